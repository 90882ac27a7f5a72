"""Scale-out benchmarks (issue #21): one process on one Redis against replicas on
a three-master Redis Cluster. Every service is a real ``autoecoops serve``
process (auth-service and policy-audit always run: calls carry real tokens and
every PublishBatch is audited before it answers); the load comes from this
process over gRPC, through an address list where there are replicas.

1. Publish throughput. Baseline: ONE event-bus process on ONE redis-server
   (started here on a free port), the topic one stream. Scaled: TWO event-bus
   processes on a 3 masters + 3 replicas cluster (tests/cluster.py
   LocalCluster), the topic created with --partitions partitions, producers
   reaching both processes through ``AUTOECOOPS_EVENT_BUS_ADDR``-style list
   (round robin). --producers concurrent loops of PublishBatch (--batch events
   of 1 KiB, keyed by 64 subjects) for --seconds; events/s and the ratio.
   On the cluster every publish and audit append also waits for one replica
   (WAIT, the cluster default). Also: ONE of the two processes on the same
   cluster, which separates the replicas' effect from the cluster's.
   Then the consume side on A and B: --consumers Subscribe streams of a new
   consumer group read the backlog the publish runs left and acknowledge
   every batch they receive (Ack per batch); events/s and the ratio.
2. Audit log ceiling on one shard: AppendEntry (--writers concurrent callers)
   and BatchAppendEntries (500 entries a call, 4 callers) through the
   policy-audit process, on the single Redis and on the cluster (WAIT to one
   replica). The log is one sequence in one hash slot, so on the cluster it is
   one master whatever the cluster's size.
3. memory-hub Search queries/s with one replica and with two (processes on the
   single Redis, documents ingested first, --searchers concurrent Search
   calls through an address list of one or both); the ratio.

For each run the CPU time every process used (from /proc) is printed per
1,000 events / entries / searches: that is what a capacity plan scales, and
the Redis master's share gives the ceiling of one shard (the rate at which
its one core would be saturated). docs/scale.md ("Performance and a plan for
100x") records the figures. Both setups run side by side and each
comparison alternates between them for --rounds rounds (means printed), so
load from elsewhere on the machine hits both alike.

On a 2-core machine the services, the Redis nodes and this load generator
share two cores, so two processes cannot run faster than one process that
already keeps both cores busy: expect ratios near or below 1 here. The
per-1,000 CPU figures are what carries over to machines with more cores.

    .venv/bin/python bench/bench_scale.py [--seconds 10] [--producers 8] [--partitions 6]
    .venv/bin/python bench/bench_scale.py --quick        # about a minute
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import any_pb2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_memory_hub import ACTIONS, SUBJECTS, SYMPTOMS, documents  # noqa: E402
from bench_policy_audit import entry  # noqa: E402

from autoecoops.audit.v1 import audit_pb2, audit_pb2_grpc  # noqa: E402
from autoecoops.events.v1 import envelope_pb2, events_pb2, events_pb2_grpc  # noqa: E402
from autoecoops.infra.v1 import events_pb2 as infra  # noqa: E402
from autoecoops.kernel.mesh.config import SERVICES, MeshConfig  # noqa: E402
from autoecoops.memory.v1 import memory_pb2, memory_pb2_grpc  # noqa: E402
from autoecoops.sdk.channels import channel_options, target_of  # noqa: E402
from tests.cluster import LocalCluster  # noqa: E402
from tests.conftest import RedisProcess, free_port  # noqa: E402

BIN = Path(sys.executable).parent
TOPIC = "infra.sync"
TYPE = "autoecoops.infra.sync.failed"
PAYLOAD = "x" * 1024
AUDIT_BATCH = 500
AUDIT_CALLERS = 4
CLOCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux /proc)."""
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK
    return 0.0


class CpuMeter:
    """CPU seconds each named group of processes uses between ``start`` and ``stop``."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = {k: v for k, v in groups.items() if v}
        self._at: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        return {k: sum(cpu_seconds(p) for p in pids) for k, pids in self.groups.items()}

    def start(self) -> None:
        """Take the starting readings."""
        self._at = self._now()

    def stop(self) -> None:
        """Take the final readings; ``used`` holds the difference."""
        now = self._now()
        self.used = {k: now[k] - self._at[k] for k in now}

    def per_thousand(self, count: int, unit: str) -> str:
        """'CPU ms per 1,000 <unit>: group a, group b, ...'."""
        parts = ", ".join(f"{k} {v * 1e6 / max(count, 1):.0f}" for k, v in self.used.items())
        return f"CPU ms per 1,000 {unit}: {parts}"


@dataclasses.dataclass
class Proc:
    """One ``autoecoops serve`` process."""

    service: str
    port: int
    log: Path
    popen: subprocess.Popen[bytes]


class Deployment:
    """Services as ``autoecoops serve`` processes on one Redis URL, one key
    prefix and one data directory (the signing keys auth-service creates)."""

    def __init__(self, redis_url: str, root: Path, replicas: dict[str, int]) -> None:
        self.root = root
        self.ports = {
            s.name: [free_port() for _ in range(replicas.get(s.name, 1))] for s in SERVICES
        }
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("AUTOECOOPS_", "OTEL_")) and k != "REDIS_URL"
        }
        for s in SERVICES:
            env[f"AUTOECOOPS_{s.env}_PORT"] = str(self.ports[s.name][0])
            if len(self.ports[s.name]) > 1:
                env[f"AUTOECOOPS_{s.env}_ADDR"] = self.addr(s.name)
        env.update(
            REDIS_URL=redis_url,
            AUTOECOOPS_KEY_PREFIX=f"bench-scale-{uuid.uuid4().hex[:8]}:",
            AUTOECOOPS_DATA_DIR=str(root / "data"),
            AUTOECOOPS_LOG_LEVEL="WARNING",
            AUTOECOOPS_EVENT_BUS_MAX_BATCH="1000",
        )
        self.env = env
        self.prefix = env["AUTOECOOPS_KEY_PREFIX"]
        self.procs: list[Proc] = []
        self._token = ""

    def addr(self, service: str, replicas: int | None = None) -> str:
        """The address list of ``service``'s first ``replicas`` processes."""
        return ",".join(f"127.0.0.1:{p}" for p in self.ports[service][:replicas])

    def pids(self, service: str) -> list[int]:
        """Process ids of ``service``'s running replicas."""
        return [p.popen.pid for p in self.procs if p.service == service]

    def _spawn(self, service: str, replica: int) -> Proc:
        env = dict(self.env)
        svc = next(s for s in SERVICES if s.name == service)
        port = self.ports[service][replica]
        env[f"AUTOECOOPS_{svc.env}_PORT"] = str(port)
        log = self.root / f"{service}-{replica}.log"
        popen = subprocess.Popen(
            [str(BIN / "autoecoops"), "serve", service],
            env=env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        proc = Proc(service, port, log, popen)
        self.procs.append(proc)
        return proc

    @staticmethod
    async def _serving(proc: Proc, within: float = 120) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if "SERVING in" in proc.log.read_text(errors="replace"):
                return
            if proc.popen.poll() is not None:
                break
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{proc.service} did not start:\n{proc.log.read_text()}")

    async def start(self, *services: str) -> None:
        """Start every replica of ``services`` (all at once) and wait until each serves.
        auth-service, when named, goes first: it creates the signing keys the
        others load."""
        if "auth-service" in services:
            await self._serving(self._spawn("auth-service", 0))
            services = tuple(s for s in services if s != "auth-service")
        started = [self._spawn(s, i) for s in services for i in range(len(self.ports[s]))]
        await asyncio.gather(*(self._serving(p) for p in started))

    def token(self) -> str:
        """An admin token (``autoecoops token``), minted once."""
        if not self._token:
            self._token = subprocess.run(
                [
                    *(str(BIN / "autoecoops"), "token", "--subject", "bench"),
                    *("--roles", "admin", "--ttl", "1h"),
                ],
                env=self.env,
                capture_output=True,
                text=True,
                check=True,
                timeout=60,
            ).stdout.strip()
        return self._token

    def metadata(self) -> list[tuple[str, str]]:
        """Call metadata carrying the token."""
        return [("authorization", f"Bearer {self.token()}")]

    async def stop(self) -> None:
        """SIGTERM every process (drain), SIGKILL what is still there after 20 s."""
        for p in reversed(self.procs):
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for p in self.procs:
            left = max(0.1, deadline - time.monotonic())
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(p.popen.wait, left)
            if p.popen.poll() is None:
                p.popen.kill()
                p.popen.wait()


def channel(address: str) -> grpc.aio.Channel:
    """A channel as the SDK dials an address (a list: round robin over healthy replicas)."""
    target = target_of(address)
    return grpc.aio.insecure_channel(
        target, options=channel_options(MeshConfig(), None, target=target)
    )


async def for_seconds(
    seconds: float, workers: int, call: Callable[[int, int], Awaitable[int]]
) -> tuple[int, float]:
    """Run ``workers`` loops of ``call(worker, i)`` (returning items done) for
    ``seconds``; items done in all and the elapsed time (to the last answer)."""
    done = [0] * workers
    start = time.perf_counter()
    end = start + seconds

    async def loop(w: int) -> None:
        i = 0
        while time.perf_counter() < end:
            done[w] += await call(w, i)
            i += 1

    await asyncio.gather(*(loop(w) for w in range(workers)))
    return sum(done), time.perf_counter() - start


def show(label: str, value: float, unit: str) -> None:
    """One figure."""
    print(f"  {label:<58} {value:>10,.0f} {unit}", flush=True)


# -- 1. publish --------------------------------------------------------------------


def _payload() -> any_pb2.Any:
    data = any_pb2.Any()
    data.Pack(infra.SyncFailed(application="web", operation_id="op", message=PAYLOAD))
    return data


DATA = _payload()


def batch_of(tag: str, n: int) -> list[envelope_pb2.Envelope]:
    """``n`` events with fresh idempotency keys, keyed by 64 subjects."""
    out = []
    for i in range(n):
        env = envelope_pb2.Envelope(
            source="//bench", type=TYPE, idempotency_key=f"{tag}-{i}", subject=f"app-{i % 64}"
        )
        env.data.CopyFrom(DATA)
        out.append(env)
    return out


async def publish_run(
    dep: Deployment,
    cpu: CpuMeter,
    address: str,
    producers: int,
    batch: int,
    seconds: float,
) -> float:
    """Events/s of ``producers`` PublishBatch loops against ``address`` for ``seconds``."""
    md = dep.metadata()
    run = uuid.uuid4().hex[:8]
    async with channel(address) as ch:
        stub = events_pb2_grpc.EventBusServiceStub(ch)

        async def call(w: int, i: int) -> int:
            req = events_pb2.PublishBatchRequest(
                topic=TOPIC, envelopes=batch_of(f"{run}-{w}-{i}", batch)
            )
            await stub.PublishBatch(req, metadata=md, timeout=60)
            return batch

        await for_seconds(min(2.0, seconds / 2), producers, call)  # warm: channels, scripts
        run = uuid.uuid4().hex[:8]
        cpu.start()
        events, took = await for_seconds(seconds, producers, call)
        cpu.stop()
    rate = events / took
    print(f"    {events:,} events in {took:.1f} s, {events // batch:,} audited PublishBatch calls")
    print(f"    {cpu.per_thousand(events, 'events')}")
    return rate


# -- 1b. consume -------------------------------------------------------------------


async def consume_run(
    dep: Deployment, cpu: CpuMeter, address: str, consumers: int, seconds: float
) -> float:
    """Events/s delivered and acknowledged: ``consumers`` Subscribe streams of one new
    consumer group (from the earliest event: the publish runs left a backlog), each
    acknowledging every batch it receives, for ``seconds``."""
    md = dep.metadata()
    group = f"bench-{uuid.uuid4().hex[:8]}"
    acked = [0] * consumers
    counting = asyncio.Event()
    async with channel(address) as ch:
        stub = events_pb2_grpc.EventBusServiceStub(ch)

        async def consumer(c: int) -> None:
            call = stub.Subscribe(
                events_pb2.SubscribeRequest(
                    topic=TOPIC,
                    group=group,
                    consumer=f"c{c}",
                    max_in_flight=512,
                    max_batch_size=128,
                    start_position=events_pb2.START_POSITION_EARLIEST,
                ),
                metadata=md,
            )
            try:
                async for resp in call:
                    ids = [d.delivery_id for d in resp.deliveries] or [resp.delivery.delivery_id]
                    await stub.Ack(events_pb2.AckRequest(delivery_ids=ids), metadata=md, timeout=60)
                    if counting.is_set():
                        acked[c] += len(ids)
            except asyncio.CancelledError:
                call.cancel()
                raise

        tasks = [asyncio.create_task(consumer(c)) for c in range(consumers)]
        try:
            await asyncio.sleep(min(2.0, seconds / 2))  # warm: group, leases, channels
            cpu.start()
            counting.set()
            start = time.perf_counter()
            await asyncio.sleep(seconds)
            counting.clear()
            took = time.perf_counter() - start
            cpu.stop()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    events = sum(acked)
    print(f"    {events:,} events delivered and acknowledged in {took:.1f} s")
    print(f"    {cpu.per_thousand(events, 'events')}")
    return events / took


# -- 2. audit ----------------------------------------------------------------------


async def audit_run(
    dep: Deployment, cpu: CpuMeter, batched: bool, writers: int, seconds: float, label: str
) -> float:
    """Entries/s appended through ``dep``'s policy-audit: AppendEntry from
    ``writers`` callers, or (``batched``) BatchAppendEntries of AUDIT_BATCH
    entries from AUDIT_CALLERS callers."""
    md = dep.metadata()
    template = [entry(i) for i in range(64)]
    async with channel(dep.addr("policy-audit")) as ch:
        stub = audit_pb2_grpc.AuditServiceStub(ch)

        async def one(w: int, i: int) -> int:
            req = audit_pb2.AppendEntryRequest(entry=template[i % 64], request_id=uuid.uuid4().hex)
            await stub.AppendEntry(req, metadata=md, timeout=60)
            return 1

        async def many(w: int, i: int) -> int:
            req = audit_pb2.BatchAppendEntriesRequest(
                requests=[
                    audit_pb2.AppendEntryRequest(
                        entry=template[j % 64], request_id=uuid.uuid4().hex
                    )
                    for j in range(AUDIT_BATCH)
                ]
            )
            await stub.BatchAppendEntries(req, metadata=md, timeout=60)
            return AUDIT_BATCH

        call, callers = (many, AUDIT_CALLERS) if batched else (one, writers)
        await for_seconds(min(1.0, seconds / 2), callers, call)  # warm up
        cpu.start()
        n, took = await for_seconds(seconds, callers, call)
        cpu.stop()
    show(label, n / took, "entries/s")
    print(f"    {cpu.per_thousand(n, 'entries')}")
    master = cpu.used.get("redis (log's master)", 0.0)
    if master:
        print(
            f"    one-shard ceiling (the log's master at one full core): ~{n / master:,.0f} entries/s"
        )
    return n / took


# -- 3. memory-hub search -------------------------------------------------------------


def queries(n: int) -> Iterator[str]:
    """Distinct runbook-like questions (no two alike, so no cache answers them)."""
    rng = random.Random(21)
    for i in range(n):
        s, y, a = rng.choice(SUBJECTS), rng.choice(SYMPTOMS), rng.choice(ACTIONS)
        yield f"what to do when {s} {y} on cluster {i % 17}? {a.split()[0].lower()} {i}"


async def search_bench(
    dep: Deployment, docs: int, searchers: int, seconds: float, rounds: int
) -> tuple[float, float]:
    """Search/s through one memory-hub replica and through two (mean of ``rounds``)."""
    md = dep.metadata()
    async with channel(dep.addr("memory-hub", 1)) as ch:
        stub = memory_pb2_grpc.MemoryServiceStub(ch)
        await stub.CreateNamespace(
            memory_pb2.CreateNamespaceRequest(namespace=memory_pb2.Namespace(name="bench")),
            metadata=md,
            timeout=60,
        )
        texts = documents(docs)
        t = time.perf_counter()
        for at in range(0, docs, 32):
            await stub.IngestDocuments(
                memory_pb2.IngestDocumentsRequest(
                    namespace="bench",
                    documents=[
                        memory_pb2.Document(
                            id=f"doc-{i}", text=text, content_type=memory_pb2.CONTENT_TYPE_MARKDOWN
                        )
                        for i, text in enumerate(texts[at : at + 32], at)
                    ],
                ),
                metadata=md,
                timeout=300,
            )
        info = await stub.GetNamespace(
            memory_pb2.GetNamespaceRequest(name="bench"), metadata=md, timeout=60
        )
    print(
        f"  {docs} documents ({info.namespace.chunk_count} chunks) ingested through replica A "
        f"in {time.perf_counter() - t:.1f} s"
    )
    # Each replica answers one search on its own first: a replica loads its
    # model and the namespace on first use, which must not land in a round.
    t = time.perf_counter()
    for port in dep.ports["memory-hub"]:
        async with channel(f"127.0.0.1:{port}") as ch:
            await memory_pb2_grpc.MemoryServiceStub(ch).Search(
                memory_pb2.SearchRequest(namespace="bench", query="warm up", k=5),
                metadata=md,
                timeout=300,
            )
    print(f"  both replicas loaded and answering in {time.perf_counter() - t:.1f} s")
    pids = {"memory-hub": dep.pids("memory-hub")}
    results: dict[int, list[float]] = {1: [], 2: []}
    asked = queries(10_000_000)
    for _ in range(rounds):
        for replicas in (1, 2):
            cpu = CpuMeter({**pids, "bench client": [os.getpid()]})
            async with channel(dep.addr("memory-hub", replicas)) as ch:
                stub = memory_pb2_grpc.MemoryServiceStub(ch)

                async def call(w: int, i: int, stub: Any = stub) -> int:
                    req = memory_pb2.SearchRequest(namespace="bench", query=next(asked), k=5)
                    await stub.Search(req, metadata=md, timeout=60)
                    return 1

                await for_seconds(1.0, searchers, call)  # both replicas caught up and warm
                cpu.start()
                n, took = await for_seconds(seconds, searchers, call)
                cpu.stop()
            results[replicas].append(n / took)
            show(
                f"Search, {searchers} concurrent callers, {replicas} replica(s)",
                n / took,
                "searches/s",
            )
            print(f"    {cpu.per_thousand(n, 'searches')}")
    one, two = (sum(v) / len(v) for v in (results[1], results[2]))
    return one, two


# -- the runs ------------------------------------------------------------------------


def mean(values: list[float]) -> float:
    """The arithmetic mean."""
    return sum(values) / len(values)


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each measurement")
    parser.add_argument("--producers", type=int, default=8, help="concurrent PublishBatch loops")
    parser.add_argument("--batch", type=int, default=100, help="events per PublishBatch")
    parser.add_argument("--partitions", type=int, default=6, help="partitions on the cluster")
    parser.add_argument("--consumers", type=int, default=8, help="concurrent Subscribe streams")
    parser.add_argument("--writers", type=int, default=32, help="concurrent AppendEntry callers")
    parser.add_argument("--searchers", type=int, default=16, help="concurrent Search callers")
    parser.add_argument("--docs", type=int, default=200, help="documents ingested before searching")
    parser.add_argument(
        "--rounds", type=int, default=2, help="interleaved rounds of every comparison"
    )
    parser.add_argument(
        "--quick", action="store_true", help="short runs (3 s, 60 documents, one round)"
    )
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.docs, args.rounds = 3.0, 60, 1
    cores = os.cpu_count()
    print(
        f"bench_scale: {cores} cores; {args.rounds} round(s) of {args.seconds:g} s measurements; "
        f"{args.producers} producers x PublishBatch of {args.batch} events "
        f"({len(PAYLOAD)} B payload)",
        flush=True,
    )
    print(
        f"  NOTE: services, Redis nodes and this load generator share the machine's {cores} "
        "cores,\n  so a ratio here is bounded by the cores (expect it near or below 1); "
        "the CPU per 1,000 figures carry over.\n  The two setups run side by side and are "
        "measured in alternation, so load from elsewhere hits both alike.",
        flush=True,
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        root = Path(tmp)
        redis = RedisProcess(root / "redis", "--appendonly", "no")
        cluster = LocalCluster(root / "cluster")
        single = Deployment(redis.url, root / "single", {"memory-hub": 2})
        scaled: Deployment | None = None
        try:
            t = time.perf_counter()
            await asyncio.gather(redis.start(), asyncio.to_thread(cluster.start))
            assert redis.proc is not None
            scaled = Deployment(cluster.url, root / "scaled", {"event-bus": 2})
            for d in (single, scaled):
                d.root.mkdir()
            await asyncio.gather(
                *(d.start("auth-service", "policy-audit", "event-bus") for d in (single, scaled))
            )
            print(
                f"(one redis-server and a cluster of 3 masters + 3 replicas, each with "
                f"auth-service, policy-audit and event-bus, up in {time.perf_counter() - t:.1f} s)",
                flush=True,
            )
            async with channel(scaled.addr("event-bus")) as ch:
                await events_pb2_grpc.EventBusServiceStub(ch).CreateTopic(
                    events_pb2.CreateTopicRequest(
                        topic_id=TOPIC, topic=events_pb2.Topic(partitions=args.partitions)
                    ),
                    metadata=scaled.metadata(),
                    timeout=60,
                )
            masters = [
                n.proc.pid
                for n in cluster.nodes
                if n.proc is not None and n.client().info("replication")["role"] == "master"
            ]
            replicas = [
                n.proc.pid
                for n in cluster.nodes
                if n.proc is not None and n.proc.pid not in masters
            ]
            me = [os.getpid()]
            single_groups = {
                "event-bus": single.pids("event-bus"),
                "policy-audit": single.pids("policy-audit"),
                "auth": single.pids("auth-service"),
                "redis": [redis.proc.pid],
                "bench client": me,
            }
            scaled_groups = {
                "event-bus": scaled.pids("event-bus"),
                "policy-audit": scaled.pids("policy-audit"),
                "auth": scaled.pids("auth-service"),
                "redis masters": masters,
                "redis replicas": replicas,
                "bench client": me,
            }
            lone_groups = {**scaled_groups, "event-bus": scaled.pids("event-bus")[:1]}

            print(
                f"\n== 1. publish: A = ONE event-bus process on ONE redis-server, topic of one"
                f" stream;\n   B = TWO event-bus processes (address list) on the 3-master cluster,"
                f" {args.partitions} partitions, WAIT 1 replica;\n   C = ONE of those two"
                " processes, same cluster and topic (the replicas' effect alone)"
            )
            pub: dict[str, list[float]] = {"A": [], "B": [], "C": []}
            runs = (
                ("A", single, single_groups, single.addr("event-bus")),
                ("B", scaled, scaled_groups, scaled.addr("event-bus")),
                ("C", scaled, lone_groups, scaled.addr("event-bus", 1)),
            )
            for r in range(args.rounds):
                for name, dep, groups, address in runs:
                    pub[name].append(
                        await publish_run(
                            dep,
                            CpuMeter(groups),
                            address,
                            args.producers,
                            args.batch,
                            args.seconds,
                        )
                    )
                    show(f"round {r + 1}, {name}: PublishBatch", pub[name][-1], "events/s")

            print(
                f"\n== 1b. consume: {args.consumers} Subscribe streams of a new group from the"
                " backlog the publish runs left,\n   each acknowledging every batch; A and B as"
                " above"
            )
            sub: dict[str, list[float]] = {"A": [], "B": []}
            for r in range(args.rounds):
                for name, dep, groups, address in runs[:2]:
                    sub[name].append(
                        await consume_run(
                            dep, CpuMeter(groups), address, args.consumers, args.seconds
                        )
                    )
                    show(f"round {r + 1}, {name}: Subscribe + Ack", sub[name][-1], "events/s")

            print(
                "\n== 2. audit log: one redis-server (no WAIT) vs the cluster (the log's one"
                " slot's master, WAIT 1 replica)"
            )
            log_master = cluster.master_for(f"{scaled.prefix}{{policy-audit}}:{{audit}}:head")
            assert log_master.proc is not None
            audit_groups = {
                "one Redis": {
                    "policy-audit": single.pids("policy-audit"),
                    "redis (log's master)": [redis.proc.pid],
                    "bench client": me,
                },
                "cluster": {
                    "policy-audit": scaled.pids("policy-audit"),
                    "redis (log's master)": [log_master.proc.pid],
                    "redis (its replica)": [
                        n.proc.pid for n in cluster.replicas_of(log_master) if n.proc is not None
                    ],
                    "bench client": me,
                },
            }
            audit: dict[tuple[bool, str], list[float]] = {}
            for r in range(args.rounds):
                for batched in (False, True):
                    kind = (
                        f"BatchAppendEntries ({AUDIT_BATCH} a call, {AUDIT_CALLERS} callers)"
                        if batched
                        else f"AppendEntry ({args.writers} callers)"
                    )
                    for where, dep in (("one Redis", single), ("cluster", scaled)):
                        audit.setdefault((batched, where), []).append(
                            await audit_run(
                                dep,
                                CpuMeter(audit_groups[where]),
                                batched,
                                args.writers,
                                args.seconds,
                                f"round {r + 1}, {where}: {kind}",
                            )
                        )

            print("\n== 3. memory-hub Search: one replica vs two (processes, the one redis-server)")
            await scaled.stop()  # idle, but its processes and nodes are not part of this
            cluster.stop()
            await single.start("memory-hub")
            one_hub, two_hub = await search_bench(
                single, args.docs, args.searchers, args.seconds, args.rounds
            )
        finally:
            await single.stop()
            if scaled is not None:
                await scaled.stop()
            cluster.stop()
            await redis.kill()

    base, spread, lone = mean(pub["A"]), mean(pub["B"]), mean(pub["C"])
    print(
        f"\n== summary, means of {args.rounds} round(s) (ratios bounded by this machine's "
        "cores; see the NOTE above)"
    )
    show("publish A: 1 event-bus on 1 Redis", base, "events/s")
    show(
        f"publish B: 2 event-bus on 3-master cluster, {args.partitions} partitions",
        spread,
        "events/s",
    )
    show("publish C: 1 event-bus on the same cluster", lone, "events/s")
    print(f"  ratio B/A (the issue's comparison): {spread / base:.2f}x; B/C: {spread / lone:.2f}x")
    sub_a, sub_b = mean(sub["A"]), mean(sub["B"])
    show("consume A: 1 event-bus on 1 Redis", sub_a, "events/s")
    show(
        f"consume B: 2 event-bus on 3-master cluster, {args.partitions} partitions",
        sub_b,
        "events/s",
    )
    print(f"  ratio B/A: {sub_b / sub_a:.2f}x")
    show("memory-hub Search, 1 replica", one_hub, "searches/s")
    show("memory-hub Search, 2 replicas", two_hub, "searches/s")
    print(f"  ratio two/one: {two_hub / one_hub:.2f}x")
    for batched, kind in ((False, "AppendEntry"), (True, "BatchAppendEntries")):
        one_r, cl_r = mean(audit[(batched, "one Redis")]), mean(audit[(batched, "cluster")])
        show(f"audit {kind}, one Redis", one_r, "entries/s")
        show(f"audit {kind}, cluster (WAIT 1)", cl_r, "entries/s")
        print(f"  ratio cluster/one Redis: {cl_r / one_r:.2f}x")
    print(f"(whole run {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    asyncio.run(main())
