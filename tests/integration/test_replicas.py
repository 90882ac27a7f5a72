"""Replicas of one service: two servers on distinct ports behind one address.

Both the mesh's client factory and the SDK take a list of replicas; calls go
round robin to the replicas reporting SERVING, a replica that goes
NOT_SERVING or stops is skipped, and idempotent calls that met a dying replica
are retried on the other. Each replica is a real grpc.aio mesh server (a
scripted auth-service that records what it served); the processes-and-SIGKILL
version of this is tests/e2e/test_replicas.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import grpc
import pytest

from autoecoops.auth.v1 import auth_pb2, auth_pb2_grpc
from autoecoops.kernel.mesh.clients import ClientFactory
from autoecoops.kernel.mesh.config import MeshConfig
from autoecoops.kernel.mesh.errors import Cancelled, Unavailable
from autoecoops.kernel.mesh.server import Mesh
from autoecoops.sdk import AsyncClient
from tests.conftest import StartMesh, make_config
from tests.integration.sdk.scripted import Scripted, serve


async def replicas(
    start_mesh: StartMesh, tmp_path: object, n: int = 2
) -> tuple[list[Mesh], list[Scripted], str]:
    """``n`` scripted auth-service replicas and their address list."""
    meshes, servicers = [], []
    for _ in range(n):
        servicer = Scripted()
        # A drain waits a moment between NOT_SERVING and refusing calls (what
        # AUTOECOOPS_DRAIN_DELAY_SECONDS / a preStop hook give a pod), so the
        # clients' health watches take the replica out first; a call that reaches
        # a server already stopping is CANCELLED, which is not safe to retry.
        cfg = make_config(data_dir=tmp_path, shutdown_grace=0.0, drain_delay=1.0)
        meshes.append(await start_mesh(["auth-service"], {"auth-service": serve(servicer)}, cfg))
        servicers.append(servicer)
    addr = ",".join(f"127.0.0.1:{m.config.port('auth-service')}" for m in meshes)
    return meshes, servicers, addr


def served(servicers: list[Scripted], method: str = "GetJwks") -> list[int]:
    """Calls of ``method`` each replica served."""
    return [len(s.seen[method]) for s in servicers]


async def warm(sdk: AsyncClient, servicers: list[Scripted]) -> None:
    """Call until every replica has served: a new channel sends its first calls
    to the replicas connected so far."""

    async def all_served() -> bool:
        await sdk.auth.get_jwks()
        return all(served(servicers))

    await until(all_served)


async def until(check: Callable[[], Awaitable[bool]], within: float = 30) -> None:
    """Poll ``check`` until it holds (generous: the machine is shared)."""
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_sdk_spreads_calls_over_replicas_and_skips_one_not_serving(
    start_mesh: StartMesh, tmp_path: object
) -> None:
    meshes, servicers, addr = await replicas(start_mesh, tmp_path)
    async with AsyncClient(addresses={"auth-service": addr}, config=MeshConfig()) as sdk:
        for _ in range(20):
            await sdk.auth.get_jwks()
        # Round robin: both replicas serve, about evenly (the first calls may
        # land on whichever connected first).
        assert all(n >= 5 for n in served(servicers)), served(servicers)

        await meshes[0].runtime.set_unhealthy("auth-service", "draining for the test")
        before = served(servicers)

        async def only_second() -> bool:
            # Once the client's health watch saw NOT_SERVING, calls avoid it.
            start = served(servicers)
            for _ in range(10):
                await sdk.auth.get_jwks()
            now = served(servicers)
            return now[0] == start[0]

        await until(only_second)
        assert served(servicers)[1] > before[1]

        await meshes[0].runtime.set_unhealthy("auth-service", "")

        async def both_again() -> bool:
            start = served(servicers)
            for _ in range(10):
                await sdk.auth.get_jwks()
            now = served(servicers)
            return now[0] > start[0] and now[1] > start[1]

        await until(both_again)


async def test_calls_keep_succeeding_while_a_replica_drains_and_stops(
    start_mesh: StartMesh, tmp_path: object
) -> None:
    meshes, servicers, addr = await replicas(start_mesh, tmp_path)
    async with AsyncClient(addresses={"auth-service": addr.split(",")}, config=MeshConfig()) as sdk:
        for _ in range(10):
            await sdk.auth.get_jwks()
        assert all(served(servicers))
        # Calls in flight on the first replica when it drains: they finish
        # within the grace period, and the calls made meanwhile and after go
        # to the second (the drain's NOT_SERVING took the first out first).
        servicers[0].default["GetJwks"] = 0.3
        seen_before = sum(len(s.seen["GetJwks"]) for s in servicers)
        slow = [asyncio.ensure_future(sdk.auth.get_jwks()) for _ in range(6)]
        # Every slow call is being served (not still on its way) before the drain.
        await until(
            lambda: _true(sum(len(s.seen["GetJwks"]) for s in servicers) >= seen_before + 6)
        )
        stopping = asyncio.ensure_future(meshes[0].stop(grace=5))
        during = [await sdk.auth.get_jwks() for _ in range(10)]
        await stopping
        assert len(await asyncio.gather(*slow)) == 6 and len(during) == 10
        before = served(servicers)
        for _ in range(20):
            await sdk.auth.get_jwks()
        assert served(servicers) == [before[0], before[1] + 20]


async def test_a_non_idempotent_call_on_a_dying_replica_fails_once_and_is_not_retried(
    start_mesh: StartMesh, tmp_path: object
) -> None:
    meshes, servicers, addr = await replicas(start_mesh, tmp_path)
    async with AsyncClient(addresses={"auth-service": addr}, config=MeshConfig()) as sdk:
        await warm(sdk, servicers)
        for s in servicers:
            s.default["IssueToken"] = 0.5
        calls = [
            asyncio.ensure_future(sdk.auth.issue_token(client_id=f"c{i}", client_secret="s"))
            for i in range(6)
        ]
        await until(lambda: _true(sum(served(servicers, "IssueToken")) == 6))
        # No grace: the server cancels what it was serving.
        await meshes[0].stop(grace=0)
        results = await asyncio.gather(*calls, return_exceptions=True)
    # Each call reached exactly one replica, once: those on the stopped one
    # fail as the transport said (UNAVAILABLE from its GOAWAY, or CANCELLED,
    # by timing: either way it may have acted, so the caller decides), the
    # others succeed; none was sent twice.
    on_stopped, on_other = served(servicers, "IssueToken")
    assert on_stopped + on_other == 6 and on_stopped and on_other
    failed = [r for r in results if isinstance(r, BaseException)]
    assert len(failed) == on_stopped, results
    assert all(isinstance(r, Cancelled | Unavailable) for r in failed), results
    assert {r.access_token for r in results if not isinstance(r, BaseException)}


async def test_the_mesh_client_factory_balances_and_retries_idempotent_calls(
    start_mesh: StartMesh, tmp_path: object
) -> None:
    _, servicers, addr = await replicas(start_mesh, tmp_path)
    caller = MeshConfig(addrs={"auth-service": addr})
    factory = ClientFactory(caller)
    try:
        stub = factory.stub(auth_pb2_grpc.AuthServiceStub, "auth-service")
        for _ in range(20):
            await stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=10)
        assert all(n >= 5 for n in served(servicers)), served(servicers)
        # The first replica answers UNAVAILABLE to the next calls: the
        # factory's channel retries each on the other replica.
        servicers[0].default["GetJwks"] = Unavailable("going away")
        for _ in range(10):
            await stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=10)
        # A non-idempotent call is not retried: it answers what the replica said.
        servicers[0].default["IssueToken"] = Unavailable("going away")
        servicers[1].default["IssueToken"] = Unavailable("going away")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.IssueToken(
                auth_pb2.IssueTokenRequest(client_id="a", client_secret="b"), timeout=10
            )
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert info.value.details() == "going away"
        assert sum(served(servicers, "IssueToken")) == 1
    finally:
        await factory.close()


async def _true(value: bool) -> bool:
    return value
