"""Drift healed in seconds: the embedded cluster's change feed drives the reconciler."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable

from autoecoops.kernel.infra_manager.cluster import Change, EmbeddedCluster
from autoecoops.kernel.infra_manager.model import Automated, Phase, Ref
from autoecoops.kernel.infra_manager.reconcile import Reconciler
from tests.integration.infra_manager.conftest import Infra, configmap, deployment, succeeded

WEB = Ref("apps", "v1", "Deployment", "team-a", "web")


async def _collect(feed: AsyncIterator[Change], into: list[Change]) -> None:
    async for change in feed:
        into.append(change)


class Stop:
    """A stop flag for a follower of the feed."""

    def __init__(self) -> None:
        self.stopped = False

    def __call__(self) -> bool:
        return self.stopped


async def _until(predicate: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    for _ in range(int(within / 0.02)):
        if await predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


async def test_every_write_is_in_the_change_feed_with_its_applications(infra: Infra) -> None:
    seen: list[Change] = []
    stop = Stop()
    follower = asyncio.create_task(_collect(infra.cluster.changes(set, stop), seen))
    await asyncio.sleep(0.05)
    try:
        infra.repo.commit({"deploy/app.yaml": deployment("web")})
        await infra.create(infra.app())
        succeeded(await infra.sync())
        await infra.cluster.update(WEB, lambda o: o["spec"].update(replicas=2))
        await infra.cluster.delete(WEB)

        async def three() -> bool:
            return len(seen) >= 3

        await _until(three)
    finally:
        stop.stopped = True
        await asyncio.wait_for(follower, 5)
    kinds = [(c.type, c.ref, c.apps) for c in seen]
    assert kinds[0] == ("ADDED", WEB, ("web",))
    assert ("MODIFIED", WEB, ("web",)) in kinds
    assert kinds[-1] == ("DELETED", WEB, ("web",))
    rvs = [int(c.resource_version) for c in seen]
    assert rvs == sorted(rvs)


async def test_a_follower_that_fell_behind_the_trimmed_feed_relists(infra: Infra) -> None:
    cm = Ref("", "v1", "ConfigMap", "team-a", "c")
    feed = infra.cluster.changes()
    pending = asyncio.ensure_future(feed.__anext__())
    await asyncio.sleep(0.05)
    await infra.cluster.apply(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "team-a"}}
    )
    first = await asyncio.wait_for(pending, 5)
    assert (first.type, first.ref) == ("ADDED", cm)
    for i in range(5):
        await infra.cluster.update(cm, lambda o, i=i: o.update(data={"i": str(i)}))
    # Trimmed past the follower's position, as a long pause would: it must relist.
    await infra.cluster.redis.xtrim(infra.cluster._feed, maxlen=1, approximate=False)
    second = await asyncio.wait_for(feed.__anext__(), 5)
    third = await asyncio.wait_for(feed.__anext__(), 5)
    assert second.type == "RELIST"
    assert (third.type, third.ref) == ("MODIFIED", cm)
    await feed.aclose()  # type: ignore[attr-defined]


async def test_a_self_heal_application_is_healed_by_the_watch_not_the_interval(
    infra: Infra,
) -> None:
    infra.repo.commit({"deploy/app.yaml": deployment("web") + "---\n" + configmap("settings")})
    # The interval is an hour: only the watch can bring the reconcile in time.
    settings = dataclasses.replace(
        infra.manager.settings, reconcile_interval=3600, tick=0.05, self_heal_timeout=0
    )
    infra.manager.settings = settings
    reconciler = Reconciler(infra.manager, settings, rand=lambda: 0.0)
    await infra.create(infra.app(automated=Automated(self_heal=True)))
    reconciler.start()
    try:

        async def deployed() -> bool:
            op = await infra.store.operation("web")
            return op is not None and op.phase is Phase.SUCCEEDED

        await _until(deployed)
        await asyncio.sleep(0.2)  # the watch is up once the first reconcile ran
        await infra.cluster.update(WEB, lambda o: o["spec"].update(replicas=5))

        async def healed() -> bool:
            live = await infra.cluster.get(WEB)
            return live is not None and live["spec"]["replicas"] == 1

        await _until(healed)

        async def two_syncs() -> bool:  # the first deploy, then the self-heal
            return len(infra.events.of("SyncSucceeded")) == 2

        await _until(two_syncs)
        assert infra.events.of("SyncStarted")[-1].initiated_by == "automated"
    finally:
        await reconciler.stop()


async def test_without_watch_the_interval_is_all_there_is(infra: Infra) -> None:
    infra.repo.commit({"deploy/app.yaml": configmap("settings")})
    settings = dataclasses.replace(
        infra.manager.settings, reconcile_interval=3600, tick=0.05, watch=False
    )
    reconciler = Reconciler(infra.manager, settings, rand=lambda: 0.0)
    await infra.create(infra.app(automated=Automated(self_heal=True)))
    reconciler.start()
    try:
        await asyncio.sleep(0.5)
        assert reconciler._watches == {}
    finally:
        await reconciler.stop()
    assert isinstance(infra.cluster, EmbeddedCluster)


async def test_a_change_makes_its_applications_due_and_a_relist_makes_all_due(
    infra: Infra,
) -> None:
    infra.repo.commit({"deploy/app.yaml": configmap("settings")})
    for name in ("one", "two"):
        await infra.create(infra.app(name))
    reconciler = Reconciler(infra.manager, infra.manager.settings, rand=lambda: 0.0)
    await reconciler.tick()  # both known, due an interval from now
    assert all(due > 0 for due in reconciler._due.values())
    ref = Ref("", "v1", "ConfigMap", "team-a", "settings")
    reconciler.on_change(Change("MODIFIED", ref, ("one",), "7"))
    assert reconciler._due["one"] == 0.0 and reconciler._due["two"] > 0
    reconciler.on_change(Change("MODIFIED", ref, ("unknown-app",), "8"))
    assert "unknown-app" not in reconciler._due
    reconciler.on_change(Change("RELIST"))
    assert reconciler._due == {"one": 0.0, "two": 0.0}
