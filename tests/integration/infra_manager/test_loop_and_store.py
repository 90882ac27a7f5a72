"""The reconcile loop's scheduling, the embedded cluster's object semantics, and remote mirrors."""

from __future__ import annotations

import asyncio
import dataclasses

from autoecoops.kernel.infra_manager.model import Automated, Phase, Ref, SyncCode
from autoecoops.kernel.infra_manager.reconcile import Reconciler
from tests.integration.infra_manager.conftest import Infra, configmap, deployment

CM = Ref("", "v1", "ConfigMap", "team-a", "settings")


async def test_the_loop_spreads_apps_over_the_jitter_and_reconciles_them_when_due(
    infra: Infra,
) -> None:
    infra.repo.commit({"deploy/app.yaml": configmap("settings")})
    for name in ("a", "b"):
        await infra.create(infra.app(name, namespace=f"team-{name}", automated=Automated()))
    now = [100.0]
    draws = iter([0.0, 0.5] + [0.25] * 50)
    settings = dataclasses.replace(
        infra.reconciler.settings, reconcile_interval=60, reconcile_jitter=10
    )
    loop = Reconciler(infra.manager, settings, rand=lambda: next(draws), clock=lambda: now[0])
    assert await loop.tick() == 1  # a is due now, b in 5s (half the jitter)
    await infra.manager.wait("a")
    assert await infra.store.status("b") is None
    now[0] = 105.0
    # a again (the end of its sync makes it due, to refresh its status), and b.
    assert await loop.tick() == 2
    await infra.manager.wait("b")
    assert await loop.tick() == 1  # b, after its sync
    assert await loop.tick() == 0
    loop.trigger("a")  # Refresh or a spec change
    assert await loop.tick() == 1
    now[0] = 105.0 + 60 + 2.5 - 0.1  # interval + a quarter of the jitter, not yet
    assert await loop.tick() == 0
    now[0] += 0.2
    assert await loop.tick() == 2
    assert {e.application for e in infra.events.of("SyncSucceeded")} == {"a", "b"}


async def test_the_background_loop_auto_syncs_a_new_commit(infra: Infra) -> None:
    infra.repo.commit({"deploy/app.yaml": configmap("settings", {"v": "1"})})
    settings = dataclasses.replace(
        infra.reconciler.settings, reconcile_interval=0.05, reconcile_jitter=0.0, tick=0.02
    )
    loop = Reconciler(infra.manager, settings)
    await infra.create(infra.app(automated=Automated()))
    loop.start()
    try:
        for _ in range(300):
            live = await infra.cluster.get(CM)
            if live is not None:
                break
            await asyncio.sleep(0.02)
        infra.repo.commit({"deploy/app.yaml": configmap("settings", {"v": "2"})})
        for _ in range(300):
            live = await infra.cluster.get(CM)
            if live is not None and live["data"]["v"] == "2":
                break
            await asyncio.sleep(0.02)
    finally:
        await loop.stop()
    assert live is not None and live["data"]["v"] == "2"
    await infra.manager.wait("web")
    assert len(await infra.manager.history("web")) == 2


async def test_embedded_objects_have_resource_versions_generations_and_controller_status(
    infra: Infra,
) -> None:
    infra.cluster.simulate_ready = False
    c = infra.cluster
    obj = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "settings", "namespace": "team-a"},
        "data": {"a": "1"},
    }
    first = await c.apply(obj)
    assert first["metadata"]["generation"] == 1 and first["metadata"]["uid"]
    again = await c.apply(obj)
    assert again["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]  # no-op
    changed = await c.apply({**obj, "data": {"a": "2"}})
    assert int(changed["metadata"]["resourceVersion"]) > int(first["metadata"]["resourceVersion"])
    assert changed["metadata"]["generation"] == 2
    assert changed["metadata"]["uid"] == first["metadata"]["uid"]
    labelled = await c.apply(
        {**obj, "data": {"a": "2"}, "metadata": {**obj["metadata"], "labels": {"x": "y"}}}
    )
    assert labelled["metadata"]["generation"] == 2  # metadata does not count
    status = await c.set_status(CM, {"phase": "Ready"})
    assert status["metadata"]["generation"] == 2 and status["status"] == {"phase": "Ready"}
    reapplied = await c.apply({**obj, "data": {"a": "3"}})
    assert reapplied["status"] == {"phase": "Ready"}  # apply never writes status
    assert "labels" not in reapplied["metadata"]  # dropped from Git, so removed
    predicted = await c.apply({**obj, "data": {"a": "4"}}, dry_run=True)
    assert predicted["data"] == {"a": "4"} and (await c.get(CM))["data"] == {"a": "3"}  # type: ignore[index]
    assert await c.delete(CM) and await c.get(CM) is None


async def test_a_file_url_is_mirrored_and_fetched(infra: Infra) -> None:
    infra.repo.commit({"deploy/app.yaml": deployment("web")})
    app = infra.app()
    app = dataclasses.replace(
        app, source=dataclasses.replace(app.source, repo_url=f"file://{infra.repo.path}")
    )
    await infra.create(app)
    op = await infra.sync()
    assert op.phase is Phase.SUCCEEDED, op.message
    mirrors = list((infra.tmp / "cache").glob("*.git"))
    assert len(mirrors) == 1 and (mirrors[0] / "HEAD").exists()
    second = infra.repo.commit({"deploy/app.yaml": deployment("web", replicas=2)})
    op = await infra.sync()  # a manual sync fetches again
    assert op.revision == second
    await infra.reconciler.reconcile("web")
    status = await infra.store.status("web")
    assert status is not None and status.sync is SyncCode.SYNCED
