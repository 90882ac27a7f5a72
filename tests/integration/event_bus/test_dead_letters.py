"""Dead letters on a real Redis (6.2 and 7.x): list, inspect, redrive, purge."""

from __future__ import annotations

import pytest

from autoecoops.events.v1 import envelope_pb2, events_pb2
from autoecoops.kernel.event_bus.bus import DeadLetterSelector
from autoecoops.kernel.event_bus.retry import RetryPolicy
from autoecoops.kernel.mesh.errors import InvalidArgument, NotFound
from tests.integration.event_bus.conftest import TOPIC, Harness, app_of

ONE_TRY = RetryPolicy(initial_backoff=0.05, max_backoff=0.1, max_attempts=1)


async def dead_letter(bus: Harness, group: str, *apps: str) -> list[str]:
    """Publish events and have ``group`` fail each once (ONE_TRY: straight to the DLQ)."""
    s = await bus.subscribe(group=group, policy=ONE_TRY, start="$")
    await bus.publish_apps(*apps)
    ids = []
    for d in await s.take(len(apps)):
        out = await bus.bus.nack(d.delivery_id, "alice", f"cannot handle {app_of(d)}")
        assert out.dead_lettered
        ids.append(d.event_id)
    await s.close()
    return ids


async def all_dead(bus: Harness, group: str = "") -> list[str]:
    found, token = await bus.bus.list_dead_letters(TOPIC, group, 1000, "")
    assert token == ""
    return [d.event_id for d in found]


async def test_dead_letters_are_listed_in_pages_and_inspected(bus: Harness) -> None:
    ids = await dead_letter(bus, "g", *"abcde")
    page1, token = await bus.bus.list_dead_letters(TOPIC, "", 2, "")
    page2, token2 = await bus.bus.list_dead_letters(TOPIC, "", 2, token)
    page3, token3 = await bus.bus.list_dead_letters(TOPIC, "", 2, token2)
    assert [d.event_id for d in page1 + page2 + page3] == ids
    assert token and token2 and token3 == ""
    one = await bus.bus.get_dead_letter(TOPIC, page2[0].id)
    assert (one.event_id, one.group, one.reason, one.attempts) == (
        ids[2],
        "g",
        "cannot handle c",
        1,
    )
    env = envelope_pb2.Envelope.FromString(one.envelope)
    assert env.type == "autoecoops.infra.sync.started"
    with pytest.raises(NotFound):
        await bus.bus.get_dead_letter(TOPIC, "1-1")
    with pytest.raises(InvalidArgument):
        await bus.bus.get_dead_letter(TOPIC, "not-an-id")
    with pytest.raises(InvalidArgument):
        await bus.bus.list_dead_letters(TOPIC, "", 2, "bogus-token")


async def test_each_dead_letter_is_announced_on_the_deadletter_topic(bus: Harness) -> None:
    (eid,) = await dead_letter(bus, "g", "x")
    s = await bus.subscribe(group="ops", topic="events.deadletter")
    (d,) = await s.take(1)
    env = envelope_pb2.Envelope.FromString(d.envelope)
    note = events_pb2.DeadLettered()
    env.data.Unpack(note)
    assert (note.topic, note.group, note.event_id, note.attempts) == (TOPIC, "g", eid, 1)
    assert note.reason == "cannot handle x"


async def test_redrive_one_sends_it_back_to_its_group_only_with_attempts_reset(
    bus: Harness,
) -> None:
    bystander = await bus.subscribe(group="bystander")
    ids = await dead_letter(bus, "g", "a", "b")
    await bystander.take(2)
    dead, _ = await bus.bus.list_dead_letters(TOPIC, "", 10, "")
    assert await bus.bus.redrive(TOPIC, DeadLetterSelector(ids=[dead[1].id])) == 1
    s = await bus.subscribe(group="g", policy=ONE_TRY)
    (d,) = await s.take(1)
    assert (d.event_id, d.attempt, app_of(d)) == (ids[1], 1, "b")
    await bus.ack(d)
    await bystander.nothing_for(0.3)
    assert await all_dead(bus) == [ids[0]]


async def test_redrive_of_a_missing_id_redrives_nothing(bus: Harness) -> None:
    await dead_letter(bus, "g", "a")
    dead, _ = await bus.bus.list_dead_letters(TOPIC, "", 10, "")
    with pytest.raises(NotFound):
        await bus.bus.redrive(TOPIC, DeadLetterSelector(ids=[dead[0].id, "1-1"]))
    assert len(await all_dead(bus)) == 1


async def test_redrive_by_filter_and_all(bus: Harness) -> None:
    a = await dead_letter(bus, "billing", "a1", "a2")
    b = await dead_letter(bus, "search", "b1")
    n = await bus.bus.redrive(TOPIC, DeadLetterSelector(group="search"))
    assert n == 1 and await all_dead(bus) == a
    assert await bus.bus.redrive(TOPIC, DeadLetterSelector(all=True)) == 2
    assert await all_dead(bus) == []
    search = await bus.subscribe(group="search", policy=ONE_TRY)
    billing = await bus.subscribe(group="billing", policy=ONE_TRY)
    assert [d.event_id for d in await search.take(1)] == b
    # billing also still had "b1" unread (published after billing joined).
    assert sorted(d.event_id for d in await billing.take(3)) == sorted(a + b)
    (stats,) = [g for g in (await bus.bus.topic_stats(TOPIC)).groups if g.name == "search"]
    assert stats.dead_letters == 0


async def test_purge_by_ids_filter_and_all(bus: Harness) -> None:
    await dead_letter(bus, "g", *"abcd")
    await dead_letter(bus, "h", "e")
    dead, _ = await bus.bus.list_dead_letters(TOPIC, "", 10, "")
    assert await bus.bus.purge(TOPIC, DeadLetterSelector(ids=[dead[0].id, "1-1"])) == 1
    end = dead[2].time_ms + 1
    assert await bus.bus.purge(TOPIC, DeadLetterSelector(group="g", end_ms=end)) >= 1
    remaining = await all_dead(bus)
    assert dead[4].event_id in remaining
    assert await bus.bus.purge(TOPIC, DeadLetterSelector(all=True)) == len(remaining)
    assert await all_dead(bus) == []
    info = await bus.bus.topic_stats(TOPIC)
    assert info.dead_letters == 0 and all(g.dead_letters == 0 for g in info.groups)
