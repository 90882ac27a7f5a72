"""Partitioned topics on a real Redis (6.2 and 7.x): routing by ordering key, order
per key, consumer groups over partitions, replay, dedup and dead letters per
partition, summed stats, and the refusals of bad partition counts."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable

import grpc
import pytest
from redis.cluster import key_slot

from autoecoops.events.v1 import envelope_pb2, events_pb2, events_pb2_grpc
from autoecoops.kernel.event_bus.bus import DeadLetterSelector
from autoecoops.kernel.event_bus.retry import RetryPolicy
from autoecoops.kernel.event_bus.store import partition_of
from autoecoops.kernel.event_bus.subscription import Delivery
from autoecoops.kernel.mesh.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from autoecoops.kernel.mesh.server import Mesh
from tests.integration.event_bus.conftest import TOPIC, Harness, Stream, app_of, sync_started
from tests.integration.event_bus.test_service import (  # noqa: F401 (fixtures)
    Md,
    fails,
    mesh,
    stub,
    token,
)

N = 4
ONE_TRY = RetryPolicy(initial_backoff=0.05, max_backoff=0.1, max_attempts=1)


def keyed(app: str, i: int) -> envelope_pb2.Envelope:
    """The i-th event about ``app`` (its subject, so its ordering key)."""
    env = sync_started(app, f"{app}-{i}")
    env.subject = app
    return env


async def publish_keyed(bus: Harness, apps: int = 8, per_app: int = 5) -> dict[str, list[str]]:
    """Publish ``per_app`` events per app, interleaved; the event ids per app, in order."""
    ids: dict[str, list[str]] = defaultdict(list)
    for i in range(per_app):
        envs = [keyed(f"app{a}", i) for a in range(apps)]
        results = await bus.bus.publish(TOPIC, envs, bus.ctx())
        for env, r in zip(envs, results, strict=True):
            assert r.partition == partition_of(env.subject, N)
            ids[env.subject].append(f"{r.partition}/{r.event_id}")
    return ids


async def take_all(bus: Harness, s: Stream, n: int) -> list[Delivery]:
    """Take and ack ``n`` deliveries, a few at a time (within the in-flight limit)."""
    out: list[Delivery] = []
    while len(out) < n:
        batch = await s.take(min(n - len(out), 4))
        await bus.ack(*batch)
        out += batch
    return out


async def test_events_go_to_the_partition_of_their_key_and_every_partition_is_used(
    bus: Harness,
) -> None:
    assert await bus.bus.create_topic(TOPIC, N) == N
    ids = await publish_keyed(bus)
    used = {int(i.split("/")[0]) for events in ids.values() for i in events}
    assert used == set(range(N))
    # Each partition is its own stream under its own hash tag; no one-stream key.
    # (On a cluster the partitions' base drops event-bus's own tag, so the
    # partition's tag is the key's first and partitions spread over the masters.)
    base = bus.store.partition_base
    for p in range(N):
        key = f"{base}{{{TOPIC}:{p}}}"
        if bus.store.cluster:
            assert key_slot(key.encode()) == key_slot(f"{TOPIC}:{p}".encode())
        assert bus.store.keys(TOPIC, p).stream == key
        assert await bus.redis.xlen(key) == sum(
            1 for e in ids.values() for i in e if i.startswith(f"{p}/")
        )
    assert not await bus.redis.exists(bus.store.base + TOPIC)
    info = await bus.bus.topic_stats(TOPIC)
    assert (info.length, info.partitions) == (40, N)


async def test_one_consumer_gets_every_partition_in_order_per_key(bus: Harness) -> None:
    await bus.bus.create_topic(TOPIC, N)
    ids = await publish_keyed(bus)
    s = await bus.subscribe(max_in_flight=7)
    got: dict[str, list[str]] = defaultdict(list)
    for _ in range(40):
        (d,) = await s.take(1)
        env = envelope_pb2.Envelope.FromString(d.envelope)
        got[env.subject].append(f"{d.partition}/{d.event_id}")
        await bus.ack(d)
    assert got == ids
    stats = await bus.bus.topic_stats(TOPIC, "g")
    (g,) = stats.groups
    assert (g.counters["acked"], g.pending, g.lag) == (40, 0, 0)


async def test_a_group_spreads_over_partitions_and_keeps_each_keys_order(bus: Harness) -> None:
    await bus.bus.create_topic(TOPIC, N)
    ids = await publish_keyed(bus)
    one = await bus.subscribe(consumer="c1", max_in_flight=4)
    two = await bus.subscribe(consumer="c2", max_in_flight=4)
    seen: dict[str, list[tuple[str, str]]] = defaultdict(list)
    deadline = time.monotonic() + 60
    while sum(len(v) for v in seen.values()) < 40 and time.monotonic() < deadline:
        for name, s in (("c1", one), ("c2", two)):
            try:
                batch = await s.next(0.2)
            except TimeoutError:
                continue
            for d in batch:
                env = envelope_pb2.Envelope.FromString(d.envelope)
                seen[env.subject].append((name, f"{d.partition}/{d.event_id}"))
            await bus.ack(*batch)
    # Every event once; each consumer gets its share of a key's events in publish
    # order (Redis hands each entry of a partition to one consumer of the group).
    assert {k: sorted(i for _, i in v) for k, v in seen.items()} == {
        k: sorted(v) for k, v in ids.items()
    }
    for key, events in seen.items():
        for name in ("c1", "c2"):
            mine = [i for who, i in events if who == name]
            assert mine == [i for i in ids[key] if i in mine]
    assert {name for v in seen.values() for name, _ in v} == {"c1", "c2"}


async def test_replay_per_partition_and_over_all(bus: Harness) -> None:
    await bus.bus.create_topic(TOPIC, N)
    ids = await publish_keyed(bus)
    s = await bus.subscribe()
    await take_all(bus, s, 40)
    in_p2 = sorted(i for e in ids.values() for i in e if i.startswith("2/"))
    assert await bus.bus.replay(TOPIC, "g", "0-0", None, True, partition=2) == len(in_p2)
    again = await take_all(bus, s, len(in_p2))
    assert sorted(f"{d.partition}/{d.event_id}" for d in again) == in_p2
    await s.nothing_for(0.3)
    # By time, over every partition.
    assert await bus.bus.replay(TOPIC, "g", "0-0", None, True) == 40
    assert len({(d.partition, d.event_id) for d in await take_all(bus, s, 40)}) == 40


async def test_dedup_is_per_partition_and_a_key_always_finds_its_partition(bus: Harness) -> None:
    await bus.bus.create_topic(TOPIC, N)
    (first,) = await bus.bus.publish(TOPIC, [keyed("web", 1)], bus.ctx())
    (again,) = await bus.bus.publish(TOPIC, [keyed("web", 1)], bus.ctx())
    assert again == (first.event_id, True, first.partition)
    # Without subject or partition_key the idempotency key orders: a retry
    # lands where the first try did, so it is a duplicate there too.
    bare = sync_started("api", "bare-key")
    (b1,) = await bus.bus.publish(TOPIC, [bare], bus.ctx())
    (b2,) = await bus.bus.publish(TOPIC, [bare], bus.ctx())
    assert b2 == (b1.event_id, True, partition_of("bare-key", N))
    # A batch over several partitions with a reused key (another payload) is
    # refused before anything of it is stored.
    reused = sync_started("other-payload", "web-1")  # keyed("web", 1)'s key, other data
    reused.subject = "web"
    batch = [keyed(f"new{i}", 0) for i in range(6)] + [reused]
    assert len({partition_of(e.subject, N) for e in batch}) > 1
    before = (await bus.bus.topic_stats(TOPIC)).length
    with pytest.raises(AlreadyExists) as err:
        await bus.bus.publish(TOPIC, batch, bus.ctx())
    assert err.value.reason == "IDEMPOTENCY_KEY_REUSED" and err.value.metadata["index"] == "6"
    assert (await bus.bus.topic_stats(TOPIC)).length == before


async def test_dead_letters_name_their_partition(bus: Harness) -> None:
    await bus.bus.create_topic(TOPIC, N)
    s = await bus.subscribe(policy=ONE_TRY, start="$")
    await bus.bus.publish(TOPIC, [keyed(f"app{a}", 0) for a in range(8)], bus.ctx())
    for d in await s.take(8):
        assert (await bus.bus.nack(d.delivery_id, "alice", "no")).dead_lettered
    listed, page = await bus.bus.list_dead_letters(TOPIC, "", 3, "")
    while page:
        more, page = await bus.bus.list_dead_letters(TOPIC, "", 3, page)
        listed += more
    assert len(listed) == 8
    for d in listed:
        assert d.id.startswith(f"p{d.partition}-")
        assert (await bus.bus.get_dead_letter(TOPIC, d.id)).event_id == d.event_id
    with pytest.raises(InvalidArgument) as err:
        await bus.bus.get_dead_letter(TOPIC, listed[0].id.split("-", 1)[1])
    assert err.value.reason == "INVALID_EVENT_ID"
    ids = [d.id for d in listed[:3]]
    assert await bus.bus.redrive(TOPIC, DeadLetterSelector(ids=ids)) == 3
    redriven = await s.take(3)
    assert sorted(app_of(d) for d in redriven) == sorted(
        app_of_envelope(d.envelope) for d in listed[:3]
    )
    assert await bus.bus.purge(TOPIC, DeadLetterSelector(all=True)) == 5


def app_of_envelope(raw: bytes) -> str:
    from autoecoops.infra.v1 import events_pb2 as infra

    env = envelope_pb2.Envelope.FromString(raw)
    msg = infra.SyncStarted()
    env.data.Unpack(msg)
    return msg.application


async def test_outcomes_go_to_the_partitions_own_outbox_when_it_has_one(
    harness_factory: Callable[..., Harness],
) -> None:
    bus = harness_factory(audit=True)
    bus.store.slot_outboxes = True  # as on Redis Cluster
    await bus.bus.create_topic(TOPIC, N)
    await publish_keyed(bus, apps=8, per_app=1)
    s = await bus.subscribe()
    await take_all(bus, s, 8)
    per_partition = [await bus.redis.xlen(k.outcomes) for k in bus.store.all_keys(TOPIC, N)]
    assert sum(per_partition) == 8 and all(per_partition)
    assert await bus.redis.xlen(bus.store.outbox) == 0


async def test_an_unpartitioned_topic_keeps_its_one_stream(bus: Harness) -> None:
    (r,) = await bus.bus.publish(TOPIC, [keyed("web", 1)], bus.ctx())
    assert r.partition == 0
    # Its one stream: the key it always had on one Redis (tagged on a cluster).
    assert await bus.redis.xlen(bus.store.keys(TOPIC).stream) == 1
    if not bus.store.cluster:
        assert bus.store.keys(TOPIC).stream == bus.store.base + TOPIC
    # In use with one partition: its count is fixed.
    with pytest.raises(FailedPrecondition) as err:
        await bus.bus.create_topic(TOPIC, N)
    assert err.value.reason == "PARTITION_COUNT_FIXED"
    assert err.value.metadata["partitions"] == "1"
    assert await bus.bus.create_topic(TOPIC, 1) == 1


async def test_bad_partition_counts_and_partitions_are_refused(bus: Harness) -> None:
    for bad in (0, -1, bus.bus.settings.max_partitions + 1):
        with pytest.raises(InvalidArgument) as err:
            await bus.bus.create_topic(TOPIC, bad)
        assert err.value.reason == "INVALID_PARTITION_COUNT"
        assert [v.field for v in err.value.field_violations] == ["topic.partitions"]
    assert await bus.bus.create_topic(TOPIC, N) == N
    assert await bus.bus.create_topic(TOPIC, N) == N  # again, the same: fine
    with pytest.raises(FailedPrecondition) as fixed:
        await bus.bus.create_topic(TOPIC, 2)
    assert fixed.value.metadata == {"partitions": "4", "requested": "2"}
    with pytest.raises(InvalidArgument) as unknown:
        await bus.bus.create_topic("no.such.topic", 2)
    assert unknown.value.reason == "UNKNOWN_TOPIC"
    with pytest.raises(InvalidArgument) as part:
        await bus.bus.replay(TOPIC, "g", "0-0", None, True, partition=N)
    assert part.value.reason == "INVALID_PARTITION"
    with pytest.raises(InvalidArgument) as by_id:
        await bus.bus.replay(TOPIC, "g", "1-0", None, True, by_id=True)
    assert [v.field for v in by_id.value.field_violations] == ["partition"]


async def test_partitions_over_grpc(
    mesh: Mesh,  # noqa: F811
    stub: events_pb2_grpc.EventBusServiceStub,  # noqa: F811
    token: Callable[..., Md],  # noqa: F811
) -> None:
    md = token()
    code, reason, fields = await fails(
        stub.CreateTopic(
            events_pb2.CreateTopicRequest(topic_id=TOPIC, topic=events_pb2.Topic(partitions=0)),
            metadata=md,
        )
    )
    assert (code, reason, fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PARTITION_COUNT",
        ["topic.partitions"],
    )
    made = await stub.CreateTopic(
        events_pb2.CreateTopicRequest(topic_id=TOPIC, topic=events_pb2.Topic(partitions=N)),
        metadata=md,
    )
    assert made.topic.partitions == N
    code, reason, _ = await fails(
        stub.CreateTopic(
            events_pb2.CreateTopicRequest(topic_id=TOPIC, topic=events_pb2.Topic(partitions=2)),
            metadata=md,
        )
    )
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "PARTITION_COUNT_FIXED")
    env = keyed("web", 1)
    reply = await stub.Publish(events_pb2.PublishRequest(topic=TOPIC, envelope=env), metadata=md)
    assert reply.partition == partition_of("web", N)
    env2 = keyed("x", 2)
    env2.partition_key = "web"  # the ordering key wins over the subject
    reply2 = await stub.Publish(events_pb2.PublishRequest(topic=TOPIC, envelope=env2), metadata=md)
    assert reply2.partition == reply.partition
    code, reason, fields = await fails(
        stub.Replay(
            events_pb2.ReplayRequest(
                topic=TOPIC, group="g", start_event_id=reply.event_id, reset=True
            ),
            metadata=md,
        )
    )
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["partition"])
    topics = await stub.ListTopics(events_pb2.ListTopicsRequest(), metadata=md)
    (t,) = [t for t in topics.topics if t.name == TOPIC]
    assert (t.partitions, t.length) == (N, 2)
    stats = await stub.GetTopicStats(events_pb2.GetTopicStatsRequest(topic=TOPIC), metadata=md)
    assert (stats.stats.partitions, stats.stats.length) == (N, 2)


async def test_create_topic_commits_its_audit_record_with_the_count(bus: Harness) -> None:
    """The record of an audited CreateTopic is written by the script that fixes the
    count (one slot on a cluster), and only when the count was fixed by this call."""
    from autoecoops.kernel.event_bus.bus import EventBus
    from autoecoops.kernel.event_bus.store import EventStore
    from autoecoops.kernel.mesh.audit import build_request
    from autoecoops.kernel.mesh.outbox import AuditContext, Outbox, current_audit

    old = bus.store
    box = Outbox(bus.redis, old.base + "_test:outbox")  # in event-bus's slot on a cluster
    audited = EventBus(EventStore(bus.redis, old.base, old.settings, box), old.settings)

    async def create(partitions: int) -> tuple[AuditContext, int | Exception]:
        call = AuditContext(build_request(type="rpc", service="event-bus", action="topics.create"))
        ctx_token = current_audit.set(call)
        try:
            return call, await audited.create_topic(TOPIC, partitions)
        except FailedPrecondition as err:
            return call, err
        finally:
            current_audit.reset(ctx_token)

    try:
        first, n = await create(N)
        assert n == N and first.staged
        again, n = await create(N)  # nothing changed: nothing staged by the script
        assert n == N and not again.staged
        refused, err = await create(2)
        assert isinstance(err, FailedPrecondition) and not refused.staged
        staged = await bus.redis.xrange(box.key, "-", "+")
        assert len(staged) == 1
    finally:
        await bus.redis.delete(box.key)
