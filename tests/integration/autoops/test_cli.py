"""``autoecoops slo apply|get|list|budget|rules`` as a user runs it, against the real platform."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import yaml

from autoecoops.kernel.mesh.server import Mesh
from tests.conftest import MintToken

BIN = Path(sys.executable).parent / "autoecoops"

SPEC = """
apiVersion: openslo/v1
kind: SLO
metadata: {name: checkout-availability, displayName: Checkout availability}
spec:
  service: checkout
  description: Checkout answers without server errors
  indicator:
    metadata: {name: checkout-errors}
    spec:
      ratioMetric:
        counter: true
        good: {metricSource: {type: AutoEcoOpsPushed, spec: {}}}
        total: {metricSource: {type: AutoEcoOpsPushed, spec: {}}}
  timeWindow: [{duration: 28d, isRolling: true}]
  budgetingMethod: Occurrences
  objectives: [{displayName: ok, target: 0.999}]
"""


async def cli(mesh: Mesh, token: str, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOECOOPS_")}
    env["AUTOECOOPS_AUTOOPS_ADDR"] = mesh.config.addr("autoops")
    env["AUTOECOOPS_TOKEN"] = token
    proc = await asyncio.create_subprocess_exec(
        str(BIN), *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_apply_get_list_budget_rules(
    mesh: Mesh, mint_token: MintToken, tmp_path: Path
) -> None:
    token = mint_token("alice", ["admin"])
    spec = tmp_path / "slo.yaml"
    spec.write_text(SPEC)
    code, out, err = await cli(mesh, token, "slo", "apply", "-f", str(spec))
    assert code == 0, err
    assert "slos/checkout-availability applied (objective 0.999, service checkout)" in out
    code, out, _ = await cli(mesh, token, "slo", "apply", "-f", str(spec))  # again: an update
    assert code == 0

    code, out, _ = await cli(mesh, token, "slo", "get", "checkout-availability")
    doc = yaml.safe_load(out)
    assert doc["kind"] == "SLO" and doc["spec"]["objectives"][0]["target"] == 0.999
    assert doc["spec"]["timeWindow"] == [{"duration": "28d", "isRolling": True}]

    code, out, _ = await cli(mesh, token, "slo", "get", "-f", str(spec), "-o", "json")
    assert code == 0 and '"name": "slos/checkout-availability"' in out

    code, out, _ = await cli(mesh, token, "slo", "list")
    assert code == 0 and "slos/checkout-availability" in out and "PUSHED" in out

    code, out, _ = await cli(mesh, token, "slo", "budget", "-f", str(spec))
    assert code == 0 and "slos/checkout-availability: NO_DATA" in out

    bad = tmp_path / "bad.yaml"
    bad.write_text(SPEC.replace("target: 0.999", "target: 1.5"))
    code, _, err = await cli(mesh, token, "slo", "apply", "-f", str(bad))
    assert code == 1 and "INVALID_ARGUMENT" in err and "objective" in err

    code, _, err = await cli(mesh, token, "slo", "get", "nope")
    assert code == 1 and "NOT_FOUND" in err
