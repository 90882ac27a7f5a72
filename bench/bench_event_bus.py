"""event-bus benchmarks (issue #5), 1 KiB payloads. Needs a Redis ($REDIS_URL or 127.0.0.1:6379).

1. Publish throughput, batches of --batch events: PublishBatch over gRPC
   (event-bus in its own process, auth-service and policy-audit in another:
   real tokens, the mesh interceptor, and its synchronous audit append per call)
   from one producer and from four, and the bus's domain path in this process
   (validation, dedup, Lua append), vs a raw redis-py pipelined XADD loop of
   the same envelopes. Target >= 0.5x raw.
2. End to end, one producer and two consumers: throughput from the first
   publish to the last ack (the SDK Consumer helper over gRPC, vs a raw
   XADD + XREADGROUP/XACK loop with two consumers), and publish -> handler
   latency p50/p99 at a fixed rate (--rate events/s). Target >= 0.25x raw.

3. With --partitions N: only the bus's domain publish path (validation, dedup,
   Lua append), to a topic of N partitions vs the same topic as one stream,
   one producer and four concurrent ones, events keyed by 64 subjects; prints
   the ratio partitioned/one-stream. On one Redis a partitioned batch costs
   one script call per partition it touches (Redis runs them one at a time),
   so expect a ratio at or below 1 here; the gain comes from partitions on
   different masters of a Redis Cluster (REDIS_URL of a cluster).

    .venv/bin/python bench/bench_event_bus.py [--events 20000] [--batch 100] [--rate 500]
    .venv/bin/python bench/bench_event_bus.py --partitions 4 [--events 20000] [--batch 100]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import redis.asyncio as aioredis

from autoecoops.events.v1 import envelope_pb2, events_pb2, events_pb2_grpc
from autoecoops.infra.v1 import events_pb2 as infra
from autoecoops.kernel.event_bus.bus import EventBus
from autoecoops.kernel.event_bus.envelope import PublishContext
from autoecoops.kernel.event_bus.settings import EventBusSettings
from autoecoops.kernel.event_bus.store import EventStore
from autoecoops.kernel.mesh.auth import Principal
from autoecoops.kernel.mesh.config import SERVICES
from autoecoops.kernel.mesh.redis import connect
from autoecoops.sdk.consumer import Consumer, Event

ROOT = Path(__file__).resolve().parent.parent
TOPIC = "infra.sync"
TYPE = "autoecoops.infra.sync.failed"
TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
PAYLOAD = "x" * 1024
#: In-flight deliveries per consumer (the SDK's concurrency, and its batch size).
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "64"))
#: Concurrent PublishBatch callers in the second publish measurement.
PUBLISHERS = 4
SERVICES_RUN = ["auth-service", "policy-audit", "event-bus"]

SERVER = r"""
import asyncio, os, sys
import grpc
from autoecoops.events.v1 import events_pb2_grpc
from autoecoops.kernel.event_bus.bus import EventBus
from autoecoops.kernel.event_bus.service import EventBusServicer
from autoecoops.kernel.event_bus.settings import EventBusSettings
from autoecoops.kernel.event_bus.store import EventStore
from autoecoops.kernel.mesh.config import MeshConfig
from autoecoops.kernel.mesh.redis import connect
from autoecoops.kernel.mesh.server import Mesh

async def main(names):
    cfg = MeshConfig.from_env()
    mesh = Mesh(cfg)
    await mesh.start(names)
    if "event-bus" not in names:
        print("ready", flush=True)
        await asyncio.Event().wait()
    # The same servicer on a bare grpc.aio server: no interceptors, no auth, no audit.
    settings = EventBusSettings.from_env()
    store = EventStore(connect(cfg.redis_url), cfg.key_prefix + "events:", settings)
    bare = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    events_pb2_grpc.add_EventBusServiceServicer_to_server(EventBusServicer(EventBus(store, settings)), bare)
    bare.add_insecure_port(f"127.0.0.1:{os.environ['BENCH_BARE_PORT']}")
    await bare.start()
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main(sys.argv[1].split(",")))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def envelope(key: str, at: float | None = None, bare: bool = False) -> envelope_pb2.Envelope:
    env = envelope_pb2.Envelope(source="//bench", type=TYPE, idempotency_key=key)
    if bare:  # no call context to take the actor and trace from
        env.actor.subject, env.trace_parent = "bench", TRACE
    env.data.Pack(infra.SyncFailed(application="web", operation_id=key, message=PAYLOAD))
    if at is not None:
        env.time.FromNanoseconds(int(at * 1e9))
    return env


async def cleanup(r: aioredis.Redis, prefix: str) -> None:
    keys = [k async for k in r.scan_iter(match=prefix + "*", count=10_000)]
    for at in range(0, len(keys), 1000):
        await r.unlink(*keys[at : at + 1000])


class Server:
    """event-bus in a process of its own, auth-service and policy-audit in
    another, as they run in pods of their own."""

    def __init__(self, redis_url: str, prefix: str, data_dir: Path) -> None:
        self.ports = {s.name: free_port() for s in SERVICES}
        self.bare_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOECOOPS_")}
        env.update({f"AUTOECOOPS_{s.env}_PORT": str(self.ports[s.name]) for s in SERVICES})
        env.update(
            REDIS_URL=redis_url,
            AUTOECOOPS_KEY_PREFIX=prefix,
            AUTOECOOPS_DATA_DIR=str(data_dir),
            AUTOECOOPS_LOG_LEVEL="WARNING",
            AUTOECOOPS_EVENT_BUS_MAX_BATCH="1000",
            BENCH_BARE_PORT=str(self.bare_port),
        )
        self.env = env
        self.data_dir = data_dir
        self.procs: list[asyncio.subprocess.Process] = []

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.ports['event-bus']}"

    async def start(self) -> None:
        for names in ("auth-service,policy-audit", "event-bus"):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                SERVER,
                names,
                env=self.env,
                cwd=ROOT,
                stdout=asyncio.subprocess.PIPE,
            )
            self.procs.append(proc)
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            assert line.strip() == b"ready", line

    def token(self) -> str:
        from autoecoops.kernel.auth.keys import KeyRing
        from autoecoops.kernel.auth.settings import AuthSettings
        from autoecoops.kernel.auth.tokens import Issuer
        from autoecoops.kernel.mesh.config import MeshConfig

        s = AuthSettings.from_env(MeshConfig(data_dir=self.data_dir), {})
        ring = KeyRing(s.key_dir, publish_delay=s.publish_delay, max_token_ttl=s.max_token_ttl)
        ring.load_or_create()
        return Issuer(s.issuer, ring).issue("bench", s.audience, 3600, roles=["admin"]).token

    async def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.returncode is None:
                proc.terminate()
                await proc.wait()


# -- 1. publish throughput -------------------------------------------------------


async def raw_publish(r: aioredis.Redis, stream: str, n: int, batch: int) -> float:
    data = [envelope(f"k{i}").SerializeToString() for i in range(n)]
    start = time.perf_counter()
    for at in range(0, n, batch):
        async with r.pipeline(transaction=False) as pipe:
            for i in range(at, min(at + batch, n)):
                pipe.xadd(stream, {"k": f"k{i}", "t": TYPE, "e": data[i]})
            await pipe.execute()
    return n / (time.perf_counter() - start)


async def domain_publish(bus: EventBus, n: int, batch: int) -> float:
    ctx = PublishContext(principal=Principal("bench"), trace_parent=TRACE, now=time.time())
    start = time.perf_counter()
    for at in range(0, n, batch):
        envs = [envelope(f"d{i}") for i in range(at, min(at + batch, n))]
        await bus.publish(TOPIC, envs, ctx)
    return n / (time.perf_counter() - start)


def keyed_envelope(key: str, i: int) -> envelope_pb2.Envelope:
    """An event keyed by one of 64 subjects (its ordering key)."""
    env = envelope(key)
    env.subject = f"app-{i % 64}"
    return env


async def keyed_publish(bus: EventBus, n: int, batch: int, tag: str, producers: int) -> float:
    """Events/s of ``producers`` concurrent loops publishing ``n`` keyed events in all."""
    ctx = PublishContext(principal=Principal("bench"), trace_parent=TRACE, now=time.time())
    per = n // producers

    async def one(p: int) -> None:
        for at in range(0, per, batch):
            hi = min(at + batch, per)
            envs = [keyed_envelope(f"{tag}{p}-{i}", i) for i in range(at, hi)]
            await bus.publish(TOPIC, envs, ctx)

    start = time.perf_counter()
    await asyncio.gather(*(one(p) for p in range(producers)))
    return per * producers / (time.perf_counter() - start)


async def partition_bench(url: str, n: int, batch: int, partitions: int) -> None:
    """Publish to a topic of ``partitions`` partitions vs one stream; print the ratio."""
    prefix = f"bench-ebp-{uuid.uuid4().hex[:8]}:"
    r = connect(url)
    settings = EventBusSettings(max_batch=1000, max_partitions=max(partitions, 1))
    one = EventBus(EventStore(r, prefix + "one:events:", settings), settings)
    many = EventBus(EventStore(r, prefix + "many:events:", settings), settings)
    await many.create_topic(TOPIC, partitions)
    print(
        f"Redis {(await r.info('server'))['redis_version']}, {n} events of {len(PAYLOAD)} B "
        f"payload, batches of {batch}, 64 ordering keys"
    )
    try:
        await keyed_publish(one, 500, batch, "warm", 1)
        await keyed_publish(many, 500, batch, "warm", 1)
        print(f"3. publish: one stream vs {partitions} partitions (bus domain path)")
        for producers in (1, PUBLISHERS):
            single = await keyed_publish(one, n, batch, f"s{producers}-", producers)
            split = await keyed_publish(many, n, batch, f"m{producers}-", producers)
            show(f"one stream, {producers} producer(s)", single)
            show(f"{partitions} partitions, {producers} producer(s)", split)
            print(f"  ratio partitioned/one stream, {producers} producer(s): {split / single:.2f}x")
        info = await many.topic_stats(TOPIC)
        print(f"  partitioned topic holds {info.length} events over {info.partitions} partitions")
    finally:
        await cleanup(r, prefix)
        await r.aclose()


async def grpc_publish(
    stub: events_pb2_grpc.EventBusServiceStub,
    md: list[tuple[str, str]],
    n: int,
    batch: int,
    tag: str,
) -> float:
    start = time.perf_counter()
    for at in range(0, n, batch):
        envs = [envelope(f"{tag}{i}", bare=not md) for i in range(at, min(at + batch, n))]
        await stub.PublishBatch(
            events_pb2.PublishBatchRequest(topic=TOPIC, envelopes=envs), metadata=md
        )
    return n / (time.perf_counter() - start)


# -- 2. end to end ---------------------------------------------------------------


async def produce(
    publish: Callable[[int, int, float], Awaitable[None]], n: int, batch: int, rate: float | None
) -> None:
    """Publish ``n`` events in batches; at ``rate`` events/s, or as fast as possible."""
    start = time.perf_counter()
    for at in range(0, n, batch):
        if rate:
            delay = start + at / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        await publish(at, min(at + batch, n), time.time())


async def raw_e2e(
    r: aioredis.Redis, url: str, stream: str, n: int, batch: int, rate: float | None
) -> tuple[float, list[float]]:
    await r.xgroup_create(stream, "g", "$", mkstream=True)
    body = envelope("raw").SerializeToString()
    latencies: list[float] = []
    done = asyncio.Event()

    async def publish(lo: int, hi: int, now: float) -> None:
        async with r.pipeline(transaction=False) as pipe:
            for i in range(lo, hi):
                pipe.xadd(stream, {"k": f"k{i}", "ts": repr(now), "e": body})
            await pipe.execute()

    async def consume(name: str) -> None:
        c = aioredis.Redis.from_url(url)
        try:
            while not done.is_set():
                got = await c.xreadgroup("g", name, {stream: ">"}, count=64, block=100)
                if not got:
                    continue
                entries = got[0][1]
                now = time.time()
                latencies.extend(now - float(f[b"ts"]) for _, f in entries)
                await c.xack(stream, "g", *[i for i, _ in entries])
                if len(latencies) >= n:
                    done.set()
        finally:
            await c.aclose()

    consumers = [asyncio.create_task(consume(f"c{i}")) for i in range(2)]
    start = time.perf_counter()
    await produce(publish, n, batch, rate)
    await asyncio.wait_for(done.wait(), 300)
    elapsed = time.perf_counter() - start
    await asyncio.gather(*consumers)
    return n / elapsed, latencies


async def bus_e2e(
    server: Server, md: list[tuple[str, str]], group: str, n: int, batch: int, rate: float | None
) -> tuple[float, list[float]]:
    latencies: list[float] = []
    done = asyncio.Event()

    async def handle(event: Event) -> None:
        latencies.append(time.time() - event.envelope.time.ToNanoseconds() / 1e9)
        if len(latencies) >= n:
            done.set()

    channels = [grpc.aio.insecure_channel(server.addr) for _ in range(3)]
    stub = events_pb2_grpc.EventBusServiceStub(channels[0])
    consumers = [
        Consumer(
            ch, TOPIC, group, handle, consumer=f"c{i}", concurrency=CONCURRENCY, metadata=lambda: md
        )
        for i, ch in enumerate(channels[1:])
    ]
    tasks = [asyncio.create_task(c.run()) for c in consumers]
    for _ in range(200):  # the group exists once the consumers have subscribed
        try:
            await stub.GetTopicStats(
                events_pb2.GetTopicStatsRequest(topic=TOPIC, group=group), metadata=md
            )
            break
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.05)

    async def publish(lo: int, hi: int, now: float) -> None:
        envs = [envelope(f"{group}-{i}", now) for i in range(lo, hi)]
        await stub.PublishBatch(
            events_pb2.PublishBatchRequest(topic=TOPIC, envelopes=envs), metadata=md
        )

    start = time.perf_counter()
    await produce(publish, n, batch, rate)
    await asyncio.wait_for(done.wait(), 300)
    while True:  # until the last ack has landed
        stats = await stub.GetTopicStats(
            events_pb2.GetTopicStatsRequest(topic=TOPIC, group=group), metadata=md
        )
        if stats.stats.groups[0].acked_count >= n:
            break
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - start
    for c in consumers:
        await c.stop(5)
    await asyncio.gather(*tasks)
    for ch in channels:
        await ch.close()
    return n / elapsed, latencies


def show(label: str, value: float, unit: str = "events/s") -> None:
    print(f"  {label:<52} {value:>10,.0f} {unit}")


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--rate", type=float, default=500.0, help="events/s of the latency runs")
    parser.add_argument(
        "--partitions", type=int, default=0, help="only compare publishing to N partitions"
    )
    args = parser.parse_args()
    url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    if args.partitions:
        await partition_bench(url, args.events, args.batch, args.partitions)
        return
    prefix = f"bench-eb-{uuid.uuid4().hex[:8]}:"
    r = connect(url)
    settings = EventBusSettings(max_batch=1000)
    bus = EventBus(EventStore(r, prefix + "events:", settings), settings)
    n, b = args.events, args.batch
    print(
        f"Redis {(await r.info('server'))['redis_version']}, {n} events of {len(PAYLOAD)} B payload, batches of {b}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(url, prefix, Path(tmp))
        try:
            await server.start()
            md = [("authorization", f"Bearer {server.token()}")]
            async with grpc.aio.insecure_channel(server.addr) as ch:
                stub = events_pb2_grpc.EventBusServiceStub(ch)
                await grpc_publish(stub, md, 500, b, "warm")  # connections, caches, scripts

                print("1. publish throughput")
                raw = await raw_publish(r, prefix + "raw", n, b)
                domain = await domain_publish(bus, n, b)
                over_grpc = await grpc_publish(stub, md, n, b, "g")
                async with grpc.aio.insecure_channel(f"127.0.0.1:{server.bare_port}") as bare_ch:
                    bare = await grpc_publish(
                        events_pb2_grpc.EventBusServiceStub(bare_ch), [], n, b, "bare"
                    )
                per = n // PUBLISHERS
                parallel = sum(
                    await asyncio.gather(
                        *(grpc_publish(stub, md, per, b, f"p{i}-") for i in range(PUBLISHERS))
                    )
                )
                show("raw redis-py pipelined XADD (one loop)", raw)
                show("bus domain path (validate, dedup, Lua append)", domain)
                show("PublishBatch over gRPC, one producer", over_grpc)
                show(f"PublishBatch over gRPC, {PUBLISHERS} producers", parallel)
                show("PublishBatch, bare grpc.aio (no mesh), one producer", bare)
                print(
                    f"  ratio PublishBatch/raw: {over_grpc / raw:.2f}x one producer, "
                    f"{parallel / raw:.2f}x {PUBLISHERS} producers (target >= 0.5x); "
                    f"domain path/raw: {domain / raw:.2f}x"
                )

            print("2. end to end: 1 producer, 2 consumers")
            await cleanup(r, prefix)
            raw_tp, _ = await raw_e2e(r, url, prefix + "raw-e2e", n, b, None)
            bus_tp, _ = await bus_e2e(server, md, "tp", n, b, None)
            show("raw XADD + XREADGROUP/XACK, throughput", raw_tp)
            show("bus Publish -> Subscribe (SDK) -> Ack, throughput", bus_tp)
            print(f"  ratio bus/raw: {bus_tp / raw_tp:.2f}x (target >= 0.25x)")
            m = min(n, int(args.rate * 10))
            _, raw_lat = await raw_e2e(r, url, prefix + "raw-lat", m, 10, args.rate)
            _, bus_lat = await bus_e2e(server, md, "lat", m, 10, args.rate)
            for label, lat in (("raw", raw_lat), ("bus", bus_lat)):
                print(
                    f"  {label} latency at {args.rate:.0f}/s: p50 {pct(lat, 50) * 1e3:.2f} ms, "
                    f"p99 {pct(lat, 99) * 1e3:.2f} ms"
                )
        finally:
            await server.stop()
            await cleanup(r, prefix)
            await r.aclose()


if __name__ == "__main__":
    asyncio.run(main())
