"""Replay and retention on a real Redis (6.2 and 7.x)."""

from __future__ import annotations

import asyncio

import pytest

from autoecoops.kernel.event_bus.names import MAX_U64
from autoecoops.kernel.event_bus.settings import Retention
from autoecoops.kernel.mesh.errors import InvalidArgument
from tests.integration.event_bus.conftest import TOPIC, Harness, app_of, sync_started


async def consume_all(bus: Harness, n: int, group: str = "g") -> list[str]:
    s = await bus.subscribe(group=group)
    got = await s.take(n)
    await bus.ack(*got)
    await s.close()
    return [d.event_id for d in got]


async def test_replay_of_a_range_redelivers_processed_events_to_that_group_only(
    bus: Harness,
) -> None:
    ids = await bus.publish_apps(*"abcde")
    assert await consume_all(bus, 5) == ids
    assert await consume_all(bus, 5, group="other") == ids
    n = await bus.bus.replay(TOPIC, "g", ids[1], ids[3], reset=False)
    assert n == 3
    s = await bus.subscribe(group="g", max_in_flight=1)
    got = []
    for _ in range(3):
        (d,) = await s.take(1)
        got.append(d)
        await bus.ack(d)
    # In stream order, as first deliveries, and not swallowed by the group's dedup marks.
    assert [(d.event_id, d.attempt) for d in got] == [(i, 1) for i in ids[1:4]]
    await s.nothing_for(0.3)
    other = await bus.subscribe(group="other")
    await other.nothing_for(0.3)


async def test_replay_with_reset_moves_the_group_back_to_a_time(bus: Harness) -> None:
    ids = await bus.publish_apps("a")
    await asyncio.sleep(0.01)
    ids += await bus.publish_apps("b", "c")
    await consume_all(bus, 3)
    later = await bus.publish_apps("d")
    ms = int(ids[1].split("-")[0])  # replay from the time b was published
    n = await bus.bus.replay(TOPIC, "g", f"{ms}-0", None, reset=True)
    assert n == 3
    s = await bus.subscribe(group="g")
    assert [d.event_id for d in await s.take(3)] == ids[1:] + later


async def test_replay_to_a_new_group(bus: Harness) -> None:
    ids = await bus.publish_apps(*"abc")
    assert await bus.bus.replay(TOPIC, "audit-rebuild", ids[1], None, reset=True) == 2
    s = await bus.subscribe(group="audit-rebuild", start="$")
    assert [app_of(d) for d in await s.take(2)] == ["b", "c"]


async def test_a_bad_replay_is_invalid_and_changes_nothing(bus: Harness) -> None:
    ids = await bus.publish_apps("a", "b")
    with pytest.raises(InvalidArgument):
        await bus.bus.replay(TOPIC, "g", ids[0], ids[1], reset=True)
    with pytest.raises(InvalidArgument):
        await bus.bus.replay(TOPIC, "g", ids[1], ids[0], reset=False)
    with pytest.raises(InvalidArgument):
        await bus.bus.replay(TOPIC, "g*", ids[0], None, reset=True)
    with pytest.raises(InvalidArgument):
        await bus.bus.replay(TOPIC, "g", "yesterday", None, reset=True)
    assert not await bus.store.group_exists(TOPIC, "g")


async def test_retention_by_length_trims_the_oldest(harness_factory: object) -> None:
    bus: Harness = harness_factory(retention=Retention(max_len=50, max_age=0))  # type: ignore[operator]
    ids: list[str] = []
    for batch in range(10):
        ids += await bus.publish([sync_started(f"{batch}-{i}", f"k{batch}-{i}") for i in range(50)])
    stream = bus.store.keys(TOPIC).stream
    length = await bus.redis.xlen(stream)
    # Trimming is by whole stream nodes (100 entries): never below the bound, at most a node above.
    assert 50 <= length < 150
    first = (await bus.redis.xrange(stream, count=1))[0][0].decode()
    assert first not in ids[:300] and first in ids
    assert (await bus.redis.xrevrange(stream, count=1))[0][0].decode() == ids[-1]


async def test_retention_by_age_trims_events_older_than_it(harness_factory: object) -> None:
    bus: Harness = harness_factory(retention=Retention(max_len=0, max_age=0.5))  # type: ignore[operator]
    old = await bus.publish([sync_started(f"old{i}", f"old{i}") for i in range(250)])
    await asyncio.sleep(0.7)
    (new,) = await bus.publish([sync_started("new", "new")])
    stream = bus.store.keys(TOPIC).stream
    remaining = [i.decode() for i, _ in await bus.redis.xrange(stream)]
    assert new in remaining
    # Whole nodes of 100 go: at most the last node of old events is left.
    assert len([i for i in remaining if i in old]) < 100


async def test_settled_events_are_deleted_when_retention_says_acked(
    harness_factory: object,
) -> None:
    bus: Harness = harness_factory(  # type: ignore[operator]
        topic_retention={TOPIC: Retention(max_len=1000, max_age=3600, trim_acked=True)}
    )
    ids = await bus.publish_apps(*"abcdef")
    s = await bus.subscribe(group="fast")
    slow = await bus.subscribe(group="slow", max_in_flight=2)
    await bus.ack(*await s.take(6))
    first_two = await slow.take(2)
    await bus.ack(first_two[0])
    deleted = await bus.store.trim_settled(TOPIC)
    stream = bus.store.keys(TOPIC).stream
    remaining = [i.decode() for i, _ in await bus.redis.xrange(stream)]
    # "slow" still holds b and has not read c..f: nothing it needs is gone.
    assert deleted == 1 and remaining == ids[1:]
    await bus.ack(first_two[1])
    for _ in range(4):
        await bus.ack(*await slow.take(1))
    await bus.store.trim_settled(TOPIC)
    assert await bus.redis.xlen(stream) <= 1


def test_end_time_covers_the_whole_millisecond() -> None:
    assert f"5-{MAX_U64}" > "5-0"
