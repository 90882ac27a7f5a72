# Unit tests of machine-ops' remediation policy (see ../deploy/deploy_test.rego for the form).
package autoecoops.machineops.remediation_test

import rego.v1

sysctl := {"id": "sysctl-01", "kind": "CHECK_KIND_SYSCTL", "key": "net.ipv4.ip_forward", "expected": "0", "remediable": true}

cases := [
	{
		"name": "a remediable sysctl on a lab node is allowed",
		"query": "autoecoops/machineops/remediation/allow",
		"input": {"node": {"labels": {"zone": "lab"}}, "control": sysctl, "dry_run": false},
		"want": true,
	},
	{
		"name": "a node that opted out is never changed",
		"query": "autoecoops/machineops/remediation/allow",
		"input": {"node": {"labels": {"remediation": "disabled"}}, "control": sysctl, "dry_run": false},
		"want": false,
	},
	{
		"name": "production needs an explicit opt-in",
		"query": "autoecoops/machineops/remediation/allow",
		"input": {"node": {"labels": {"environment": "production"}}, "control": sysctl, "dry_run": false},
		"want": false,
	},
	{
		"name": "a dry run is always allowed",
		"query": "autoecoops/machineops/remediation/allow",
		"input": {"node": {"labels": {"environment": "production"}}, "control": sysctl, "dry_run": true},
		"want": true,
	},
	{
		"name": "a control not marked remediable is refused",
		"query": "autoecoops/machineops/remediation/allow",
		"input": {"node": {"labels": {}}, "control": object.union(sysctl, {"remediable": false}), "dry_run": true},
		"want": false,
	},
]
