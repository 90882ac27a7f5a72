# Unit tests of the deploy policy, as a table: each case sets `input`,
# queries `query` and expects `want` (exact) or `includes` (members of a
# set or array result). Run by `autoecoops policy test` and in CI. Cases
# rather than `test_*` rules with `with input as ...`: rego-cpp 1.5 crashes
# on `with`, so the runner sets the input itself.
package autoecoops.deploy_test

import rego.v1

alice := {"sub": "alice", "roles": ["developer"], "groups": ["team-web"]}

bob := {"sub": "bob", "roles": ["deployer"], "groups": ["team-web"]}

carol := {"sub": "carol", "roles": ["platform-admin"], "groups": []}

cases := [
	{
		"name": "an owner with the developer role deploys to staging",
		"query": "autoecoops/deploy/allow",
		"input": {"identity": alice, "target": {"environment": "staging", "namespace": "web"}},
		"want": true,
	},
	{
		"name": "a developer may not deploy to production, approved or not",
		"query": "autoecoops/deploy/allow",
		"input": {
			"identity": alice,
			"target": {"environment": "production", "namespace": "web"},
			"change": {"author": "alice", "approvers": ["dave"], "risk": "low"},
		},
		"want": false,
	},
	{
		"name": "someone outside the owning group is refused, with the reason",
		"query": "autoecoops/deploy/reasons",
		"input": {
			"identity": {"sub": "eve", "roles": ["developer"], "groups": ["team-payments"]},
			"target": {"environment": "staging", "namespace": "web"},
		},
		"includes": ["eve is not in a group that owns namespace \"web\""],
	},
	{
		"name": "a deployer's self-approval does not count for production",
		"query": "autoecoops/deploy/allow",
		"input": {
			"identity": bob,
			"target": {"environment": "production", "namespace": "web"},
			"change": {"author": "bob", "approvers": ["bob"], "risk": "low"},
		},
		"want": false,
	},
	{
		"name": "a deployer with an independent approval deploys to production",
		"query": "autoecoops/deploy/allow",
		"input": {
			"identity": bob,
			"target": {"environment": "production", "namespace": "web"},
			"change": {"author": "bob", "approvers": ["alice"], "risk": "low"},
		},
		"want": true,
	},
	{
		"name": "a platform admin deploys anywhere outside production",
		"query": "autoecoops/deploy/allow",
		"input": {"identity": carol, "target": {"environment": "staging", "namespace": "payments"}},
		"want": true,
	},
	{
		"name": "a platform admin still needs approval in production",
		"query": "autoecoops/deploy/decision",
		"input": {
			"identity": carol,
			"target": {"environment": "production", "namespace": "payments"},
			"change": {"author": "carol", "approvers": []},
		},
		"want": {"allow": false, "reasons": ["this change needs 1 approval(s) from someone other than its author; it has 0"]},
	},
	{
		"name": "an unknown namespace is named",
		"query": "autoecoops/deploy/reasons",
		"input": {"identity": alice, "target": {"environment": "staging", "namespace": "nope"}},
		"includes": ["unknown namespace \"nope\""],
	},
]
