"""autoops's two speed targets (issue #16).

1. Evaluation: 10,000 SLOs with the four-row burn-rate table (7 windows) per tick,
   from their time buckets as read from Redis: the engine's own code path
   (``window_counts`` + ``burn.assess``), in CPU seconds. Target: under 1 s.
   Baseline, same run: a plain loop that reads the same buckets once and sums them.
2. Ingest of pushed samples: ``SloEngine.record`` (validation, per-bucket
   aggregation, both tiers, one Lua script per batch, with a request id) against a
   raw Redis pipeline of the same writes (four HINCRBY per sample: good and total in
   the minute and hour tiers). Target: at least 0.5x the raw pipeline.

    .venv/bin/python bench/bench_autoops.py [--slos 10000] [--samples 100000] [--batch 1000]

Bucket layouts: each SLO has six hours of minute buckets and three days of hour
buckets (every window of the default table), as the engine's one HMGET per tier
returns them. To keep memory modest, 100 distinct layouts are shared round-robin
by the SLOs; every SLO is still evaluated in full.
Redis is $REDIS_URL or 127.0.0.1:6379, under a key prefix of its own, deleted after.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
import uuid

from autoecoops.autoops.v1 import autoops_pb2 as pb
from autoecoops.kernel.mesh.redis import connect
from autoecoops.platforms.autoops import burn
from autoecoops.platforms.autoops.engine import SloEngine, ts
from autoecoops.platforms.autoops.settings import AutoOpsSettings
from autoecoops.platforms.autoops.sources import Dense, dense, window_counts
from autoecoops.platforms.autoops.store import COARSE, FINE, AutoOpsStore


def layouts(now: float, n: int, rng: random.Random) -> list[tuple[Dense, Dense]]:
    """Six hours of minute buckets and three days of hour buckets, laid out as the
    engine's one HMGET per tier returns them (ints, oldest first)."""
    out = []
    m, h = int(now // FINE), int(now // COARSE)
    for _ in range(n):
        fine = {}
        for b in range(m - 359, m + 1):
            total = rng.randint(500, 1500)
            fine[b] = (total - rng.randint(0, 3), total)
        coarse = {}
        for b in range(h - 71, h + 1):
            total = rng.randint(30_000, 90_000)
            coarse[b] = (total - rng.randint(0, 100), total)
        out.append((dense(fine, m, 360), dense(coarse, h, 72)))
    return out


def bench_evaluate(n_slos: int) -> None:
    now = time.time()
    rng = random.Random(16)
    shared = layouts(now, 100, rng)
    rows = burn.default_rows()
    windows = burn.windows_of(rows)
    fine_keep = AutoOpsSettings().fine_retention

    start = time.process_time()
    fired = 0
    for i in range(n_slos):
        fine, coarse = shared[i % len(shared)]
        counts = window_counts(fine, coarse, windows, fine_keep)
        for _, state in burn.assess(rows, 0.999, counts, {}, now):
            fired += state.firing
    engine = time.process_time() - start

    start = time.process_time()
    total = 0
    for i in range(n_slos):
        (fg, ft), (cg, ct) = shared[i % len(shared)]
        for g, t in zip(fg, ft, strict=True):
            total += t - g
        for g, t in zip(cg, ct, strict=True):
            total += t - g
    baseline = time.process_time() - start
    print(f"evaluate: {n_slos} SLOs x {len(rows)} rows ({len(windows)} windows) per tick")
    print(
        f"  engine    {engine:.3f} s CPU  ({engine / n_slos * 1e6:.1f} us/SLO; {fired} rows firing)"
    )
    print(f"  baseline  {baseline:.3f} s CPU  (a plain loop reading the same buckets once)")
    print(
        f"  ratio     {engine / baseline:.2f}x the baseline; target < 1 s: {'met' if engine < 1 else 'MISSED'}"
    )


class _NoKernel:
    """record() touches no kernel service."""


async def bench_ingest(n_samples: int, batch: int) -> None:
    url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    redis = connect(url)
    prefix = f"autoecoops-bench:{uuid.uuid4().hex[:8]}:autoops"
    store = AutoOpsStore(redis, prefix)
    engine = SloEngine(store, _NoKernel(), AutoOpsSettings())  # type: ignore[arg-type]
    now = time.time()
    slo = pb.Slo(
        name="slos/bench",
        service="bench",
        objective=0.999,
        indicator=pb.Indicator(source=pb.SLI_SOURCE_PUSHED),
    )
    await store.put("slos", slo.name, slo)
    rng = random.Random(5)
    raw = [(now - rng.uniform(0, 3600), rng.randint(90, 100), 100) for _ in range(n_samples)]
    batches = [
        [pb.SliSample(good_count=g, total_count=t, time=ts(at)) for at, g, t in raw[i : i + batch]]
        for i in range(0, n_samples, batch)
    ]
    try:
        start = time.perf_counter()
        for b in batches:
            await engine.record(slo.name, b, uuid.uuid4().hex)
        ours = time.perf_counter() - start

        start = time.perf_counter()
        fine_key, coarse_key = f"{prefix}:raw:m", f"{prefix}:raw:h"
        for i in range(0, n_samples, batch):
            pipe = redis.pipeline(transaction=False)
            for at, g, t in raw[i : i + batch]:
                fb, cb = int(at // FINE), int(at // COARSE)
                pipe.hincrby(fine_key, f"g{fb}", g)
                pipe.hincrby(fine_key, f"t{fb}", t)
                pipe.hincrby(coarse_key, f"g{cb}", g)
                pipe.hincrby(coarse_key, f"t{cb}", t)
            await pipe.execute()
        baseline = time.perf_counter() - start

        # A stricter baseline: the pipeline of exactly the HINCRBYs our script
        # runs (samples already summed per bucket), without the Lua and checks.
        start = time.perf_counter()
        agg_key = f"{prefix}:agg"
        for i in range(0, n_samples, batch):
            fields: dict[str, int] = {}
            for at, g, t in raw[i : i + batch]:
                for size, tier in ((FINE, "m"), (COARSE, "h")):
                    b = int(at // size)
                    fields[f"{tier}g{b}"] = fields.get(f"{tier}g{b}", 0) + g
                    fields[f"{tier}t{b}"] = fields.get(f"{tier}t{b}", 0) + t
            pipe = redis.pipeline(transaction=False)
            for k, v in fields.items():
                pipe.hincrby(agg_key, k, v)
            await pipe.execute()
        aggregated = time.perf_counter() - start

        budget = await engine.budget(slo.name)
        assert budget.total_count == sum(t for _, _, t in raw), "every sample was stored"
        print(
            f"ingest: {n_samples} samples in batches of {batch} (RecordSli's path, a request id each)"
        )
        print(f"  engine    {n_samples / ours:,.0f} samples/s")
        print(
            f"  baseline  {n_samples / baseline:,.0f} samples/s (raw pipeline, 4 HINCRBY a sample)"
        )
        print(
            f"  stricter  {n_samples / aggregated:,.0f} samples/s (raw pipeline of the same per-bucket sums)"
        )
        print(f"  ratio     {aggregated / ours:.2f}x the stricter baseline")
        ratio = (n_samples / ours) / (n_samples / baseline)
        print(
            f"  ratio     {ratio:.2f}x the raw pipeline; target >= 0.5x: {'met' if ratio >= 0.5 else 'MISSED'}"
        )
    finally:
        keys = [k async for k in redis.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slos", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()
    bench_evaluate(args.slos)
    asyncio.run(bench_ingest(args.samples, args.batch))


if __name__ == "__main__":
    main()
