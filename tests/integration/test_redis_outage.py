"""Redis going away under every kernel service: each answers UNAVAILABLE with
RetryInfo (never INTERNAL with an error id), through the mesh's one mapping.

The tests run a redis-server of their own on a free port and stop, pause or
demote only that one; the shared Redis is never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import redis
import redis.exceptions as rx

from autoecoops.audit.v1 import audit_pb2, audit_pb2_grpc
from autoecoops.auth.v1 import auth_pb2, auth_pb2_grpc
from autoecoops.events.v1 import events_pb2, events_pb2_grpc
from autoecoops.infra.v1 import infra_pb2, infra_pb2_grpc
from autoecoops.kernel.mesh.errors import Unavailable, from_rpc_error
from autoecoops.kernel.mesh.redis import redis_unavailable
from autoecoops.kernel.mesh.server import Mesh
from autoecoops.memory.v1 import memory_pb2, memory_pb2_grpc
from tests.conftest import REDIS_SERVER, MintToken, RedisProcess, StartMesh, free_port, make_config

KERNEL = ["auth-service", "policy-audit", "event-bus", "memory-hub", "infra-manager"]


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisProcess]:
    if REDIS_SERVER is None:
        pytest.skip("needs the redis-server binary")
    # BUSY answers after 50 ms of a running script (the default is 5 s).
    server = RedisProcess(tmp_path / "redis", "--appendonly", "no", "--busy-reply-threshold", "50")
    await server.start()
    yield server
    await server.kill()


@pytest.fixture
async def mesh(
    own_redis: RedisProcess, start_mesh: StartMesh, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Mesh:
    monkeypatch.setenv("AUTOECOOPS_INFRA_MANAGER_RECONCILE_SECONDS", "0")
    monkeypatch.setenv("AUTOECOOPS_INFRA_MANAGER_REPO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("AUTOECOOPS_POLICY_AUDIT_BUNDLE_DIR", str(tmp_path / "bundles"))
    (tmp_path / "bundles").mkdir()
    config = make_config(
        redis_url=own_redis.url,
        key_prefix="outage:",
        data_dir=tmp_path,
        shutdown_grace=1.0,
    )
    return await start_mesh(KERNEL, config=config, secure=True)


Call = Callable[[], Awaitable[Any]]


def reads(mesh: Mesh, token: str, timeout: float = 10) -> dict[str, Call]:
    """One call per service that has to read Redis to answer."""
    md = [("authorization", f"Bearer {token}")]

    def ch(name: str) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(mesh.config.addr(name))

    auth = auth_pb2_grpc.AuthServiceStub(ch("auth-service"))
    audit = audit_pb2_grpc.AuditServiceStub(ch("policy-audit"))
    events = events_pb2_grpc.EventBusServiceStub(ch("event-bus"))
    memory = memory_pb2_grpc.MemoryServiceStub(ch("memory-hub"))
    infra = infra_pb2_grpc.InfraServiceStub(ch("infra-manager"))
    return {
        "auth-service GetRole": lambda: auth.GetRole(
            auth_pb2.GetRoleRequest(name="viewer"), metadata=md, timeout=timeout
        ),
        "policy-audit ListEntries": lambda: audit.ListEntries(
            audit_pb2.ListEntriesRequest(page_size=5), metadata=md, timeout=timeout
        ),
        "policy-audit GetCheckpoint": lambda: audit.GetCheckpoint(
            audit_pb2.GetCheckpointRequest(), metadata=md, timeout=timeout
        ),
        "event-bus ListTopics": lambda: events.ListTopics(
            events_pb2.ListTopicsRequest(page_size=5), metadata=md, timeout=timeout
        ),
        "memory-hub ListNamespaces": lambda: memory.ListNamespaces(
            memory_pb2.ListNamespacesRequest(page_size=5), metadata=md, timeout=timeout
        ),
        "memory-hub CreateNamespace": lambda: memory.CreateNamespace(
            memory_pb2.CreateNamespaceRequest(namespace=memory_pb2.Namespace(name="outage-ns")),
            metadata=md,
            timeout=timeout,
        ),
        "infra-manager ListApplications": lambda: infra.ListApplications(
            infra_pb2.ListApplicationsRequest(page_size=5), metadata=md, timeout=timeout
        ),
    }


async def assert_unavailable(calls: dict[str, Call], what: str) -> None:
    wrong = {}

    async def one(name: str, call: Call) -> None:
        try:
            await call()
        except grpc.aio.AioRpcError as err:
            got = from_rpc_error(err)
            if not isinstance(got, Unavailable) or got.retry_delay is None:
                wrong[name] = f"{err.code().name}: {err.details()} ({got.reason})"
        else:
            wrong[name] = "succeeded"

    await asyncio.gather(*(one(name, call) for name, call in calls.items()))
    assert not wrong, f"{what}: not UNAVAILABLE with RetryInfo: {wrong}"


async def test_every_service_answers_unavailable_when_redis_is_gone(
    mesh: Mesh, own_redis: RedisProcess, mint_token: MintToken
) -> None:
    calls = reads(mesh, mint_token("root", ["admin"]))
    for name, call in calls.items():
        if "Create" not in name:
            await call()  # all is well while Redis runs
    await own_redis.kill()
    await assert_unavailable(calls, "Redis stopped")


async def test_every_service_answers_at_once_after_redis_restarts(
    start_mesh: StartMesh, tmp_path: Path, mint_token: MintToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connections pooled before a Redis restart are dead; the first calls after
    it must not fail on them (redis-py's from_url retries nothing by itself)."""
    if REDIS_SERVER is None:
        pytest.skip("needs the redis-server binary")
    own = RedisProcess(tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "always")
    await own.start()
    try:
        monkeypatch.setenv("AUTOECOOPS_INFRA_MANAGER_RECONCILE_SECONDS", "0")
        monkeypatch.setenv("AUTOECOOPS_INFRA_MANAGER_REPO_CACHE_DIR", str(tmp_path / "cache"))
        config = make_config(
            redis_url=own.url, key_prefix="restart:", data_dir=tmp_path, shutdown_grace=1.0
        )
        mesh = await start_mesh(KERNEL, config=config, secure=True)
        calls = {
            k: v for k, v in reads(mesh, mint_token("root", ["admin"])).items() if "Create" not in k
        }
        # Several calls at once, so each service's pool holds several connections.
        await asyncio.gather(*(call() for call in calls.values() for _ in range(4)))
        await own.kill()
        await own.start()
        failed = {}

        async def one(name: str, call: Call) -> None:
            try:
                await call()
            except grpc.aio.AioRpcError as err:
                failed[name] = f"{err.code().name}: {err.details()}"

        await asyncio.gather(*(one(n, c) for n, c in calls.items() for _ in range(4)))
        assert not failed, f"first calls after the restart failed: {failed}"
    finally:
        await own.kill()


async def test_every_service_answers_unavailable_while_redis_hangs(
    mesh: Mesh, own_redis: RedisProcess, mint_token: MintToken
) -> None:
    # A hung Redis is noticed when redis-py's socket timeout (5 s) runs out,
    # and event-bus retries a command once: the calls get time for that.
    calls = reads(mesh, mint_token("root", ["admin"]), timeout=30)
    for name, call in calls.items():
        if "Create" not in name:
            await call()
    assert own_redis.proc is not None
    # Paused (a frozen VM, a partition): connections stay open, replies never come.
    own_redis.proc.send_signal(signal.SIGSTOP)
    try:
        await assert_unavailable(calls, "Redis paused")
    finally:
        own_redis.proc.send_signal(signal.SIGCONT)


async def test_every_service_answers_unavailable_while_redis_is_busy(
    mesh: Mesh, own_redis: RedisProcess, mint_token: MintToken
) -> None:
    calls = reads(mesh, mint_token("root", ["admin"]))
    for name, call in calls.items():
        if "Create" not in name:
            await call()
    # A script that runs past busy-reply-threshold: Redis answers BUSY to all else.
    blocker = redis.Redis.from_url(own_redis.url)
    script = asyncio.get_running_loop().run_in_executor(
        None,
        lambda: _swallow(lambda: blocker.eval("local i = 0 while true do i = i + 1 end", 0)),
    )
    try:
        await asyncio.sleep(0.3)
        await assert_unavailable(calls, "Redis BUSY")
    finally:
        killer = redis.Redis.from_url(own_redis.url)
        killer.script_kill()
        await script
        killer.close()
        blocker.close()


async def test_a_demoted_redis_makes_writes_unavailable(
    mesh: Mesh, own_redis: RedisProcess, mint_token: MintToken
) -> None:
    calls = reads(mesh, mint_token("root", ["admin"]))
    client = redis.Redis.from_url(own_redis.url)
    # A failover demoted this node: it is a replica now and refuses writes.
    client.replicaof("127.0.0.1", str(free_port()))
    try:
        await assert_unavailable(
            {"memory-hub CreateNamespace": calls["memory-hub CreateNamespace"]}, "READONLY"
        )
    finally:
        client.replicaof("NO", "ONE")
        client.close()


def _swallow(fn: Callable[[], Any]) -> None:
    with contextlib.suppress(rx.RedisError):
        fn()


@pytest.mark.parametrize(
    ("error", "what"),
    [
        (
            rx.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused."),
            "ConnectionError",
        ),
        (rx.ConnectionError("Connection reset by peer"), "ConnectionError"),
        (rx.TimeoutError("Timeout reading from socket"), "TimeoutError"),
        (rx.BusyLoadingError("Redis is loading the dataset in memory"), "LOADING"),
        (rx.ReadOnlyError("You can't write against a read only replica."), "READONLY"),
        (rx.ResponseError("BUSY Redis is busy running a script."), "BUSY"),
        (rx.ResponseError("MASTERDOWN Link with MASTER is down"), "MASTERDOWN"),
        # A Redis Cluster in failover (redis-py follows MOVED and ASK itself).
        (rx.ClusterDownError("CLUSTERDOWN The cluster is down"), "ClusterDownError"),
        (rx.TryAgainError("TRYAGAIN Multiple keys request during rehashing"), "TryAgainError"),
        (rx.SlotNotCoveredError("Slot 866 is not covered by the cluster"), "SlotNotCoveredError"),
        (rx.ClusterError("TTL exhausted."), "ClusterError"),
    ],
)
def test_the_mapping_names_each_transient_failure(error: rx.RedisError, what: str) -> None:
    mapped = redis_unavailable(error)
    assert mapped is not None
    assert mapped.reason == "REDIS_UNAVAILABLE"
    assert mapped.metadata["redis_error"] == what
    assert mapped.retry_delay == 1.0


def test_a_wrapped_failure_is_found_and_bugs_are_not_mapped() -> None:
    try:
        try:
            raise rx.ConnectionError("Connection refused")
        except rx.ConnectionError as inner:
            raise RuntimeError("store failed") from inner
    except RuntimeError as outer:
        assert redis_unavailable(outer) is not None
    assert redis_unavailable(rx.ResponseError("WRONGTYPE Operation against a key")) is None
    assert (
        redis_unavailable(rx.ResponseError("BUSYGROUP Consumer Group name already exists")) is None
    )
    assert redis_unavailable(ValueError("no")) is None
    # Keys of one script or MULTI in two slots: a bug in a key layout, not an outage.
    assert redis_unavailable(rx.ResponseError("CROSSSLOT Keys in request don't hash")) is None
    assert redis_unavailable(rx.RedisClusterException("Keys in request don't hash")) is None


def test_a_failed_pipeline_command_is_mapped_by_its_reply() -> None:
    err = rx.ResponseError(
        "Command # 1 (EXISTS a) of pipeline caused error: BUSY Redis is busy running a script."
    )
    mapped = redis_unavailable(err)
    assert mapped is not None and mapped.metadata["redis_error"] == "BUSY"
    quoted = rx.ResponseError(
        "Command # 1 (EXISTS a) of pipeline caused error: ('BUSY Redis is busy running a script.',)"
    )
    assert redis_unavailable(quoted) is not None


async def test_through_the_gateway_an_outage_is_503_with_retry_after(
    mesh: Mesh, own_redis: RedisProcess, mint_token: MintToken
) -> None:
    from autoecoops.gateway import GatewaySettings
    from autoecoops.gateway.server import start_gateway

    gateway = await start_gateway(mesh.config, GatewaySettings(port=0))
    try:
        auth = {"Authorization": f"Bearer {mint_token('root', ['admin'])}"}
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{gateway.port}", headers=auth, timeout=20
        ) as http:
            assert (await http.get("/v1/memory/namespaces")).status_code == 200
            await own_redis.kill()
            for path in ("/v1/memory/namespaces", "/v1/audit/entries", "/v1/applications"):
                r = await http.get(path)
                assert r.status_code == 503, (path, r.text)
                assert r.headers["retry-after"] == "1"
                reasons = [d.get("reason") for d in r.json()["details"]]
                assert "REDIS_UNAVAILABLE" in reasons, r.text
    finally:
        await gateway.stop()
