# Whether a self-healing remediation of Platform-01 (autoops) waits for a human.
#
# Input: {"runbook": ..., "target": ..., "automated": bool, "dry_run": bool,
#         "requires_approval": bool, "actions": ["ROLLBACK", ...],
#         "labels": {...the alerting SLO's labels, e.g. "environment"}}
# A dry run never waits; a runbook that asks for approval always does; an
# automated scale-down or a rollback in production waits for a human.
package autoecoops.autoops.remediation

import rego.v1

disruptive := {"SCALE"}

default required := false

required if {
	not input.dry_run
	input.requires_approval
}

required if {
	not input.dry_run
	input.automated
	some a in input.actions
	a in disruptive
}

required if {
	not input.dry_run
	input.automated
	input.labels.environment == "production"
	"ROLLBACK" in input.actions
}

reason := "the runbook requires approval" if {
	required
	input.requires_approval
} else := "an automated rollback in production needs a human" if {
	required
	input.labels.environment == "production"
} else := "an automated scale needs a human" if {
	required
} else := ""

decision := {"required": required, "reason": reason}
