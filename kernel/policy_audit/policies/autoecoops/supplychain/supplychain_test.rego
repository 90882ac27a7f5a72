# Case table for the supply-chain gate (see deploy_test.rego for the shape).
package autoecoops.supplychain_test

import rego.v1

ok := {"verified": true, "signed": true, "failed_checks": []}

ours := {"ref": "ghcr.io/autoecoops/app:1", "repository": "ghcr.io/autoecoops/app", "registry": "ghcr.io"}

cases := [
	{
		"name": "a verified, signed artifact with a clean scan is allowed",
		"query": "autoecoops/supplychain/allow",
		"input": {"artifact": ours, "verification": ok, "scan": {"present": true, "vulnerabilities": []}},
		"want": true,
	},
	{
		"name": "a failed verification is refused with the failed checks",
		"query": "autoecoops/supplychain/reasons",
		"input": {
			"artifact": ours,
			"verification": {"verified": false, "signed": false, "failed_checks": ["signature[0]"]},
			"scan": {"present": false, "vulnerabilities": []},
		},
		"includes": ["verification failed: signature[0]", "ghcr.io/autoecoops/app requires a valid signature"],
	},
	{
		"name": "a critical vulnerability blocks, and says its fix",
		"query": "autoecoops/supplychain/reasons",
		"input": {"artifact": ours, "verification": ok, "scan": {"present": true, "vulnerabilities": [
			{"id": "GHSA-1", "purl": "pkg:pypi/a@1", "severity": "CRITICAL", "fixed_versions": ["1.1"]},
			{"id": "GHSA-2", "purl": "pkg:pypi/b@1", "severity": "HIGH", "fixed_versions": []},
		]}},
		"want": ["pkg:pypi/a@1: CRITICAL vulnerability GHSA-1, fixed in 1.1"],
	},
]
