"""Events that exist exactly when their change does: committed with the change
through the outbox, published on event-bus by the relay.

memory DocumentIngested/DocumentDeleted, policy PolicyDecisionMade and
BundleActivated, audit EntryAppended.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from autoecoops.audit.v1 import audit_pb2, audit_pb2_grpc
from autoecoops.audit.v1 import events_pb2 as audit_events
from autoecoops.events.v1 import envelope_pb2
from autoecoops.kernel.mesh.redis import connect_sync
from autoecoops.kernel.mesh.server import Mesh
from autoecoops.memory.v1 import events_pb2 as memory_events
from autoecoops.memory.v1 import memory_pb2, memory_pb2_grpc
from autoecoops.policy.v1 import events_pb2 as policy_events
from autoecoops.policy.v1 import policy_pb2, policy_pb2_grpc
from tests.conftest import MintToken, StartMesh, topic_stream

Md = list[tuple[str, str]]


def _events(mesh: Mesh, topic: str) -> list[envelope_pb2.Envelope]:
    r = connect_sync(mesh.config.redis_url)
    try:
        raw = r.xrange(
            topic_stream(mesh.config.redis_url, mesh.config.key_prefix, topic),
            "-",
            "+",
        )
        return [envelope_pb2.Envelope.FromString(f[b"e"]) for _, f in raw]
    finally:
        r.close()


async def _wait_events(mesh: Mesh, topic: str, n: int) -> list[envelope_pb2.Envelope]:
    assert await mesh.runtime.auditor.relay.flush(within=10.0)  # type: ignore[union-attr]
    for _ in range(100):
        got = _events(mesh, topic)
        if len(got) >= n:
            return got
        await asyncio.sleep(0.05)
    return _events(mesh, topic)


def _unpack(env: envelope_pb2.Envelope, cls: Any) -> Any:
    msg = cls()
    assert env.data.Unpack(msg), env.type
    return msg


@pytest.fixture
async def mesh(start_mesh: StartMesh, model_path: Any) -> Mesh:
    return await start_mesh(
        ["auth-service", "policy-audit", "event-bus", "memory-hub"], secure=True
    )


@pytest.fixture
def md(mint_token: MintToken) -> Md:
    return [("authorization", f"Bearer {mint_token('alice', ['admin'])}")]


async def test_memory_policy_and_audit_events_are_published_with_their_change(
    mesh: Mesh, md: Md, tmp_path: Path
) -> None:
    async with (
        grpc.aio.insecure_channel(mesh.config.addr("memory-hub")) as m,
        grpc.aio.insecure_channel(mesh.config.addr("policy-audit")) as p,
    ):
        mem = memory_pb2_grpc.MemoryServiceStub(m)
        policy = policy_pb2_grpc.PolicyServiceStub(p)
        log = audit_pb2_grpc.AuditServiceStub(p)

        await mem.CreateNamespace(
            memory_pb2.CreateNamespaceRequest(namespace=memory_pb2.Namespace(name="ops")),
            metadata=md,
        )
        doc = memory_pb2.Document(
            id="disk",
            text="# Disk full\n\nPrune images.",
            content_type=memory_pb2.CONTENT_TYPE_MARKDOWN,
        )
        await mem.IngestDocuments(
            memory_pb2.IngestDocumentsRequest(namespace="ops", documents=[doc]), metadata=md
        )
        # A refused change publishes nothing: same id, stale revision.
        with pytest.raises(grpc.aio.AioRpcError):
            await mem.DeleteDocument(
                memory_pb2.DeleteDocumentRequest(namespace="ops", document_id="nope"), metadata=md
            )
        await mem.DeleteDocument(
            memory_pb2.DeleteDocumentRequest(namespace="ops", document_id="disk"), metadata=md
        )
        got = await _wait_events(mesh, "memory.documents", 2)
        assert [e.type for e in got] == [
            "autoecoops.memory.document.ingested",
            "autoecoops.memory.document.deleted",
        ]
        ingested = _unpack(got[0], memory_events.DocumentIngested)
        assert (ingested.namespace, ingested.document_id, ingested.chunk_count) == (
            "ops",
            "disk",
            1,
        )
        assert _unpack(got[1], memory_events.DocumentDeleted).document_id == "disk"
        assert all(e.actor.subject == "alice" for e in got)

        bundle = policy_pb2.Bundle(
            name="team",
            roots=["team"],
            modules=[
                policy_pb2.PolicyModule(
                    path="team.rego", source='package team\n\nallow if input.user == "bob"\n'
                )
            ],
        )
        created = await policy.CreateBundle(
            policy_pb2.CreateBundleRequest(bundle=bundle), metadata=md
        )
        value = struct_pb2.Value()
        value.struct_value.update({"user": "bob"})
        decided = await policy.Evaluate(
            policy_pb2.EvaluateRequest(path="team/allow", input=value), metadata=md
        )
        activated = await _wait_events(mesh, "policy.bundles", 1)
        made = await _wait_events(mesh, "policy.decisions", 1)
        a = _unpack(activated[-1], policy_events.BundleActivated)
        assert (a.bundle, a.revision, a.module_count) == ("team", created.bundle.revision, 1)
        d = _unpack(made[-1], policy_events.PolicyDecisionMade)
        assert (d.decision_id, d.path, d.allowed) == (decided.decision_id, "team/allow", True)

        # Every entry in the log has its EntryAppended, in order.
        size = (await log.GetCheckpoint(audit_pb2.GetCheckpointRequest(), metadata=md)).checkpoint
        appended = await _wait_events(mesh, "audit.entries", size.tree_size)
        indexes = [_unpack(e, audit_events.EntryAppended).index for e in appended]
        assert indexes[: size.tree_size] == list(range(size.tree_size))
        first = await log.GetEntry(audit_pb2.GetEntryRequest(index=0), metadata=md)
        e0 = _unpack(appended[0], audit_events.EntryAppended)
        assert (e0.type, e0.service, e0.outcome) == (
            first.entry.type,
            first.entry.service,
            first.entry.outcome,
        )
