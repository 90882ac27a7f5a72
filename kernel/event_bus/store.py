"""event-bus's Redis persistence: topic streams, consumer groups, retries, DLQ.

Every key lives under one base (``<prefix>events:``). A topic has one or more
partitions (its count is fixed once, in the hash ``<base>_bus:partitions``):

- a topic of ONE partition on a standalone Redis keeps the layout it always
  had: the stream ``<base>t`` and everything else about it ``<base>t:...``;
- partition ``p`` of a partitioned topic (and every topic on Redis Cluster)
  is the stream ``<base>{t:p}`` with everything else ``<base>{t:p}:...``:
  the hash tag puts a partition's keys in one slot, so every script (each
  touches one partition only) runs on one node, and partitions spread over
  the cluster.

Topic names come from the contracts and group names are checked (names.py),
so no user text reaches a key pattern. State changes are the scripts of lua.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, NoReturn

import redis.asyncio as aioredis
from redis import exceptions as rx

from autoecoops.kernel.event_bus import lua
from autoecoops.kernel.event_bus.envelope import ValidEvent
from autoecoops.kernel.event_bus.names import id_ms
from autoecoops.kernel.event_bus.retry import RetryPolicy
from autoecoops.kernel.event_bus.settings import EventBusSettings
from autoecoops.kernel.mesh.errors import AlreadyExists, Unavailable
from autoecoops.kernel.mesh.outbox import Outbox, OutboxScript
from autoecoops.kernel.mesh.redis import RETRY_DELAY, confirm_replicated, redis_unavailable

log = logging.getLogger("autoecoops.event_bus")

#: How many expired leases one reclaim pass takes over.
RECLAIM_BATCH = 100
#: Events scheduled per replay script call (each call is atomic and short).
REPLAY_CHUNK = 1000


def partition_of(key: str, partitions: int) -> int:
    """The partition of an ordering key: CRC-32 of its UTF-8 bytes, modulo the count.

    Stable across processes and versions (never Python's salted ``hash``), so
    every replica sends a key to the same partition.
    """
    return zlib.crc32(key.encode()) % partitions if partitions > 1 else 0


def is_cluster(redis: Any) -> bool:
    """True for a Redis Cluster client (its scripts must stay within one slot)."""
    return type(redis).__name__ == "RedisCluster"


class NoGroup(Exception):
    """Redis has no such consumer group (never created, or lost with its data)."""


@contextlib.asynccontextmanager
async def redis_errors() -> AsyncIterator[None]:
    """Turn Redis failures into ``Unavailable`` (never a false success) through
    the mesh's one mapping, and a missing group into ``NoGroup``."""
    try:
        yield
    except rx.RedisError as err:
        if isinstance(err, rx.ResponseError) and "NOGROUP" in str(err):
            raise NoGroup(str(err)) from err
        mapped = redis_unavailable(err)
        if mapped is None:
            raise
        raise mapped from err
    except OSError as err:
        # A socket error redis-py did not wrap is the same outage.
        raise Unavailable(
            f"Redis cannot serve the request now ({type(err).__name__}); retry",
            reason="REDIS_UNAVAILABLE",
            retry_delay=RETRY_DELAY,
        ) from err


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
    #: The partition (0 for a topic of one partition).
    partition: int = 0
    #: The hash-tagged layout's own outboxes ('' in the one-stream layout,
    #: which uses the service's): audited calls' records and processing outcomes.
    outbox: str = ""
    outcomes: str = ""

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
    partition: int = 0


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
    partitions: int = 1


@dataclass(frozen=True, slots=True)
class GroupConfig:
    """A group's stored settings."""

    policy: RetryPolicy
    vis_ms: int
    gen: str


def _reused(index: int) -> NoReturn:
    raise AlreadyExists(
        f"envelopes[{index}]: the idempotency key was already used for a different "
        "event within the dedup window; use a new key for a new event",
        reason="IDEMPOTENCY_KEY_REUSED",
        metadata={"index": str(index)},
    )


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _leased(raw: Sequence[Any]) -> list[Entry]:
    return [
        Entry(_s(raw[i]), int(raw[i + 1]), raw[i + 2], _s(raw[i + 3]), _s(raw[i + 4]))
        for i in range(0, len(raw), 5)
    ]


class Published(NamedTuple):
    """Where one published event went."""

    event_id: str
    #: True when its idempotency key had been seen: nothing was stored.
    duplicate: bool
    partition: int


class EventStore:
    """Topic streams and consumer groups on one Redis, under one key base."""

    def __init__(
        self,
        redis: aioredis.Redis,
        base: str,
        settings: EventBusSettings,
        outbox: Outbox | None = None,
        slot_outboxes: bool | None = None,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
    ) -> None:
        self.redis = redis
        #: A publish is acknowledged once this many replicas have it (``WAIT``;
        #: MeshConfig.wait_replicas, 1 on a Redis Cluster), so a failover cannot
        #: lose an acknowledged event.
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.base = base
        self.settings = settings
        self._secret: bytes | None = None
        self._version: tuple[int, ...] | None = None
        self.cluster = is_cluster(redis)
        #: Where partition keys start. On a cluster the base carries event-bus's
        #: own hash tag (kernel/mesh/redis.py service_base), and the first tag of a
        #: key wins: without it, each partition's ``{topic:p}`` is its slot, so
        #: partitions spread over the cluster's masters.
        self.partition_base = base.replace("{", "").replace("}", "") if self.cluster else base
        #: Give each hash-tagged partition outboxes of its own, in its slot: a
        #: script that changes a partition and commits its audit record must
        #: touch one slot. Needed on Redis Cluster; elsewhere the service's
        #: one outbox keeps every record in one commit order.
        self.slot_outboxes = self.cluster if slot_outboxes is None else slot_outboxes
        #: Called with a partition's keys the first time it is used, so its
        #: outcome outbox is drained (set by audit.relay_outcomes).
        self.on_partition: Callable[[TopicKeys], None] | None = None
        self.audit_outbox = outbox
        self._counts: dict[str, int] = {}
        self._attached: set[str] = set()
        self._boxes: dict[str, Outbox] = {}
        self._audited: dict[tuple[str, str], OutboxScript] = {}
        self._fix_count: Any = None
        r = redis
        # PUBLISH changed something when an id has no '+' (not a duplicate).
        self._sources = {
            "publish": (
                lua.PUBLISH,
                "type(r) == 'string' and string.sub(r, 1, 8) ~= 'conflict'"
                " and (string.find(r, '%d$') ~= nil or string.find(r, '%d ') ~= nil)",
            ),
            "ack": (
                lua.ACK,
                "(function() for _, c in ipairs(r) do if c == 'a' then return true end end"
                " return false end)()",
            ),
            "fail": (
                lua.FAIL,
                "(function() for _, c in ipairs(r) do if c[1] == 'r' or c[1] == 'd' then"
                " return true end end return false end)()",
            ),
            "redrive": (lua.REDRIVE, "r[1] == 'ok' and tonumber(r[2]) > 0"),
            "purge": (lua.PURGE, "tonumber(r) > 0"),
        }
        self._plain = {name: r.register_script(src) for name, (src, _) in self._sources.items()}
        self._group_init = r.register_script(lua.GROUP_INIT)
        self._fetch = r.register_script(lua.FETCH)
        self._reclaim = r.register_script(lua.RECLAIM)
        self._extend = r.register_script(lua.EXTEND)
        self._replay_range = r.register_script(lua.REPLAY_RANGE)
        self._count_range = r.register_script(lua.COUNT_RANGE)

    def _script(self, name: str, k: TopicKeys) -> Any:
        """The script ``name`` for partition ``k``: with an outbox, wrapped so it also
        commits the audited call's record (to the partition's own outbox if it has one)."""
        box = self._box(k.outbox) if k.outbox else self.audit_outbox
        if box is None:
            return self._plain[name]
        script = self._audited.get((name, box.key))
        if script is None:
            src, ok = self._sources[name]
            script = self._audited[(name, box.key)] = box.script(src, ok, client=self.redis)
        return script

    def _box(self, key: str) -> Outbox | None:
        """The outbox stream ``key``, drained by the service outbox's relay."""
        if self.audit_outbox is None:
            return None
        box = self._boxes.get(key)
        if box is None:
            box = self._boxes[key] = Outbox(self.audit_outbox.redis, key, self.audit_outbox.relay)
        return box

    # -- keys and partitions ---------------------------------------------

    @property
    def partitions_key(self) -> str:
        """Hash: topic -> its partition count, fixed on first use."""
        return self.base + "_bus:partitions"

    def keys(self, topic: str, partition: int = 0, partitions: int | None = None) -> TopicKeys:
        """The keys of one partition of ``topic`` (of ``partitions``; default: as known)."""
        n = partitions if partitions is not None else self._counts.get(topic, 1)
        if n == 1 and not self.cluster:
            s = self.base + topic
            return TopicKeys(stream=s, dlq=s + ":dlq", dlq_counts=s + ":dlqn", idem=s + ":idem:")
        s = f"{self.partition_base}{{{topic}:{partition}}}"
        own = self.slot_outboxes
        return TopicKeys(
            stream=s,
            dlq=s + ":dlq",
            dlq_counts=s + ":dlqn",
            idem=s + ":idem:",
            partition=partition,
            outbox=s + ":outbox" if own else "",
            outcomes=s + ":audit" if own else "",
        )

    def all_keys(self, topic: str, partitions: int) -> list[TopicKeys]:
        """The keys of every partition of ``topic``."""
        return [self.keys(topic, p, partitions) for p in range(partitions)]

    async def _one_stream_exists(self, topic: str) -> bool:
        # The one-stream layout never exists on a cluster (it is never used there).
        return not self.cluster and bool(await self.redis.exists(self.base + topic))

    async def partitions(self, topic: str, pin: bool = False) -> int:
        """The partition count of ``topic``; with ``pin``, fixed now if it was not yet
        (1 for a topic that already has a one-stream layout, else the default)."""
        n = self._counts.get(topic)
        if n is not None:
            return n
        raw = await self.redis.hget(self.partitions_key, topic)
        if raw is None:
            n = 1 if await self._one_stream_exists(topic) else self.settings.partitions
            if not pin:
                return n
            await self.redis.hsetnx(self.partitions_key, topic, n)
            raw = await self.redis.hget(self.partitions_key, topic)
        n = int(raw or 1)
        self._counts[topic] = n
        self._attach(topic, n)
        return n

    async def create_topic(self, topic: str, partitions: int) -> int:
        """Fix ``topic``'s partition count at ``partitions`` unless it is fixed already;
        the count it has now. The audited call's record commits in the same script
        as the count (the partitions hash and the service's outbox share event-bus's
        slot on a cluster), so a crash between the two cannot leave one without the other."""
        n = self._counts.get(topic)
        if n is None:
            if await self._one_stream_exists(topic):
                # In use since before partitions: it is one partition, and stays so.
                await self.redis.hsetnx(self.partitions_key, topic, 1)
            if self._fix_count is None:
                box = self.audit_outbox
                self._fix_count = (
                    box.script(lua.FIX_PARTITIONS, ok="r > 0", client=self.redis)
                    if box is not None
                    else self.redis.register_script(lua.FIX_PARTITIONS)
                )
            await self._fix_count(keys=[self.partitions_key], args=[topic, partitions])
            n = await self.partitions(topic, pin=True)
        return n

    async def partitioned_topics(self) -> dict[str, int]:
        """Every topic whose partition count is fixed, with it."""
        raw = await self.redis.hgetall(self.partitions_key)
        return {_s(t): int(n) for t, n in raw.items()}

    async def attach_all(self) -> None:
        """Load every fixed partition count, so the partitions' own outboxes are
        drained from the start (what an earlier run left there goes first)."""
        for topic, n in (await self.partitioned_topics()).items():
            self._counts.setdefault(topic, n)
            self._attach(topic, n)

    def _attach(self, topic: str, n: int) -> None:
        if not self.slot_outboxes or topic in self._attached:
            return
        self._attached.add(topic)
        for k in self.all_keys(topic, n):
            box = self._box(k.outbox)
            if box is not None and box.relay is not None:
                box.relay.start()
            if self.on_partition is not None:
                self.on_partition(k)

    @property
    def outbox(self) -> str:
        """The stream of processing outcomes waiting to be sent to the audit trail
        (of topics without outboxes of their own)."""
        return self.base + "_bus:audit"

    def outcome_outboxes(self) -> list[str]:
        """Every outcome outbox in use: the shared one and the partitions' own."""
        return [self.outbox] + [
            k.outcomes for t, n in self._counts.items() for k in self.all_keys(t, n) if k.outcomes
        ]

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
    ) -> list[Published]:
        """Append ``events`` (deduplicated, trimmed), each to the partition of its
        ordering key; where each went.

        Each partition's events are stored by one script, atomically; a batch
        over several partitions is checked for reused keys first, then stored
        partition by partition (see docs/event-bus.md, "Partitions").
        """
        n = await self.partitions(topic, pin=True)
        ret = self.settings.retention_for(topic)
        minid = f"{max(now_ms - int(ret.max_age * 1000), 0)}-0" if ret.max_age else ""
        head: list[Any] = [ret.max_len, minid, int(self.settings.dedup_window * 1000)]
        parts: dict[int, list[int]] = {}
        for i, e in enumerate(events):
            parts.setdefault(partition_of(e.ordering_key, n), []).append(i)
        if len(parts) > 1:
            await self._check_reuse(topic, n, events, parts)
        out: list[Published | None] = [None] * len(events)

        async def append(p: int, idx: list[int]) -> None:
            k = self.keys(topic, p, n)
            args = [*head, k.idem]
            for i in idx:
                e = events[i]
                # Tabs never occur in the digests, the type or a traceparent; the
                # actor goes last, so the script keeps any tab it holds.
                args += [
                    f"{e.key_hash}\t{e.content_hash}\t{e.type}\t{e.trace_parent}\t{e.actor}",
                    e.data,
                ]
            raw = _s(await self._script("publish", k)(keys=[k.stream], args=args))
            if raw.startswith("conflict "):
                _reused(idx[int(raw.split()[1])])
            # A duplicate is confirmed too: the original's own confirmation may have failed.
            await confirm_replicated(
                self.redis, k.stream, self.wait_replicas, self.wait_timeout_ms, f"{topic} events"
            )
            for i, r in zip(idx, raw.split(" "), strict=True):
                out[i] = Published(r.rstrip("+"), r.endswith("+"), p)

        first, *rest = sorted(parts.items())
        # The first partition's script commits the audited call's record; the
        # others then run at once (pipelined on one Redis, in parallel on a cluster).
        await append(*first)
        if rest:
            await asyncio.gather(*(append(p, idx) for p, idx in rest))
        return [o for o in out if o is not None]

    async def _check_reuse(
        self, topic: str, n: int, events: Sequence[ValidEvent], parts: dict[int, list[int]]
    ) -> None:
        """Refuse a batch with a key reused for another event before storing any of it."""
        order = [i for _, idx in sorted(parts.items()) for i in idx]
        async with self.redis.pipeline(transaction=False) as pipe:
            for i in order:
                e = events[i]
                pipe.get(self.keys(topic, partition_of(e.ordering_key, n), n).idem + e.key_hash)
            priors = await pipe.execute()
        for i, prior in zip(order, priors, strict=True):
            if prior is not None and _s(prior).partition(" ")[2] != events[i].content_hash:
                _reused(i)

    # -- groups ----------------------------------------------------------

    async def ensure_group(
        self,
        topic: str,
        group: str,
        start: str,
        now_ms: int,
        policy: RetryPolicy | None = None,
        vis_ms: int | None = None,
        partition: int | None = None,
    ) -> bool:
        """Create the group at ``start`` ('$' or an id) on every partition (or only
        ``partition``) where it is missing, and store its settings there (given
        ones replace, defaults only fill gaps). True if created anywhere."""
        n = await self.partitions(topic, pin=True)
        default_vis = int(self.settings.visibility_timeout * 1000)
        args: list[Any] = [group, start, now_ms, default_vis if vis_ms is None else vis_ms]
        args += ["0" if vis_ms is None else "1", "0" if policy is None else "1"]
        for name, value in (policy or RetryPolicy()).to_fields().items():
            args += [name, value]
        created = False
        for p in range(n) if partition is None else [partition]:
            k = self.keys(topic, p, n)
            made = await self._group_init(keys=[k.stream, k.group(group).meta], args=args)
            created = bool(int(made)) or created
        return created

    async def group_config(self, topic: str, group: str, partition: int = 0) -> GroupConfig | None:
        """The stored settings of a group (on a partition), or None if it was never set up."""
        n = await self.partitions(topic)
        raw = await self.redis.hgetall(self.keys(topic, partition, n).group(group).meta)
        if not raw:
            return None
        meta = {_s(a): _s(b) for a, b in raw.items()}
        vis = int(meta.get("vis_ms", self.settings.visibility_timeout * 1000))
        return GroupConfig(RetryPolicy.from_fields(meta), vis, meta.get("gen", "0"))

    async def group_exists(self, topic: str, group: str) -> bool:
        """True when Redis has the consumer group (on the first partition)."""
        n = await self.partitions(topic)
        try:
            groups = await self.redis.xinfo_groups(self.keys(topic, 0, n).stream)
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
        partition: int = 0,
    ) -> FetchResult:
        """Lease to ``consumer`` what it has room for on one partition: due retries,
        then new events."""
        k = self.keys(topic, partition, await self.partitions(topic))
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

    async def wait_for_events(self, topic: str, after: dict[int, str], block: float) -> None:
        """Block until a partition has an event newer than its id in ``after``
        (partition -> id), or ``block`` seconds: one blocking read of them all."""
        ms = max(int(block * 1000), 1)
        n = await self.partitions(topic)
        streams = {self.keys(topic, p, n).stream: i for p, i in after.items()}
        if not self.cluster or len(streams) == 1:
            await self.redis.xread(streams, count=1, block=ms)  # type: ignore[arg-type]
            return
        # On a cluster each partition is its own slot, and one XREAD may not
        # span slots: a blocking read per partition, the first answer wins. The
        # others end on their own within ``block`` (cancelling a blocking
        # redis-py read can wedge its connection; see subscription.shielded).
        reads = [
            asyncio.ensure_future(self.redis.xread({k: i}, count=1, block=ms))
            for k, i in streams.items()
        ]
        for r in reads:
            r.add_done_callback(_consumed)
        await asyncio.wait(reads, return_when=asyncio.FIRST_COMPLETED)
        for r in reads:
            if r.done() and not r.cancelled() and r.exception() is not None:
                raise r.exception()  # type: ignore[misc]

    async def reclaim(
        self, topic: str, group: str, consumer: str, vis_ms: int, partition: int = 0
    ) -> tuple[list[Entry], int]:
        """Take over deliveries idle past the visibility timeout (XAUTOCLAIM)."""
        k = self.keys(topic, partition, await self.partitions(topic))
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
        partition: int = 0,
    ) -> list[str]:
        """Acknowledge deliveries; per item 'a' acked, 'A' settled before, 'x' expired."""
        k = self.keys(topic, partition, await self.partitions(topic))
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
        raw = await self._script("ack", k)(
            keys=[k.stream, g.meta, g.attempts, g.retry, k.outcomes or self.outbox], args=args
        )
        return [_s(c) for c in raw]

    async def fail(
        self,
        topic: str,
        group: str,
        items: Sequence[Failure],
        now_ms: int,
        by: str,
        audit: bool,
        partition: int = 0,
    ) -> list[FailResult]:
        """Settle failed deliveries: schedule their retry or dead-letter them."""
        k = self.keys(topic, partition, await self.partitions(topic))
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
        raw = await self._script("fail", k)(
            keys=[
                k.stream,
                g.meta,
                g.retry,
                g.attempts,
                k.dlq,
                k.dlq_counts,
                k.outcomes or self.outbox,
            ],
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
        self, topic: str, group: str, items: Sequence[tuple[Settle, int]], partition: int = 0
    ) -> list[int]:
        """Extend leases by the given ms (0 = the visibility timeout); -1 where lost."""
        k = self.keys(topic, partition, await self.partitions(topic))
        g = k.group(group)
        args: list[Any] = [group, g.dedup, int(self.settings.visibility_timeout * 1000)]
        for s, ext in items:
            args += [s.entry_id, s.consumer, s.attempt, ext, s.key]
        raw = await self._extend(keys=[k.stream, g.meta, g.attempts], args=args)
        return [int(x) for x in raw]

    # -- dead letters ----------------------------------------------------

    async def dead_letters(
        self, topic: str, start: str, end: str, count: int, partition: int = 0
    ) -> list[DeadLetterRecord]:
        """Dead letters of a partition with ids in [start, end] (XRANGE syntax), oldest first."""
        k = self.keys(topic, partition, await self.partitions(topic))
        raw: Any = await self.redis.xrange(k.dlq, start, end, count=count)
        return [_dead_letter(_s(i), f, partition) for i, f in raw]

    async def dead_letter(
        self, topic: str, dead_letter_id: str, partition: int = 0
    ) -> DeadLetterRecord | None:
        """One dead letter (its stream id within the partition's queue), or None."""
        found = await self.dead_letters(topic, dead_letter_id, dead_letter_id, 1, partition)
        return found[0] if found else None

    async def redrive(
        self, topic: str, ids: Sequence[str], strict: bool, partition: int = 0
    ) -> int | str:
        """Send dead letters of a partition back to their groups; the count, or the
        first missing id when ``strict`` and one does not exist (then nothing is redriven)."""
        if not ids:
            return 0
        k = self.keys(topic, partition, await self.partitions(topic))
        args = [self.settings.retention_for(topic).max_len, "1" if strict else "0", *ids]
        raw = await self._script("redrive", k)(keys=[k.stream, k.dlq, k.dlq_counts], args=args)
        return int(raw[1]) if _s(raw[0]) == "ok" else _s(raw[1])

    async def purge(self, topic: str, ids: Sequence[str] | None, partition: int = 0) -> int:
        """Delete the given dead letters of a partition (None: all); the count deleted."""
        k = self.keys(topic, partition, await self.partitions(topic))
        args = ["*"] if ids is None else list(ids)
        if not args:
            return 0
        return int(await self._script("purge", k)(keys=[k.dlq, k.dlq_counts], args=args))

    # -- replay ----------------------------------------------------------

    async def replay_reset(
        self, topic: str, group: str, before_id: str, now_ms: int, partition: int = 0
    ) -> int:
        """Move the group back to just after ``before_id`` on a partition; the events
        it will re-read."""
        k = self.keys(topic, partition, await self.partitions(topic, pin=True))
        g = k.group(group)
        await self.ensure_group(topic, group, before_id, now_ms, partition=partition)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xgroup_setid(k.stream, group, before_id)
            # A new generation: the group's "processed" marks no longer suppress.
            pipe.hincrby(g.meta, "gen", 1)
            box = self._box(k.outbox) if k.outbox else self.audit_outbox
            if box is not None:
                await box.execute(pipe)
            else:
                await pipe.execute()
        return int(await self._count_range(keys=[k.stream], args=[f"({before_id}", "+"]))

    async def replay_range(
        self, topic: str, group: str, start: str, end: str, now_ms: int, partition: int = 0
    ) -> int:
        """Schedule the group's events in [start, end] of a partition for redelivery;
        the count in range."""
        k = self.keys(topic, partition, await self.partitions(topic, pin=True))
        g = k.group(group)
        if await self.ensure_group(topic, group, "$", now_ms, partition=partition):
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
        """Length, groups and counters of a topic, summed over its partitions; None
        if it has no stream."""
        n = await self.partitions(topic)
        parts = [await self._partition_info(k, only_group) for k in self.all_keys(topic, n)]
        found = [i for i in parts if i is not None]
        if not found:
            return None
        groups: dict[str, list[GroupInfo]] = {}
        for info in found:
            for g in info.groups:
                groups.setdefault(g.name, []).append(g)
        lasts = [i.last_id for i in found if i.last_id]
        return TopicInfo(
            name=topic,
            length=sum(i.length for i in found),
            groups=[_sum_groups(name, gs) for name, gs in groups.items()],
            dead_letters=sum(i.dead_letters for i in found),
            last_id=max(lasts, key=_id_key) if lasts else None,
            partitions=n,
        )

    async def _partition_info(self, k: TopicKeys, only_group: str) -> TopicInfo | None:
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
            groups.append(await self._group_info(k, g, dlq_counts))
        return TopicInfo(
            name=k.stream,
            length=int(length),
            groups=groups,
            dead_letters=int(dlq_len),
            last_id=_s(last[0][0]) if last else None,
        )

    async def _group_info(
        self, k: TopicKeys, raw: dict[Any, Any], dlq_counts: dict[bytes, bytes]
    ) -> GroupInfo:
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
        """The topics of ``topics`` that have a stream (on any partition)."""
        counts = [await self.partitions(t) for t in topics]
        async with self.redis.pipeline(transaction=False) as pipe:
            for t, n in zip(topics, counts, strict=True):
                for k in self.all_keys(t, n):
                    pipe.exists(k.stream)
            found = iter(await pipe.execute())
        return [
            t for t, n in zip(topics, counts, strict=True) if any([next(found) for _ in range(n)])
        ]

    # -- retention -------------------------------------------------------

    async def trim_settled(self, topic: str) -> int:
        """Delete the events every group of the topic has settled; the count deleted.

        Per partition, the watermark is the lowest of: each group's next unread
        event, its oldest pending delivery and its oldest waiting retry.
        """
        n = await self.partitions(topic)
        total = 0
        for k in self.all_keys(topic, n):
            total += await self._trim_partition(k)
        return total

    async def _trim_partition(self, k: TopicKeys) -> int:
        try:
            groups = await self.redis.xinfo_groups(k.stream)
        except rx.ResponseError:
            return 0  # no such stream (a partition nothing was published to)
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
        low = min(marks, key=_id_key)
        # MINID keeps `low` itself: one settled event too many at most.
        return int(await self.redis.xtrim(k.stream, minid=low, approximate=False))


def _id_key(entry_id: str) -> tuple[int, ...]:
    return tuple(int(p) for p in entry_id.split("-"))


def _sum_groups(name: str, parts: Sequence[GroupInfo]) -> GroupInfo:
    """One group's figures over the partitions it reads."""
    counters: dict[str, int] = {}
    for g in parts:
        for c, v in g.counters.items():
            counters[c] = counters.get(c, 0) + v
    oldest = [g.oldest_pending_ms for g in parts if g.oldest_pending_ms is not None]
    return GroupInfo(
        name=name,
        # A consumer reads every partition, so it is in each partition's group.
        consumers=max(g.consumers for g in parts),
        pending=sum(g.pending for g in parts),
        lag=sum(g.lag for g in parts),
        last_delivered_id=max((g.last_delivered_id for g in parts), key=_id_key),
        oldest_pending_ms=min(oldest) if oldest else None,
        dead_letters=sum(g.dead_letters for g in parts),
        counters=counters,
    )


def _dead_letter(entry_id: str, f: dict[bytes, bytes], partition: int = 0) -> DeadLetterRecord:
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
        partition=partition,
    )


def _consumed(task: asyncio.Future[Any]) -> None:
    """Retrieve a finished read's error, so an unawaited loser is not logged as unhandled."""
    if not task.cancelled():
        task.exception()
