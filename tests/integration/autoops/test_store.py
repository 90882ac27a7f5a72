"""The SLI buckets on a real Redis: both tiers written at once, retention, request ids,
and budgets over calendar periods."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
from google.protobuf import timestamp_pb2

from autoecoops.autoops.v1 import autoops_pb2 as pb
from autoecoops.kernel.mesh.redis import connect
from autoecoops.platforms.autoops.engine import SloEngine
from autoecoops.platforms.autoops.settings import AutoOpsSettings
from autoecoops.platforms.autoops.slo import calendar_start
from autoecoops.platforms.autoops.store import AutoOpsStore
from tests.conftest import base_key


@pytest.fixture
async def store(redis_url: str, key_prefix: str) -> AsyncIterator[AutoOpsStore]:
    redis = connect(redis_url)
    yield AutoOpsStore(redis, base_key(redis_url, key_prefix, "autoops"))
    await redis.aclose()


def at(seconds: float) -> timestamp_pb2.Timestamp:
    t = timestamp_pb2.Timestamp()
    t.FromNanoseconds(int(seconds * 1e9))
    return t


async def test_samples_land_in_both_tiers_once_per_request_id(store: AutoOpsStore) -> None:
    now = 1_800_000_000.0
    samples = [(now - 30, 9, 10), (now - 90, 5, 10), (now - 7200, 1, 2)]
    assert await store.record("slos/a", samples, "req-1", now)
    assert not await store.record("slos/a", samples, "req-1", now)  # a retry adds nothing
    fine = await store.buckets("slos/a", "m")
    coarse = await store.buckets("slos/a", "h")
    assert fine == {
        int((now - 30) // 60): (9, 10),
        int((now - 90) // 60): (5, 10),
        int((now - 7200) // 60): (1, 2),
    }
    assert sum(t for _, t in coarse.values()) == 22 and sum(g for g, _ in coarse.values()) == 15


async def test_retention_trims_each_tier_to_its_own_age(store: AutoOpsStore) -> None:
    now = 1_800_000_000.0
    await store.record(
        "slos/a", [(now - 13 * 3600, 1, 1), (now - 60, 1, 1), (now - 40 * 86400, 1, 1)], "", now
    )
    removed = await store.trim("slos/a", now, fine_keep=12 * 3600, coarse_keep=30 * 86400)
    # Minute buckets older than 12 h go (two of them, good and total fields each),
    # hour buckets older than 30 days go (one).
    assert removed == 6
    assert list((await store.buckets("slos/a", "m")).values()) == [(1, 1)]
    assert sum(t for _, t in (await store.buckets("slos/a", "h")).values()) == 2


async def test_a_calendar_month_budget_counts_from_the_first_of_the_month(
    store: AutoOpsStore,
) -> None:
    engine = SloEngine(store, kernel=None, settings=AutoOpsSettings())  # type: ignore[arg-type]
    slo = pb.Slo(
        service="billing",
        objective=0.99,
        indicator=pb.Indicator(source=pb.SLI_SOURCE_PUSHED),
        time_window=pb.TimeWindow(calendar=pb.CALENDAR_UNIT_MONTH),
    )
    await engine.create("billing", slo)
    now = time.time()
    start = calendar_start(pb.CALENDAR_UNIT_MONTH, now)
    samples = [pb.SliSample(good_count=99, total_count=100, time=at(now - 10))]
    if start - 3 * 86400 > now - engine.settings.coarse_retention:  # last month: outside the period
        samples.append(pb.SliSample(good_count=0, total_count=100, time=at(start - 3 * 86400)))
    await engine.record("slos/billing", samples, "")
    budget = await engine.budget("slos/billing")
    assert budget.period_start.ToSeconds() == int(start)
    assert (budget.good_count, budget.total_count) == (99, 100)
    assert budget.consumed_fraction == pytest.approx(1.0)
