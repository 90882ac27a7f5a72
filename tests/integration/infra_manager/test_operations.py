"""Operations a user can watch and stop: progress, terminate, auto-sync guards, clean failures."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import grpc
import pytest

from autoecoops.infra.v1 import infra_pb2 as pb
from autoecoops.kernel.infra_manager.model import Automated, Phase, Source
from autoecoops.kernel.mesh.errors import FailedPrecondition, InvalidArgument
from autoecoops.kernel.mesh.server import Mesh
from tests.conftest import MintToken, StartMesh
from tests.integration.infra_manager.conftest import (
    ADMIN,
    Infra,
    configmap,
    deployment,
    succeeded,
)
from tests.integration.infra_manager.gitrepo import GitRepo
from tests.integration.infra_manager.test_service import application, bearer, details, infra


def waves() -> dict[str, str | None]:
    """A ConfigMap in wave 0, then a Deployment in wave 1 that never becomes ready here."""
    return {
        "deploy/a.yaml": configmap("first"),
        "deploy/b.yaml": deployment("web", **{"autoecoops.io/sync-wave": "1"}),
    }


async def test_a_running_sync_is_terminated_and_the_next_one_runs(infra: Infra) -> None:
    infra.repo.commit(waves())
    infra.cluster.simulate_ready = False  # the Deployment waits for a controller
    infra.manager.settings = dataclasses.replace(infra.manager.settings, wave_timeout=60)
    await infra.create(infra.app())
    op = await infra.manager.sync("web", ADMIN)
    for _ in range(200):
        stored = await infra.store.operation("web")
        if stored is not None and len(stored.results) >= 2:
            break
        await asyncio.sleep(0.02)
    assert stored is not None and stored.phase is Phase.RUNNING and len(stored.results) >= 2
    with pytest.raises(FailedPrecondition) as busy:
        await infra.manager.sync("web", ADMIN)
    assert busy.value.reason == "OPERATION_IN_PROGRESS"

    stopping = await infra.manager.terminate("web", ADMIN)
    assert stopping.id == op.id and stopping.phase is Phase.TERMINATING
    done = await infra.manager.wait("web")
    assert done is not None and done.phase is Phase.FAILED
    assert done.message == "terminated by alice" and done.end_time > 0
    assert [r.ref.name for r in done.results][:1] == ["first"]  # what was applied is kept
    assert not await infra.store.locked_by("web")
    (failed,) = infra.events.of("SyncFailed")
    assert failed.message == "terminated by alice" and not failed.will_retry
    assert infra.audit.of("infra.sync")[-1]["details"]["message"] == "terminated by alice"

    with pytest.raises(FailedPrecondition) as idle:
        await infra.manager.terminate("web", ADMIN)
    assert idle.value.reason == "NO_OPERATION_RUNNING"
    infra.cluster.simulate_ready = True
    succeeded(await infra.sync())


async def test_terminate_reaches_the_replica_that_runs_the_operation(infra: Infra) -> None:
    """Another replica only shares Redis: the request is stored and the runner stops."""
    from autoecoops.kernel.infra_manager.manager import InfraManager

    infra.repo.commit(waves())
    infra.cluster.simulate_ready = False
    infra.manager.settings = dataclasses.replace(infra.manager.settings, wave_timeout=60)
    await infra.create(infra.app())
    await infra.manager.sync("web", ADMIN)
    other = InfraManager(
        infra.store,
        lambda _n: infra.cluster,
        infra.manager.git,
        infra.manager.settings,
        events=infra.events,
        audit=infra.audit,
        authorizer=None,
    )
    stopping = await other.terminate("web", ADMIN)
    assert stopping.phase is Phase.TERMINATING
    done = await asyncio.wait_for(infra.manager.wait("web"), 10)
    assert done is not None and done.message == "terminated by alice"


async def test_manual_sync_to_another_revision_is_refused_under_auto_sync(infra: Infra) -> None:
    first = infra.repo.commit({"deploy/a.yaml": configmap("one")})
    infra.repo.branch("old")
    second = infra.repo.commit({"deploy/a.yaml": configmap("one", {"k": "2"})})
    await infra.create(infra.app(automated=Automated()))
    for other in ("old", first):
        with pytest.raises(FailedPrecondition) as err:
            await infra.manager.sync("web", ADMIN, revision=other)
        assert err.value.reason == "AUTO_SYNC_ENABLED"
        assert [v.field for v in err.value.field_violations] == ["revision"]
    assert await infra.store.operation("web") is None  # nothing started
    # The target revision itself, by name or commit, and a dry run elsewhere, are fine.
    assert succeeded(await infra.sync(revision=second)).revision == second
    assert succeeded(await infra.sync(revision="main")).revision == second
    assert succeeded(await infra.sync(revision=first, dry_run=True)).revision == first


async def test_a_failed_create_leaves_no_mirror_behind(infra: Infra, tmp_path: Path) -> None:
    cache = infra.manager.git.cache_dir
    for url in (f"file://{tmp_path}/nothing-here", f"file://{tmp_path}/also-missing.git"):
        app = infra.app()
        with pytest.raises(InvalidArgument) as err:
            await infra.create(dataclasses.replace(app, source=Source(url, "main", "deploy")))
        assert err.value.reason == "REPOSITORY_UNREACHABLE"
    assert not cache.exists() or list(cache.iterdir()) == []
    assert not await infra.store.exists("web")


@pytest.fixture
async def slow_mesh(start_mesh: StartMesh, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Mesh:
    monkeypatch.setenv("AUTOECOOPS_INFRA_MANAGER_RECONCILE_SECONDS", "0")
    # Chosen explicitly: a CI runner that is itself a pod must not refuse the simulator.
    monkeypatch.setenv("AUTOECOOPS_INFRA_MANAGER_CLUSTER", "embedded")
    monkeypatch.setenv("AUTOECOOPS_INFRA_MANAGER_HEALTH_POLL_SECONDS", "0.02")
    monkeypatch.setenv("AUTOECOOPS_INFRA_MANAGER_WAVE_TIMEOUT_SECONDS", "60")
    monkeypatch.setenv("AUTOECOOPS_INFRA_MANAGER_EMBEDDED_SIMULATE_READY", "false")
    monkeypatch.setenv("AUTOECOOPS_INFRA_MANAGER_REPO_CACHE_DIR", str(tmp_path / "cache"))
    return await start_mesh(
        ["auth-service", "policy-audit", "event-bus", "infra-manager"], secure=True
    )


async def test_progress_terminate_and_update_over_grpc(
    slow_mesh: Mesh, mint_token: MintToken, tmp_path: Path
) -> None:
    repo = GitRepo(tmp_path / "repo")
    repo.commit(waves())
    stub, md = infra(slow_mesh), bearer(mint_token("alice", ["admin"]))
    await stub.CreateApplication(
        pb.CreateApplicationRequest(application=application(repo)), metadata=md
    )
    started = await stub.SyncApplication(pb.SyncApplicationRequest(name="web"), metadata=md)
    # GetApplication shows the stored progress while the sync waits on wave 1.
    for _ in range(300):
        got = await stub.GetApplication(pb.GetApplicationRequest(name="web"), metadata=md)
        op = got.application.status.operation_state
        if len(op.resource_results) >= 2:
            break
        await asyncio.sleep(0.02)
    assert op.id == started.operation.id and op.phase == pb.OPERATION_PHASE_RUNNING
    assert op.message != "waiting to start"
    assert [r.resource.name for r in op.resource_results][:1] == ["first"]

    stopped = await stub.TerminateOperation(pb.TerminateOperationRequest(name="web"), metadata=md)
    assert stopped.operation.phase == pb.OPERATION_PHASE_TERMINATING
    for _ in range(300):
        got = await stub.GetApplication(pb.GetApplicationRequest(name="web"), metadata=md)
        op = got.application.status.operation_state
        if op.phase not in (pb.OPERATION_PHASE_RUNNING, pb.OPERATION_PHASE_TERMINATING):
            break
        await asyncio.sleep(0.02)
    assert op.phase == pb.OPERATION_PHASE_FAILED and op.message == "terminated by alice"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.TerminateOperation(pb.TerminateOperationRequest(name="web"), metadata=md)
    assert details(err.value)[:2] == (grpc.StatusCode.FAILED_PRECONDITION, "NO_OPERATION_RUNNING")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.TerminateOperation(pb.TerminateOperationRequest(name="absent"), metadata=md)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    # UpdateApplication answers with the application as stored, status included.
    await stub.RefreshApplication(pb.RefreshApplicationRequest(name="web"), metadata=md)
    changed = application(repo)
    changed.revision_history_limit = 3
    updated = await stub.UpdateApplication(
        pb.UpdateApplicationRequest(application=changed), metadata=md
    )
    app = updated.application
    assert app.revision_history_limit == 3
    assert app.status.sync.status == pb.SYNC_STATUS_CODE_SYNCED  # both were applied
    assert app.status.health.status == pb.HEALTH_STATUS_CODE_PROGRESSING  # no controller here
    assert len(app.status.resources) == 2
    assert app.status.operation_state.message == "terminated by alice"


async def test_a_sync_asked_for_as_the_last_one_ends_waits_for_its_lease(infra: Infra) -> None:
    """The end of an operation is stored, then its lease released (a round trip later,
    perhaps in another replica): a sync asked for in between runs, not refused."""
    from autoecoops.kernel.mesh.lease import Lease

    infra.repo.commit({"deploy/app.yaml": configmap("settings")})
    await infra.create(infra.app())
    succeeded(await infra.sync())
    ended = await infra.store.operation("web")
    assert ended is not None and ended.phase is Phase.SUCCEEDED
    # Another replica's operation, ended and recorded, still holding its lease.
    settings = infra.manager.settings.lease
    held = Lease(infra.store.redis, infra.store.operation_lease("web"), "other-op", settings)
    assert await held.acquire()
    released = asyncio.get_running_loop().call_later(
        0.3, lambda: asyncio.ensure_future(held.release())
    )
    try:
        op = await infra.manager.sync("web", ADMIN)
    finally:
        released.cancel()
    assert op.phase is Phase.RUNNING
    succeeded(await infra.manager.wait("web"))

    # The same for a rollback that turns auto-sync off first (it checks before it starts).
    app = await infra.store.get("web")
    policy = dataclasses.replace(app.sync_policy, automated=Automated())
    await infra.manager.update(dataclasses.replace(app, sync_policy=policy), ADMIN)
    assert await held.acquire()
    released = asyncio.get_running_loop().call_later(
        0.3, lambda: asyncio.ensure_future(held.release())
    )
    try:
        back = await infra.manager.rollback("web", 1, ADMIN, disable_auto_sync=True)
    finally:
        released.cancel()
    assert back.phase is Phase.RUNNING
    succeeded(await infra.manager.wait("web"))
    assert (await infra.store.get("web")).automated is None

    # While the stored operation is running, it is refused.
    infra.repo.commit(waves())
    infra.cluster.simulate_ready = False
    infra.manager.settings = dataclasses.replace(infra.manager.settings, wave_timeout=60)
    await infra.manager.sync("web", ADMIN)
    with pytest.raises(FailedPrecondition) as busy:
        await infra.manager.sync("web", ADMIN)
    assert busy.value.reason == "OPERATION_IN_PROGRESS"
    await infra.manager.terminate("web", ADMIN)
    await infra.manager.wait("web")
