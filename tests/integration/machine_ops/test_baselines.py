"""Baselines over gRPC, drift between evaluations, events on the bus and the audit trail."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from autoecoops.audit.v1 import audit_pb2, audit_pb2_grpc
from autoecoops.events.v1 import events_pb2, events_pb2_grpc
from autoecoops.kernel.mesh.server import Mesh
from autoecoops.machineops.v1 import events_pb2 as mo_events
from autoecoops.machineops.v1 import machineops_pb2 as pb
from tests.integration.machine_ops.conftest import enroll_token, stub
from tests.integration.machine_ops.test_service import details

IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


def content_control(path: Path) -> pb.Control:
    return pb.Control(
        id="motd-ok",
        title="the file says ok",
        impact=0.8,
        tags=["custom:1"],
        check=pb.Check(kind=pb.CHECK_KIND_FILE_CONTENT, key=str(path), expected="^ok$"),
    )


async def test_baseline_crud_versions_etags_and_bad_input(
    mesh: Mesh, admin, tmp_path: Path
) -> None:
    mo = stub(mesh)
    b = (
        await mo.CreateBaseline(
            pb.CreateBaselineRequest(
                baseline_id="custom",
                baseline=pb.Baseline(
                    title="t", node_selector="zone=lab", controls=[content_control(tmp_path / "f")]
                ),
                request_id="c1",
            ),
            metadata=admin,
        )
    ).baseline
    assert (b.name, b.version) == ("baselines/custom", 1)
    assert b.controls[0].severity == 4  # impact 0.8 -> high
    again = await mo.CreateBaseline(
        pb.CreateBaselineRequest(baseline_id="custom", baseline=pb.Baseline(), request_id="c1"),
        metadata=admin,
    )
    assert again.baseline == b
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mo.CreateBaseline(
            pb.CreateBaselineRequest(baseline_id="custom", baseline=pb.Baseline()), metadata=admin
        )
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS

    up = (
        await mo.UpdateBaseline(
            pb.UpdateBaselineRequest(
                baseline=pb.Baseline(name=b.name, etag=b.etag, node_selector="zone in (lab,edge)"),
                update_mask=field_mask_pb2.FieldMask(paths=["node_selector"]),
            ),
            metadata=admin,
        )
    ).baseline
    assert up.version == 2 and up.node_selector == "zone in (lab,edge)" and len(up.controls) == 1
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mo.UpdateBaseline(
            pb.UpdateBaselineRequest(
                baseline=pb.Baseline(name=b.name, etag=b.etag, title="x"),
                update_mask=field_mask_pb2.FieldMask(paths=["title"]),
            ),
            metadata=admin,
        )
    assert err.value.code() == grpc.StatusCode.ABORTED

    bad = pb.Control(
        id="x",
        impact=3,
        check=pb.Check(kind=pb.CHECK_KIND_FILE_MODE, key="etc/passwd", expected="999"),
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mo.CreateBaseline(
            pb.CreateBaselineRequest(baseline_id="bad", baseline=pb.Baseline(controls=[bad])),
            metadata=admin,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reason, fields = details(err.value)
    assert reason == "INVALID_CONTROL"
    assert set(fields) == {
        "baseline.controls[0].impact",
        "baseline.controls[0].check.key",
        "baseline.controls[0].check.expected",
    }
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mo.CreateBaseline(
            pb.CreateBaselineRequest(baseline_id="Bad_Id", baseline=pb.Baseline()), metadata=admin
        )
    assert details(err.value) == ("INVALID_ID", ["baseline_id"])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mo.GetBaseline(pb.GetBaselineRequest(name="custom"), metadata=admin)
    assert details(err.value) == ("INVALID_NAME", ["name"])

    imported = (
        await mo.ImportBaseline(
            pb.ImportBaselineRequest(
                baseline_id="custom",
                yaml="- id: fwd\n  kernel_parameter: {name: net.ipv4.ip_forward, value: 0}\n",
            ),
            metadata=admin,
        )
    ).baseline
    assert imported.version == 3 and [c.id for c in imported.controls] == ["fwd"]
    listed = await mo.ListBaselines(pb.ListBaselinesRequest(page_size=1), metadata=admin)
    assert len(listed.baselines) == 1 and listed.next_page_token
    await mo.DeleteBaseline(pb.DeleteBaselineRequest(name="baselines/custom"), metadata=admin)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mo.GetBaseline(pb.GetBaselineRequest(name="baselines/custom"), metadata=admin)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_drift_and_violations_reach_the_bus_and_the_trail(
    mesh: Mesh, admin, start_agent, tmp_path: Path
) -> None:
    mo = stub(mesh)
    target = tmp_path / "motd"
    target.write_text("ok\n")
    await mo.CreateBaseline(
        pb.CreateBaselineRequest(
            baseline_id="custom",
            baseline=pb.Baseline(node_selector="zone=lab", controls=[content_control(target)]),
        ),
        metadata=admin,
    )
    secret = await enroll_token(mo, admin, "lab-1", {"zone": "lab"})
    await start_agent(mesh, "lab-1", secret, evaluate_interval=0, inventory_interval=0)
    req = pb.EvaluateNodeRequest(name="nodes/lab-1", baselines=["baselines/custom"])
    first = (await mo.EvaluateNode(req, metadata=admin, timeout=30)).evaluation
    assert [(r.control_id, r.status) for r in first.results] == [("motd-ok", pb.RESULT_STATUS_PASS)]
    target.write_text("tampered\n")
    second = (await mo.EvaluateNode(req, metadata=admin, timeout=30)).evaluation
    assert second.results[0].status == pb.RESULT_STATUS_FAIL and second.score == 0.0
    (d,) = second.drift
    assert (d.control_id, d.previous_status, d.status) == (
        "motd-ok",
        pb.RESULT_STATUS_PASS,
        pb.RESULT_STATUS_FAIL,
    )

    bus = events_pb2_grpc.EventBusServiceStub(
        grpc.aio.insecure_channel(mesh.config.addr("event-bus"))
    )
    call = bus.Subscribe(
        events_pb2.SubscribeRequest(
            topic="machineops.compliance",
            group="t",
            consumer="c",
            start_position=events_pb2.START_POSITION_EARLIEST,
        ),
        metadata=admin,
    )
    got = []
    async for reply in call:
        got.append(reply.delivery.envelope)
        if len(got) == 2:
            break
    call.cancel()
    assert [e.type for e in got] == [
        "autoecoops.machineops.baseline.violated",
        "autoecoops.machineops.node.drifted",
    ]
    violated, drifted = mo_events.BaselineViolated(), mo_events.NodeDriftDetected()
    got[0].data.Unpack(violated)
    got[1].data.Unpack(drifted)
    assert violated.node == "nodes/lab-1" and violated.baseline == "baselines/custom"
    assert [r.control_id for r in violated.failed] == ["motd-ok"] and violated.max_severity == 4
    assert (
        drifted.evaluation == second.name
        and drifted.previous_score == 100.0
        and drifted.score == 0.0
    )

    audit = audit_pb2_grpc.AuditServiceStub(
        grpc.aio.insecure_channel(mesh.config.addr("policy-audit"))
    )
    entries = (
        await audit.ListEntries(
            audit_pb2.ListEntriesRequest(type="machineops.evaluation"), metadata=admin
        )
    ).entries
    assert sorted(e.resource for e in entries) == sorted([first.name, second.name])
    rpc = (
        await audit.ListEntries(audit_pb2.ListEntriesRequest(type="rpc"), metadata=admin)
    ).entries
    evaluate = [e for e in rpc if e.action.endswith(".EvaluateNode")]
    assert [e.resource for e in evaluate] == ["nodes/lab-1", "nodes/lab-1"]
    assert all(e.actor.subject == "alice" for e in evaluate)


async def test_remediation_needs_a_remediable_control_and_a_policy_yes(
    mesh: Mesh, admin, start_agent
) -> None:
    mo = stub(mesh)
    secret = await enroll_token(mo, admin, "fix-1", {"remediation": "disabled"})
    await start_agent(mesh, "fix-1", secret, evaluate_interval=0, inventory_interval=0)
    before = IP_FORWARD.read_text().strip()  # noqa: ASYNC240

    # A dry run is allowed everywhere: the agent reports what it would change, changing nothing.
    dry = await mo.RemediateNode(
        pb.RemediateNodeRequest(
            name="nodes/fix-1",
            baseline="baselines/linux-hardening",
            control_id="sysctl-01",
            dry_run=True,
        ),
        metadata=admin,
        timeout=30,
    )
    assert dry.decision_id and dry.result.status == pb.COMMAND_STATUS_SUCCEEDED
    assert dry.result.output["before"] == before and dry.result.output["changed"] is False
    assert IP_FORWARD.read_text().strip()  # noqa: ASYNC240 == before

    # The node opted out: policy-audit says no, the agent is never asked.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mo.RemediateNode(
            pb.RemediateNodeRequest(
                name="nodes/fix-1", baseline="baselines/linux-hardening", control_id="sysctl-01"
            ),
            metadata=admin,
        )
    assert (
        err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        and details(err.value)[0] == "POLICY_DENIED"
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mo.RemediateNode(
            pb.RemediateNodeRequest(
                name="nodes/fix-1",
                baseline="baselines/linux-hardening",
                control_id="file-01",
                dry_run=True,
            ),
            metadata=admin,
        )
    assert (
        err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        and details(err.value)[0] == "NOT_REMEDIABLE"
    )
    assert IP_FORWARD.read_text().strip()  # noqa: ASYNC240 == before
