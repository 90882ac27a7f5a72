"""event-bus's Redis persistence: topic streams, consumer groups, retries, DLQ.

Every key lives under one base (``<prefix>events:``): a topic ``t`` is the
stream ``<base>t``, and everything else about it is ``<base>t:...``. Topic
names come from the contracts and group names are checked (names.py), so no
user text reaches a key pattern. State changes are the scripts of lua.py.

Redis Cluster is not supported with this layout: a topic's keys do not share
a hash tag, because the stream address ``autoecoops:events:<topic>`` is part
of the contract. Standalone Redis and Sentinel are.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rx
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from autoecoops.kernel.event_bus import lua
from autoecoops.kernel.event_bus.envelope import ValidEvent
from autoecoops.kernel.event_bus.names import id_ms
from autoecoops.kernel.event_bus.retry import RetryPolicy
from autoecoops.kernel.event_bus.settings import EventBusSettings
from autoecoops.kernel.mesh.errors import AlreadyExists, Unavailable
from autoecoops.kernel.mesh.redis import connect

log = logging.getLogger("autoecoops.event_bus")

#: How many expired leases one reclaim pass takes over.
RECLAIM_BATCH = 100
#: Events scheduled per replay script call (each call is atomic and short).
REPLAY_CHUNK = 1000
#: Redis errors that mean "not now": the caller gets UNAVAILABLE and retries.
_TRANSIENT = ("LOADING", "MASTERDOWN", "MISCONF", "TRYAGAIN", "READONLY", "OOM", "BUSY ")


def connect_bus(url: str) -> aioredis.Redis:
    """The bus's Redis client: the mesh's ``connect``, plus one immediate retry
    on a connection error.

    After Redis restarts, every connection pooled before the outage fails its
    next command ("Connection closed by server"); without the retry each of
    them would fail one client call with UNAVAILABLE long after Redis is back.
    A command is retried only when its connection broke, and every script of
    the bus tolerates running twice (publish is deduplicated, settling checks
    the lease, acks are idempotent): at worst the second run reports the first
    run's effect as already done.
    """
    return connect(url, retry=Retry(NoBackoff(), 1), retry_on_error=[rx.ConnectionError])


class NoGroup(Exception):
    """Redis has no such consumer group (never created, or lost with its data)."""


@contextlib.asynccontextmanager
async def redis_errors() -> AsyncIterator[None]:
    """Turn Redis failures into ``Unavailable`` (never a false success) and a
    missing group into ``NoGroup``."""
    try:
        yield
    except (rx.ConnectionError, rx.TimeoutError, rx.BusyLoadingError, OSError) as err:
        raise Unavailable(
            f"Redis is unavailable: {type(err).__name__}",
            reason="REDIS_UNAVAILABLE",
            retry_delay=1.0,
        ) from err
    except rx.ResponseError as err:
        text = str(err)
        if "NOGROUP" in text:
            raise NoGroup(text) from err
        if any(code in text for code in _TRANSIENT):
            raise Unavailable(
                f"Redis cannot serve the request now: {text.split()[0] if text else 'error'}",
                reason="REDIS_UNAVAILABLE",
                retry_delay=1.0,
            ) from err
        raise


@dataclass(frozen=True, slots=True)
class TopicKeys:
    """The keys of one topic."""

    stream: str
    #: Dead letters of every group of the topic.
    dlq: str
    #: Hash: group -> dead letters currently held.
    dlq_counts: str
    #: Prefix of producer dedup records (+ key digest).
    idem: str

    def group(self, group: str) -> GroupKeys:
        """The keys of a consumer group of this topic."""
        g = f"{self.stream}:g:{group}:"
        return GroupKeys(meta=g + "meta", retry=g + "retry", attempts=g + "att", dedup=g + "d:")


@dataclass(frozen=True, slots=True)
class GroupKeys:
    """The keys of one consumer group (see lua.py for what each holds)."""

    meta: str
    retry: str
    attempts: str
    dedup: str


@dataclass(frozen=True, slots=True)
class Entry:
    """A stream entry leased to a consumer."""

    id: str
    attempt: int
    #: The stored envelope (empty when only the lease matters).
    envelope: bytes = b""
    #: The original event's id, for a redriven copy.
    original_id: str = ""
    #: The idempotency-key digest.
    key: str = ""

    @property
    def event_id(self) -> str:
        """The event's id: the entry id, or the original's for a redriven copy."""
        return self.original_id or self.id


@dataclass(frozen=True, slots=True)
class FetchResult:
    """What one fetch leased, and what the subscription should wait for next."""

    entries: list[Entry]
    deduplicated: int
    lost: int
    #: True when more new events may be waiting right away.
    more: bool
    #: Epoch ms the earliest retry falls due, or None.
    next_due: float | None
    #: The newest event id, to block for anything after it.
    last_id: str
    #: Deliveries this consumer may still take.
    free: int


@dataclass(frozen=True, slots=True)
class Settle:
    """One delivery to settle: which entry, held by whom, at which attempt."""

    entry_id: str
    consumer: str
    attempt: int
    #: The idempotency-key digest, when known ('' makes the script read the event).
    key: str = ""


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed delivery: retry it at ``due_ms``, or dead-letter it."""

    settle: Settle
    dead_letter: bool
    due_ms: int
    reason: str


@dataclass(frozen=True, slots=True)
class FailResult:
    """What became of a failed delivery."""

    #: 'r' retry scheduled, 'd' dead-lettered, 'x' lease already lost, 'l' event gone.
    outcome: str
    due_ms: int = 0
    dead_letter_id: str = ""


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    """A dead letter as stored."""

    id: str
    group: str
    event_id: str
    type: str
    reason: str
    attempts: int
    consumer: str
    time_ms: int
    envelope: bytes


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """Redis's view of a consumer group plus the bus's counters."""

    name: str
    consumers: int
    pending: int
    lag: int
    last_delivered_id: str
    oldest_pending_ms: int | None
    dead_letters: int
    counters: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TopicInfo:
    """A topic's stream as Redis holds it."""

    name: str
    length: int
    groups: list[GroupInfo]
    dead_letters: int
    last_id: str | None


@dataclass(frozen=True, slots=True)
class GroupConfig:
    """A group's stored settings."""

    policy: RetryPolicy
    vis_ms: int
    gen: str


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _leased(raw: Sequence[Any]) -> list[Entry]:
    return [
        Entry(_s(raw[i]), int(raw[i + 1]), raw[i + 2], _s(raw[i + 3]), _s(raw[i + 4]))
        for i in range(0, len(raw), 5)
    ]


class EventStore:
    """Topic streams and consumer groups on one Redis, under one key base."""

    def __init__(self, redis: aioredis.Redis, base: str, settings: EventBusSettings) -> None:
        self.redis = redis
        self.base = base
        self.settings = settings
        self._secret: bytes | None = None
        self._version: tuple[int, ...] | None = None
        r = redis
        self._publish = r.register_script(lua.PUBLISH)
        self._group_init = r.register_script(lua.GROUP_INIT)
        self._fetch = r.register_script(lua.FETCH)
        self._reclaim = r.register_script(lua.RECLAIM)
        self._ack = r.register_script(lua.ACK)
        self._fail = r.register_script(lua.FAIL)
        self._extend = r.register_script(lua.EXTEND)
        self._replay_range = r.register_script(lua.REPLAY_RANGE)
        self._count_range = r.register_script(lua.COUNT_RANGE)
        self._redrive = r.register_script(lua.REDRIVE)
        self._purge = r.register_script(lua.PURGE)

    # -- keys ------------------------------------------------------------

    def keys(self, topic: str) -> TopicKeys:
        """The keys of ``topic``."""
        s = self.base + topic
        return TopicKeys(stream=s, dlq=s + ":dlq", dlq_counts=s + ":dlqn", idem=s + ":idem:")

    @property
    def outbox(self) -> str:
        """The stream of processing outcomes waiting to be sent to the audit trail."""
        return self.base + "_bus:audit"

    async def secret(self) -> bytes:
        """The bus's delivery-id secret, shared by every replica through Redis."""
        if self._secret is None:
            key = self.base + "_bus:secret"
            await self.redis.set(key, secrets.token_bytes(32), nx=True)
            value: Any = await self.redis.get(key)
            if not value:
                raise Unavailable("the delivery-id secret could not be read", retry_delay=1.0)
            self._secret = bytes(value)
        return self._secret

    async def version(self) -> tuple[int, ...]:
        """The Redis server version, e.g. (7, 0, 15)."""
        if self._version is None:
            info = await self.redis.info("server")
            self._version = tuple(int(p) for p in str(info["redis_version"]).split(".")[:3])
        return self._version

    # -- publish ---------------------------------------------------------

    async def publish(
        self, topic: str, events: Sequence[ValidEvent], now_ms: int
    ) -> list[tuple[str, bool]]:
        """Append ``events`` (deduplicated, trimmed); return (event id, duplicate) each."""
        k = self.keys(topic)
        ret = self.settings.retention_for(topic)
        minid = f"{max(now_ms - int(ret.max_age * 1000), 0)}-0" if ret.max_age else ""
        args: list[Any] = [ret.max_len, minid, int(self.settings.dedup_window * 1000), k.idem]
        for e in events:
            # Tabs never occur in the digests, the type or a traceparent; the
            # actor goes last, so the script keeps any tab it holds.
            args += [
                f"{e.key_hash}\t{e.content_hash}\t{e.type}\t{e.trace_parent}\t{e.actor}",
                e.data,
            ]
        raw = _s(await self._publish(keys=[k.stream], args=args))
        if raw.startswith("conflict "):
            index = int(raw.split()[1])
            raise AlreadyExists(
                f"envelopes[{index}]: the idempotency key was already used for a different "
                "event within the dedup window; use a new key for a new event",
                reason="IDEMPOTENCY_KEY_REUSED",
                metadata={"index": str(index)},
            )
        return [(i.rstrip("+"), i.endswith("+")) for i in raw.split(" ")]

    # -- groups ----------------------------------------------------------

    async def ensure_group(
        self,
        topic: str,
        group: str,
        start: str,
        now_ms: int,
        policy: RetryPolicy | None = None,
        vis_ms: int | None = None,
    ) -> bool:
        """Create the group at ``start`` ('$' or an id) if missing, and store its
        settings (given ones replace, defaults only fill gaps). True if created."""
        k = self.keys(topic)
        g = k.group(group)
        default_vis = int(self.settings.visibility_timeout * 1000)
        args: list[Any] = [group, start, now_ms, default_vis if vis_ms is None else vis_ms]
        args += ["0" if vis_ms is None else "1", "0" if policy is None else "1"]
        for name, value in (policy or RetryPolicy()).to_fields().items():
            args += [name, value]
        created = await self._group_init(keys=[k.stream, g.meta], args=args)
        return bool(int(created))

    async def group_config(self, topic: str, group: str) -> GroupConfig | None:
        """The stored settings of a group, or None if it was never set up."""
        raw = await self.redis.hgetall(self.keys(topic).group(group).meta)
        if not raw:
            return None
        meta = {_s(a): _s(b) for a, b in raw.items()}
        vis = int(meta.get("vis_ms", self.settings.visibility_timeout * 1000))
        return GroupConfig(RetryPolicy.from_fields(meta), vis, meta.get("gen", "0"))

    async def group_exists(self, topic: str, group: str) -> bool:
        """True when Redis has the consumer group."""
        try:
            groups = await self.redis.xinfo_groups(self.keys(topic).stream)
        except rx.ResponseError:
            return False
        return any(_s(g["name"]) == group for g in groups)

    # -- delivery --------------------------------------------------------

    async def fetch(
        self,
        topic: str,
        group: str,
        consumer: str,
        max_in_flight: int,
        ordered: bool,
        vis_ms: int,
        now_ms: int,
        park_ms: int,
    ) -> FetchResult:
        """Lease to ``consumer`` what it has room for: due retries, then new events."""
        k = self.keys(topic)
        g = k.group(group)
        raw = await self._fetch(
            keys=[k.stream, g.meta, g.retry, g.attempts],
            args=[
                group,
                consumer,
                max_in_flight,
                now_ms,
                "1" if ordered else "0",
                vis_ms,
                g.dedup,
                park_ms,
            ],
        )
        due = float(_s(raw[4]))
        return FetchResult(
            entries=_leased(raw[0]),
            deduplicated=int(raw[1]),
            lost=int(raw[2]),
            more=bool(int(raw[3])),
            next_due=None if due < 0 else due,
            last_id=_s(raw[5]),
            free=int(raw[6]),
        )

    async def wait_for_events(self, topic: str, after_id: str, block: float) -> None:
        """Block until the topic has an event newer than ``after_id``, or ``block`` seconds."""
        ms = max(int(block * 1000), 1)
        await self.redis.xread({self.keys(topic).stream: after_id}, count=1, block=ms)

    async def reclaim(
        self, topic: str, group: str, consumer: str, vis_ms: int
    ) -> tuple[list[Entry], int]:
        """Take over deliveries idle past the visibility timeout (XAUTOCLAIM)."""
        k = self.keys(topic)
        g = k.group(group)
        raw = await self._reclaim(
            keys=[k.stream, g.meta, g.attempts], args=[group, consumer, vis_ms, RECLAIM_BATCH]
        )
        ids = raw[0]
        return [Entry(_s(ids[i]), int(ids[i + 1])) for i in range(0, len(ids), 2)], int(raw[1])

    async def ack(
        self,
        topic: str,
        group: str,
        items: Sequence[Settle],
        now_ms: int,
        by: str,
        audit: bool,
    ) -> list[str]:
        """Acknowledge deliveries; per item 'a' acked, 'A' settled before, 'x' expired."""
        k = self.keys(topic)
        g = k.group(group)
        args: list[Any] = [
            group,
            int(self.settings.done_ttl(topic) * 1000),
            g.dedup,
            now_ms,
            "1" if audit else "0",
            by,
            topic,
        ]
        for s in items:
            args += [s.entry_id, s.consumer, s.attempt, s.key]
        raw = await self._ack(keys=[k.stream, g.meta, g.attempts, g.retry, self.outbox], args=args)
        return [_s(c) for c in raw]

    async def fail(
        self,
        topic: str,
        group: str,
        items: Sequence[Failure],
        now_ms: int,
        by: str,
        audit: bool,
    ) -> list[FailResult]:
        """Settle failed deliveries: schedule their retry or dead-letter them."""
        k = self.keys(topic)
        g = k.group(group)
        args: list[Any] = [
            group,
            now_ms,
            g.dedup,
            self.settings.dlq_max_len,
            "1" if audit else "0",
            by,
            topic,
        ]
        for f in items:
            s = f.settle
            args += [s.entry_id, s.consumer, s.attempt, "d" if f.dead_letter else "r"]
            args += [f.due_ms, f.reason]
        raw = await self._fail(
            keys=[k.stream, g.meta, g.retry, g.attempts, k.dlq, k.dlq_counts, self.outbox],
            args=args,
        )
        out: list[FailResult] = []
        for r in raw:
            code = _s(r[0])
            if code == "r":
                out.append(FailResult("r", due_ms=int(float(_s(r[1])))))
            elif code == "d":
                out.append(FailResult("d", dead_letter_id=_s(r[1])))
            else:
                out.append(FailResult(code))
        return out

    async def extend(
        self, topic: str, group: str, items: Sequence[tuple[Settle, int]]
    ) -> list[int]:
        """Extend leases by the given ms (0 = the visibility timeout); -1 where lost."""
        k = self.keys(topic)
        g = k.group(group)
        args: list[Any] = [group, g.dedup, int(self.settings.visibility_timeout * 1000)]
        for s, ext in items:
            args += [s.entry_id, s.consumer, s.attempt, ext, s.key]
        raw = await self._extend(keys=[k.stream, g.meta, g.attempts], args=args)
        return [int(x) for x in raw]

    # -- dead letters ----------------------------------------------------

    async def dead_letters(
        self, topic: str, start: str, end: str, count: int
    ) -> list[DeadLetterRecord]:
        """Dead letters with ids in [start, end] (XRANGE syntax), oldest first."""
        raw: Any = await self.redis.xrange(self.keys(topic).dlq, start, end, count=count)
        return [_dead_letter(_s(i), f) for i, f in raw]

    async def dead_letter(self, topic: str, dead_letter_id: str) -> DeadLetterRecord | None:
        """One dead letter, or None."""
        found = await self.dead_letters(topic, dead_letter_id, dead_letter_id, 1)
        return found[0] if found else None

    async def redrive(self, topic: str, ids: Sequence[str], strict: bool) -> int | str:
        """Send dead letters back to their groups; the count, or the first missing
        id when ``strict`` and one does not exist (then nothing is redriven)."""
        if not ids:
            return 0
        k = self.keys(topic)
        args = [self.settings.retention_for(topic).max_len, "1" if strict else "0", *ids]
        raw = await self._redrive(keys=[k.stream, k.dlq, k.dlq_counts], args=args)
        return int(raw[1]) if _s(raw[0]) == "ok" else _s(raw[1])

    async def purge(self, topic: str, ids: Sequence[str] | None) -> int:
        """Delete the given dead letters (None: all of the topic's); the count deleted."""
        k = self.keys(topic)
        args = ["*"] if ids is None else list(ids)
        if not args:
            return 0
        return int(await self._purge(keys=[k.dlq, k.dlq_counts], args=args))

    # -- replay ----------------------------------------------------------

    async def replay_reset(self, topic: str, group: str, before_id: str, now_ms: int) -> int:
        """Move the group back to just after ``before_id``; the events it will re-read."""
        k = self.keys(topic)
        g = k.group(group)
        await self.ensure_group(topic, group, before_id, now_ms)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xgroup_setid(k.stream, group, before_id)
            # A new generation: the group's "processed" marks no longer suppress.
            pipe.hincrby(g.meta, "gen", 1)
            await pipe.execute()
        return int(await self._count_range(keys=[k.stream], args=[f"({before_id}", "+"]))

    async def replay_range(self, topic: str, group: str, start: str, end: str, now_ms: int) -> int:
        """Schedule the group's events in [start, end] for redelivery; the count in range."""
        k = self.keys(topic)
        g = k.group(group)
        if await self.ensure_group(topic, group, "$", now_ms):
            log.info("replay created group %s on %s", group, topic)
        last = await self._last_delivered(k.stream, group)
        await self.redis.hincrby(g.meta, "gen", 1)
        # Due long ago, so replayed events come before ordinary retries.
        base = now_ms - 10**9
        total, offset, cursor = 0, 0, start
        while True:
            n, _scheduled, last_scanned, scanned = await self._replay_range(
                keys=[k.stream, g.retry, g.attempts],
                args=[group, cursor, end, REPLAY_CHUNK, last, base, offset],
            )
            total += int(n)
            offset += REPLAY_CHUNK
            if int(scanned) < REPLAY_CHUNK:
                return total
            cursor = "(" + _s(last_scanned)

    async def _last_delivered(self, stream: str, group: str) -> str:
        for g in await self.redis.xinfo_groups(stream):
            if _s(g["name"]) == group:
                return _s(g["last-delivered-id"])
        raise NoGroup(group)

    # -- stats -----------------------------------------------------------

    async def topic_info(self, topic: str, only_group: str = "") -> TopicInfo | None:
        """Length, groups and counters of a topic; None if it has no stream."""
        k = self.keys(topic)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(k.stream)
            pipe.xlen(k.stream)
            pipe.xlen(k.dlq)
            pipe.hgetall(k.dlq_counts)
            pipe.xrevrange(k.stream, "+", "-", count=1)
            exists, length, dlq_len, dlq_counts, last = await pipe.execute()
        if not exists:
            return None
        groups = []
        for g in await self.redis.xinfo_groups(k.stream):
            name = _s(g["name"])
            if only_group and name != only_group:
                continue
            groups.append(await self._group_info(topic, g, dlq_counts))
        return TopicInfo(
            name=topic,
            length=int(length),
            groups=groups,
            dead_letters=int(dlq_len),
            last_id=_s(last[0][0]) if last else None,
        )

    async def _group_info(
        self, topic: str, raw: dict[Any, Any], dlq_counts: dict[bytes, bytes]
    ) -> GroupInfo:
        k = self.keys(topic)
        name = _s(raw["name"])
        last = _s(raw["last-delivered-id"])
        lag = raw.get("lag")
        if lag is None:
            # Before Redis 7 (or when 7 cannot tell): count what the group has not read.
            lag = await self._count_range(keys=[k.stream], args=[f"({last}", "+"])
        pending = await self.redis.xpending(k.stream, name)
        meta = await self.redis.hgetall(k.group(name).meta)
        counters = {
            _s(a): int(b)
            for a, b in meta.items()
            if _s(a)
            in ("delivered", "acked", "retried", "dead_lettered", "deduplicated", "retry_scheduled")
        }
        oldest = _s(pending["min"]) if pending.get("min") else None
        return GroupInfo(
            name=name,
            consumers=int(raw["consumers"]),
            pending=int(pending["pending"]),
            lag=int(lag),
            last_delivered_id=last,
            oldest_pending_ms=id_ms(oldest) if oldest else None,
            dead_letters=int(dlq_counts.get(name.encode(), 0)),
            counters=counters,
        )

    async def existing(self, topics: Sequence[str]) -> list[str]:
        """The topics of ``topics`` that have a stream."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for t in topics:
                pipe.exists(self.keys(t).stream)
            found = await pipe.execute()
        return [t for t, e in zip(topics, found, strict=True) if e]

    # -- retention -------------------------------------------------------

    async def trim_settled(self, topic: str) -> int:
        """Delete the events every group of the topic has settled; the count deleted.

        The watermark is the lowest of: each group's next unread event, its
        oldest pending delivery and its oldest waiting retry.
        """
        k = self.keys(topic)
        groups = await self.redis.xinfo_groups(k.stream)
        if not groups:
            return 0
        marks: list[str] = []
        for g in groups:
            name = _s(g["name"])
            marks.append(_s(g["last-delivered-id"]))
            pending = await self.redis.xpending(k.stream, name)
            if pending.get("min"):
                marks.append(_s(pending["min"]))
            waiting = await self.redis.zrange(k.group(name).retry, 0, -1)
            marks += [_s(w) for w in waiting]
        low = min(marks, key=lambda m: tuple(int(p) for p in m.split("-")))
        # MINID keeps `low` itself: one settled event too many at most.
        return int(await self.redis.xtrim(k.stream, minid=low, approximate=False))


def _dead_letter(entry_id: str, f: dict[bytes, bytes]) -> DeadLetterRecord:
    def get(name: bytes) -> str:
        return f.get(name, b"").decode()

    return DeadLetterRecord(
        id=entry_id,
        group=get(b"group"),
        event_id=get(b"eid"),
        type=get(b"t"),
        reason=get(b"reason"),
        attempts=int(get(b"attempts") or 0),
        consumer=get(b"consumer"),
        time_ms=int(get(b"time") or 0),
        envelope=f.get(b"e", b""),
    )
