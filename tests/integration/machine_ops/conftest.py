"""Fixtures for machine-ops on the real mesh: auth, policy-audit, event-bus, machine-ops."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest

from autoecoops.kernel.mesh.server import Mesh
from autoecoops.machineops.v1 import machineops_pb2 as pb
from autoecoops.machineops.v1 import machineops_pb2_grpc
from autoecoops.platforms.machine_ops.agent import Agent, AgentConfig
from tests.conftest import MintToken, StartMesh

SERVICES = ["auth-service", "policy-audit", "event-bus", "machine-ops"]


@pytest.fixture
async def mesh(start_mesh: StartMesh, monkeypatch: pytest.MonkeyPatch) -> Mesh:
    monkeypatch.setenv("AUTOECOOPS_MACHINEOPS_HEARTBEAT_SECONDS", "0.5")
    return await start_mesh(SERVICES, secure=True)


@pytest.fixture
def admin(mint_token: MintToken) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {mint_token('alice', ['admin'])}")]


def stub(mesh: Mesh) -> machineops_pb2_grpc.MachineOpsServiceStub:
    return machineops_pb2_grpc.MachineOpsServiceStub(
        grpc.aio.insecure_channel(mesh.config.addr("machine-ops"))
    )


async def enroll_token(
    mo: machineops_pb2_grpc.MachineOpsServiceStub,
    admin: list[tuple[str, str]],
    node_id: str,
    labels: dict[str, str] | None = None,
) -> str:
    reply = await mo.CreateEnrollmentToken(
        pb.CreateEnrollmentTokenRequest(
            enrollment_token_id=f"tok-{node_id}",
            enrollment_token=pb.EnrollmentToken(node_id=node_id, labels=labels or {}),
        ),
        metadata=admin,
    )
    return reply.secret


StartAgent = Callable[..., "asyncio.Future[Agent]"]


@pytest.fixture
async def start_agent(tmp_path: Path) -> AsyncIterator[Callable[..., object]]:
    """Run agents in this process against a mesh; stopped afterwards."""
    running: list[tuple[Agent, asyncio.Task[None]]] = []

    async def start(
        mesh: Mesh, node_id: str, secret: str, *, connect: bool = True, **kw: object
    ) -> Agent:
        cfg = AgentConfig(
            platform=mesh.config.addr("machine-ops"),
            auth=mesh.config.addr("auth-service"),
            node_id=node_id,
            state_dir=tmp_path / f"agent-{node_id}",
            enroll_secret=secret,
            **kw,  # type: ignore[arg-type]
        )
        agent = Agent(cfg)
        task = asyncio.create_task(agent.run())
        running.append((agent, task))
        if connect:
            await asyncio.wait_for(agent.connected.wait(), 20)
        return agent

    yield start
    for agent, task in running:
        agent.stop()
        await asyncio.wait_for(task, 10)
