"""The event bus's logic: publish, settle deliveries, dead letters, replay, stats.

Plain Python over ``EventStore``; the gRPC edge (service.py) only converts
messages. Subscriptions run in subscription.py.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import NoReturn

from autoecoops.events.v1 import envelope_pb2, events_pb2
from autoecoops.kernel.event_bus import metrics
from autoecoops.kernel.event_bus.envelope import (
    EnvelopeValidator,
    PublishContext,
    Registry,
    default_registry,
)
from autoecoops.kernel.event_bus.names import (
    check_name,
    check_partition,
    id_before,
    parse_partitioned_id,
    parse_stream_id,
    partitioned_id,
)
from autoecoops.kernel.event_bus.settings import EventBusSettings
from autoecoops.kernel.event_bus.store import (
    DeadLetterRecord,
    EventStore,
    FailResult,
    Failure,
    NoGroup,
    Published,
    Settle,
    TopicInfo,
    redis_errors,
)
from autoecoops.kernel.event_bus.tokens import (
    DeliveryRef,
    DeliveryTokens,
    check_token_field,
    subject_tag,
)
from autoecoops.kernel.mesh import paging
from autoecoops.kernel.mesh.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
)

log = logging.getLogger("autoecoops.event_bus")

DEAD_LETTER_TOPIC = "events.deadletter"
DEAD_LETTER_TYPE = "autoecoops.events.delivery.deadlettered"
BUS_SOURCE = "//autoecoops/kernel/event-bus"
MAX_REASON = 1024
MAX_PAGE = 1000


@dataclass(frozen=True, slots=True)
class AckOutcome:
    """What an Ack did."""

    acked: int
    expired: list[str]


@dataclass(frozen=True, slots=True)
class NackOutcome:
    """What a Nack did: dead-lettered, or redelivered at ``redeliver_at`` (epoch s)."""

    dead_lettered: bool
    redeliver_at: float | None


@dataclass(frozen=True, slots=True)
class Lease:
    """An extended lease."""

    delivery_id: str
    expire_at: float


@dataclass(frozen=True, slots=True)
class DeadLetterSelector:
    """Which dead letters a redrive or purge acts on: ids, a filter, or all."""

    ids: Sequence[str] = ()
    group: str = ""
    event_type: str = ""
    #: Epoch ms bounds of the dead-letter time, [start, end).
    start_ms: int | None = None
    end_ms: int | None = None
    all: bool = False

    def matches(self, d: DeadLetterRecord) -> bool:
        """True when a dead letter passes the filter's attribute conditions."""
        return (not self.group or d.group == self.group) and (
            not self.event_type or d.type == self.event_type
        )


class Notifier:
    """Wakes this process's subscriptions when a delivery of theirs is settled here,
    so a full consumer takes its next event at once instead of at the next poll."""

    def __init__(self) -> None:
        self._events: dict[tuple[str, str, str], asyncio.Event] = {}

    def event(self, topic: str, group: str, consumer: str) -> asyncio.Event:
        """The wake-up event of one consumer."""
        return self._events.setdefault((topic, group, consumer), asyncio.Event())

    def drop(self, topic: str, group: str, consumer: str) -> None:
        """Forget a consumer whose subscription ended."""
        self._events.pop((topic, group, consumer), None)

    def wake(self, topic: str, group: str, consumer: str) -> None:
        """Wake a consumer's subscription, if it runs in this process."""
        ev = self._events.get((topic, group, consumer))
        if ev is not None:
            ev.set()


class EventBus:
    """The bus: topics on Redis Streams, consumer groups, retries and dead letters."""

    def __init__(
        self,
        store: EventStore,
        settings: EventBusSettings,
        registry: Registry | None = None,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.store = store
        self.settings = settings
        self.registry = registry or default_registry()
        self.validator = EnvelopeValidator(self.registry, settings.max_event_bytes)
        self.clock = clock
        self.rand = rand
        self.notifier = Notifier()
        self._tokens: DeliveryTokens | None = None

    def now_ms(self) -> int:
        """The bus clock in epoch milliseconds."""
        return int(self.clock() * 1000)

    async def tokens(self) -> DeliveryTokens:
        """The delivery-id codec (its secret comes from Redis once)."""
        if self._tokens is None:
            async with redis_errors():
                self._tokens = DeliveryTokens(await self.store.secret())
        return self._tokens

    # -- publish ---------------------------------------------------------

    async def publish(
        self,
        topic: str,
        envelopes: Sequence[envelope_pb2.Envelope],
        ctx: PublishContext,
        batch: bool = True,
    ) -> list[Published]:
        """Validate and store events; (event id, duplicate, partition) each. All or
        none on one partition; see EventStore.publish for a batch over several.

        ``batch=False`` names violations after Publish's ``envelope`` field."""
        self.registry.check_topic(topic)
        if len(envelopes) > self.settings.max_batch:
            raise InvalidArgument(
                f"envelopes: {len(envelopes)} events; a batch holds at most {self.settings.max_batch}",
                reason="BATCH_TOO_LARGE",
                field_violations=[FieldViolation("envelopes", "too many events")],
            )
        if batch:
            events = self.validator.validate_batch(topic, envelopes, ctx)
        else:
            events = [self.validator.validate(topic, e, ctx) for e in envelopes]
        seen: dict[str, tuple[int, str]] = {}
        for i, e in enumerate(events):
            first = seen.setdefault(e.key_hash, (i, e.content_hash))
            if first[1] != e.content_hash:
                raise InvalidArgument(
                    f"envelopes[{i}]: same idempotency key as envelopes[{first[0]}] but another event",
                    reason="IDEMPOTENCY_KEY_REUSED",
                    field_violations=[
                        FieldViolation(f"envelopes[{i}].idempotency_key", "reused in the batch")
                    ],
                )
        async with redis_errors():
            results = await self.store.publish(topic, events, self.now_ms())
        stored = sum(1 for r in results if not r.duplicate)
        if stored:
            metrics.PUBLISHED.labels(topic).inc(stored)
        return results

    # -- settling --------------------------------------------------------

    async def _refs(
        self, delivery_ids: Sequence[str], subject: str, field: str
    ) -> list[DeliveryRef]:
        tokens = await self.tokens()
        tag = subject_tag(subject)
        refs: list[DeliveryRef] = []
        for i, token in enumerate(delivery_ids):
            name = f"{field}[{i}]" if len(delivery_ids) > 1 or field.endswith("s") else field
            check_token_field(token, name)
            ref = tokens.decode(token)
            # Forged, garbled and other subscribers' ids look alike: not found.
            if ref is None or ref.subject != tag:
                raise NotFound(
                    f"{name}: no such delivery",
                    reason="DELIVERY_NOT_FOUND",
                    resource_type="delivery",
                    resource_name=token[:64],
                )
            refs.append(ref)
        return refs

    async def ack(self, delivery_ids: Sequence[str], subject: str) -> AckOutcome:
        """Acknowledge deliveries: done for their group, never delivered again."""
        refs = await self._refs(delivery_ids, subject, "delivery_ids")
        by_group: dict[tuple[str, str, int], list[tuple[str, DeliveryRef]]] = defaultdict(list)
        for token, ref in zip(delivery_ids, refs, strict=True):
            by_group[(ref.topic, ref.group, ref.partition)].append((token, ref))
        acked, expired = 0, []
        for (topic, group, partition), items in by_group.items():
            settles = [Settle(r.entry_id, r.consumer, r.attempt, r.key) for _, r in items]
            try:
                async with redis_errors():
                    codes = await self.store.ack(
                        topic,
                        group,
                        settles,
                        self.now_ms(),
                        subject,
                        self.settings.audit,
                        partition=partition,
                    )
            except NoGroup:
                codes = ["x"] * len(items)
            for (token, ref), code in zip(items, codes, strict=True):
                if code == "x":
                    expired.append(token)
                else:
                    acked += 1
                self.notifier.wake(topic, group, ref.consumer)
            now_acked = codes.count("a")
            if now_acked:
                metrics.ACKED.labels(topic, group).inc(now_acked)
        return AckOutcome(acked, expired)

    async def nack(
        self,
        delivery_id: str,
        subject: str,
        reason: str,
        delay: float | None = None,
        dead_letter: bool = False,
    ) -> NackOutcome:
        """Reject a delivery: retry it after the backoff (or ``delay``), or dead-letter it."""
        if delay is not None and not 0 <= delay <= 86400:
            raise InvalidArgument(
                "delay: must be between 0s and 24h",
                reason="INVALID_DELAY",
                field_violations=[FieldViolation("delay", "out of range")],
            )
        (ref,) = await self._refs([delivery_id], subject, "delivery_id")
        result = (
            await self.fail(
                ref.topic,
                ref.group,
                [Settle(ref.entry_id, ref.consumer, ref.attempt)],
                reason[:MAX_REASON] or "nacked",
                subject,
                delay=delay,
                dead_letter=dead_letter,
                partition=ref.partition,
            )
        )[0]
        self.notifier.wake(ref.topic, ref.group, ref.consumer)
        if result.outcome == "x":
            raise FailedPrecondition(
                "delivery_id: the lease had already expired; the event was or will be delivered again",
                reason="LEASE_EXPIRED",
            )
        if result.outcome == "l":
            raise FailedPrecondition(
                "delivery_id: the event is no longer retained by the topic",
                reason="EVENT_NOT_RETAINED",
            )
        if result.outcome == "d":
            return NackOutcome(True, None)
        return NackOutcome(False, result.due_ms / 1000)

    async def fail(
        self,
        topic: str,
        group: str,
        items: Sequence[Settle],
        reason: str,
        by: str,
        delay: float | None = None,
        dead_letter: bool = False,
        partition: int = 0,
    ) -> list[FailResult]:
        """Settle failed attempts (on one partition) by the group's policy: retry
        with backoff, or dead-letter."""
        try:
            async with redis_errors():
                cfg = await self.store.group_config(topic, group, partition)
        except NoGroup:
            cfg = None
        if cfg is None:
            return [FailResult("x") for _ in items]
        now = self.now_ms()
        failures = []
        for settle in items:
            dead = dead_letter or cfg.policy.exhausted(settle.attempt)
            wait = delay if delay is not None else cfg.policy.delay(settle.attempt, self.rand)
            failures.append(Failure(settle, dead, now + int(wait * 1000), reason))
        try:
            async with redis_errors():
                results = await self.store.fail(
                    topic, group, failures, now, by, self.settings.audit, partition=partition
                )
        except NoGroup:
            return [FailResult("x") for _ in items]
        for f, r in zip(failures, results, strict=True):
            if r.outcome == "d":
                metrics.DEAD_LETTERED.labels(topic, group).inc()
                await self._announce_dead_letter(topic, group, f, r.dead_letter_id, partition)
        return results

    async def _announce_dead_letter(
        self, topic: str, group: str, failure: Failure, entry_id: str, partition: int = 0
    ) -> None:
        """Publish a DeadLettered event; best effort, never for its own topic (no loops)."""
        if topic == DEAD_LETTER_TOPIC:
            return
        try:
            async with redis_errors():
                record = await self.store.dead_letter(topic, entry_id, partition)
                n = await self.store.partitions(topic)
            if record is None:
                return
            dead_letter_id = partitioned_id(n, partition, entry_id)
            original = envelope_pb2.Envelope.FromString(record.envelope)
            payload = events_pb2.DeadLettered(
                topic=topic,
                group=group,
                event_id=record.event_id,
                event_type=record.type,
                dead_letter_id=dead_letter_id,
                reason=failure.reason,
                attempts=failure.settle.attempt,
            )
            env = envelope_pb2.Envelope(
                source=BUS_SOURCE,
                type=DEAD_LETTER_TYPE,
                subject=dead_letter_id,
                resource=f"events/topics/{topic}/deadLetters/{dead_letter_id}",
                idempotency_key=f"deadletter:{topic}:{dead_letter_id}",
                trace_parent=original.trace_parent,
                trace_state=original.trace_state,
                actor=envelope_pb2.Actor(subject="event-bus"),
            )
            env.data.Pack(payload)
            await self.publish(DEAD_LETTER_TOPIC, [env], PublishContext(now=self.clock()))
        except Exception:
            log.warning(
                "could not announce dead letter %s of %s", dead_letter_id, topic, exc_info=True
            )

    async def extend(
        self, delivery_ids: Sequence[str], subject: str, extension: float | None
    ) -> tuple[list[Lease], list[str]]:
        """Keep deliveries leased ``extension`` seconds from now (default and
        maximum: the group's visibility timeout)."""
        if extension is not None and extension < 0:
            raise InvalidArgument(
                "extension: must not be negative",
                reason="INVALID_EXTENSION",
                field_violations=[FieldViolation("extension", "negative")],
            )
        refs = await self._refs(delivery_ids, subject, "delivery_ids")
        ext_ms = 0 if not extension else max(int(extension * 1000), 1)
        by_group: dict[tuple[str, str, int], list[tuple[str, DeliveryRef]]] = defaultdict(list)
        for token, ref in zip(delivery_ids, refs, strict=True):
            by_group[(ref.topic, ref.group, ref.partition)].append((token, ref))
        leases, expired = [], []
        now = self.clock()
        for (topic, group, partition), items in by_group.items():
            pairs = [(Settle(r.entry_id, r.consumer, r.attempt, r.key), ext_ms) for _, r in items]
            try:
                async with redis_errors():
                    granted = await self.store.extend(topic, group, pairs, partition)
            except NoGroup:
                granted = [-1] * len(items)
            for (token, _), ms in zip(items, granted, strict=True):
                if ms < 0:
                    expired.append(token)
                else:
                    leases.append(Lease(token, now + ms / 1000))
        return leases, expired

    # -- dead letters ----------------------------------------------------

    async def _count(self, topic: str) -> int:
        async with redis_errors():
            return await self.store.partitions(topic)

    async def list_dead_letters(
        self, topic: str, group: str, page_size: int, page_token: str
    ) -> tuple[list[DeadLetterRecord], str]:
        """A page of dead letters and the next page's token ('' at the end): oldest
        first within a partition, the partitions in order."""
        self.registry.check_topic(topic)
        if group:
            check_name(group, "group", "consumer group")
        size = paging.page_size(page_size, 100, MAX_PAGE)
        if page_size < 0:
            raise InvalidArgument("page_size: must not be negative", reason="INVALID_PAGE_SIZE")
        n = await self._count(topic)
        p, start = 0, "-"
        if page_token:
            # The token is the public id of the last dead letter looked at.
            p, last = parse_partitioned_id(paging.decode_cursor(page_token), n, "page_token")
            start = "(" + last
        out: list[DeadLetterRecord] = []
        # A filtered page scans a bounded amount and may come back short, with
        # a token to go on (AIP-158 allows it).
        budget = size * 10
        async with redis_errors():
            while len(out) < size and budget > 0:
                want = min(size, budget)
                chunk = await self.store.dead_letters(topic, start, "+", want, p)
                for d in chunk:
                    budget -= 1
                    start = "(" + d.id
                    if not group or d.group == group:
                        out.append(d)
                        if len(out) == size:
                            break
                if len(chunk) < want and len(out) < size:
                    if p + 1 >= n:
                        return _public(out, n), ""
                    p, start = p + 1, "-"
            more = await self.store.dead_letters(topic, start, "+", 1, p)
            q = p + 1
            while not more and q < n:
                more = await self.store.dead_letters(topic, "-", "+", 1, q)
                q += 1
        position = start[1:] if start != "-" else "0-0"
        token = paging.encode_cursor(partitioned_id(n, p, position)) if more else ""
        return _public(out, n), token

    async def get_dead_letter(self, topic: str, dead_letter_id: str) -> DeadLetterRecord:
        """One dead letter; NOT_FOUND if it does not exist."""
        self.registry.check_topic(topic)
        n = await self._count(topic)
        p, entry_id = parse_partitioned_id(dead_letter_id, n, "dead_letter_id")
        async with redis_errors():
            found = await self.store.dead_letter(topic, entry_id, p)
        if found is None:
            raise NotFound(
                f"no dead letter {dead_letter_id} on topic {topic}",
                resource_type="dead-letter",
                resource_name=f"events/topics/{topic}/deadLetters/{dead_letter_id}",
            )
        return _public([found], n)[0]

    async def _ids_by_partition(self, topic: str, ids: Sequence[str]) -> dict[int, list[str]]:
        n = await self._count(topic)
        out: dict[int, list[str]] = defaultdict(list)
        for i, value in enumerate(ids):
            p, entry_id = parse_partitioned_id(value, n, f"ids.ids[{i}]")
            out[p].append(entry_id)
        return out

    async def redrive(self, topic: str, selector: DeadLetterSelector) -> int:
        """Send dead letters back to their groups with attempts reset; the count."""
        self.registry.check_topic(topic)
        if selector.ids:
            parts = await self._ids_by_partition(topic, selector.ids)
            n = await self._count(topic)
            total = 0
            async with redis_errors():
                if len(parts) > 1:
                    # All or none over partitions: look for a missing one first.
                    for p, ids in sorted(parts.items()):
                        for entry_id in ids:
                            if await self.store.dead_letter(topic, entry_id, p) is None:
                                _no_dead_letter(topic, partitioned_id(n, p, entry_id))
                for p, ids in sorted(parts.items()):
                    result = await self.store.redrive(topic, ids, strict=True, partition=p)
                    if isinstance(result, str):
                        _no_dead_letter(topic, partitioned_id(n, p, result))
                    else:
                        total += result
            return total
        total = 0
        async for p, chunk in self._selected(topic, selector):
            async with redis_errors():
                got = await self.store.redrive(topic, [d.id for d in chunk], False, p)
            total += int(got)
        return total

    async def purge(self, topic: str, selector: DeadLetterSelector) -> int:
        """Delete dead letters for good; the count deleted."""
        self.registry.check_topic(topic)
        total = 0
        if selector.all:
            n = await self._count(topic)
            async with redis_errors():
                for p in range(n):
                    total += await self.store.purge(topic, None, p)
            return total
        if selector.ids:
            parts = await self._ids_by_partition(topic, selector.ids)
            async with redis_errors():
                for p, ids in sorted(parts.items()):
                    total += await self.store.purge(topic, ids, p)
            return total
        async for p, chunk in self._selected(topic, selector):
            async with redis_errors():
                total += await self.store.purge(topic, [d.id for d in chunk], p)
        return total

    async def _selected(
        self, topic: str, sel: DeadLetterSelector
    ) -> AsyncIterator[tuple[int, list[DeadLetterRecord]]]:
        """(partition, chunk) of the dead letters a filter (or all) selects, oldest
        first per partition."""
        if sel.group:
            check_name(sel.group, "filter.group", "consumer group")
        if sel.end_ms is not None and sel.end_ms <= (sel.start_ms or 0):
            # [start, end) is empty; Redis would refuse the exclusive "(0-0" bound.
            return
        end = f"({sel.end_ms}-0" if sel.end_ms is not None else "+"
        for p in range(await self._count(topic)):
            start = f"{sel.start_ms}-0" if sel.start_ms is not None else "-"
            while True:
                async with redis_errors():
                    chunk = await self.store.dead_letters(topic, start, end, 500, p)
                if not chunk:
                    break
                picked = [d for d in chunk if sel.all or sel.matches(d)]
                if picked:
                    yield p, picked
                if len(chunk) < 500:
                    break
                start = "(" + chunk[-1].id

    # -- replay ----------------------------------------------------------

    async def replay(
        self,
        topic: str,
        group: str,
        start_id: str,
        end_id: str | None,
        reset: bool,
        partition: int | None = None,
        by_id: bool = False,
    ) -> int:
        """Deliver past events to ``group`` again, on one partition or all; the
        number of events it will receive. ``by_id``: start or end is an event id
        (a position in one partition), not a time."""
        self.registry.check_topic(topic)
        check_name(group, "group", "consumer group")
        n = await self._count(topic)
        if partition is not None:
            check_partition(partition, n, "partition")
        elif by_id and n > 1:
            raise InvalidArgument(
                f"partition: required with an event id; the topic has {n} partitions and an "
                "event id is a position in one of them",
                reason="INVALID_REPLAY",
                metadata={"partitions": str(n)},
                field_violations=[FieldViolation("partition", "required with an event id")],
            )
        ms, seq = parse_stream_id(start_id, "start")
        if reset and end_id is not None:
            raise InvalidArgument(
                "end: must be unset with reset (a reset group reads everything after start)",
                reason="INVALID_REPLAY",
                field_violations=[FieldViolation("end", "set together with reset")],
            )
        if end_id is not None:
            end = parse_stream_id(end_id, "end")
            if end < (ms, seq):
                raise InvalidArgument(
                    "end: before start",
                    reason="INVALID_REPLAY",
                    field_violations=[FieldViolation("end", "before start")],
                )
        total = 0
        async with redis_errors():
            for p in range(n) if partition is None else [partition]:
                if reset:
                    total += await self.store.replay_reset(
                        topic, group, id_before(ms, seq), self.now_ms(), p
                    )
                else:
                    total += await self.store.replay_range(
                        topic, group, f"{ms}-{seq}", end_id or "+", self.now_ms(), p
                    )
        return total

    # -- topics ----------------------------------------------------------

    async def create_topic(self, topic: str, partitions: int) -> int:
        """Fix a contract topic's partition count; the count it has.

        FAILED_PRECONDITION when it already has another count: moving keys
        between partitions would break the order per key.
        """
        self.registry.check_topic(topic, "topic_id")
        limit = self.settings.max_partitions
        if not 1 <= partitions <= limit:
            raise InvalidArgument(
                f"topic.partitions: {partitions}; a topic has 1 to {limit} partitions",
                reason="INVALID_PARTITION_COUNT",
                metadata={"max_partitions": str(limit)},
                field_violations=[FieldViolation("topic.partitions", f"must be 1 to {limit}")],
            )
        async with redis_errors():
            current = await self.store.create_topic(topic, partitions)
        if current != partitions:
            raise FailedPrecondition(
                f"topic {topic} already has {current} partition(s); a topic's partition count "
                "never changes, because keys would move between partitions and lose their order",
                reason="PARTITION_COUNT_FIXED",
                metadata={"partitions": str(current), "requested": str(partitions)},
                resource_type="topic",
                resource_name=f"events/topics/{topic}",
            )
        return current

    # -- stats -----------------------------------------------------------

    async def topic_stats(self, topic: str, group: str = "") -> TopicInfo:
        """A topic's length and its groups' progress; zeros for an unused topic."""
        self.registry.check_topic(topic)
        if group:
            check_name(group, "group", "consumer group")
        async with redis_errors():
            info = await self.store.topic_info(topic, group)
        if info is None:
            info = TopicInfo(topic, 0, [], 0, None, await self._count(topic))
        if group and not any(g.name == group for g in info.groups):
            raise NotFound(
                f"topic {topic} has no consumer group {group}",
                resource_type="consumer-group",
                resource_name=f"events/topics/{topic}/groups/{group}",
            )
        metrics.observe_topic(info, self.now_ms())
        return info

    async def list_topics(self, page_size: int, page_token: str) -> tuple[list[TopicInfo], str]:
        """Topics with a stream, by name, a page at a time."""
        if page_size < 0:
            raise InvalidArgument("page_size: must not be negative", reason="INVALID_PAGE_SIZE")
        after = paging.decode_cursor(page_token) if page_token else ""
        size = paging.page_size(page_size, 100, MAX_PAGE)
        async with redis_errors():
            names = await self.store.existing([t for t in self.registry.topics if t > after])
            page = names[:size]
            infos = [await self.store.topic_info(t) for t in page]
        out = [i for i in infos if i is not None]
        return out, paging.encode_cursor(page[-1]) if len(names) > size else ""


def _no_dead_letter(topic: str, dead_letter_id: str) -> NoReturn:
    raise NotFound(
        f"no dead letter {dead_letter_id} on topic {topic}; nothing was redriven",
        resource_type="dead-letter",
        resource_name=f"events/topics/{topic}/deadLetters/{dead_letter_id}",
    )


def _public(records: Sequence[DeadLetterRecord], partitions: int) -> list[DeadLetterRecord]:
    """The records with their public ids (which name the partition on a partitioned topic)."""
    return [replace(d, id=partitioned_id(partitions, d.partition, d.id)) for d in records]
