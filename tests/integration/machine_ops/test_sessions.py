"""Sessions across replicas and outages: routing, offline buffering, exactly-once."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest

from autoecoops.kernel.mesh.server import Mesh
from autoecoops.machineops.v1 import machineops_pb2 as pb
from autoecoops.machineops.v1 import machineops_pb2_grpc
from autoecoops.platforms.machine_ops import convert
from tests.conftest import StartMesh, free_port
from tests.integration.machine_ops.conftest import enroll_token, stub

KERNEL = ["auth-service", "policy-audit", "event-bus"]


@pytest.fixture
async def kernel(start_mesh: StartMesh, monkeypatch: pytest.MonkeyPatch) -> Mesh:
    monkeypatch.setenv("AUTOECOOPS_MACHINEOPS_HEARTBEAT_SECONDS", "0.5")
    return await start_mesh(KERNEL, secure=True)


async def replica(start_mesh: StartMesh, kernel: Mesh, port: int) -> Mesh:
    cfg = dataclasses.replace(kernel.config, ports={**kernel.config.ports, "machine-ops": port})
    return await start_mesh(["machine-ops"], config=cfg, secure=True)


async def test_evaluate_reaches_the_agent_through_the_other_replica(
    start_mesh: StartMesh, kernel: Mesh, admin, start_agent
) -> None:
    a = await replica(start_mesh, kernel, free_port())
    b = await replica(start_mesh, kernel, free_port())
    secret = await enroll_token(stub(a), admin, "routed")
    await start_agent(a, "routed", secret, evaluate_interval=0, inventory_interval=0)
    via_b = stub(b)
    node = (await via_b.GetNode(pb.GetNodeRequest(name="nodes/routed"), metadata=admin)).node
    assert node.connected
    reply = await via_b.EvaluateNode(
        pb.EvaluateNodeRequest(name="nodes/routed", control_ids=["sysctl-01", "file-01"]),
        metadata=admin,
        timeout=30,
    )
    assert sorted(r.control_id for r in reply.evaluation.results) == ["file-01", "sysctl-01"]
    assert reply.evaluation.on_demand


async def test_platform_outage_buffers_and_delivers_each_result_once(
    start_mesh: StartMesh, kernel: Mesh, admin, start_agent
) -> None:
    port = free_port()
    first = await replica(start_mesh, kernel, port)
    mo = stub(first)
    secret = await enroll_token(mo, admin, "edge-off")
    agent = await start_agent(
        first, "edge-off", secret, evaluate_interval=0.3, inventory_interval=0
    )
    await asyncio.sleep(1.0)
    await first.stop(grace=0)
    for _ in range(200):  # the agent notices the outage
        if not agent.connected.is_set():
            break
        await asyncio.sleep(0.05)
    offline_start = agent.enqueued.get("evaluation", 0)
    await asyncio.sleep(2.0)  # the agent keeps evaluating into its outbox
    assert agent.enqueued["evaluation"] > offline_start
    assert len(agent.outbox) > 0
    second = await replica(start_mesh, kernel, port)
    await asyncio.wait_for(agent.connected.wait(), 40)
    agent.config.evaluate_interval = 3600  # one more at most, then quiet
    await asyncio.sleep(0.5)
    for _ in range(200):
        if len(agent.outbox) == 0:
            break
        await asyncio.sleep(0.1)
    sent = agent.enqueued["evaluation"]
    listed = await stub(second).ListEvaluations(
        pb.ListEvaluationsRequest(parent="nodes/edge-off", page_size=1000), metadata=admin
    )
    names = [e.name for e in listed.evaluations]
    assert len(names) == len(set(names))
    # Every evaluation the agent made is stored once: none lost, none twice.
    assert len(agent.outbox) == 0
    assert len(names) == sent
    assert agent.outbox.dropped == 0


async def test_a_resent_message_is_acked_as_duplicate_and_applied_once(
    start_mesh: StartMesh, kernel: Mesh, admin
) -> None:
    mesh = await replica(start_mesh, kernel, free_port())
    mo = stub(mesh)
    secret = await enroll_token(mo, admin, "dup")
    creds = await mo.EnrollAgent(pb.EnrollAgentRequest(node_id="dup", secret=secret))
    from autoecoops.auth.v1 import auth_pb2, auth_pb2_grpc

    auth = auth_pb2_grpc.AuthServiceStub(
        grpc.aio.insecure_channel(mesh.config.addr("auth-service"))
    )
    token = (
        await auth.IssueToken(
            auth_pb2.IssueTokenRequest(client_id=creds.client_id, client_secret=creds.client_secret)
        )
    ).access_token
    meta = [("authorization", f"Bearer {token}")]
    report = pb.EvaluationReport(
        results=[
            pb.ControlResult(
                baseline="baselines/linux-hardening", control_id="x", status=pb.RESULT_STATUS_PASS
            )
        ],
        evaluate_time=convert.ts(1.0),
    )

    async def session() -> list[pb.AgentSessionResponse]:
        call = mo.AgentSession(metadata=meta)
        await call.write(pb.AgentSessionRequest(hello=pb.AgentHello(node="nodes/dup", epoch="e1")))
        out = [await call.read()]
        await call.write(pb.AgentSessionRequest(sequence=1, evaluation=report))
        out.append(await call.read())
        call.cancel()
        return out

    welcome, ack = await session()
    assert welcome.welcome.applied_sequence == 0 and ack.ack == pb.Ack(sequence=1, duplicate=False)
    welcome, ack = await session()
    assert welcome.welcome.applied_sequence == 1 and ack.ack == pb.Ack(sequence=1, duplicate=True)
    listed = await mo.ListEvaluations(pb.ListEvaluationsRequest(parent="nodes/dup"), metadata=admin)
    assert len(listed.evaluations) == 1

    # Another node's identity cannot speak for this node.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        call = mo.AgentSession(metadata=admin)
        await call.write(pb.AgentSessionRequest(hello=pb.AgentHello(node="nodes/dup", epoch="e1")))
        await call.read()
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    _ = machineops_pb2_grpc


async def test_history_of_inventory_deltas_and_a_silent_agent_times_out(
    start_mesh: StartMesh, kernel: Mesh, admin
) -> None:
    mesh = await replica(start_mesh, kernel, free_port())
    mo = stub(mesh)
    secret = await enroll_token(mo, admin, "quiet")
    creds = await mo.EnrollAgent(pb.EnrollAgentRequest(node_id="quiet", secret=secret))
    from autoecoops.auth.v1 import auth_pb2, auth_pb2_grpc

    auth = auth_pb2_grpc.AuthServiceStub(
        grpc.aio.insecure_channel(mesh.config.addr("auth-service"))
    )
    token = (
        await auth.IssueToken(
            auth_pb2.IssueTokenRequest(client_id=creds.client_id, client_secret=creds.client_secret)
        )
    ).access_token
    call = mo.AgentSession(metadata=[("authorization", f"Bearer {token}")])
    await call.write(pb.AgentSessionRequest(hello=pb.AgentHello(node="nodes/quiet", epoch="e")))
    assert (await call.read()).WhichOneof("message") == "welcome"

    def delta(version: str, extra: bool) -> pb.InventoryDelta:
        rows = [pb.InventoryRow(columns={"name": "openssl", "version": version})]
        if extra:
            rows.append(pb.InventoryRow(columns={"name": "curl", "version": "7.88.1"}))
        return pb.InventoryDelta(
            tables=[
                pb.InventoryTable(name="deb_packages", rows=rows),
                pb.InventoryTable(
                    name="os_version",
                    rows=[pb.InventoryRow(columns={"name": "debian", "version": "11"})],
                ),
            ]
        )

    await call.write(pb.AgentSessionRequest(sequence=1, inventory=delta("3.0.11-1", False)))
    assert (await call.read()).ack.sequence == 1
    await call.write(pb.AgentSessionRequest(sequence=2, inventory=delta("3.0.13-1", True)))
    assert (await call.read()).ack.sequence == 2
    changes = (
        await mo.ListInventoryChanges(
            pb.ListInventoryChangesRequest(parent="nodes/quiet"), metadata=admin
        )
    ).changes
    newest = changes[0]
    assert newest.table == "deb_packages" and list(newest.added) == ["curl"]
    assert list(newest.changed) == ["openssl: version 3.0.11-1 -> 3.0.13-1"]
    hit = await mo.SearchNodes(
        pb.SearchNodesRequest(filter="os.version < 12 AND package:openssl version < 3.0.14"),
        metadata=admin,
    )
    assert [n.name for n in hit.nodes] == ["nodes/quiet"]
    assert (
        await mo.GetNode(pb.GetNodeRequest(name="nodes/quiet"), metadata=admin)
    ).node.os_version == "debian 11"

    # This "agent" never answers commands: EvaluateNode gives up after its timeout.
    req = pb.EvaluateNodeRequest(name="nodes/quiet")
    req.timeout.FromMilliseconds(500)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mo.EvaluateNode(req, metadata=admin)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    command = await call.read()
    assert command.command.evaluate.baselines[0].name == "baselines/linux-hardening"
    call.cancel()
