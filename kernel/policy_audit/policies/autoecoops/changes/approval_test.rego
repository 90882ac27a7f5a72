# Unit tests of the approval policy (see deploy_test.rego for the form).
package autoecoops.changes.approval_test

import rego.v1

cases := [
	{
		"name": "a low-risk staging change needs no approval",
		"query": "autoecoops/changes/approval",
		"input": {"target": {"environment": "staging"}, "change": {"risk": "low", "kind": "Deployment"}},
		"includes_keys": {"required": false, "satisfied": true},
	},
	{
		"name": "RBAC changes need approval in every environment",
		"query": "autoecoops/changes/approval/required",
		"input": {"target": {"environment": "development"}, "change": {"kind": "ClusterRoleBinding"}},
		"want": true,
	},
	{
		"name": "a high-risk change with the author and one other approver is not enough",
		"query": "autoecoops/changes/approval/satisfied",
		"input": {"target": {"environment": "staging"}, "change": {"author": "a", "approvers": ["a", "b"], "risk": "high"}},
		"want": false,
	},
	{
		"name": "a high-risk change with two independent approvers is",
		"query": "autoecoops/changes/approval/satisfied",
		"input": {"target": {"environment": "staging"}, "change": {"author": "a", "approvers": ["b", "c"], "risk": "high"}},
		"want": true,
	},
	{
		"name": "what is missing is spelled out",
		"query": "autoecoops/changes/approval/missing",
		"input": {"target": {"environment": "production"}, "change": {"author": "a", "approvers": [], "risk": "low"}},
		"want": "this change needs 1 approval(s) from someone other than its author; it has 0",
	},
]
