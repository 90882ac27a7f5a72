"""autoops fixtures: the platform in a real, secured mesh (auth, policy-audit, event-bus)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from autoecoops.audit.v1 import audit_pb2, audit_pb2_grpc
from autoecoops.autoops.v1 import autoops_pb2_grpc
from autoecoops.events.v1 import envelope_pb2, events_pb2, events_pb2_grpc
from autoecoops.kernel.mesh.errors import STATUS_DETAILS_KEY
from autoecoops.kernel.mesh.server import Mesh
from tests.conftest import StartMesh


@pytest.fixture
async def mesh(start_mesh: StartMesh, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Mesh:
    """auth-service, policy-audit, event-bus and autoops; the tick is off (tests evaluate)."""
    monkeypatch.setenv("AUTOECOOPS_AUTOOPS_TICK_SECONDS", "0")
    monkeypatch.setenv("AUTOECOOPS_AUTOOPS_CONTEXT_NAMESPACE", "off")
    monkeypatch.setenv("AUTOECOOPS_AUTOOPS_VERIFY_POLL_SECONDS", "0.1")
    return await start_mesh(["auth-service", "policy-audit", "event-bus", "autoops"], secure=True)


def autoops(mesh: Mesh) -> autoops_pb2_grpc.AutoOpsServiceStub:
    """A stub for the platform."""
    return autoops_pb2_grpc.AutoOpsServiceStub(
        grpc.aio.insecure_channel(mesh.config.addr("autoops"))
    )


def bearer(token: str) -> list[tuple[str, str]]:
    """Call metadata carrying a token."""
    return [("authorization", f"Bearer {token}")]


def details(err: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str, list[str]]:
    """Code, ErrorInfo reason and BadRequest fields of a failed call."""
    raw = dict(err.trailing_metadata() or ())[STATUS_DETAILS_KEY]
    reason, fields = "", []
    for d in status_pb2.Status.FromString(raw).details:
        info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        if d.Unpack(info):
            reason = info.reason
        elif d.Unpack(bad):
            fields = [v.field for v in bad.field_violations]
    return err.code(), reason, fields


async def events(
    mesh: Mesh, md: Sequence[tuple[str, str]], topic: str, want: int, group: str = "test"
) -> list[envelope_pb2.Envelope]:
    """The first ``want`` events of ``topic`` on the real bus."""
    bus = events_pb2_grpc.EventBusServiceStub(
        grpc.aio.insecure_channel(mesh.config.addr("event-bus"))
    )
    got: list[envelope_pb2.Envelope] = []
    call = bus.Subscribe(
        events_pb2.SubscribeRequest(
            topic=topic,
            group=group,
            consumer="c1",
            start_position=events_pb2.START_POSITION_EARLIEST,
        ),
        metadata=md,
    )

    async def read() -> None:
        async for reply in call:
            got.append(reply.delivery.envelope)
            if len(got) >= want:
                return

    try:
        await asyncio.wait_for(read(), timeout=10)
    finally:
        call.cancel()
    return got


async def audit_entries(
    mesh: Mesh, md: Sequence[tuple[str, str]], type_: str = "autoops"
) -> list[audit_pb2.AuditEntry]:
    """Audit entries of one type."""
    stub = audit_pb2_grpc.AuditServiceStub(
        grpc.aio.insecure_channel(mesh.config.addr("policy-audit"))
    )
    reply = await stub.ListEntries(
        audit_pb2.ListEntriesRequest(type=type_, page_size=1000), metadata=md
    )
    return list(reply.entries)
