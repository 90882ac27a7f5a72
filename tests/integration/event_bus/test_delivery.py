"""Delivery on a real Redis (6.2 and 7.x): leases, acks, retries with backoff,
dead-lettering, ordering, in-flight bounds and keep-alive."""

from __future__ import annotations

import asyncio

import pytest

from autoecoops.events.v1 import envelope_pb2
from autoecoops.kernel.event_bus.retry import RetryPolicy
from autoecoops.kernel.mesh.errors import FailedPrecondition, NotFound
from tests.integration.event_bus.conftest import TOPIC, Harness, app_of

FAST_RETRY = RetryPolicy(initial_backoff=0.05, multiplier=2.0, max_backoff=1.0, max_attempts=3)


async def test_events_arrive_in_order_once_and_acked_ones_never_again(bus: Harness) -> None:
    ids = await bus.publish_apps("a", "b", "c", "d")
    s = await bus.subscribe()
    got = await s.take(4)
    assert [d.event_id for d in got] == ids
    assert [app_of(d) for d in got] == ["a", "b", "c", "d"]
    assert {d.attempt for d in got} == {1}
    env = envelope_pb2.Envelope.FromString(got[0].envelope)
    assert env.actor.subject == "alice" and env.trace_parent
    await bus.ack(*got)
    await s.nothing_for(0.5)
    (g,) = (await bus.bus.topic_stats(TOPIC)).groups
    assert (g.pending, g.lag, g.counters["delivered"], g.counters["acked"]) == (0, 0, 4, 4)


async def test_acking_twice_counts_once_and_stays_acked(bus: Harness) -> None:
    await bus.publish_apps("a")
    s = await bus.subscribe()
    (d,) = await s.take(1)
    first = await bus.bus.ack([d.delivery_id], "alice")
    again = await bus.bus.ack([d.delivery_id], "alice")
    assert (first.acked, again.acked, again.expired) == (1, 1, [])
    (g,) = (await bus.bus.topic_stats(TOPIC)).groups
    assert g.counters["acked"] == 1


async def test_in_flight_is_bounded_and_an_ack_makes_room(bus: Harness) -> None:
    await bus.publish_apps(*"abcde")
    s = await bus.subscribe(max_in_flight=2)
    first = await s.take(2)
    await s.nothing_for(0.3)
    await bus.ack(first[0])
    (third,) = await s.take(1)
    assert app_of(third) == "c"
    (g,) = (await bus.bus.topic_stats(TOPIC)).groups
    assert g.pending == 2 and g.lag == 2


async def test_two_consumers_share_a_group_and_two_groups_each_get_everything(
    bus: Harness,
) -> None:
    ids = await bus.publish_apps(*"abcdef")
    c1 = await bus.subscribe(group="workers", consumer="c1", max_in_flight=3)
    c2 = await bus.subscribe(group="workers", consumer="c2", max_in_flight=3)
    other = await bus.subscribe(group="indexer", consumer="c1")
    shared = await c1.take(3) + await c2.take(3)
    assert sorted(d.event_id for d in shared) == sorted(ids)
    assert [d.event_id for d in await other.take(6)] == ids


async def test_nack_retries_with_backoff_and_dead_letters_after_max_attempts(
    bus: Harness,
) -> None:
    bus.bus.rand = lambda: 0.5  # no jitter: the schedule is exactly the policy's
    (eid,) = await bus.publish_apps("poison")
    s = await bus.subscribe(policy=FAST_RETRY)
    schedule = []
    for attempt in (1, 2, 3):
        (d,) = await s.take(1)
        assert (d.event_id, d.attempt) == (eid, attempt)
        if schedule:
            # Never redelivered before its backoff elapsed.
            assert bus.bus.clock() >= schedule[-1][1] - 0.002
        before = bus.bus.clock()
        out = await bus.bus.nack(d.delivery_id, "alice", f"handler failed on try {attempt}")
        after = bus.bus.clock()
        if attempt < 3:
            assert not out.dead_lettered and out.redeliver_at is not None
            schedule.append((out.redeliver_at - before, out.redeliver_at, after - before))
        else:
            assert out.dead_lettered and out.redeliver_at is None
    # The policy's waits (50 ms, then 100 ms), counted from the moment the nack was
    # handled: somewhere between sending it and its answer, however slow the machine
    # (1 ms of slack for the millisecond clock).
    for (wait, _, took), expected in zip(schedule, (0.05, 0.10), strict=True):
        assert expected - 0.001 <= wait <= expected + took + 0.001, (wait, expected, took)
    await s.nothing_for(0.3)
    dead, _ = await bus.bus.list_dead_letters(TOPIC, "", 10, "")
    (dl,) = dead
    assert (dl.event_id, dl.group, dl.consumer, dl.attempts) == (eid, "g", "c1", 3)
    assert dl.reason == "handler failed on try 3"
    assert envelope_pb2.Envelope.FromString(dl.envelope).idempotency_key == "key-poison"
    (g,) = (await bus.bus.topic_stats(TOPIC)).groups
    assert (g.dead_letters, g.counters["retried"], g.counters["dead_lettered"]) == (1, 2, 1)


async def test_a_waiting_retry_does_not_block_other_events(bus: Harness) -> None:
    slow = RetryPolicy(initial_backoff=60, max_backoff=60, max_attempts=5)
    await bus.publish_apps("a", "b", "c")
    s = await bus.subscribe(max_in_flight=2, policy=slow)
    a, b = await s.take(2)
    out = await bus.bus.nack(a.delivery_id, "alice", "later")
    assert out.redeliver_at is not None and out.redeliver_at > bus.bus.clock() + 40
    (c,) = await s.take(1)
    assert [app_of(b), app_of(c)] == ["b", "c"]


async def test_concurrency_one_keeps_order_through_a_retry(bus: Harness) -> None:
    await bus.publish_apps("first", "second")
    s = await bus.subscribe(max_in_flight=1, policy=FAST_RETRY)
    (d,) = await s.take(1)
    await bus.bus.nack(d.delivery_id, "alice", "not yet")
    (again,) = await s.take(1)
    assert (app_of(again), again.attempt) == ("first", 2)
    await bus.ack(again)
    (nxt,) = await s.take(1)
    assert app_of(nxt) == "second"


async def test_an_expired_lease_is_reclaimed_and_redelivered_with_its_attempt(
    bus: Harness,
) -> None:
    (eid,) = await bus.publish_apps("slow")
    s = await bus.subscribe(visibility=0.3, policy=FAST_RETRY)
    (d,) = await s.take(1)
    # The handler never settles it: after the lease and a backoff it comes again.
    (again,) = await s.take(1, within=10)
    assert (again.event_id, again.attempt) == (eid, 2)
    assert again.delivery_id != d.delivery_id
    late = await bus.bus.ack([d.delivery_id], "alice")
    assert late.expired == [d.delivery_id] and late.acked == 0
    with pytest.raises(FailedPrecondition) as err:
        await bus.bus.nack(d.delivery_id, "alice", "too late")
    assert err.value.reason == "LEASE_EXPIRED"
    await bus.ack(again)


async def test_lease_expiry_dead_letters_with_reason_after_max_attempts(bus: Harness) -> None:
    await bus.publish_apps("hangs")
    s = await bus.subscribe(
        visibility=0.2, policy=RetryPolicy(initial_backoff=0.01, max_backoff=0.05, max_attempts=2)
    )
    await s.take(2, within=10)
    for _ in range(100):
        dead, _ = await bus.bus.list_dead_letters(TOPIC, "", 10, "")
        if dead:
            break
        await asyncio.sleep(0.05)
    (dl,) = dead
    assert (dl.reason, dl.attempts) == ("lease expired", 2)


async def test_keep_alive_holds_a_long_handlers_delivery(bus: Harness) -> None:
    await bus.publish_apps("long")
    s = await bus.subscribe(visibility=1.0, policy=FAST_RETRY)
    (d,) = await s.take(1)
    # Another consumer of the group would get the event if its lease lapsed.
    other = await bus.subscribe(consumer="c2", visibility=1.0, policy=FAST_RETRY)
    for _ in range(8):
        leases, expired = await bus.bus.extend([d.delivery_id], "alice", None)
        assert expired == [] and leases[0].expire_at > bus.bus.clock() + 0.5
        await asyncio.sleep(0.25)
    await other.nothing_for(0.1)
    await s.nothing_for(0.1)
    await bus.ack(d)


async def test_extension_is_capped_at_the_visibility_timeout(bus: Harness) -> None:
    await bus.publish_apps("x")
    s = await bus.subscribe(visibility=1.0)
    (d,) = await s.take(1)
    leases, _ = await bus.bus.extend([d.delivery_id], "alice", 3600)
    assert leases[0].expire_at <= bus.bus.clock() + 1.0


async def test_unknown_and_foreign_delivery_ids_are_not_found_and_nothing_is_acked(
    bus: Harness,
) -> None:
    await bus.publish_apps("a")
    s = await bus.subscribe()
    (d,) = await s.take(1)
    for bad, subject in (("garbage", "alice"), (d.delivery_id, "mallory")):
        with pytest.raises(NotFound) as err:
            await bus.bus.ack([d.delivery_id, bad] if bad != d.delivery_id else [bad], subject)
        assert err.value.resource_type == "delivery"
    with pytest.raises(NotFound):
        await bus.bus.nack(d.delivery_id[:-4] + "AAAA", "alice", "x")
    (g,) = (await bus.bus.topic_stats(TOPIC)).groups
    assert g.pending == 1 and g.counters.get("acked", 0) == 0
    await bus.ack(d)


async def test_a_permanent_failure_is_dead_lettered_at_once(bus: Harness) -> None:
    await bus.publish_apps("bad-input")
    s = await bus.subscribe(policy=FAST_RETRY)
    (d,) = await s.take(1)
    out = await bus.bus.nack(d.delivery_id, "alice", "schema mismatch", dead_letter=True)
    assert out.dead_lettered
    (dl,) = (await bus.bus.list_dead_letters(TOPIC, "g", 10, ""))[0]
    assert (dl.attempts, dl.reason) == (1, "schema mismatch")
    await s.nothing_for(0.3)


async def test_a_leased_event_trimmed_away_is_dropped_from_pending_not_redelivered(
    bus: Harness,
) -> None:
    # Redis 6.2's XAUTOCLAIM returns such entries as nil and keeps them
    # pending; 7.0 drops them and lists their ids. Either way: settled, gone.
    ids = await bus.publish_apps("gone", "kept")
    s = await bus.subscribe(visibility=0.2, policy=FAST_RETRY)
    await s.take(2)  # both leased; neither settled
    await bus.redis.xdel(bus.store.keys(TOPIC).stream, ids[0])
    (again,) = await s.take(1, within=10)
    assert (again.event_id, again.attempt) == (ids[1], 2)
    await bus.ack(again)
    await s.nothing_for(0.5)
    (g,) = (await bus.bus.topic_stats(TOPIC)).groups
    assert g.pending == 0


async def test_stats_set_the_prometheus_gauges_and_counters(bus: Harness) -> None:
    from prometheus_client import REGISTRY

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = value("autoecoops_events_acked_total", topic=TOPIC, group="metrics")
    await bus.publish_apps("a", "b", "c")
    s = await bus.subscribe(group="metrics", max_in_flight=2)
    await bus.ack((await s.take(1))[0])
    await bus.bus.topic_stats(TOPIC)
    assert value("autoecoops_events_acked_total", topic=TOPIC, group="metrics") == before + 1
    assert value("autoecoops_events_group_pending", topic=TOPIC, group="metrics") == 2
    assert value("autoecoops_events_group_lag", topic=TOPIC, group="metrics") == 0
    assert value("autoecoops_events_stream_length", topic=TOPIC) == 3
    assert (
        value("autoecoops_events_group_oldest_pending_age_seconds", topic=TOPIC, group="metrics")
        >= 0
    )
