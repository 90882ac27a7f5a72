# Unit tests of the remediation approval policy (see ../deploy/deploy_test.rego for the form).
package autoecoops.autoops.remediation_test

import rego.v1

cases := [
	{
		"name": "an automated staging rollback runs without a human",
		"query": "autoecoops/autoops/remediation/decision",
		"input": {"automated": true, "dry_run": false, "actions": ["ROLLBACK"], "labels": {"environment": "staging"}},
		"want": {"required": false, "reason": ""},
	},
	{
		"name": "an automated production rollback waits",
		"query": "autoecoops/autoops/remediation/required",
		"input": {"automated": true, "dry_run": false, "actions": ["ROLLBACK"], "labels": {"environment": "production"}},
		"want": true,
	},
	{
		"name": "a runbook asking for approval gets it asked",
		"query": "autoecoops/autoops/remediation/decision",
		"input": {"automated": false, "dry_run": false, "requires_approval": true, "actions": ["WEBHOOK"], "labels": {}},
		"want": {"required": true, "reason": "the runbook requires approval"},
	},
	{
		"name": "a dry run never waits",
		"query": "autoecoops/autoops/remediation/required",
		"input": {"automated": true, "dry_run": true, "requires_approval": true, "actions": ["SCALE"], "labels": {}},
		"want": false,
	},
]
