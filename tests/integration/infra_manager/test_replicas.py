"""Two infra-manager replicas on one Redis and key prefix: an application is never
reconciled by both at once, a new commit is auto-synced once, and a replica whose
lease moved cannot record a status or an operation any more."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from autoecoops.kernel.infra_manager.manager import InfraManager
from autoecoops.kernel.infra_manager.model import AppStatus, Automated, Operation, Phase, SyncCode
from autoecoops.kernel.infra_manager.reconcile import Reconciler
from autoecoops.kernel.infra_manager.source import GitSource
from autoecoops.kernel.infra_manager.store import InfraStore
from autoecoops.kernel.mesh.lease import Lease, LeaseLost, LeaseSettings
from tests.integration.infra_manager.conftest import (
    ADMIN,
    Audit,
    Events,
    Infra,
    PolicyAuthorizer,
    configmap,
    team_policy,
)

Interval = tuple[float, float, int]


@pytest.fixture
async def second(infra: Infra) -> AsyncIterator[tuple[InfraManager, Reconciler, Events]]:
    """Another replica: its own manager, reconciler, Git cache and sinks; the same Redis,
    key prefix and cluster."""
    settings = dataclasses.replace(infra.reconciler.settings, repo_cache_dir=infra.tmp / "cache-b")
    git = GitSource(settings.repo_cache_dir)
    events = Events()
    manager = InfraManager(
        InfraStore(infra.store.redis, infra.store.prefix),
        lambda _name: infra.cluster,
        git,
        settings,
        events=events,
        audit=Audit(),
        authorizer=PolicyAuthorizer(team_policy()),
    )
    yield manager, Reconciler(manager, settings, rand=lambda: 0.0), events
    await manager.close()
    git.close()


@pytest.fixture
def intervals(monkeypatch: pytest.MonkeyPatch) -> list[Interval]:
    """Start and end of every reconcile body run, by replica (the reconciler's id)."""
    seen: list[Interval] = []
    real = Reconciler._reconcile

    async def recorded(self: Reconciler, name: str, refresh: bool) -> Any:
        start = time.monotonic()
        try:
            await asyncio.sleep(0.02)  # widen the window a second reconcile would overlap in
            return await real(self, name, refresh)
        finally:
            seen.append((start, time.monotonic(), id(self)))

    monkeypatch.setattr(Reconciler, "_reconcile", recorded)
    return seen


def assert_no_overlap(seen: list[Interval]) -> None:
    ordered = sorted(seen)
    for (s1, e1, r1), (s2, _e2, r2) in itertools.pairwise(ordered):
        assert e1 <= s2, f"reconciles overlapped: {s1:.3f}-{e1:.3f} ({r1}) and {s2:.3f} ({r2})"


async def test_two_replicas_never_reconcile_one_application_at_once(
    infra: Infra, second: tuple[InfraManager, Reconciler, Events], intervals: list[Interval]
) -> None:
    _, rec_b, _ = second
    infra.repo.commit({"deploy/app.yaml": configmap("settings")})
    await infra.create(infra.app())
    rec_a = infra.reconciler
    # Refreshes through both replicas at once: each waits for the lease in turn.
    await asyncio.gather(*(r.reconcile("web", wait=30) for r in (rec_a, rec_b) * 4))
    assert len(intervals) == 8 and {r for *_, r in intervals} == {id(rec_a), id(rec_b)}
    assert_no_overlap(intervals)
    # The loops of both replicas, due at once, again and again: the one that finds the
    # lease held skips, so they never overlap either.
    intervals.clear()
    for _ in range(10):
        await asyncio.gather(rec_a.reconcile("web"), rec_b.reconcile("web"))
    assert intervals
    assert_no_overlap(intervals)
    status = await infra.store.status("web")
    assert status is not None and status.sync is SyncCode.OUT_OF_SYNC


async def test_a_new_commit_is_auto_synced_once_with_two_replicas(
    infra: Infra, second: tuple[InfraManager, Reconciler, Events]
) -> None:
    manager_b, _, events_b = second
    infra.repo.commit({"deploy/app.yaml": configmap("settings", {"v": "1"})})
    await infra.create(infra.app(automated=Automated()))
    settings = dataclasses.replace(
        infra.reconciler.settings, reconcile_interval=0.05, reconcile_jitter=0.0, tick=0.02
    )
    loops = [Reconciler(infra.manager, settings), Reconciler(manager_b, settings)]
    for loop in loops:
        loop.start()
    try:
        for v in ("1", "2", "3"):
            if v != "1":
                infra.repo.commit({"deploy/app.yaml": configmap("settings", {"v": v})})
            for _ in range(500):
                live = await infra.live("ConfigMap", "settings")
                if live is not None and live["data"]["v"] == v:
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError(f"v{v} was never synced")
    finally:
        for loop in loops:
            await loop.stop()
        await infra.manager.wait("web")
        await manager_b.wait("web")
    started = infra.events.of("SyncStarted") + events_b.of("SyncStarted")
    assert len(started) == 3, [s.revision[:8] for s in started]  # one per commit, not per replica
    assert len({s.revision for s in started}) == 3
    assert len(await infra.store.history("web")) == 3


async def test_a_replica_whose_lease_moved_cannot_record_status_or_operation(
    infra: Infra,
) -> None:
    infra.repo.commit({"deploy/app.yaml": configmap("settings")})
    await infra.create(infra.app())
    store, short = infra.store, LeaseSettings(ttl=0.3, renew=0.1)
    # A reconcile: the paused one's status write is refused after another took over.
    old = Lease(store.redis, store.reconcile_lease("web"), "old", short)
    new = Lease(store.redis, store.reconcile_lease("web"), "new", short)
    assert await old.acquire()
    stale = old.fence
    await store.set_status("web", AppStatus(sync=SyncCode.OUT_OF_SYNC), stale)
    assert await new.acquire_within(10)
    await store.set_status("web", AppStatus(sync=SyncCode.SYNCED), new.fence)
    with pytest.raises(LeaseLost):
        await store.set_status("web", AppStatus(sync=SyncCode.OUT_OF_SYNC), stale)
    with pytest.raises(LeaseLost):
        await store.set_drift("web", "sig", stale)
    got = await store.status("web")
    assert got is not None and got.sync is SyncCode.SYNCED
    assert await store.drift("web") == ""
    # An operation: same for its state, its automated-sync record and its history.
    op_old = Lease(store.redis, store.operation_lease("web"), "op-1", short)
    op_new = Lease(store.redis, store.operation_lease("web"), "op-2", short)
    assert await op_old.acquire()
    late = op_old.fence
    assert await op_new.acquire_within(10)
    second_op = Operation("op-2", Phase.RUNNING, "abc", "bob", time.time())
    await store.set_operation("web", second_op, op_new.fence)
    with pytest.raises(LeaseLost):
        await store.set_operation(
            "web", Operation("op-1", Phase.SUCCEEDED, "abc", "alice", time.time()), late
        )
    with pytest.raises(LeaseLost):
        await store.set_auto("web", {"revision": "abc"}, late)
    current = await store.operation("web")
    assert current is not None and current.id == "op-2" and current.phase is Phase.RUNNING
    assert await store.auto("web") == {}


async def test_a_running_operation_is_stopped_when_its_lease_is_taken_over(
    infra: Infra, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Applying waits on a gate, so the operation is still running when its lease moves.
    infra.repo.commit({"deploy/app.yaml": configmap("settings")})
    await infra.create(infra.app())
    short = LeaseSettings(ttl=0.5, renew=0.1)
    infra.manager.settings = dataclasses.replace(
        infra.manager.settings, lease=short, wave_timeout=30.0
    )
    gate = asyncio.Event()
    real_apply = type(infra.cluster).apply

    async def slow_apply(self: Any, *args: Any, **kwargs: Any) -> Any:
        await gate.wait()
        return await real_apply(self, *args, **kwargs)

    monkeypatch.setattr(type(infra.cluster), "apply", slow_apply)
    op = await infra.manager.sync("web", ADMIN)
    store = infra.store
    # Another replica takes the lease over (what happens once this one was paused
    # past the TTL): the running operation notices at its next renewal and stops.
    await store.redis.delete(store.operation_lease("web"))
    thief = Lease(store.redis, store.operation_lease("web"), "op-other", short)
    assert await thief.acquire()
    await store.set_operation(
        "web", Operation("op-other", Phase.RUNNING, "x", "bob", time.time()), thief.fence
    )
    for _ in range(200):
        if infra.manager.running("web") is None:
            break
        await asyncio.sleep(0.02)
    assert infra.manager.running("web") is None, "the operation kept running"
    gate.set()
    current = await store.operation("web")
    assert current is not None and current.id == "op-other"  # nothing of op's end landed
    assert op.id != "op-other"
    assert not infra.events.of("SyncSucceeded")
    assert await store.history("web") == []


async def test_a_dead_operation_is_marked_only_if_no_new_one_started_meanwhile(
    infra: Infra,
) -> None:
    infra.repo.commit({"deploy/app.yaml": configmap("settings")})
    await infra.create(infra.app())
    store = infra.store
    rec = Lease(store.redis, store.reconcile_lease("web"), "rec", LeaseSettings())
    assert await rec.acquire()
    dead = Operation("op-1", Phase.RUNNING, "abc", "alice", time.time())
    await store.set_operation("web", dead)
    ended = dataclasses.replace(dead, phase=Phase.ERROR, message="interrupted")
    # Read as dead by a reconcile; meanwhile another replica starts op-2.
    op2 = Lease(store.redis, store.operation_lease("web"), "op-2", LeaseSettings())
    assert await op2.acquire()
    await store.set_operation(
        "web", Operation("op-2", Phase.RUNNING, "def", "bob", time.time()), op2.fence
    )
    assert not await store.expire_operation("web", ended, rec.fence)
    current = await store.operation("web")
    assert current is not None and current.id == "op-2" and current.phase is Phase.RUNNING
    # op-2's process dies (its lease lapses): now it is marked.
    await op2.release()
    ended2 = Operation("op-2", Phase.ERROR, "def", "bob", time.time(), message="interrupted")
    assert await store.expire_operation("web", ended2, rec.fence)
    current = await store.operation("web")
    assert current is not None and current.phase is Phase.ERROR


async def test_replicas_share_the_interval_and_take_over_from_a_dead_one(
    infra: Infra, second: tuple[InfraManager, Reconciler, Events], intervals: list[Interval]
) -> None:
    """With two replicas an application is compared once per interval, not twice; what
    triggers a reconcile still runs at once; a replica gone quiet is taken over."""
    manager_b, _, _ = second
    infra.repo.commit({"deploy/app.yaml": configmap("settings")})
    await infra.create(infra.app())
    settings = dataclasses.replace(
        infra.reconciler.settings, reconcile_interval=1.0, reconcile_jitter=0.0
    )
    now = [100.0]
    a = Reconciler(infra.manager, settings, rand=lambda: 0.0, clock=lambda: now[0])
    b = Reconciler(manager_b, settings, rand=lambda: 0.0, clock=lambda: now[0])
    assert await a.tick() == 1
    assert await b.tick() == 0  # a compared it less than an interval ago
    assert [r for *_, r in intervals] == [id(a)]
    b.trigger("web")  # a spec change or a live change b saw: never skipped
    assert await b.tick() == 1
    assert [r for *_, r in intervals] == [id(a), id(b)]
    # An interval later both are due; b's note has lapsed first here: b compares, and
    # a, due at the same moment, finds b's fresh note and skips.
    await asyncio.sleep(1.1)
    now[0] += 1.1
    assert await b.tick() == 1
    assert await a.tick() == 0
    note = await infra.store.reconciled_by("web")
    assert note is not None and note[0] == b.owner and 0 < note[1] <= 1.0
    # a dies: b alone compares it every interval.
    for _ in range(2):
        await asyncio.sleep(1.05)
        now[0] += 1.05
        assert await b.tick() == 1
    assert [r for *_, r in intervals] == [id(a), id(b), id(b), id(b), id(b)]
