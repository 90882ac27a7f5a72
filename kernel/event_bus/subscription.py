"""One subscription: leases events to a consumer, never more than it has room for.

The loop, per turn: take over expired leases (XAUTOCLAIM) and settle them as
failed attempts; lease what the consumer has room for (due retries first,
then new events); if nothing came, wait for a new event, a retry falling
due, or room freeing up. It never buffers ahead of the consumer: a delivery's
lease starts when it is sent, so nothing ages in a pending list while it
waits in a client buffer.

On a partitioned topic a turn goes over every partition, starting from the
next one each turn so none is starved, with the consumer's room shared
between them; the wait is one blocking read of all partitions' streams.

A Redis outage does not end the subscription: the loop waits with backoff
and carries on when Redis is back, recreating the group if Redis lost it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from autoecoops.kernel.event_bus import metrics
from autoecoops.kernel.event_bus.bus import EventBus
from autoecoops.kernel.event_bus.retry import RetryPolicy
from autoecoops.kernel.event_bus.store import Entry, NoGroup, Settle, redis_errors
from autoecoops.kernel.event_bus.tokens import DeliveryRef, subject_tag
from autoecoops.kernel.mesh.backoff import Backoff
from autoecoops.kernel.mesh.errors import Unavailable

log = logging.getLogger("autoecoops.event_bus")

#: How long an event whose idempotency key another delivery is processing waits
#: before it is looked at again.
PARK_MS = 1000
#: The longest wait between tries while Redis is down.
MAX_OUTAGE_BACKOFF = 5.0

T = TypeVar("T")
_running: set[asyncio.Task[Any]] = set()


async def shielded(call: Awaitable[T]) -> T:
    """Run one Redis call to completion even if the subscriber leaves meanwhile.

    A subscriber leaving cancels its task. Cancelling redis-py in the middle of
    a command can wedge the cancelled task and its connection (seen with a
    blocking XREAD on Python 3.11); a shielded call instead finishes on its own
    (each is short or bounded) and returns its connection to the pool.
    """
    task = asyncio.ensure_future(call)
    _running.add(task)
    task.add_done_callback(_settled)
    return await asyncio.shield(task)


def _settled(task: asyncio.Task[Any]) -> None:
    _running.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: an abandoned call's error is not logged as unhandled


@dataclass(frozen=True, slots=True)
class Subscription:
    """What a subscriber asked for."""

    topic: str
    group: str
    consumer: str
    #: The subscriber's verified subject; its delivery ids are bound to it.
    subject: str
    max_in_flight: int
    #: Seconds; None keeps the group's current visibility timeout.
    visibility_timeout: float | None = None
    #: None keeps the group's current policy.
    retry_policy: RetryPolicy | None = None
    #: Where a new group starts: '$' (latest) or '0' (earliest).
    start: str = "$"

    @property
    def ordered(self) -> bool:
        """One at a time, in order: a failed event is retried before the next one."""
        return self.max_in_flight == 1


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event leased to the consumer."""

    delivery_id: str
    event_id: str
    #: The stored envelope (its id still empty; the event id fills it).
    envelope: bytes
    attempt: int
    #: Epoch seconds.
    lease_expire_at: float
    #: The partition the event is in.
    partition: int = 0


class SubscriptionLoop:
    """Runs one subscription for as long as its caller iterates."""

    def __init__(self, bus: EventBus, sub: Subscription) -> None:
        self.bus = bus
        self.sub = sub
        self.store = bus.store
        self._vis_ms = 0
        self._policy = RetryPolicy()
        self._next_reclaim = 0.0
        self._wake = asyncio.Event()
        self._partitions = 1
        #: The partition a turn starts with (rotates, for fairness).
        self._first = 0
        #: Deliveries held per partition, as its last fetch left them.
        self._held: dict[int, int] = {}

    async def setup(self) -> None:
        """Create or join the group; errors here fail the Subscribe call itself."""
        s = self.sub
        vis = None if s.visibility_timeout is None else int(s.visibility_timeout * 1000)
        async with redis_errors():
            await shielded(
                self.store.ensure_group(
                    s.topic, s.group, s.start, self.bus.now_ms(), s.retry_policy, vis
                )
            )
        async with redis_errors():
            self._partitions = await shielded(self.store.partitions(s.topic))
        await self._load_config()
        await self.bus.tokens()

    async def _load_config(self) -> None:
        async with redis_errors():
            cfg = await shielded(self.store.group_config(self.sub.topic, self.sub.group))
        if cfg is not None:
            self._vis_ms, self._policy = cfg.vis_ms, cfg.policy

    async def deliveries(self) -> AsyncIterator[list[Delivery]]:
        """Batches of deliveries, as the consumer has room for them."""
        backoff = Backoff(0.1, MAX_OUTAGE_BACKOFF)
        self._wake = self.bus.notifier.event(self.sub.topic, self.sub.group, self.sub.consumer)
        try:
            while True:
                try:
                    batch = await self._turn()
                    backoff.reset()
                except NoGroup:
                    # Redis lost the group (restarted without it, or it was
                    # destroyed): recreate it from the oldest retained event;
                    # the group's dedup marks skip what it had processed.
                    log.warning(
                        "group %s of %s is gone; recreating it", self.sub.group, self.sub.topic
                    )
                    try:
                        async with redis_errors():
                            await shielded(
                                self.store.ensure_group(
                                    self.sub.topic, self.sub.group, "0", self.bus.now_ms()
                                )
                            )
                    except (Unavailable, NoGroup):
                        await asyncio.sleep(backoff.peek())
                    continue
                except Unavailable:
                    log.warning(
                        "Redis unavailable; subscription %s/%s retrying in %.1fs",
                        self.sub.topic,
                        self.sub.group,
                        backoff.peek(),
                    )
                    await asyncio.sleep(backoff.next())
                    continue
                if batch:
                    yield batch
        finally:
            self.bus.notifier.drop(self.sub.topic, self.sub.group, self.sub.consumer)

    async def _turn(self) -> list[Delivery]:
        s, bus = self.sub, self.bus
        now = bus.clock()
        if now >= self._next_reclaim:
            await self._load_config()
            for p in range(self._partitions):
                await self._reclaim(p)
            self._next_reclaim = now + min(self._vis_ms / 2000, 1.0)
        self._wake.clear()
        n = self._partitions
        order = [(self._first + i) % n for i in range(n)]
        self._first = (self._first + 1) % n
        out: list[Delivery] = []
        more, waiting_in_order = False, False
        next_due: float | None = None
        last: dict[int, str] = {}
        for p in order:
            # The consumer's room is shared: what the other partitions hold counts.
            room = s.max_in_flight - sum(h for q, h in self._held.items() if q != p)
            if room <= 0:
                continue  # its own fetch, later in the turn, refreshes what it holds
            async with redis_errors():
                res = await shielded(
                    self.store.fetch(
                        s.topic,
                        s.group,
                        s.consumer,
                        room,
                        s.ordered,
                        self._vis_ms,
                        bus.now_ms(),
                        PARK_MS,
                        partition=p,
                    )
                )
            self._held[p] = room - res.free
            if res.deduplicated:
                metrics.DEDUPLICATED.labels(s.topic, s.group).inc(res.deduplicated)
            if res.lost:
                metrics.LOST.labels(s.topic, s.group).inc(res.lost)
            if res.entries:
                out += await self._deliveries(res.entries, p)
            more = more or res.more
            last[p] = res.last_id
            if res.next_due is not None:
                next_due = res.next_due if next_due is None else min(next_due, res.next_due)
                waiting_in_order = waiting_in_order or s.ordered
        if out or more:
            return out
        timeout = bus.settings.poll_interval
        if next_due is not None:
            timeout = min(timeout, max(next_due / 1000 - bus.clock(), 0.001))
        free = s.max_in_flight - sum(self._held.values())
        if free > 0 and not waiting_in_order and len(last) == n:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a
            # cancellation that arrives as the awaited call completes, and a
            # subscriber that hung up would keep its loop running forever.
            try:
                async with redis_errors(), asyncio.timeout(timeout + 5):
                    # Bounded, so a silent network partition cannot hang the loop.
                    await shielded(self.store.wait_for_events(s.topic, last, timeout))
            except TimeoutError:
                raise Unavailable("Redis did not answer a blocking read in time") from None
        else:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
        return []

    async def _reclaim(self, partition: int) -> None:
        """Settle leases that expired unsettled as failed attempts (with backoff)."""
        s = self.sub
        async with redis_errors():
            entries, lost = await shielded(
                self.store.reclaim(s.topic, s.group, s.consumer, self._vis_ms, partition)
            )
        if lost:
            metrics.LOST.labels(s.topic, s.group).inc(lost)
        if entries:
            log.info("%d lease(s) expired in %s/%s", len(entries), s.topic, s.group)
            await shielded(
                self.bus.fail(
                    s.topic,
                    s.group,
                    [Settle(e.id, s.consumer, e.attempt) for e in entries],
                    "lease expired",
                    by="event-bus",
                    partition=partition,
                )
            )

    async def _deliveries(self, entries: list[Entry], partition: int) -> list[Delivery]:
        s = self.sub
        tokens = await self.bus.tokens()
        tag = subject_tag(s.subject)
        expire = self.bus.clock() + self._vis_ms / 1000
        out = [
            Delivery(
                delivery_id=tokens.encode(
                    DeliveryRef(
                        s.topic, s.group, s.consumer, e.id, e.attempt, tag, e.key, partition
                    )
                ),
                event_id=e.event_id,
                envelope=e.envelope,
                attempt=e.attempt,
                lease_expire_at=expire,
                partition=partition,
            )
            for e in entries
        ]
        metrics.DELIVERED.labels(s.topic, s.group).inc(len(out))
        retries = sum(1 for e in entries if e.attempt > 1)
        if retries:
            metrics.RETRIED.labels(s.topic, s.group).inc(retries)
        return out
