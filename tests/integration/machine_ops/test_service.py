"""machine-ops on the real mesh: enrollment, sessions, evaluation, inventory, nodes."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2, status_pb2

from autoecoops.kernel.mesh.errors import STATUS_DETAILS_KEY
from autoecoops.kernel.mesh.server import Mesh
from autoecoops.machineops.v1 import machineops_pb2 as pb
from tests.integration.machine_ops.conftest import enroll_token, stub


def details(err: grpc.aio.AioRpcError) -> tuple[str, list[str]]:
    raw = dict(err.trailing_metadata() or ())[STATUS_DETAILS_KEY]
    reason, fields = "", []
    for d in status_pb2.Status.FromString(raw).details:
        info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        if d.Unpack(info):
            reason = info.reason
        elif d.Unpack(bad):
            fields = [v.field for v in bad.field_violations]
    return reason, fields


def truth_sysctl(key: str) -> str | None:
    path = Path("/proc/sys") / key.replace(".", "/")
    try:
        return " ".join(path.read_text().split())
    except FileNotFoundError:
        return None


async def test_enroll_evaluate_matches_what_the_machine_says(
    mesh: Mesh, admin, start_agent
) -> None:
    mo = stub(mesh)
    secret = await enroll_token(mo, admin, "edge-1", {"zone": "edge"})
    agent = await start_agent(mesh, "edge-1", secret, evaluate_interval=0, inventory_interval=3600)
    node = (await mo.GetNode(pb.GetNodeRequest(name="nodes/edge-1"), metadata=admin)).node
    assert node.connected and node.identity == "node.edge-1"
    assert node.labels["zone"] == "edge"
    assert "baselines/linux-hardening" in node.baselines

    reply = await mo.EvaluateNode(
        pb.EvaluateNodeRequest(name="nodes/edge-1", request_id="r1"), metadata=admin, timeout=60
    )
    ev = reply.evaluation
    builtin = (
        await mo.GetBaseline(
            pb.GetBaselineRequest(name="baselines/linux-hardening"), metadata=admin
        )
    ).baseline
    assert len(builtin.controls) >= 30
    assert len(ev.results) == len(builtin.controls)
    by_id = {r.control_id: r for r in ev.results}
    checked = 0
    for c in builtin.controls:
        r = by_id[c.id]
        if c.check.kind == pb.CHECK_KIND_SYSCTL:
            value = truth_sysctl(c.check.key)
            if value is None:
                assert r.status == pb.RESULT_STATUS_FAIL and r.observed == "(absent)"
            else:
                assert r.observed == value
                import re

                ok = (
                    value == c.check.expected
                    if c.check.operator == pb.OPERATOR_UNSPECIFIED
                    else bool(re.search(c.check.expected, value))
                )
                assert r.status == (pb.RESULT_STATUS_PASS if ok else pb.RESULT_STATUS_FAIL), c.id
            checked += 1
        elif c.check.kind == pb.CHECK_KIND_FILE_MODE and Path(c.check.key).exists():  # noqa: ASYNC240
            mode = stat.S_IMODE(os.stat(c.check.key).st_mode)
            assert r.observed == f"{mode:04o}"
            ok = mode & ~int(c.check.expected, 8) == 0
            assert r.status == (pb.RESULT_STATUS_PASS if ok else pb.RESULT_STATUS_FAIL), c.id
            checked += 1
    assert checked >= 25
    assert ev.passed + ev.failed + ev.errored + ev.skipped == len(ev.results)
    assert ev.score == pytest.approx(round(100 * ev.passed / (ev.passed + ev.failed), 2))

    # A retry with the same request id returns the same evaluation, without a new one.
    again = await mo.EvaluateNode(
        pb.EvaluateNodeRequest(name="nodes/edge-1", request_id="r1"), metadata=admin
    )
    assert again.evaluation.name == ev.name
    listed = await mo.ListEvaluations(
        pb.ListEvaluationsRequest(parent="nodes/edge-1"), metadata=admin
    )
    assert [e.name for e in listed.evaluations] == [ev.name]

    node = (await mo.GetNode(pb.GetNodeRequest(name="nodes/edge-1"), metadata=admin)).node
    assert node.compliance_score == pytest.approx(ev.score)
    assert node.last_evaluation == ev.name
    report = (
        await mo.ExportPolicyReport(
            pb.ExportPolicyReportRequest(name="nodes/edge-1"), metadata=admin
        )
    ).report
    assert report["kind"] == "PolicyReport" and report["apiVersion"] == "wgpolicyk8s.io/v1alpha2"
    assert report["summary"]["pass"] == ev.passed and report["summary"]["fail"] == ev.failed
    group = await mo.GetGroupCompliance(
        pb.GetGroupComplianceRequest(label_selector="zone=edge"), metadata=admin
    )
    assert group.nodes == 1 and group.score == pytest.approx(ev.score)
    assert agent.sessions == 1


async def test_inventory_and_search(mesh: Mesh, admin, start_agent) -> None:
    mo = stub(mesh)
    secret = await enroll_token(mo, admin, "inv-1", {"role": "db"})
    await start_agent(mesh, "inv-1", secret, evaluate_interval=0, inventory_interval=3600)
    for _ in range(100):
        inv = (
            await mo.GetInventory(
                pb.GetInventoryRequest(name="nodes/inv-1/inventory"), metadata=admin
            )
        ).inventory
        if inv.tables:
            break
        await asyncio.sleep(0.1)
    refreshed = (
        await mo.RefreshInventory(
            pb.RefreshInventoryRequest(name="nodes/inv-1/inventory"), metadata=admin, timeout=60
        )
    ).inventory
    assert {t.name for t in refreshed.tables} >= {"system_info", "os_version", "kernel_info"}
    assert refreshed.collect_time.ToNanoseconds() >= inv.collect_time.ToNanoseconds()
    tables = {t.name: t for t in inv.tables}
    node = (await mo.GetNode(pb.GetNodeRequest(name="nodes/inv-1"), metadata=admin)).node
    assert node.kernel_version == os.uname().release
    assert {
        "system_info",
        "os_version",
        "kernel_info",
        "memory_info",
        "mounts",
        "interface_addresses",
        "listening_ports",
    } <= set(tables)
    assert tables["kernel_info"].rows[0].columns["version"] == os.uname().release
    osv = tables["os_version"].rows[0].columns["version"]
    hit = await mo.SearchNodes(
        pb.SearchNodesRequest(filter=f"os.version = {osv}", label_selector="role=db"),
        metadata=admin,
    )
    assert [n.name for n in hit.nodes] == ["nodes/inv-1"]
    miss = await mo.SearchNodes(pb.SearchNodesRequest(filter=f"os.version < {osv}"), metadata=admin)
    assert not miss.nodes
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mo.SearchNodes(pb.SearchNodesRequest(filter="os.version <<< 12"), metadata=admin)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(err.value) == ("INVALID_FILTER", ["filter"])


async def test_enrollment_secret_is_single_use_and_revocable(mesh: Mesh, admin) -> None:
    mo = stub(mesh)
    secret = await enroll_token(mo, admin, "once")
    first = await mo.EnrollAgent(pb.EnrollAgentRequest(node_id="once", secret=secret))
    assert first.client_id == "node.once" and first.client_secret
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mo.EnrollAgent(pb.EnrollAgentRequest(node_id="once", secret=secret))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert details(err.value)[0] == "TOKEN_USED"

    secret2 = await enroll_token(mo, admin, "revoked")
    await mo.RevokeEnrollmentToken(
        pb.RevokeEnrollmentTokenRequest(name="enrollmentTokens/tok-revoked"), metadata=admin
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mo.EnrollAgent(pb.EnrollAgentRequest(node_id="revoked", secret=secret2))
    assert details(err.value)[0] == "TOKEN_REVOKED"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mo.EnrollAgent(pb.EnrollAgentRequest(node_id="once", secret="tok-once.wrong"))
    assert details(err.value)[0] == "ENROLLMENT_DENIED"


async def test_nodes_update_with_etag_and_delete(mesh: Mesh, admin) -> None:
    mo = stub(mesh)
    secret = await enroll_token(mo, admin, "n1", {"a": "1"})
    node = (await mo.EnrollAgent(pb.EnrollAgentRequest(node_id="n1", secret=secret))).node
    updated = (
        await mo.UpdateNode(
            pb.UpdateNodeRequest(
                node=pb.Node(name="nodes/n1", labels={"b": "2"}, etag=node.etag),
                update_mask=field_mask_pb2.FieldMask(paths=["labels.b"]),
            ),
            metadata=admin,
        )
    ).node
    assert dict(updated.labels) == {"a": "1", "b": "2"} and updated.etag != node.etag
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mo.UpdateNode(
            pb.UpdateNodeRequest(node=pb.Node(name="nodes/n1", labels={}, etag=node.etag)),
            metadata=admin,
        )
    assert err.value.code() == grpc.StatusCode.ABORTED
    listed = await mo.ListNodes(pb.ListNodesRequest(label_selector="b in (2,3),a"), metadata=admin)
    assert [n.name for n in listed.nodes] == ["nodes/n1"]
    await mo.DeleteNode(pb.DeleteNodeRequest(name="nodes/n1"), metadata=admin)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mo.GetNode(pb.GetNodeRequest(name="nodes/n1"), metadata=admin)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_evaluate_without_agent_is_unavailable(mesh: Mesh, admin) -> None:
    mo = stub(mesh)
    secret = await enroll_token(mo, admin, "off")
    await mo.EnrollAgent(pb.EnrollAgentRequest(node_id="off", secret=secret))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mo.EvaluateNode(pb.EvaluateNodeRequest(name="nodes/off"), metadata=admin)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert details(err.value)[0] == "AGENT_NOT_CONNECTED"


async def test_node_tokens_rotate_a_session_never_outlives_its_token(
    start_mesh, monkeypatch: pytest.MonkeyPatch, mint_token, start_agent
) -> None:
    monkeypatch.setenv("AUTOECOOPS_AUTH_TOKEN_TTL_SECONDS", "2")
    monkeypatch.setenv("AUTOECOOPS_MACHINEOPS_HEARTBEAT_SECONDS", "0.5")
    mesh = await start_mesh(
        ["auth-service", "policy-audit", "event-bus", "machine-ops"], secure=True
    )
    admin = [("authorization", f"Bearer {mint_token('alice', ['admin'])}")]
    mo = stub(mesh)
    secret = await enroll_token(mo, admin, "rot")
    agent = await start_agent(mesh, "rot", secret, evaluate_interval=0, inventory_interval=0)
    first = agent._token[0]
    for _ in range(100):
        if agent.sessions >= 3:
            break
        await asyncio.sleep(0.1)
    assert agent.sessions >= 3  # each session ended when its 2 s token expired
    await asyncio.wait_for(agent.connected.wait(), 10)
    assert agent._token[0] != first
    reply = await mo.EvaluateNode(
        pb.EvaluateNodeRequest(name="nodes/rot", control_ids=["sysctl-01"]),
        metadata=admin,
        timeout=30,
    )
    assert [r.control_id for r in reply.evaluation.results] == ["sysctl-01"]
