"""event-bus over gRPC with real tokens: statuses and details of bad input, the
SDK consumer helper end to end, and outcomes in the audit trail."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from autoecoops.audit.v1 import audit_pb2, audit_pb2_grpc
from autoecoops.events.v1 import envelope_pb2, events_pb2, events_pb2_grpc
from autoecoops.infra.v1 import events_pb2 as infra
from autoecoops.kernel.mesh.errors import STATUS_DETAILS_KEY
from autoecoops.kernel.mesh.redis import connect
from autoecoops.kernel.mesh.server import Mesh
from autoecoops.sdk.consumer import Consumer, Event, PermanentError
from tests.conftest import MintToken, StartMesh, base_key
from tests.integration.event_bus.conftest import TOPIC, sync_started

Md = list[tuple[str, str]]


@pytest.fixture
async def mesh(start_mesh: StartMesh, monkeypatch: pytest.MonkeyPatch) -> Mesh:
    monkeypatch.setenv("AUTOECOOPS_EVENT_BUS_POLL_SECONDS", "0.05")
    monkeypatch.setenv("AUTOECOOPS_EVENT_BUS_MAX_EVENT_BYTES", "4096")
    monkeypatch.setenv("AUTOECOOPS_EVENT_BUS_AUDIT", "true")
    return await start_mesh(["auth-service", "policy-audit", "event-bus"], secure=True)


@pytest.fixture
def token(mint_token: MintToken) -> Callable[..., Md]:
    def md(subject: str = "alice", roles: tuple[str, ...] = ("admin",)) -> Md:
        return [("authorization", f"Bearer {mint_token(subject, list(roles))}")]

    return md


@pytest.fixture
async def stub(mesh: Mesh) -> AsyncIterator[events_pb2_grpc.EventBusServiceStub]:
    async with grpc.aio.insecure_channel(mesh.config.addr("event-bus")) as ch:
        yield events_pb2_grpc.EventBusServiceStub(ch)


def details(err: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str, list[str]]:
    raw = dict(err.trailing_metadata() or ())[STATUS_DETAILS_KEY]
    reason, fields = "", []
    for d in status_pb2.Status.FromString(raw).details:
        info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        if d.Unpack(info):
            reason = info.reason
        elif d.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
    return err.code(), reason, fields


async def fails(call: object) -> tuple[grpc.StatusCode, str, list[str]]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return details(err.value)


async def publish(stub: events_pb2_grpc.EventBusServiceStub, md: Md, *apps: str) -> list[str]:
    reply = await stub.PublishBatch(
        events_pb2.PublishBatchRequest(
            topic=TOPIC, envelopes=[sync_started(a, f"key-{a}") for a in apps]
        ),
        metadata=md,
    )
    return [r.event_id for r in reply.results]


def _mesh_topic(key: str) -> bool:
    """A key of the topics the mesh publishes to on its own (the audit outbox's events)."""
    return any(f":events:{t}" in key for t in ("audit.entries", "policy.bundles"))


async def bus_keys(mesh: Mesh) -> list[str]:
    """The bus's keys, each as ``<prefix>events:...`` (without a cluster's hash tag)."""
    r = connect(mesh.config.redis_url)
    try:
        base = base_key(mesh.config.redis_url, mesh.config.key_prefix, "events")
        plain = mesh.config.key_prefix + "events"
        return [
            plain + k.decode()[len(base) :]
            async for k in r.scan_iter(match=base + ":*", count=1000)
        ]
    finally:
        await r.aclose()


async def test_bad_input_gets_the_right_status_with_details_and_writes_nothing(
    mesh: Mesh, stub: events_pb2_grpc.EventBusServiceStub, token: Callable[..., Md]
) -> None:
    md = token()

    def req(env: envelope_pb2.Envelope, topic: str = TOPIC) -> events_pb2.PublishRequest:
        return events_pb2.PublishRequest(topic=topic, envelope=env)

    assert await fails(stub.Publish(req(sync_started("a", "k"), "no.such"), metadata=md)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "UNKNOWN_TOPIC",
        ["topic"],
    )
    unknown = sync_started("a", "k")
    unknown.type = "autoecoops.infra.nothing.happened"
    code, reason, fields = await fails(stub.Publish(req(unknown), metadata=md))
    assert (code, reason, fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "UNKNOWN_EVENT_TYPE",
        ["envelope.type"],
    )
    garbled = sync_started("a", "k")
    garbled.data.value = b"\xff\xff\xff"
    code, reason, fields = await fails(stub.Publish(req(garbled), metadata=md))
    assert (code, reason, fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAYLOAD",
        ["envelope.data"],
    )
    code, _, fields = await fails(stub.Publish(req(sync_started("a", "")), metadata=md))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "envelope.idempotency_key" in fields
    big = sync_started("x" * 5000, "big")
    code, reason, _ = await fails(stub.Publish(req(big), metadata=md))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "EVENT_TOO_LARGE")
    bad_batch = events_pb2.PublishBatchRequest(
        topic=TOPIC, envelopes=[sync_started("ok", "ok"), sync_started("a", "")]
    )
    code, _, fields = await fails(stub.PublishBatch(bad_batch, metadata=md))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "envelopes[1].idempotency_key" in fields
    # Nothing of any of that reached Redis.
    # (The mesh's own events, published through the audit outbox, live on
    # their own topics: the shipped bundle's activation, the log's entries.)
    assert not [k for k in await bus_keys(mesh) if ":events:_bus:" not in k and not _mesh_topic(k)]

    for group in ("g*", "a:b", "x?", "[g]", "{h}", "has space"):
        sub = events_pb2.SubscribeRequest(topic=TOPIC, group=group, consumer="c")
        code, reason, fields = await fails(anext(stub.Subscribe(sub, metadata=md).__aiter__()))
        assert (code, reason, fields) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_NAME",
            ["group"],
        )
        replay = events_pb2.ReplayRequest(topic=TOPIC, group=group, start_event_id="1-0")
        assert (await fails(stub.Replay(replay, metadata=md)))[
            0
        ] == grpc.StatusCode.INVALID_ARGUMENT
    assert not any(c in k for k in await bus_keys(mesh) for c in "*?[]{} ")

    code, reason, _ = await fails(
        stub.Ack(events_pb2.AckRequest(delivery_ids=["no-such-delivery"]), metadata=md)
    )
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "DELIVERY_NOT_FOUND")
    viewer = token("vic", ("viewer",))
    code, _, _ = await fails(stub.Publish(req(sync_started("a", "k")), metadata=viewer))
    assert code == grpc.StatusCode.PERMISSION_DENIED


async def test_publish_subscribe_ack_over_grpc_and_a_foreign_ack_is_not_found(
    mesh: Mesh, stub: events_pb2_grpc.EventBusServiceStub, token: Callable[..., Md]
) -> None:
    alice, bob = token("alice"), token("bob")
    ids = await publish(stub, alice, "a", "b")
    again = await stub.Publish(
        events_pb2.PublishRequest(topic=TOPIC, envelope=sync_started("a", "key-a")), metadata=alice
    )
    assert (again.event_id, again.duplicate) == (ids[0], True)
    sub = events_pb2.SubscribeRequest(
        topic=TOPIC,
        group="g",
        consumer="c1",
        start_position=events_pb2.START_POSITION_EARLIEST,
        visibility_timeout=duration_pb2.Duration(seconds=30),
    )
    call = stub.Subscribe(sub, metadata=alice)
    it = call.__aiter__()
    got = [(await anext(it)).delivery for _ in range(2)]
    assert [d.event_id for d in got] == ids
    assert got[0].envelope.id == ids[0] and got[0].envelope.actor.subject == "alice"
    assert got[0].attempt == 1 and got[0].lease_expire_time.seconds > 0
    code, _, _ = await fails(
        stub.Ack(events_pb2.AckRequest(delivery_ids=[got[0].delivery_id]), metadata=bob)
    )
    assert code == grpc.StatusCode.NOT_FOUND
    acked = await stub.Ack(
        events_pb2.AckRequest(delivery_ids=[d.delivery_id for d in got]), metadata=alice
    )
    assert acked.acked_count == 2 and not acked.expired_delivery_ids
    call.cancel()
    stats = await stub.GetTopicStats(events_pb2.GetTopicStatsRequest(topic=TOPIC), metadata=alice)
    (g,) = stats.stats.groups
    assert (stats.stats.length, g.acked_count, g.pending, g.lag) == (2, 2, 0, 0)
    topics = await stub.ListTopics(events_pb2.ListTopicsRequest(), metadata=alice)
    ours = [t for t in topics.topics if not _mesh_topic(":events:" + t.name)]
    assert [t.name for t in ours] == [TOPIC] and ours[0].groups == ["g"]


async def run_consumer(consumer: Consumer) -> asyncio.Task[None]:
    task = asyncio.create_task(consumer.run())
    await asyncio.sleep(0)
    return task


async def stop(consumer: Consumer, task: asyncio.Task[None], grace: float = 5) -> None:
    await consumer.stop(grace)
    await asyncio.wait_for(task, 10)


async def test_sdk_consumer_acks_returns_retries_raises_and_dead_letters_permanent_errors(
    mesh: Mesh, stub: events_pb2_grpc.EventBusServiceStub, token: Callable[..., Md]
) -> None:
    md = token()
    seen: list[tuple[str, int]] = []

    async def handle(event: Event) -> None:
        assert isinstance(event.data, infra.SyncStarted)
        app = event.data.application
        seen.append((app, event.attempt))
        if app == "flaky" and event.attempt == 1:
            raise ConnectionError("upstream reset")
        if app == "poison":
            raise PermanentError("cannot parse the manifest")

    async with grpc.aio.insecure_channel(mesh.config.addr("event-bus")) as ch:
        consumer = Consumer(
            ch,
            TOPIC,
            "deployer",
            handle,
            concurrency=4,
            start_position=events_pb2.START_POSITION_EARLIEST,
            retry_policy=events_pb2.RetryPolicy(
                initial_backoff=duration_pb2.Duration(nanos=50_000_000), max_attempts=3
            ),
            metadata=lambda: md,
        )
        task = await run_consumer(consumer)
        await publish(stub, md, "ok", "flaky", "poison")
        for _ in range(200):
            if len(seen) >= 4:
                break
            await asyncio.sleep(0.05)
        await stop(consumer, task)
    assert sorted(seen) == [("flaky", 1), ("flaky", 2), ("ok", 1), ("poison", 1)]
    dead = await stub.ListDeadLetters(
        events_pb2.ListDeadLettersRequest(topic=TOPIC, group="deployer"), metadata=md
    )
    (dl,) = dead.dead_letters
    assert (dl.reason, dl.attempts) == ("PermanentError: cannot parse the manifest", 1)
    stats = (
        await stub.GetTopicStats(events_pb2.GetTopicStatsRequest(topic=TOPIC), metadata=md)
    ).stats
    (g,) = stats.groups
    assert (g.acked_count, g.retried_count, g.dead_lettered_count, g.pending) == (2, 1, 1, 0)


async def test_sdk_keeps_a_long_handlers_lease_and_a_sync_handler_runs_off_the_loop(
    mesh: Mesh, stub: events_pb2_grpc.EventBusServiceStub, token: Callable[..., Md]
) -> None:
    md = token()
    attempts: list[int] = []

    def slow(event: Event) -> None:
        import time

        attempts.append(event.attempt)
        time.sleep(1.5)  # three leases' worth; blocking, in a worker thread

    async with grpc.aio.insecure_channel(mesh.config.addr("event-bus")) as ch:
        consumer = Consumer(
            ch,
            TOPIC,
            "slow",
            slow,
            visibility_timeout=0.5,
            metadata=lambda: md,
            start_position=events_pb2.START_POSITION_EARLIEST,
        )
        task = await run_consumer(consumer)
        await publish(stub, md, "long")
        for _ in range(100):
            if attempts:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.0)
        await stop(consumer, task)
    assert attempts == [1]
    (g,) = (
        await stub.GetTopicStats(events_pb2.GetTopicStatsRequest(topic=TOPIC), metadata=md)
    ).stats.groups
    assert (g.acked_count, g.delivered_count) == (1, 1)


async def test_graceful_stop_lets_running_handlers_finish(
    mesh: Mesh, stub: events_pb2_grpc.EventBusServiceStub, token: Callable[..., Md]
) -> None:
    md = token()
    started, finished = asyncio.Event(), asyncio.Event()

    async def handle(event: Event) -> None:
        started.set()
        await asyncio.sleep(0.3)
        finished.set()

    async with grpc.aio.insecure_channel(mesh.config.addr("event-bus")) as ch:
        consumer = Consumer(
            ch,
            TOPIC,
            "g",
            handle,
            metadata=lambda: md,
            start_position=events_pb2.START_POSITION_EARLIEST,
        )
        task = await run_consumer(consumer)
        await publish(stub, md, "a")
        await asyncio.wait_for(started.wait(), 10)
        await stop(consumer, task, grace=5)
    assert finished.is_set()
    (g,) = (
        await stub.GetTopicStats(events_pb2.GetTopicStatsRequest(topic=TOPIC), metadata=md)
    ).stats.groups
    assert (g.acked_count, g.pending) == (1, 0)


async def test_sdk_consumer_raises_a_non_retryable_error(
    mesh: Mesh, token: Callable[..., Md]
) -> None:
    async with grpc.aio.insecure_channel(mesh.config.addr("event-bus")) as ch:
        consumer = Consumer(ch, TOPIC, "bad*group", lambda e: None, metadata=lambda: token())
        from autoecoops.sdk.errors import InvalidArgument

        with pytest.raises(InvalidArgument):
            await asyncio.wait_for(consumer.run(), 10)


async def test_every_processing_outcome_reaches_the_audit_trail(
    mesh: Mesh, stub: events_pb2_grpc.EventBusServiceStub, token: Callable[..., Md]
) -> None:
    md = token()

    async def handle(event: Event) -> None:
        assert isinstance(event.data, infra.SyncStarted)
        app = event.data.application
        if (event.attempt == 1 and app != "fine") or (event.attempt == 2 and app == "doomed"):
            raise RuntimeError(f"{app} failed on try {event.attempt}")

    async with grpc.aio.insecure_channel(mesh.config.addr("event-bus")) as ch:
        consumer = Consumer(
            ch,
            TOPIC,
            "auditors",
            handle,
            concurrency=3,
            metadata=lambda: md,
            start_position=events_pb2.START_POSITION_EARLIEST,
            retry_policy=events_pb2.RetryPolicy(
                initial_backoff=duration_pb2.Duration(nanos=50_000_000), max_attempts=2
            ),
        )
        task = await run_consumer(consumer)
        ids = await publish(stub, md, "fine", "recovers", "doomed")
        audit = audit_pb2_grpc.AuditServiceStub(
            grpc.aio.insecure_channel(mesh.config.addr("policy-audit"))
        )
        actions: dict[str, list[str]] = {}
        for _ in range(200):
            listed = await audit.ListEntries(
                audit_pb2.ListEntriesRequest(type="event.processed", page_size=100), metadata=md
            )
            actions = {}
            for e in listed.entries:
                actions.setdefault(e.details.fields["event_id"].string_value, []).append(e.action)
            if sum(len(v) for v in actions.values()) >= 5:
                break
            await asyncio.sleep(0.1)
        with contextlib.suppress(Exception):
            await stop(consumer, task)
    short = {k: [a.rsplit(".", 1)[1] for a in v] for k, v in actions.items()}
    assert short == {
        ids[0]: ["acked"],
        ids[1]: ["retried", "acked"],
        ids[2]: ["retried", "dead_lettered"],
    }
    entry = listed.entries[0]
    assert entry.service == "event-bus" and entry.actor.subject == "alice"
    assert entry.resource.startswith(f"events/topics/{TOPIC}/groups/auditors/events/")
    assert len(entry.trace_id) == 32
