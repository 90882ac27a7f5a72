"""Producer and consumer deduplication on a real Redis (6.2 and 7.x)."""

from __future__ import annotations

import asyncio

import pytest

from autoecoops.kernel.event_bus.retry import RetryPolicy
from autoecoops.kernel.mesh.errors import AlreadyExists, InvalidArgument
from tests.integration.event_bus.conftest import TOPIC, Harness, app_of, sync_started

RETRY = RetryPolicy(initial_backoff=0.05, max_backoff=0.2, max_attempts=5)


async def test_publishing_the_same_key_again_returns_the_original_and_appends_nothing(
    bus: Harness,
) -> None:
    first = await bus.bus.publish(TOPIC, [sync_started("web", "k1")], bus.ctx())
    again = await bus.bus.publish(TOPIC, [sync_started("web", "k1")], bus.ctx())
    batch = await bus.bus.publish(
        TOPIC, [sync_started("api", "k2"), sync_started("web", "k1")], bus.ctx()
    )
    assert first == [(first[0][0], False, 0)]
    assert again == [(first[0][0], True, 0)]
    assert batch[1] == (first[0][0], True, 0) and not batch[0][1]
    assert await bus.redis.xlen(bus.store.keys(TOPIC).stream) == 2


async def test_a_reused_key_with_another_payload_is_refused_and_nothing_is_written(
    bus: Harness,
) -> None:
    await bus.publish([sync_started("web", "k1")])
    with pytest.raises(AlreadyExists) as err:
        await bus.bus.publish(
            TOPIC, [sync_started("new", "k-new"), sync_started("other", "k1")], bus.ctx()
        )
    assert err.value.reason == "IDEMPOTENCY_KEY_REUSED" and err.value.metadata["index"] == "1"
    with pytest.raises(InvalidArgument):
        await bus.bus.publish(
            TOPIC, [sync_started("x", "same"), sync_started("y", "same")], bus.ctx()
        )
    assert await bus.redis.xlen(bus.store.keys(TOPIC).stream) == 1


async def test_a_group_skips_a_key_it_already_processed(harness_factory: object) -> None:
    # A producer retrying after its dedup window stores the event twice; the
    # group processes it once.
    bus: Harness = harness_factory(dedup_window=0.05)  # type: ignore[operator]
    await bus.publish([sync_started("web", "k1")])
    s = await bus.subscribe()
    (d,) = await s.take(1)
    await bus.ack(d)
    await asyncio.sleep(0.1)
    ids = await bus.publish([sync_started("web", "k1"), sync_started("api", "k2")])
    (nxt,) = await s.take(1)
    assert (nxt.event_id, app_of(nxt)) == (ids[1], "api")
    await bus.ack(nxt)
    await s.nothing_for(0.2)
    (g,) = (await bus.bus.topic_stats(TOPIC)).groups
    assert g.counters["deduplicated"] == 1 and g.pending == 0
    # Another group has processed nothing, so it gets all three.
    other = await bus.subscribe(group="other")
    assert len(await other.take(3)) == 3


async def test_a_failed_handler_is_retried_not_lost_to_dedup(bus: Harness) -> None:
    (eid,) = await bus.publish([sync_started("web", "k1")])
    s = await bus.subscribe(policy=RETRY)
    (d,) = await s.take(1)
    await bus.bus.nack(d.delivery_id, "alice", "database down")
    (again,) = await s.take(1)
    assert (again.event_id, again.attempt) == (eid, 2)
    await bus.ack(again)
    (g,) = (await bus.bus.topic_stats(TOPIC)).groups
    assert (g.counters["acked"], g.counters.get("deduplicated", 0)) == (1, 0)


async def test_a_duplicate_waits_while_its_twin_is_processed_then_is_skipped(
    harness_factory: object,
) -> None:
    bus: Harness = harness_factory(dedup_window=0.05)  # type: ignore[operator]
    await bus.publish([sync_started("web", "k1")])
    s = await bus.subscribe(policy=RETRY)
    (d,) = await s.take(1)
    await asyncio.sleep(0.1)
    await bus.publish([sync_started("web", "k1")])
    # The twin is not handed out while the first is being processed ...
    await s.nothing_for(0.3)
    # ... the first fails, is retried and succeeds; then the twin is skipped.
    await bus.bus.nack(d.delivery_id, "alice", "flaky")
    (again,) = await s.take(1)
    assert again.event_id == d.event_id
    await bus.ack(again)
    await s.nothing_for(1.3)
    (g,) = (await bus.bus.topic_stats(TOPIC)).groups
    assert g.counters["deduplicated"] == 1 and g.pending == 0


async def test_a_duplicate_of_a_dead_lettered_event_is_still_delivered(
    harness_factory: object,
) -> None:
    bus: Harness = harness_factory(dedup_window=0.05)  # type: ignore[operator]
    await bus.publish([sync_started("web", "k1")])
    s = await bus.subscribe(policy=RETRY)
    (d,) = await s.take(1)
    await bus.bus.nack(d.delivery_id, "alice", "bad", dead_letter=True)
    await asyncio.sleep(0.1)
    (twin,) = await bus.publish([sync_started("web", "k1")])
    (got,) = await s.take(1)
    assert got.event_id == twin
