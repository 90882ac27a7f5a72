# Which changes need approval, and whether they have it.
#
# Input: {"target": {"environment": ...}, "change": {"author": ..., "approvers": [...],
#         "risk": "low"|"medium"|"high", "kind": ...}}
# Approvals by the change's own author never count.
package autoecoops.changes.approval

import rego.v1

sensitive_kinds := {"RoleBinding", "ClusterRoleBinding", "NetworkPolicy", "PodSecurityPolicy", "Secret"}

default required := false

required if input.target.environment == "production"

required if input.change.risk == "high"

required if input.change.kind in sensitive_kinds

default needed := 0

needed := 2 if {
	required
	input.change.risk == "high"
}

# `not ... ==` rather than `!=`, so a change with no risk stated still needs one.
needed := 1 if {
	required
	not input.change.risk == "high"
}

approvals := {a | some a in input.change.approvers; a != input.change.author}

default satisfied := false

satisfied if count(approvals) >= needed

missing := sprintf("this change needs %d approval(s) from someone other than its author; it has %d", [needed, count(approvals)]) if {
	not satisfied
}
