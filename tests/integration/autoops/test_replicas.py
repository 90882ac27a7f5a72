"""Two replicas of the platform on one Redis and key prefix: an SLO breach fires once,
a remediation runs once, the evaluation loop passes once per interval, and a
replica whose remediation lease moved cannot write the remediation any more."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections import Counter
from typing import Any

import pytest
from google.protobuf import timestamp_pb2

from autoecoops.autoops.v1 import autoops_pb2 as pb
from autoecoops.kernel.mesh.lease import Lease, LeaseLost, LeaseSettings
from autoecoops.kernel.mesh.redis import connect
from autoecoops.kernel.mesh.server import Mesh
from autoecoops.platforms.autoops.engine import SloEngine
from autoecoops.platforms.autoops.store import AutoOpsStore
from tests.conftest import MintToken, StartMesh, base_key, free_port
from tests.integration.autoops.conftest import autoops, bearer
from tests.integration.autoops.test_remediations import Hook, settled, webhook_runbook

KERNEL = ["auth-service", "policy-audit", "event-bus"]


@pytest.fixture
def hook() -> Any:
    h = Hook()
    yield h
    h.close()


async def replica(start_mesh: StartMesh, first: Mesh) -> Mesh:
    """Another autoops process: same Redis and key prefix, the same kernel, its own port."""
    ports = {**first.config.ports, "autoops": free_port()}
    cfg = dataclasses.replace(first.config, ports=ports)
    return await start_mesh(["autoops"], config=cfg, secure=True)


def at(seconds: float) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


@pytest.fixture
def quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOECOOPS_AUTOOPS_TICK_SECONDS", "0")
    monkeypatch.setenv("AUTOECOOPS_AUTOOPS_CONTEXT_NAMESPACE", "off")
    monkeypatch.setenv("AUTOECOOPS_LEASE_TTL_SECONDS", "2")
    monkeypatch.setenv("AUTOECOOPS_LEASE_RENEW_SECONDS", "0.5")


async def test_two_replicas_evaluating_at_once_fire_a_breach_once(
    start_mesh: StartMesh, mint_token: MintToken, hook: Hook, quiet: None
) -> None:
    a = await start_mesh([*KERNEL, "autoops"], secure=True)
    b = await replica(start_mesh, a)
    sa, sb, md = autoops(a), autoops(b), bearer(mint_token("alice", ["admin"]))
    rb = webhook_runbook(hook.url)
    rb.target = ""
    rb.trigger.label_selector.match_labels["team"] = "payments"
    await sa.CreateRunbook(pb.CreateRunbookRequest(runbook_id="page", runbook=rb), metadata=md)
    slo = pb.Slo(
        service="checkout",
        objective=0.999,
        labels={"team": "payments"},
        indicator=pb.Indicator(source=pb.SLI_SOURCE_PUSHED),
    )
    await sa.CreateSlo(pb.CreateSloRequest(slo_id="checkout", slo=slo), metadata=md)
    now = time.time()
    samples = [
        pb.SliSample(good_count=900, total_count=1000, time=at(now - 60 * i)) for i in range(30)
    ]
    await sa.RecordSli(pb.RecordSliRequest(slo="slos/checkout", samples=samples), metadata=md)
    # Both replicas evaluate at the same moment, several times over.
    replies = await asyncio.gather(
        *(stub.EvaluateSlos(pb.EvaluateSlosRequest(), metadata=md) for stub in (sa, sb, sa, sb))
    )
    fired = [alert for r in replies for alert in r.changed_alerts]
    assert fired, "the breach should fire"
    assert len(
        {(a.window.long_window.seconds, a.window.short_window.seconds) for a in fired}
    ) == len(fired), "a burn-rate row fired twice"
    alerts = (await sb.ListAlerts(pb.ListAlertsRequest(), metadata=md)).alerts
    assert sorted(a.name for a in alerts) == sorted(a.name for a in fired)
    rems = (
        await sb.ListRemediations(pb.ListRemediationsRequest(runbook="runbooks/page"), metadata=md)
    ).remediations
    assert len(rems) == len(fired)  # one remediation per firing row, not one per replica
    for rem in rems:
        assert (await settled(sb, md, rem.name)).state == pb.REMEDIATION_STATE_SUCCEEDED
    assert Counter(c["body"]["remediation"] for c in hook.calls) == {r.name: 1 for r in rems}


async def test_a_remediation_runs_once_when_two_replicas_resume_it(
    start_mesh: StartMesh, mint_token: MintToken, hook: Hook, quiet: None
) -> None:
    kernel = await start_mesh([*KERNEL, "autoops"], secure=True)
    stub, md = autoops(kernel), bearer(mint_token("alice", ["admin"]))
    await stub.CreateRunbook(
        pb.CreateRunbookRequest(
            runbook_id="gated", runbook=webhook_runbook(hook.url, requires_approval=True)
        ),
        metadata=md,
    )
    names = [
        (
            await stub.RunRunbook(
                pb.RunRunbookRequest(name="runbooks/gated", reason=f"r{i}", target=f"t{i}"),
                metadata=md,
            )
        ).remediation.name
        for i in range(6)
    ]
    # Approved while no replica ran them (what a restart finds): PENDING in Redis.
    r = connect(kernel.config.redis_url)
    base = base_key(kernel.config.redis_url, kernel.config.key_prefix, "autoops")
    for name in names:
        stored = pb.Remediation.FromString(await r.hget(f"{base}:remediations", name))
        stored.state = pb.REMEDIATION_STATE_PENDING
        await r.hset(f"{base}:remediations", name, stored.SerializeToString())
    await r.aclose()
    hook.delay = 0.3  # each step takes a while, so the replicas' runs would overlap
    # Two more replicas start together; each resumes every PENDING remediation.
    b, c = await asyncio.gather(replica(start_mesh, kernel), replica(start_mesh, kernel))
    for name in names:
        done = await settled(autoops(b), md, name)
        assert done.state == pb.REMEDIATION_STATE_SUCCEEDED, done.message
    assert Counter(call["body"]["remediation"] for call in hook.calls) == dict.fromkeys(names, 1)
    del c


async def test_a_runner_whose_remediation_lease_moved_cannot_write_it(
    redis_url: str, key_prefix: str
) -> None:
    r = connect(redis_url)
    try:
        store = AutoOpsStore(r, base_key(redis_url, key_prefix, "autoops"))
        short = LeaseSettings(ttl=0.3, renew=0.1)
        name = "remediations/x"
        old = Lease(r, store.remediation_lease(name), "old", short)
        new = Lease(r, store.remediation_lease(name), "new", short)
        assert await old.acquire()
        stale = old.fence
        rem = pb.Remediation(name=name, state=pb.REMEDIATION_STATE_RUNNING)
        await store.save_remediation(rem, True, stale)
        assert await store.claim_step(name, 0, stale)
        # old is paused past its TTL; new takes over.
        assert await new.acquire_within(10)
        rem.state = pb.REMEDIATION_STATE_FAILED
        await store.save_remediation(rem, False, new.fence)
        late = pb.Remediation(name=name, state=pb.REMEDIATION_STATE_SUCCEEDED)
        with pytest.raises(LeaseLost):
            await store.save_remediation(late, True, stale)
        with pytest.raises(LeaseLost):
            await store.claim_step(name, 1, stale)  # nor start its next action
        with pytest.raises(LeaseLost):
            await store.finish_step(name, 0, stale)
        got = await store.find("remediations", name, pb.Remediation)
        assert got is not None and got.state == pb.REMEDIATION_STATE_FAILED
        assert await store.active_remediations() == []
        assert await store.step_marks(name) == {0: "started"}
    finally:
        await r.aclose()


async def test_the_evaluation_loop_passes_once_per_interval_across_replicas(
    start_mesh: StartMesh, monkeypatch: pytest.MonkeyPatch, quiet: None
) -> None:
    interval = 0.5
    monkeypatch.setenv("AUTOECOOPS_AUTOOPS_TICK_SECONDS", str(interval))
    passes: list[tuple[float, float, int]] = []
    claims: list[tuple[float, float]] = []
    real = SloEngine.evaluate
    real_claim = AutoOpsStore.claim_tick

    async def recorded(self: SloEngine, names: Any = ()) -> Any:
        start = time.monotonic()
        try:
            return await real(self, names)
        finally:
            passes.append((start, time.monotonic(), id(self)))

    async def claim(self: AutoOpsStore, every: float) -> float:
        sent = time.monotonic()
        wait = await real_claim(self, every)
        if wait == 0:
            claims.append((sent, time.monotonic()))  # Redis took it in between
        return wait

    monkeypatch.setattr(SloEngine, "evaluate", recorded)
    monkeypatch.setattr(AutoOpsStore, "claim_tick", claim)
    a = await start_mesh([*KERNEL, "autoops"], secure=True)
    await replica(start_mesh, a)
    await replica(start_mesh, a)
    begin = time.monotonic()
    while len(passes) < 8:
        await asyncio.sleep(0.05)
        assert time.monotonic() - begin < 60, f"only {len(passes)} passes"
    for (_, e1, _), (s2, _, _) in itertools.pairwise(sorted(passes)):
        assert e1 <= s2, "two evaluations overlapped"
    # Each interval's pass is claimed once, on Redis's clock: a claim lies between
    # its call and its answer, so two claims closer than the interval would show as
    # a later claim's answer less than an interval after an earlier one's call
    # (5 ms for the script's millisecond clock).
    for (sent1, _), (_, got2) in itertools.pairwise(sorted(claims)):
        assert got2 - sent1 >= interval - 0.005, f"two claims within {got2 - sent1:.3f}s"
    assert len(passes) <= len(claims)  # every pass was claimed first
