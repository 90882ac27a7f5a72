# Who may deploy where.
#
# Input: {"identity": {...verified claims, set by policy-audit...},
#         "target": {"environment": ..., "namespace": ...},
#         "change": {"author": ..., "approvers": [...], "risk": ..., "kind": ...}}
# Query data.autoecoops.deploy.decision for {"allow": bool, "reasons": [...]}.
package autoecoops.deploy

import rego.v1

default allow := false

env := input.target.environment

namespace := input.target.namespace

roles := {r | some r in input.identity.roles}

groups := {g | some g in input.identity.groups}

admin if {
	some r in data.autoecoops.deploy.admin_roles
	r in roles
}

owner if {
	some g in data.autoecoops.deploy.namespaces[namespace].owners
	g in groups
}

may_deploy_to_env if {
	some r in data.autoecoops.deploy.deploy_roles[env]
	r in roles
}

# Platform admins deploy anywhere, but production changes still need approval.
allow if {
	admin
	env != "production"
}

allow if {
	admin
	env == "production"
	data.autoecoops.changes.approval.satisfied
}

# Owners of a namespace deploy to it with a role allowed in the environment;
# production also needs its approvals.
allow if {
	owner
	may_deploy_to_env
	env != "production"
}

allow if {
	owner
	may_deploy_to_env
	env == "production"
	data.autoecoops.changes.approval.satisfied
}

reasons contains msg if {
	not env in {e | some e in data.autoecoops.deploy.environments}
	msg := sprintf("unknown environment \"%s\"", [env])
}

reasons contains msg if {
	not data.autoecoops.deploy.namespaces[namespace]
	msg := sprintf("unknown namespace \"%s\"", [namespace])
}

reasons contains msg if {
	data.autoecoops.deploy.namespaces[namespace]
	not owner
	not admin
	msg := sprintf("%s is not in a group that owns namespace \"%s\"", [input.identity.sub, namespace])
}

reasons contains msg if {
	not may_deploy_to_env
	not admin
	msg := sprintf("%s has no role that may deploy to %s", [input.identity.sub, env])
}

reasons contains msg if {
	env == "production"
	not data.autoecoops.changes.approval.satisfied
	msg := data.autoecoops.changes.approval.missing
}

decision := {"allow": allow, "reasons": reasons}
