"""RBAC pushed to services (issue 12): WatchAuthorization's snapshot, changes and
resume, and a service's authorizer across auth-service going down and coming
back, against real servers and a real Redis.

A service in another process is a second ``Mesh`` here: its own runtime,
client factory, authorizer and identity, reaching auth-service over gRPC only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from autoecoops.auth.v1 import auth_pb2, auth_pb2_grpc
from autoecoops.kernel.auth.mesh import WatchingAuthorizer
from autoecoops.kernel.auth.rbac import Binding, Subject
from autoecoops.kernel.auth.store import AuthStore
from autoecoops.kernel.mesh.server import Mesh
from autoecoops.memory.v1 import memory_pb2
from tests.conftest import MintToken, StartMesh
from tests.integration.auth.test_auth_service import auth_stub, bearer, memory_stub, reason

KERNEL = ["auth-service", "policy-audit"]


def store_of(mesh: Mesh) -> AuthStore:
    return AuthStore(mesh.runtime.redis, mesh.runtime.key("auth"))


def authorizer_of(mesh: Mesh) -> WatchingAuthorizer:
    authorizer = mesh.runtime.authorizer
    assert isinstance(authorizer, WatchingAuthorizer)
    return authorizer


def viewer_binding(name: str, user: str) -> auth_pb2.CreateRoleBindingRequest:
    return auth_pb2.CreateRoleBindingRequest(
        role_binding=auth_pb2.RoleBinding(
            name=name,
            role="viewer",
            subjects=[auth_pb2.Subject(kind=auth_pb2.SUBJECT_KIND_USER, name=user)],
        )
    )


async def next_event(stream: grpc.aio.UnaryStreamCall) -> auth_pb2.WatchAuthorizationResponse:  # type: ignore[type-arg]
    async with asyncio.timeout(5):
        message = await stream.read()
    assert isinstance(message, auth_pb2.WatchAuthorizationResponse)
    return message


async def test_watch_sends_a_snapshot_then_changes_and_resumes_from_a_version(
    start_mesh: StartMesh, mint_token: MintToken
) -> None:
    mesh = await start_mesh(KERNEL, secure=True)
    auth = auth_stub(mesh)
    admin = bearer(mint_token("root", ["admin"]))
    stream = auth.WatchAuthorization(auth_pb2.WatchAuthorizationRequest(), metadata=admin)
    first = await next_event(stream)
    assert first.WhichOneof("event") == "snapshot"
    assert {"admin", "viewer", "mesh-service"} <= {r.name for r in first.snapshot.roles}
    assert "auth.authorization.watch" in next(
        r.permissions for r in first.snapshot.roles if r.name == "mesh-service"
    )
    start = first.version
    await auth.CreateRole(
        auth_pb2.CreateRoleRequest(role=auth_pb2.Role(name="reader", permissions=["memory.*.get"])),
        metadata=admin,
    )
    await auth.CreateRoleBinding(viewer_binding("bob-views", "bob"), metadata=admin)
    await auth.DeleteRoleBinding(
        auth_pb2.DeleteRoleBindingRequest(name="bob-views"), metadata=admin
    )
    role, bound, unbound = [await next_event(stream) for _ in range(3)]
    assert [e.version for e in (role, bound, unbound)] == [start + 1, start + 2, start + 3]
    assert (role.change.type, role.change.role.name, list(role.change.role.permissions)) == (
        auth_pb2.CHANGE_TYPE_UPSERT,
        "reader",
        ["memory.*.get"],
    )
    assert (bound.change.type, bound.change.role_binding.subjects[0].name) == (
        auth_pb2.CHANGE_TYPE_UPSERT,
        "bob",
    )
    assert (unbound.change.type, unbound.change.role_binding.name) == (
        auth_pb2.CHANGE_TYPE_DELETE,
        "bob-views",
    )
    stream.cancel()
    # Resuming from a version the log covers: a bookmark, then only what came after.
    resumed = auth.WatchAuthorization(
        auth_pb2.WatchAuthorizationRequest(resume_version=start + 1), metadata=admin
    )
    mark = await next_event(resumed)
    assert (mark.WhichOneof("event"), mark.version) == ("bookmark", start + 1)
    assert [(await next_event(resumed)).version for _ in range(2)] == [start + 2, start + 3]
    resumed.cancel()
    # A version the store never had (Redis was reset, say): a full snapshot.
    fresh = auth.WatchAuthorization(
        auth_pb2.WatchAuthorizationRequest(resume_version=start + 1000), metadata=admin
    )
    again = await next_event(fresh)
    assert (again.WhichOneof("event"), again.version) == ("snapshot", start + 3)
    assert "reader" in {r.name for r in again.snapshot.roles}
    fresh.cancel()
    # Only holders of the permission may watch.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await next_event(
            auth.WatchAuthorization(
                auth_pb2.WatchAuthorizationRequest(), metadata=bearer(mint_token("eve", ["viewer"]))
            )
        )
    assert reason(info.value)[:2] == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_MISSING")


async def test_a_service_follows_changes_and_outlives_an_auth_service_restart(
    start_mesh: StartMesh, mint_token: MintToken
) -> None:
    kernel = await start_mesh(KERNEL, secure=True)
    # memory-hub as its own process would run it: only gRPC to auth-service,
    # its identity from the client credentials auth-service left in the data dir.
    service = await start_mesh(["memory-hub"], config=kernel.config, secure=True)
    watcher = authorizer_of(service)
    assert await watcher.wait_for_version(1, 5.0)
    admin, bob = bearer(mint_token("root", ["admin"])), bearer(mint_token("bob"))
    memory = memory_stub(service)
    listing = memory_pb2.ListNamespacesRequest()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await memory.ListNamespaces(listing, metadata=bob)
    assert reason(info.value)[1] == "PERMISSION_MISSING"
    # A binding made through auth-service reaches memory-hub.
    await auth_stub(kernel).CreateRoleBinding(viewer_binding("bob-views", "bob"), metadata=admin)
    assert await watcher.wait_for_version(await store_of(kernel).rbac_version(), 5.0)
    await memory.ListNamespaces(listing, metadata=bob)
    held = watcher.version
    assert (watcher.snapshots, watcher.connections) == (1, 1)

    # auth-service goes away: memory-hub keeps authorizing from its snapshot.
    await kernel.stop(grace=0)
    for _ in range(50):
        if not watcher.connected:
            break
        await asyncio.sleep(0.05)
    assert not watcher.connected
    await memory.ListNamespaces(listing, metadata=bob)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await memory.ListNamespaces(listing, metadata=bearer(mint_token("carol")))
    assert reason(info.value)[1] == "PERMISSION_MISSING"
    # Meanwhile the store changes (another auth-service replica, say).
    await store_of(service).create_binding(
        Binding("carol-views", "viewer", (Subject("user", "carol"),))
    )

    # auth-service comes back on the same address: the watcher resumes from its
    # version (no second snapshot) and gets the change it missed.
    back = await start_mesh(KERNEL, config=kernel.config, secure=True)
    assert await watcher.wait_for_version(held + 1, 10.0)
    assert watcher.connected and (watcher.snapshots, watcher.connections) == (1, 2)
    await memory.ListNamespaces(listing, metadata=bearer(mint_token("carol")))
    # And changes keep flowing on the new stream: a revocation applies at once.
    await auth_stub(back).DeleteRoleBinding(
        auth_pb2.DeleteRoleBindingRequest(name="bob-views"), metadata=admin
    )
    assert await watcher.wait_for_version(await store_of(back).rbac_version(), 5.0)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await memory.ListNamespaces(listing, metadata=bob)
    assert reason(info.value)[1] == "PERMISSION_MISSING"


async def test_a_service_that_never_had_a_snapshot_fails_closed(
    start_mesh: StartMesh,
    mint_token: MintToken,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("AUTOECOOPS_AUTH_RBAC_WAIT_SECONDS", "0.3")
    kernel = await start_mesh(KERNEL, secure=True)
    # A data directory of its own and no client credentials: its watch is
    # refused, so it never gets a snapshot.
    alone = dataclasses.replace(kernel.config, data_dir=tmp_path / "elsewhere")
    service = await start_mesh(["memory-hub"], config=alone, secure=True)
    metric = "autoecoops_auth_rbac_no_snapshot_denials_total"
    before = REGISTRY.get_sample_value(metric) or 0.0
    with caplog.at_level(logging.ERROR, logger="autoecoops.auth"):
        for token in (mint_token("root", ["admin"]), mint_token("bob", ["viewer"])):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await memory_stub(service).ListNamespaces(
                    memory_pb2.ListNamespacesRequest(), metadata=bearer(token)
                )
            assert reason(info.value)[:2] == (
                grpc.StatusCode.UNAVAILABLE,
                "RBAC_SNAPSHOT_UNAVAILABLE",
            )
    assert (REGISTRY.get_sample_value(metric) or 0.0) - before == 2
    assert any("no RBAC snapshot" in r.getMessage() for r in caplog.records)
    assert authorizer_of(service).version == 0
    # The kernel itself, which follows its own store, is unaffected.
    await auth_pb2_grpc.AuthServiceStub(
        grpc.aio.insecure_channel(kernel.config.addr("auth-service"))
    ).ListRoles(auth_pb2.ListRolesRequest(), metadata=bearer(mint_token("root", ["admin"])))


async def test_an_idle_watch_stays_open(start_mesh: StartMesh) -> None:
    # Longer than redis-py's default 5 s socket timeout, which once cut every
    # idle read of the change log and dropped the watch.
    kernel = await start_mesh(KERNEL, secure=True)
    service = await start_mesh(["memory-hub"], config=kernel.config, secure=True)
    watchers = [authorizer_of(kernel), authorizer_of(service)]
    for watcher in watchers:
        assert await watcher.wait_for_version(1, 5.0)
    await asyncio.sleep(6.5)
    assert [(w.connected, w.connections, w.snapshots) for w in watchers] == [(True, 1, 1)] * 2


async def test_a_service_elsewhere_gets_its_token_through_issue_token_not_the_key_ring(
    start_mesh: StartMesh, tmp_path: Path
) -> None:
    import jwt

    from autoecoops.kernel.auth.mesh import ServiceIdentity

    kernel = await start_mesh(KERNEL, secure=True)
    # Only the client credentials travel (as a Secret would); no signing key does.
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "auth").mkdir(parents=True)
    credentials = tmp_path / "auth" / "mesh-client.json"
    (elsewhere / "auth" / "mesh-client.json").write_text(credentials.read_text())
    service = await start_mesh(
        ["memory-hub"], config=dataclasses.replace(kernel.config, data_dir=elsewhere), secure=True
    )
    identity = service.runtime.clients.token_source
    assert isinstance(identity, ServiceIdentity)
    claims = jwt.decode(await identity.token(), options={"verify_signature": False})
    assert claims["sub"].startswith("system:local.") and claims["client_id"] == claims["sub"]
    assert claims["roles"] == ["mesh-service"]
    assert await authorizer_of(service).wait_for_version(1, 5.0)
    assert not (elsewhere / "auth" / "keys").exists()
