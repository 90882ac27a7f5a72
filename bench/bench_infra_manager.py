"""infra-manager benchmarks (issue #8), on a real Redis and a real Git repository.

1. One application of 500 resources (250 ConfigMaps, 150 Deployments, 100
   Services across 50 files): the time of a full diff (Git at a revision ->
   parsed manifests -> live objects and dry-run predictions from the embedded
   cluster -> normalized comparison), of the first sync (every object
   created, each wave gated on health) and of a re-sync (every apply a no-op).
2. The reconcile loop at 100 applications of 10 resources each, all synced:
   CPU (``time.process_time``) per application per interval, i.e. one
   reconcile each.

The baseline, measured in the same run on the same manifests, is the least
any comparison must do: parse the YAML (libyaml) and compare each document
with a copy of itself as dicts. Redis's own CPU is not in these figures (it
is another process); the wall times include its round trips.

    .venv/bin/python bench/bench_infra_manager.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis as sync_redis
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from autoecoops.kernel.infra_manager.cluster import EmbeddedCluster  # noqa: E402
from autoecoops.kernel.infra_manager.manager import InfraManager  # noqa: E402
from autoecoops.kernel.infra_manager.model import (  # noqa: E402
    Application,
    Destination,
    Phase,
    Source,
)
from autoecoops.kernel.infra_manager.reconcile import Reconciler  # noqa: E402
from autoecoops.kernel.infra_manager.settings import InfraSettings  # noqa: E402
from autoecoops.kernel.infra_manager.source import GitSource  # noqa: E402
from autoecoops.kernel.infra_manager.store import InfraStore  # noqa: E402
from autoecoops.kernel.mesh.auth import Principal  # noqa: E402
from autoecoops.kernel.mesh.redis import EmbeddedRedis, connect  # noqa: E402
from tests.integration.infra_manager.conftest import configmap, deployment  # noqa: E402
from tests.integration.infra_manager.gitrepo import GitRepo  # noqa: E402

ADMIN = Principal("bench", roles=("admin",))
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def service(name: str) -> str:
    return (
        f"apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n"
        f"  selector: {{app: {name}}}\n  ports:\n    - port: 80\n      targetPort: 8080\n"
    )


def files_of(
    n_cm: int, n_dep: int, n_svc: int, per_file: int, prefix: str
) -> dict[str, str | None]:
    docs = (
        [configmap(f"cm-{i}", {"index": str(i), "payload": "x" * 64}) for i in range(n_cm)]
        + [deployment(f"dep-{i}", replicas=1 + i % 3) for i in range(n_dep)]
        + [service(f"svc-{i}") for i in range(n_svc)]
    )
    return {
        f"{prefix}/part-{i // per_file:03d}.yaml": "---\n".join(docs[i : i + per_file])
        for i in range(0, len(docs), per_file)
    }


class Quiet:
    """Event and audit sinks that keep nothing: the bench measures the engine."""

    async def publish(self, *_a: Any, **_k: Any) -> bool:
        return True

    async def record(self, **_k: Any) -> int:
        return 0


def baseline(texts: list[str]) -> float:
    """Seconds to parse the YAML and compare every document with a copy of itself."""
    start = time.perf_counter()
    docs = [d for t in texts for d in yaml.load_all(t, Loader=_Loader) if d]
    live = [copy.deepcopy(d) for d in docs]
    start_cmp = time.perf_counter()
    equal = sum(a == b for a, b in zip(docs, live, strict=True))
    assert equal == len(docs)
    return (start_cmp - start) + (time.perf_counter() - start_cmp)


def baseline_cpu(texts: list[str]) -> float:
    start = time.process_time()
    docs = [d for t in texts for d in yaml.load_all(t, Loader=_Loader) if d]
    live = [copy.deepcopy(d) for d in docs]
    assert all(a == b for a, b in zip(docs, live, strict=True))
    return time.process_time() - start


async def run(url: str, rounds: int) -> None:
    prefix = f"autoecoops-bench:{uuid.uuid4().hex[:8]}:"
    client = connect(url)
    tmp = Path(tempfile.mkdtemp(prefix="bench-infra-"))
    settings = InfraSettings(
        reconcile_interval=180, reconcile_jitter=0, health_poll=0.01, repo_cache_dir=tmp / "cache"
    )
    cluster = EmbeddedCluster(client, f"{prefix}infra-manager:cluster", simulate_ready=True)
    git = GitSource(settings.repo_cache_dir)
    manager = InfraManager(
        InfraStore(client, f"{prefix}infra-manager"),
        lambda _n: cluster,
        git,
        settings,
        events=Quiet(),
        audit=Quiet(),
        authorizer=None,
    )
    repo = GitRepo(tmp / "repo")
    big = files_of(250, 150, 100, 10, "big")
    small = files_of(4, 3, 3, 5, "small")
    repo.commit({**big, **small})
    try:
        # -- 1. one application of 500 resources --------------------------------
        await manager.create(
            Application("big", Source(repo.url, "main", "big"), Destination("bench")), ADMIN
        )
        texts = [t for t in big.values() if t]
        base = statistics.median(baseline(texts) for _ in range(rounds))

        start = time.perf_counter()
        await manager.sync("big", ADMIN)
        op = await manager.wait("big")
        first_sync = time.perf_counter() - start
        assert op is not None and op.phase is Phase.SUCCEEDED, op

        diffs = []
        for _ in range(rounds):
            manager.forget_rendered()  # parse Git every time, as a hard refresh does
            start = time.perf_counter()
            cmp = await manager.diff("big")
            diffs.append(time.perf_counter() - start)
        assert len(cmp.diffs) == 500 and not cmp.drifted(), [d.text() for d in cmp.drifted()[:1]]
        cached = []
        for _ in range(rounds):
            start = time.perf_counter()
            await manager.diff("big")
            cached.append(time.perf_counter() - start)

        resyncs = []
        for _ in range(rounds):
            start = time.perf_counter()
            await manager.sync("big", ADMIN)
            op = await manager.wait("big")
            resyncs.append(time.perf_counter() - start)
            assert op is not None and op.phase is Phase.SUCCEEDED

        diff_t, cached_t, resync_t = (statistics.median(x) for x in (diffs, cached, resyncs))
        print("one application of 500 resources (embedded cluster on Redis)")
        print(f"  baseline: parse YAML + dict compare  {base * 1e3:8.1f} ms")
        print(
            f"  diff, Git parsed again               {diff_t * 1e3:8.1f} ms   x{diff_t / base:.1f} baseline"
        )
        print(
            f"  diff, manifests cached (reconcile)   {cached_t * 1e3:8.1f} ms   x{cached_t / base:.1f} baseline"
        )
        print(
            f"  first sync (500 creates, health)     {first_sync * 1e3:8.1f} ms   x{first_sync / base:.1f} baseline"
        )
        print(
            f"  re-sync (500 no-op applies)          {resync_t * 1e3:8.1f} ms   x{resync_t / base:.1f} baseline"
        )

        # -- 2. the loop at 100 applications --------------------------------------
        await manager.delete("big", cascade=True, principal=ADMIN)
        n_apps = 100
        for i in range(n_apps):
            await manager.create(
                Application(
                    f"app-{i:03d}", Source(repo.url, "main", "small"), Destination(f"ns-{i}")
                ),
                ADMIN,
            )
            await manager.sync(f"app-{i:03d}", ADMIN)
            await manager.wait(f"app-{i:03d}")
        loop = Reconciler(manager, settings, rand=lambda: 0.0)
        now = [0.0]
        loop._clock = lambda: now[0]
        await loop.tick()  # warm: Git read and parsed once per commit, as in steady state
        per_app = []
        for _ in range(rounds):
            now[0] += settings.reconcile_interval + 1  # one interval later: every app due
            start = time.process_time()
            wall = time.perf_counter()
            done = await loop.tick()
            per_app.append((time.process_time() - start) / done)
            wall_t = time.perf_counter() - wall
            assert done == n_apps
        small_texts = [t for t in small.values() if t]
        base_app = statistics.median(baseline_cpu(small_texts) for _ in range(rounds * 5))
        cpu = statistics.median(per_app)
        print(f"\nreconcile loop, {n_apps} applications of 10 resources, all synced")
        print(f"  baseline CPU per app: parse + compare {base_app * 1e3:8.2f} ms")
        print(
            f"  CPU per app per interval              {cpu * 1e3:8.2f} ms   x{cpu / base_app:.1f} baseline"
        )
        print(f"  one pass over all apps (wall)         {wall_t * 1e3:8.1f} ms")
        print(
            f"  at the default 180 s interval: {cpu * n_apps / 180 * 100:.3f}% of one core "
            "for the whole loop"
        )
        # -- 3. time to heal drift ------------------------------------------------
        await heal(manager, repo, settings, rounds)
    finally:
        await manager.close()
        git.close()
        keys = [k async for k in client.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def heal(manager: InfraManager, repo: GitRepo, base: InfraSettings, rounds: int) -> None:
    """Seconds from a drifted live object to its reverted state, with default settings.

    The application (10 resources, automated with selfHeal) is synced; then a
    Deployment's replicas are changed behind infra-manager's back, as
    ``kubectl scale`` would, and the clock runs until the live object is back
    to what Git says. The loop runs with the defaults (180 s interval + up to
    30 s jitter, 1 s tick, 5 s self-heal wait), the watch on. Each drift comes
    after the self-heal wait, as drift does in practice. The baseline,
    measured in the same run, is the least any healing takes: one reconcile
    that compares and starts the sync, and that sync, driven directly.
    """
    settings = InfraSettings(
        health_poll=base.health_poll, repo_cache_dir=base.repo_cache_dir
    )  # defaults otherwise
    manager.settings = settings
    from autoecoops.kernel.infra_manager.model import Automated, SyncPolicy

    app = Application(
        "heal",
        Source(repo.url, "main", "small"),
        Destination("heal"),
        sync_policy=SyncPolicy(automated=Automated(self_heal=True)),
    )
    await manager.create(app, ADMIN)
    await manager.sync("heal", ADMIN)
    await manager.wait("heal")
    cluster = manager.clusters("")
    target = next(r for r in (await manager.diff("heal")).diffs if r.ref.kind == "Deployment").ref

    async def restored() -> bool:
        live = await cluster.get(target)
        return live is not None and live["spec"]["replicas"] != 9

    # Baseline: drift, then one reconcile and its sync, driven directly.
    direct = Reconciler(manager, dataclasses.replace(settings, self_heal_timeout=0))
    floors = []
    for _ in range(rounds):
        await cluster.update(target, lambda o: o["spec"].update(replicas=9))  # type: ignore[attr-defined]
        start = time.perf_counter()
        await direct.reconcile("heal")
        await manager.wait("heal")
        floors.append(time.perf_counter() - start)
        assert await restored()
    loop = Reconciler(manager, settings)
    loop.start()
    times = []
    try:
        await asyncio.sleep(settings.tick * 2)  # the first pass starts the watch
        for _ in range(rounds):
            await asyncio.sleep(settings.self_heal_timeout + 0.5)
            await cluster.update(target, lambda o: o["spec"].update(replicas=9))  # type: ignore[attr-defined]
            start = time.perf_counter()
            while not await restored():
                await asyncio.sleep(0.01)
                if time.perf_counter() - start > 60:
                    raise AssertionError("drift not healed within 60 s")
            times.append(time.perf_counter() - start)
    finally:
        await loop.stop()
    floor, took = statistics.median(floors), statistics.median(times)
    polled = settings.reconcile_interval + settings.reconcile_jitter / 2
    print("\ntime to heal a drifted Deployment of a selfHeal application (defaults, watch on)")
    print(f"  baseline: one reconcile + its sync      {floor * 1e3:8.1f} ms")
    print(
        f"  drift -> reverted, median of {rounds}         {took * 1e3:8.1f} ms   x{took / floor:.1f} baseline"
        f"   (max {max(times) * 1e3:.1f} ms; target 10 s)"
    )
    print(
        f"  by polling alone it would take {polled:.0f} s on average "
        f"(interval + half the jitter): x{polled / took:.0f} slower"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import os

    url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    embedded = None
    try:
        sync_redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
    except sync_redis.RedisError:
        embedded = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="bench-redis-")))
        url = embedded.start()
    try:
        asyncio.run(run(url, args.rounds))
    finally:
        if embedded is not None:
            embedded.stop()


if __name__ == "__main__":
    main()
