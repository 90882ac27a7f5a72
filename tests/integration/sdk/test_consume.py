"""client.events.consume against the real event bus: a handler's return acks,
its exception nacks and the event comes back, and stop() ends the consumer."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from google.protobuf import duration_pb2

from autoecoops.events.v1 import envelope_pb2, events_pb2
from autoecoops.memory.v1 import events_pb2 as memory_events
from autoecoops.sdk import AsyncClient, Client, StaticToken
from tests.conftest import MintToken, StartMesh

TOPIC = "memory.documents"
QUICK_RETRY = events_pb2.RetryPolicy(
    initial_backoff=duration_pb2.Duration(nanos=50_000_000),
    max_backoff=duration_pb2.Duration(nanos=100_000_000),
    max_attempts=5,
)


def ingested(document_id: str) -> envelope_pb2.Envelope:
    envelope = envelope_pb2.Envelope(
        source="//tests/sdk",
        type="autoecoops.memory.document.ingested",
        idempotency_key=str(uuid.uuid4()),
    )
    envelope.data.Pack(memory_events.DocumentIngested(namespace="n", document_id=document_id))
    return envelope


class Recorder:
    """A handler that fails the first delivery of one document, then records."""

    def __init__(self, flaky: str, expected: int) -> None:
        self.flaky, self.expected = flaky, expected
        self.seen: list[tuple[str, int]] = []
        self.done = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def record(self, event: Any) -> None:
        document = event.data.document_id
        if document == self.flaky and event.attempt == 1:
            raise RuntimeError("transient failure")
        self.seen.append((document, event.attempt))
        if len(self.seen) == self.expected:
            self._loop.call_soon_threadsafe(self.done.set)


async def test_the_async_client_consumes_with_ack_and_retry(
    start_mesh: StartMesh, mint_token: MintToken
) -> None:
    mesh = await start_mesh(["auth-service", "policy-audit", "event-bus"], secure=True)
    creds = StaticToken(mint_token("alice", ["admin"]))
    recorder = Recorder("doc-1", expected=3)

    async def handle(event: Any) -> None:
        recorder.record(event)

    async with AsyncClient(config=mesh.config, credentials=creds) as sdk:
        for i in range(3):
            await sdk.events.publish(topic=TOPIC, envelope=ingested(f"doc-{i}"))
        consumer = sdk.events.consume(
            TOPIC,
            "sdk-async",
            handle,
            start_position=events_pb2.START_POSITION_EARLIEST,
            retry_policy=QUICK_RETRY,
            concurrency=2,
        )
        running = asyncio.create_task(consumer.run())
        await asyncio.wait_for(recorder.done.wait(), 20)
        await consumer.stop(grace=2)
        await asyncio.wait_for(running, 10)
        stats = await sdk.events.get_topic_stats(topic=TOPIC)
    assert sorted(recorder.seen) == [("doc-0", 1), ("doc-1", 2), ("doc-2", 1)]
    # Everything settled: acked, nothing left pending, one retry.
    (group,) = [g for g in stats.stats.groups if g.group == "sdk-async"]
    assert (group.pending, group.acked_count, group.retried_count) == (0, 3, 1)


async def test_the_sync_client_consumes_in_its_thread_until_stopped(
    start_mesh: StartMesh, mint_token: MintToken
) -> None:
    mesh = await start_mesh(["auth-service", "policy-audit", "event-bus"], secure=True)
    creds = StaticToken(mint_token("alice", ["admin"]))
    recorder = Recorder("doc-b", expected=2)
    with Client(config=mesh.config, credentials=creds) as sdk:
        for name in ("doc-a", "doc-b"):
            await asyncio.to_thread(sdk.events.publish, topic=TOPIC, envelope=ingested(name))
        # A plain function: the helper runs it in a worker thread.
        consumer = sdk.events.consume(
            TOPIC,
            "sdk-sync",
            recorder.record,
            start_position=events_pb2.START_POSITION_EARLIEST,
            retry_policy=QUICK_RETRY,
        )
        running = asyncio.ensure_future(asyncio.to_thread(consumer.run))
        await asyncio.wait_for(recorder.done.wait(), 20)
        consumer.stop(grace=2)
        await asyncio.wait_for(running, 10)
    assert sorted(recorder.seen) == [("doc-a", 1), ("doc-b", 2)]
