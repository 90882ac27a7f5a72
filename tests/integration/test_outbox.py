"""kernel/mesh/outbox.py against a real Redis: what commits with a change, and the relay."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from autoecoops.audit.v1 import audit_pb2
from autoecoops.kernel.mesh.audit import build_request
from autoecoops.kernel.mesh.outbox import (
    AuditContext,
    LogRejected,
    Outbox,
    Relay,
    current_audit,
    make_event,
    unpack_events,
)
from autoecoops.kernel.mesh.redis import connect
from autoecoops.memory.v1 import events_pb2 as memory_events
from tests.conftest import base_key

# Sets a field unless it is taken; 1 when it changed something.
SETNX = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then return 1 end
return 0
"""


@pytest.fixture
def key_prefix(redis_url: str, key_prefix: str) -> str:
    """The test's keys as one service's ("svc"): one hash tag on a cluster, so a
    script or MULTI over a key and the outbox touches one slot, as in a store."""
    return base_key(redis_url, key_prefix, "svc")


@pytest.fixture
async def r(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = connect(redis_url)
    yield client
    await client.aclose()


def ctx(action: str = "things.create") -> AuditContext:
    return AuditContext(build_request(type="rpc", service="test", action=action, trace_id=""))


async def records(r: aioredis.Redis, key: str) -> list[audit_pb2.AppendEntryRequest]:
    got = await r.xrange(key, "-", "+")
    return [audit_pb2.AppendEntryRequest.FromString(f[b"r"]) for _, f in got]


async def test_a_script_commits_the_record_only_when_it_changed_something(
    r: aioredis.Redis, key_prefix: str
) -> None:
    box = Outbox(r, key_prefix + ":outbox")
    script = box.script(SETNX, ok="r == 1")
    call = ctx()
    token = current_audit.set(call)
    try:
        assert await script(keys=[key_prefix + ":h"], args=["a", "1"]) == 1
        assert call.staged and call.observed
        # The same call again: already staged, nothing more is added.
        assert await script(keys=[key_prefix + ":h"], args=["b", "1"]) == 1
    finally:
        current_audit.reset(token)
    refused = ctx()
    token = current_audit.set(refused)
    try:
        assert await script(keys=[key_prefix + ":h"], args=["a", "2"]) == 0
    finally:
        current_audit.reset(token)
    # Refused: observed, not staged, no record. Outside a call: no record either.
    assert refused.observed and not refused.staged
    assert await script(keys=[key_prefix + ":h"], args=["c", "1"]) == 1
    got = await records(r, box.key)
    assert [g.request_id for g in got] == [call.request.request_id]
    assert got[0].entry.HasField("time")


async def test_a_script_error_commits_nothing_and_still_raises(
    r: aioredis.Redis, key_prefix: str
) -> None:
    box = Outbox(r, key_prefix + ":outbox")
    script = box.script("return redis.error_reply('nope')", ok="true")
    token = current_audit.set(ctx())
    try:
        with pytest.raises(redis.exceptions.ResponseError, match="nope"):
            await script(keys=[key_prefix + ":k"], args=[])
    finally:
        current_audit.reset(token)
    assert await r.xlen(box.key) == 0


async def test_events_commit_with_the_change_only(r: aioredis.Redis, key_prefix: str) -> None:
    box = Outbox(r, key_prefix + ":outbox")
    script = box.script(SETNX, ok="r == 1")
    event = make_event(
        memory_events.DocumentDeleted(namespace="ops", document_id="d"),
        source="//autoecoops/kernel/memory-hub",
        subject="d",
        resource="memory/namespaces/ops/documents/d",
        key="k1",
    )
    assert await script(keys=[key_prefix + ":h"], args=["a", "1"], events=[event]) == 1
    assert await script(keys=[key_prefix + ":h"], args=["a", "1"], events=[event]) == 0
    got = await r.xrange(box.events_key, "-", "+")
    assert len(got) == 1
    (req,) = unpack_events(got[0][1][b"ev"])
    assert req.topic == "memory.documents"
    assert req.envelope.type == "autoecoops.memory.document.deleted"
    assert req.envelope.actor.subject == "system:memory-hub" and req.envelope.trace_parent


async def test_a_transaction_commits_the_record_with_it(r: aioredis.Redis, key_prefix: str) -> None:
    box = Outbox(r, key_prefix + ":outbox")
    call = ctx()
    token = current_audit.set(call)
    try:
        async with r.pipeline(transaction=True) as pipe:
            pipe.set(key_prefix + ":x", "1")
            pipe.get(key_prefix + ":x")
            assert await box.execute(pipe) == [True, b"1"]
    finally:
        current_audit.reset(token)
    assert call.staged
    assert [g.request_id for g in await records(r, box.key)] == [call.request.request_id]


class Log:
    """A stand-in for the log's append: records what it was given, can be made to fail."""

    def __init__(self) -> None:
        self.appended: list[audit_pb2.AppendEntryRequest] = []
        self.down = False
        self.refuse = ""

    async def __call__(self, reqs: Sequence[audit_pb2.AppendEntryRequest]) -> list[int]:
        if self.down:
            raise ConnectionError("the log is down")
        if any(q.entry.action == self.refuse for q in reqs):
            raise LogRejected("invalid entry")
        held = {q.request_id: i for i, q in enumerate(self.appended)}
        for q in reqs:
            if q.request_id in held and self.appended[held[q.request_id]] != q:
                raise LogRejected(
                    "request_id already used",
                    "REQUEST_ID_REUSED",
                    {"index": str(held[q.request_id])},
                )
        start = len(self.appended)
        self.appended += reqs
        return list(range(start, start + len(reqs)))


async def test_the_relay_appends_in_order_keeps_all_while_down_and_sets_aside_a_refused_record(
    r: aioredis.Redis, key_prefix: str
) -> None:
    log = Log()
    relay = Relay(log, probe_interval=0.05, max_backoff=0.05)
    box = Outbox(r, key_prefix + ":outbox", relay)
    try:
        first = ctx("a.one")
        await box.stage(first)
        assert await relay.wait(box, first.staged_id, 5.0) == 0
        log.down = True
        waiting = []
        for n in range(5):
            c = ctx(f"a.{n}")
            await box.stage(c)
            waiting.append(c)
        late = await relay.wait(box, waiting[0].staged_id, 0.3)
        assert late is None and not relay.reachable
        assert (await relay.status())[box.key]["backlog"] == 5
        log.refuse = "a.2"
        log.down = False
        assert await relay.flush(within=5.0)
        assert relay.reachable
        # In commit order, the refused one set aside (never deleted, never blocking).
        assert [q.entry.action for q in log.appended] == ["a.one", "a.0", "a.1", "a.3", "a.4"]
        aside = await r.xrange(box.rejected_key, "-", "+")
        assert len(aside) == 1
        assert await relay.wait(box, waiting[4].staged_id, 1.0) == 4
    finally:
        await relay.close()


async def test_only_the_lease_holder_drains_and_other_replicas_see_their_records_leave(
    r: aioredis.Redis, key_prefix: str
) -> None:
    log = Log()
    one, two = Relay(log, probe_interval=0.2), Relay(log, probe_interval=0.2)
    a = Outbox(r, key_prefix + ":outbox", one)
    b = Outbox(r, key_prefix + ":outbox", two)
    try:
        c1 = ctx("from.one")
        await a.stage(c1)
        assert await one.wait(a, c1.staged_id, 5.0) == 0
        c2 = ctx("from.two")
        await b.stage(c2)
        got = await asyncio.wait_for(two.wait(b, c2.staged_id, 5.0), 6.0)
        assert got in (1, -1)  # -1: appended by the other replica, index unknown here
        assert [q.entry.action for q in log.appended] == ["from.one", "from.two"]
    finally:
        await one.close()
        await two.close()


async def test_a_retry_whose_request_id_is_already_in_the_log_counts_as_recorded(
    r: aioredis.Redis, key_prefix: str
) -> None:
    """A client's retry of one change (same request_id, AIP-155) derives the same audit
    request id but builds a new entry (its own time): the log refuses it as
    REQUEST_ID_REUSED, which means the change is recorded, not that the record is bad."""
    log = Log()
    relay = Relay(log, probe_interval=0.05, max_backoff=0.05)
    box = Outbox(r, key_prefix + ":outbox", relay)
    try:
        first, retry = ctx("a.create"), ctx("a.create")
        retry.request.request_id = first.request.request_id
        retry.request.entry.resource = "another time, another trace"
        await box.stage(first)
        assert await relay.wait(box, first.staged_id, 5.0) == 0
        await box.stage(retry)
        assert await relay.wait(box, retry.staged_id, 5.0) == 0  # the original's index
        assert len(log.appended) == 1
        assert await r.xlen(box.rejected_key) == 0
    finally:
        await relay.close()


async def test_the_first_call_after_the_log_returns_is_not_refused_on_an_old_verdict(
    r: aioredis.Redis, key_prefix: str
) -> None:
    log = Log()
    probes: list[float] = []

    async def probe(within: float) -> None:
        probes.append(within)
        if log.down:
            raise ConnectionError("the log is down")

    # A slow periodic probe: only recheck() can notice the log is back in time.
    relay = Relay(log, probe=probe, probe_interval=60, max_backoff=60)
    box = Outbox(r, key_prefix + ":outbox", relay)
    try:
        log.down = True
        c = ctx("a.one")
        await box.stage(c)
        assert await relay.wait(box, c.staged_id, 0.3) is None and not relay.reachable
        assert not await relay.recheck(1.0)  # still down: a fresh look says so
        assert not await relay.recheck(1.0)  # and a second look right after is not made
        assert len(probes) == 1
        log.down = False
        relay._probed_at = 0.0  # the last failed look is old now
        assert await asyncio.gather(*(relay.recheck(1.0) for _ in range(20))) == [True] * 20
        assert len(probes) == 2  # one look for twenty callers
        assert await relay.wait(box, c.staged_id, 5.0) == 0  # the backlog drains at once
    finally:
        await relay.close()
