# Whether an artifact may be used: IAOps's supply-chain gate over an
# artifact's verification (signatures, provenance) and its SBOM scan.
#
# Input: {"artifact": {"ref", "repository", "registry", "digest"},
#         "verification": {"verified", "signed", "key_id", "failed_checks", "provenance"},
#         "scan": {"present", "vulnerabilities": [{"id", "purl", "severity", "fixed_versions"}]}}
# Query data.autoecoops.supplychain.decision for {"allow": bool, "reasons": [...]}.
package autoecoops.supplychain

import rego.v1

default allow := false

signature_required if {
	some prefix in data.autoecoops.supplychain.signed_repositories
	startswith(input.artifact.repository, prefix)
}

reasons contains msg if {
	not input.verification.verified
	msg := concat("", ["verification failed: ", concat(", ", input.verification.failed_checks)])
}

reasons contains msg if {
	signature_required
	not input.verification.signed
	msg := concat("", [input.artifact.repository, " requires a valid signature"])
}

reasons contains msg if {
	data.autoecoops.supplychain.sbom_required
	not input.scan.present
	msg := "an SBOM is required"
}

# A vulnerability at a blocking severity blocks, fixed upstream or not: with
# a fix the remedy is to upgrade, without one it is to wait or to mitigate.
reasons contains msg if {
	some v in input.scan.vulnerabilities
	v.severity in {s | some s in data.autoecoops.supplychain.blocking_severities}
	count(v.fixed_versions) > 0
	msg := concat("", [v.purl, ": ", v.severity, " vulnerability ", v.id, ", fixed in ", concat(", ", v.fixed_versions)])
}

reasons contains msg if {
	some v in input.scan.vulnerabilities
	v.severity in {s | some s in data.autoecoops.supplychain.blocking_severities}
	count(v.fixed_versions) == 0
	msg := concat("", [v.purl, ": ", v.severity, " vulnerability ", v.id, ", no fix available"])
}

allow if count(reasons) == 0

decision := {"allow": allow, "reasons": reasons}
