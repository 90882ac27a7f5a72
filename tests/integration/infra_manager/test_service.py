"""infra-manager over gRPC in a real mesh: auth-service (tokens, RBAC), policy-audit (the
trail), event-bus (the events) and infra-manager, on a real Redis and real Git repositories."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2, status_pb2

from autoecoops.audit.v1 import audit_pb2, audit_pb2_grpc
from autoecoops.auth.v1 import auth_pb2, auth_pb2_grpc
from autoecoops.events.v1 import events_pb2, events_pb2_grpc
from autoecoops.infra.v1 import events_pb2 as infra_events
from autoecoops.infra.v1 import infra_pb2 as pb
from autoecoops.infra.v1 import infra_pb2_grpc
from autoecoops.kernel.infra_manager.cluster import EmbeddedCluster
from autoecoops.kernel.infra_manager.model import Ref
from autoecoops.kernel.mesh.errors import STATUS_DETAILS_KEY
from autoecoops.kernel.mesh.redis import connect
from autoecoops.kernel.mesh.server import Mesh
from tests.conftest import MintToken, StartMesh, base_key
from tests.integration.infra_manager.conftest import configmap, deployment
from tests.integration.infra_manager.gitrepo import GitRepo

RBAC_REFRESH = 1.1


@pytest.fixture
async def mesh(start_mesh: StartMesh, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Mesh:
    # The loop is off: the tests drive reconciles with Refresh, so nothing races them.
    monkeypatch.setenv("AUTOECOOPS_INFRA_MANAGER_RECONCILE_SECONDS", "0")
    # Chosen explicitly: a CI runner that is itself a pod must not refuse the simulator.
    monkeypatch.setenv("AUTOECOOPS_INFRA_MANAGER_CLUSTER", "embedded")
    monkeypatch.setenv("AUTOECOOPS_INFRA_MANAGER_HEALTH_POLL_SECONDS", "0.02")
    monkeypatch.setenv("AUTOECOOPS_INFRA_MANAGER_REPO_CACHE_DIR", str(tmp_path / "cache"))
    return await start_mesh(
        ["auth-service", "policy-audit", "event-bus", "infra-manager"], secure=True
    )


def infra(mesh: Mesh) -> infra_pb2_grpc.InfraServiceStub:
    return infra_pb2_grpc.InfraServiceStub(
        grpc.aio.insecure_channel(mesh.config.addr("infra-manager"))
    )


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def details(err: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str, list[str], dict[str, str]]:
    """Code, ErrorInfo reason, BadRequest fields and ErrorInfo metadata of a failed call."""
    raw = dict(err.trailing_metadata() or ())[STATUS_DETAILS_KEY]
    reason, fields, meta = "", [], {}
    for d in status_pb2.Status.FromString(raw).details:
        info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        if d.Unpack(info):
            reason, meta = info.reason, dict(info.metadata)
        elif d.Unpack(bad):
            fields = [v.field for v in bad.field_violations]
    return err.code(), reason, fields, meta


def application(repo: GitRepo, name: str = "web", namespace: str = "team-a") -> pb.Application:
    return pb.Application(
        name=name,
        source=pb.ApplicationSource(repo_url=repo.url, target_revision="main", path="deploy"),
        destination=pb.ApplicationDestination(namespace=namespace),
    )


async def finished(
    stub: infra_pb2_grpc.InfraServiceStub, md: list[tuple[str, str]], name: str = "web"
) -> pb.OperationState:
    for _ in range(500):
        got = await stub.GetApplication(pb.GetApplicationRequest(name=name), metadata=md)
        op = got.application.status.operation_state
        if op.id and op.phase != pb.OPERATION_PHASE_RUNNING:
            return op
        await asyncio.sleep(0.02)
    raise AssertionError("the operation did not finish")


def cluster_of(mesh: Mesh) -> EmbeddedCluster:
    return EmbeddedCluster(
        connect(mesh.config.redis_url),
        base_key(mesh.config.redis_url, mesh.config.key_prefix, "infra-manager") + ":cluster",
    )


async def test_sync_over_grpc_publishes_events_on_the_bus_and_audits(
    mesh: Mesh, mint_token: MintToken, tmp_path: Path
) -> None:
    repo = GitRepo(tmp_path / "repo")
    commit = repo.commit({"deploy/app.yaml": deployment("web") + "---\n" + configmap("settings")})
    stub, md = infra(mesh), bearer(mint_token("alice", ["admin"]))
    created = await stub.CreateApplication(
        pb.CreateApplicationRequest(application=application(repo)), metadata=md
    )
    assert created.application.status.sync.status == pb.SYNC_STATUS_CODE_UNKNOWN

    started = await stub.SyncApplication(pb.SyncApplicationRequest(name="web"), metadata=md)
    assert (
        started.operation.phase == pb.OPERATION_PHASE_RUNNING
        and started.operation.revision == commit
    )
    op = await finished(stub, md)
    assert op.phase == pb.OPERATION_PHASE_SUCCEEDED, op.message
    assert op.initiated_by == "alice" and len(op.resource_results) == 2

    fresh = (
        await stub.RefreshApplication(pb.RefreshApplicationRequest(name="web"), metadata=md)
    ).application
    assert fresh.status.sync.status == pb.SYNC_STATUS_CODE_SYNCED
    assert fresh.status.health.status == pb.HEALTH_STATUS_CODE_HEALTHY
    history = await stub.ListApplicationHistory(
        pb.ListApplicationHistoryRequest(name="web"), metadata=md
    )
    assert [(e.id, e.revision) for e in history.entries] == [(1, commit)]

    # Drift by editing the live object, seen in the diff.
    cluster = cluster_of(mesh)
    await cluster.update(
        Ref("apps", "v1", "Deployment", "team-a", "web"), lambda o: o["spec"].update(replicas=3)
    )
    diff = await stub.GetApplicationDiff(pb.GetApplicationDiffRequest(name="web"), metadata=md)
    assert diff.sync_status == pb.SYNC_STATUS_CODE_OUT_OF_SYNC
    (drifted,) = [d for d in diff.resource_diffs if d.diff]
    assert (
        drifted.status == pb.RESOURCE_SYNC_STATUS_OUT_OF_SYNC and "-  replicas: 3" in drifted.diff
    )
    await stub.RefreshApplication(pb.RefreshApplicationRequest(name="web"), metadata=md)

    # The events arrived on the real bus, in order, from infra-manager's own identity.
    bus = events_pb2_grpc.EventBusServiceStub(
        grpc.aio.insecure_channel(mesh.config.addr("event-bus"))
    )
    got = []
    for topic in ("infra.sync", "infra.drift"):
        call = bus.Subscribe(
            events_pb2.SubscribeRequest(
                topic=topic,
                group="test",
                consumer="c1",
                start_position=events_pb2.START_POSITION_EARLIEST,
            ),
            metadata=md,
        )
        want = 2 if topic == "infra.sync" else 1
        async for reply in call:
            got.append(reply.delivery.envelope)
            if len([e for e in got if e.type.split(".")[2] == topic.split(".")[1]]) == want:
                break
        call.cancel()
    assert [e.type for e in got] == [
        "autoecoops.infra.sync.started",
        "autoecoops.infra.sync.succeeded",
        "autoecoops.infra.drift.detected",
    ]
    assert {e.source for e in got} == {"//autoecoops/kernel/infra-manager"}
    # infra-manager's own identity, though the mesh runs every service in one process.
    assert [(bool(e.trace_parent), e.actor.subject) for e in got] == [
        (True, "system:infra-manager")
    ] * 3
    done = infra_events.SyncSucceeded()
    got[1].data.Unpack(done)
    assert (done.application, done.history_id, done.revision) == ("web", 1, commit)
    drift = infra_events.DriftDetected()
    got[2].data.Unpack(drift)
    assert [r.resource.name for r in drift.drifted_resources] == ["web"]

    # The sync's own entry in the audit trail, with the user as actor.
    audit = audit_pb2_grpc.AuditServiceStub(
        grpc.aio.insecure_channel(mesh.config.addr("policy-audit"))
    )
    entries = (
        await audit.ListEntries(audit_pb2.ListEntriesRequest(type="infra.sync"), metadata=md)
    ).entries
    (entry,) = entries
    assert entry.actor.subject == "alice" and entry.service == "infra-manager"
    assert entry.details["phase"] == "Succeeded" and entry.details["revision"] == commit
    await cluster.redis.aclose()


async def test_bad_input_gets_statuses_with_details_and_changes_nothing(
    mesh: Mesh, mint_token: MintToken, tmp_path: Path
) -> None:
    repo = GitRepo(tmp_path / "repo")
    repo.commit({"deploy/app.yaml": configmap("settings")})
    stub, md = infra(mesh), bearer(mint_token("alice", ["admin"]))

    bad_url = application(repo)
    bad_url.source.repo_url = "not a url"
    bad_rev = application(repo)
    bad_rev.source.target_revision = "v9.9.9"
    for app, reason, field in (
        (bad_url, "REPOSITORY_URL_INVALID", "application.source.repo_url"),
        (bad_rev, "REVISION_NOT_FOUND", "application.source.target_revision"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateApplication(pb.CreateApplicationRequest(application=app), metadata=md)
        assert details(err.value)[:3] == (grpc.StatusCode.INVALID_ARGUMENT, reason, [field])
    listed = await stub.ListApplications(pb.ListApplicationsRequest(), metadata=md)
    assert list(listed.applications) == []

    await stub.CreateApplication(
        pb.CreateApplicationRequest(application=application(repo)), metadata=md
    )
    await stub.SyncApplication(pb.SyncApplicationRequest(name="web"), metadata=md)
    await finished(stub, md)
    cluster = cluster_of(mesh)
    before = await cluster.list_app("web")

    repo.commit(
        {"deploy/app.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  labels: {a: b}\n"}
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.SyncApplication(pb.SyncApplicationRequest(name="web"), metadata=md)
    assert details(err.value)[:3] == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "INVALID_MANIFESTS",
        ["deploy/app.yaml#0"],
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.SyncApplication(
            pb.SyncApplicationRequest(name="web", revision="deadbeef00"), metadata=md
        )
    assert details(err.value)[:3] == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "REVISION_NOT_FOUND",
        ["revision"],
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.RollbackApplication(
            pb.RollbackApplicationRequest(name="web", history_id=7), metadata=md
        )
    assert details(err.value)[:3] == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "HISTORY_NOT_FOUND",
        ["history_id"],
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.UpdateApplication(
            pb.UpdateApplicationRequest(
                application=pb.Application(name="web", status=pb.ApplicationStatus()),
                update_mask=field_mask_pb2.FieldMask(paths=["status"]),
            ),
            metadata=md,
        )
    assert details(err.value)[:3] == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_UPDATE_MASK",
        ["update_mask"],
    )
    assert await cluster.list_app("web") == before
    history = await stub.ListApplicationHistory(
        pb.ListApplicationHistoryRequest(name="web"), metadata=md
    )
    assert len(history.entries) == 1
    await cluster.redis.aclose()


async def test_deploying_to_a_namespace_without_permission_is_refused(
    mesh: Mesh, mint_token: MintToken, tmp_path: Path
) -> None:
    repo = GitRepo(tmp_path / "repo")
    repo.commit({"deploy/app.yaml": configmap("settings")})
    auth = auth_pb2_grpc.AuthServiceStub(
        grpc.aio.insecure_channel(mesh.config.addr("auth-service"))
    )
    admin = bearer(mint_token("root", ["admin"]))
    for role in (
        auth_pb2.Role(name="infra-dev", permissions=["infra.applications.*", "infra.history.list"]),
        auth_pb2.Role(name="deployer", permissions=["infra.destinations.deploy"]),
    ):
        await auth.CreateRole(auth_pb2.CreateRoleRequest(role=role), metadata=admin)
    await auth.CreateRoleBinding(
        auth_pb2.CreateRoleBindingRequest(
            role_binding=auth_pb2.RoleBinding(
                name="bob-team-a",
                role="deployer",
                namespace="team-a",
                subjects=[auth_pb2.Subject(kind=auth_pb2.SUBJECT_KIND_USER, name="bob")],
            )
        ),
        metadata=admin,
    )
    await asyncio.sleep(RBAC_REFRESH)
    stub, bob = infra(mesh), bearer(mint_token("bob", ["infra-dev"]))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreateApplication(
            pb.CreateApplicationRequest(application=application(repo, namespace="team-b")),
            metadata=bob,
        )
    code, reason, fields, meta = details(err.value)
    assert (code, reason, fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "DESTINATION_NOT_PERMITTED",
        ["application.destination.namespace"],
    )
    assert meta["namespaces"] == "team-b" and meta["permission"] == "infra.destinations.deploy"

    await stub.CreateApplication(
        pb.CreateApplicationRequest(application=application(repo)), metadata=bob
    )
    # Moving the application elsewhere is refused too, and leaves it where it was.
    moved = application(repo, namespace="team-b")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.UpdateApplication(
            pb.UpdateApplicationRequest(
                application=moved,
                update_mask=field_mask_pb2.FieldMask(paths=["destination.namespace"]),
            ),
            metadata=bob,
        )
    assert details(err.value)[1] == "DESTINATION_NOT_PERMITTED"
    got = await stub.GetApplication(pb.GetApplicationRequest(name="web"), metadata=bob)
    assert got.application.destination.namespace == "team-a"
    await stub.SyncApplication(pb.SyncApplicationRequest(name="web"), metadata=bob)
    assert (await finished(stub, bob)).phase == pb.OPERATION_PHASE_SUCCEEDED


async def test_get_manifests_over_grpc(mesh: Mesh, mint_token: MintToken, tmp_path: Path) -> None:
    repo = GitRepo(tmp_path / "repo")
    first = repo.commit({"deploy/app.yaml": deployment("web") + "---\n" + configmap("settings")})
    stub, md = infra(mesh), bearer(mint_token("alice", ["admin"]))
    await stub.CreateApplication(
        pb.CreateApplicationRequest(application=application(repo)), metadata=md
    )
    second = repo.commit({"deploy/app.yaml": configmap("settings", {"cpu": "500m"})})

    got = await stub.GetManifests(pb.GetManifestsRequest(name="web"), metadata=md)
    assert got.revision == second
    (only,) = got.manifests
    assert (only.resource.kind, only.resource.namespace, only.resource.name) == (
        "ConfigMap",
        "team-a",
        "settings",
    )
    assert (only.source_path, only.document_index, only.line) == ("deploy/app.yaml", 0, 1)
    assert only.yaml == configmap("settings", {"cpu": "500m"})

    old = await stub.GetManifests(pb.GetManifestsRequest(name="web", revision=first), metadata=md)
    assert old.revision == first
    assert [(m.resource.kind, m.document_index) for m in old.manifests] == [
        ("Deployment", 0),
        ("ConfigMap", 1),
    ]

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetManifests(pb.GetManifestsRequest(name="web", revision="nope"), metadata=md)
    assert details(err.value)[:3] == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "REVISION_NOT_FOUND",
        ["revision"],
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetManifests(pb.GetManifestsRequest(name="absent"), metadata=md)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetManifests(pb.GetManifestsRequest(name="web"))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
