"""autoops under `autoecoops up`, driven as docs/autoops.md shows: grpcurl, REST through
the gateway and the `autoecoops slo` CLI against one running mesh."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from tests.e2e.conftest import RunningMesh

SPEC = """
apiVersion: openslo/v1
kind: SLO
metadata: {name: api-availability}
spec:
  service: api
  indicator:
    metadata: {name: api-errors}
    spec:
      ratioMetric:
        counter: true
        good: {metricSource: {type: AutoEcoOpsPushed, spec: {}}}
        total: {metricSource: {type: AutoEcoOpsPushed, spec: {}}}
  timeWindow: [{duration: 7d, isRolling: true}]
  budgetingMethod: Occurrences
  objectives: [{target: 0.99}]
"""


def test_slos_over_grpcurl_rest_and_the_cli(mesh: RunningMesh, tmp_path: Path) -> None:
    token = mesh.cli("token", "--subject", "alice", "--roles", "admin").strip()
    auth = ("-H", f"authorization: Bearer {token}")
    svc = "autoecoops.autoops.v1.AutoOpsService"
    created = mesh.grpcurl(
        "autoops",
        f"{svc}/CreateSlo",
        data={
            "slo_id": "checkout",
            "request_id": "b1c7",
            "slo": {
                "service": "checkout",
                "objective": 0.999,
                "indicator": {"source": "SLI_SOURCE_PUSHED", "ratio": {}},
                "time_window": {"rolling": "2592000s"},
                "owner": "team-payments",
            },
        },
        flags=auth,
    )
    assert json.loads(created.stdout)["slo"]["name"] == "slos/checkout"
    mesh.grpcurl(
        "autoops",
        f"{svc}/RecordSli",
        data={
            "slo": "slos/checkout",
            "request_id": "batch-1",
            "samples": [{"good_count": 950, "total_count": 1000}],
        },
        flags=auth,
    )
    budget = json.loads(
        mesh.grpcurl(
            "autoops", f"{svc}/GetErrorBudget", data={"slo": "slos/checkout"}, flags=auth
        ).stdout
    )
    # grpcurl prints proto field names
    assert budget["error_budget"]["total_count"] == "1000", budget
    assert budget["error_budget"]["status"] == "ERROR_BUDGET_STATUS_EXHAUSTED"

    base = f"http://127.0.0.1:{mesh.env['AUTOECOOPS_GATEWAY_PORT']}"
    headers = {"Authorization": f"Bearer {token}"}
    got = httpx.get(f"{base}/v1/autoops/slos/checkout/errorBudget", headers=headers, timeout=10)
    assert got.status_code == 200 and got.json()["errorBudget"]["goodCount"] == "950"
    missing = httpx.get(f"{base}/v1/autoops/slos/nope", headers=headers, timeout=10)
    assert missing.status_code == 404
    made = httpx.post(
        f"{base}/v1/autoops/slos",
        params={"slo_id": "rest-made"},
        headers=headers,
        timeout=10,
        json={"service": "web", "objective": 0.99, "indicator": {"ratio": {}}},
    )
    assert made.status_code == 200, made.text
    assert made.json()["slo"]["name"] == "slos/rest-made"

    spec = tmp_path / "slo.yaml"
    spec.write_text(SPEC)
    env_token = {"AUTOECOOPS_TOKEN": token}
    mesh.env.update(env_token)
    assert "slos/api-availability applied" in mesh.cli("slo", "apply", "-f", str(spec))
    listed = mesh.cli("slo", "list")
    assert "slos/checkout" in listed and "slos/api-availability" in listed
    assert "slos/api-availability: NO_DATA" in mesh.cli("slo", "budget", "-f", str(spec))
