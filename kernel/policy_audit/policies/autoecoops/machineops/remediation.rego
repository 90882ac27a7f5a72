# Whether machine-ops may let a node's agent remediate a control (write a sysctl).
#
# Input: {"node": {"name": ..., "labels": {...}}, "baseline": ...,
#         "control": {"id", "kind", "key", "expected", "remediable"}, "dry_run": bool}
# Only controls marked remediable, only sysctls; a dry run is always allowed;
# a node labelled remediation=disabled is never changed; nodes labelled
# environment=production need remediation=allowed as well.
package autoecoops.machineops.remediation

import rego.v1

default allow := false

allow if {
	input.control.remediable
	input.control.kind == "CHECK_KIND_SYSCTL"
	input.dry_run
}

allow if {
	input.control.remediable
	input.control.kind == "CHECK_KIND_SYSCTL"
	not input.node.labels.remediation == "disabled"
	not input.node.labels.environment == "production"
}

allow if {
	input.control.remediable
	input.control.kind == "CHECK_KIND_SYSCTL"
	input.node.labels.environment == "production"
	input.node.labels.remediation == "allowed"
}
