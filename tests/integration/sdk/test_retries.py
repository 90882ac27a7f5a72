"""Retries against a real server: which calls are retried, how long the
client waits, one deadline for all attempts, and throttling under a storm.

The server is real (grpc.aio with the mesh interceptor); the client's waits
are recorded instead of slept, so the tests are fast and exact.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from autoecoops.kernel.mesh.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from autoecoops.kernel.mesh.server import Mesh
from autoecoops.sdk import NO_RETRY, AsyncClient, Client, Clock, Retry, RetryThrottle
from tests.conftest import StartMesh
from tests.integration.sdk.scripted import FakeClock, Scripted, serve

FAST = Retry(initial=timedelta(milliseconds=100), maximum=timedelta(seconds=2), max_attempts=5)


async def scripted_mesh(start_mesh: StartMesh) -> tuple[Mesh, Scripted]:
    servicer = Scripted()
    mesh = await start_mesh(["auth-service"], {"auth-service": serve(servicer)})
    return mesh, servicer


def client(mesh: Mesh, fake: FakeClock, **kwargs: object) -> AsyncClient:
    kwargs.setdefault("retry", FAST)
    return AsyncClient(config=mesh.config, clock=fake.clock(), **kwargs)  # type: ignore[arg-type]


async def test_an_idempotent_call_is_retried_through_unavailable_until_it_succeeds(
    start_mesh: StartMesh,
) -> None:
    mesh, server = await scripted_mesh(start_mesh)
    server.script["GetJwks"] = [Unavailable("down"), Unavailable("down"), Unavailable("down")]
    fake = FakeClock(random=0.5)
    async with client(mesh, fake) as sdk:
        reply, call = await sdk.auth.get_jwks.with_call()
    assert call.attempts == 4 and len(server.seen["GetJwks"]) == 4
    # Full jitter with random=0.5: half of 0.1, 0.2, 0.4 s.
    assert fake.sleeps == pytest.approx([0.05, 0.1, 0.2])
    # Every attempt is the same call: one trace, the one the response reports.
    assert {s.trace_id for s in server.seen["GetJwks"]} == {call.trace_id}
    assert reply.keys[0].kid == call.trace_id


async def test_attempts_run_out(start_mesh: StartMesh) -> None:
    mesh, server = await scripted_mesh(start_mesh)
    server.default["GetJwks"] = Unavailable("down for good")
    fake = FakeClock()
    async with client(mesh, fake, retry=FAST.with_max_attempts(3)) as sdk:
        with pytest.raises(Unavailable) as info:
            await sdk.auth.get_jwks()
    assert len(server.seen["GetJwks"]) == 3 and len(fake.sleeps) == 2
    assert info.value.message == "down for good"
    assert "gave up after 3 attempts" in info.value.__notes__


async def test_a_non_idempotent_call_is_not_retried(start_mesh: StartMesh) -> None:
    mesh, server = await scripted_mesh(start_mesh)
    server.default["IssueToken"] = Unavailable("down")
    fake = FakeClock()
    async with client(mesh, fake) as sdk:
        with pytest.raises(Unavailable) as info:
            await sdk.auth.issue_token(client_id="a", client_secret="b")
    assert len(server.seen["IssueToken"]) == 1 and fake.sleeps == []
    assert "not idempotent" in info.value.__notes__[0]


async def test_invalid_argument_is_not_retried(start_mesh: StartMesh) -> None:
    mesh, server = await scripted_mesh(start_mesh)
    server.default["GetJwks"] = InvalidArgument("no")
    fake = FakeClock()
    async with client(mesh, fake) as sdk:
        with pytest.raises(InvalidArgument):
            await sdk.auth.get_jwks()
        # Nor is a request the interceptor rejects as invalid, before any handler.
        with pytest.raises(InvalidArgument) as info:
            await sdk.auth.issue_token(client_id="a")
    assert [v.field for v in info.value.field_violations] == ["client_secret"]
    assert len(server.seen["GetJwks"]) == 1 and "IssueToken" not in server.seen
    assert fake.sleeps == []


async def test_retry_info_is_honoured_and_required_for_quota_errors(
    start_mesh: StartMesh,
) -> None:
    mesh, server = await scripted_mesh(start_mesh)
    server.script["GetJwks"] = [
        ResourceExhausted("slow down", retry_delay=0.75),
        Unavailable("restarting", retry_delay=1.25),
    ]
    fake = FakeClock()
    async with client(mesh, fake) as sdk:
        _, call = await sdk.auth.get_jwks.with_call()
        assert call.attempts == 3
        assert fake.sleeps == [0.75, 1.25]
        # Without RetryInfo a quota error is not retried: it may well persist.
        server.script["GetJwks"] = [ResourceExhausted("quota")]
        with pytest.raises(ResourceExhausted):
            await sdk.auth.get_jwks()
    assert len(server.seen["GetJwks"]) == 4


async def test_one_deadline_covers_every_attempt(start_mesh: StartMesh) -> None:
    mesh, server = await scripted_mesh(start_mesh)
    server.default["GetJwks"] = Unavailable("down")
    fake = FakeClock(random=0.99)
    policy = Retry(
        initial=timedelta(milliseconds=100), maximum=timedelta(seconds=5), max_attempts=50
    )
    async with client(mesh, fake, retry=policy) as sdk:
        with pytest.raises(Unavailable) as info:
            await sdk.auth.get_jwks(timeout=1.0)
    seen = server.seen["GetJwks"]
    # Waits of 0.099, 0.198, 0.396 s; the next (0.792 s) would end past the
    # deadline, so the client stops instead of starting a doomed attempt.
    assert fake.sleeps == pytest.approx([0.099, 0.198, 0.396])
    assert len(seen) == 4
    assert "would pass the deadline" in info.value.__notes__[0]
    # Each attempt got what was left of the one deadline, never a fresh second
    # (give or take the ~10 ms by which gRPC's deadline encoding rounds up).
    waited = 0.0
    for attempt, wait in zip(seen, [*fake.sleeps, 0.0], strict=True):
        assert attempt.remaining is not None
        assert attempt.remaining <= 1.0 - waited + 0.02
        waited += wait


async def test_an_attempt_that_outlives_the_deadline_ends_the_call(start_mesh: StartMesh) -> None:
    mesh, server = await scripted_mesh(start_mesh)
    server.default["GetJwks"] = 5.0  # stalls far past the deadline
    async with AsyncClient(config=mesh.config, retry=FAST) as sdk:
        with pytest.raises(DeadlineExceeded):
            await sdk.auth.get_jwks(timeout=0.3)
    # DEADLINE_EXCEEDED is not retried: the one deadline is spent.
    assert len(server.seen["GetJwks"]) == 1
    # The server got the call's deadline (give or take gRPC's encoding round-up).
    assert server.seen["GetJwks"][0].remaining is not None
    assert server.seen["GetJwks"][0].remaining <= 0.3 + 0.02


async def test_throttling_stops_a_retry_storm_and_recovers(start_mesh: StartMesh) -> None:
    mesh, server = await scripted_mesh(start_mesh)
    server.default["GetJwks"] = Unavailable("overloaded")
    fake = FakeClock()
    throttle = RetryThrottle(max_tokens=10, token_ratio=0.1)
    async with client(mesh, fake, throttle=throttle) as sdk:
        for _ in range(20):
            with pytest.raises(Unavailable):
                await sdk.auth.get_jwks()
        # The first call drains the bucket to half (5 attempts); after that,
        # each call makes one attempt: 24, where 20 calls x 5 would be 100.
        assert len(server.seen["GetJwks"]) == 24
        # Successes refill the bucket by 0.1 each. A failure takes its token
        # before the decision, so a retry needs more than 6 tokens beforehand.
        del server.default["GetJwks"]
        for _ in range(60):
            await sdk.auth.get_jwks()
        server.script["GetJwks"] = [Unavailable("blip")]
        with pytest.raises(Unavailable) as info:
            await sdk.auth.get_jwks()  # 6.0 - 1 = 5.0: not above half
        assert "throttled" in info.value.__notes__[0]
        for _ in range(11):
            await sdk.auth.get_jwks()
        server.script["GetJwks"] = [Unavailable("blip")]
        _, call = await sdk.auth.get_jwks.with_call()  # 6.1 - 1 = 5.1: retried
        assert call.attempts == 2


async def test_without_throttling_the_same_storm_makes_every_attempt(
    start_mesh: StartMesh,
) -> None:
    mesh, server = await scripted_mesh(start_mesh)
    server.default["GetJwks"] = Unavailable("overloaded")
    fake = FakeClock()
    async with client(mesh, fake, throttle=None) as sdk:
        for _ in range(20):
            with pytest.raises(Unavailable):
                await sdk.auth.get_jwks()
    assert len(server.seen["GetJwks"]) == 100


async def test_policies_per_call_override_the_clients(start_mesh: StartMesh) -> None:
    mesh, server = await scripted_mesh(start_mesh)
    fake = FakeClock()
    async with client(mesh, fake, retry=NO_RETRY) as sdk:
        server.script["GetJwks"] = [Unavailable("down")]
        with pytest.raises(Unavailable):
            await sdk.auth.get_jwks()
        server.script["GetJwks"] = [Unavailable("down")]
        _, call = await sdk.auth.get_jwks.with_call(retry=FAST)
        assert call.attempts == 2
        server.script["GetJwks"] = [Unavailable("down")]
        with pytest.raises(Unavailable):
            await sdk.auth.get_jwks(retry=None)


async def test_closing_the_client_ends_a_wait_for_a_retry(start_mesh: StartMesh) -> None:
    mesh, server = await scripted_mesh(start_mesh)
    server.default["GetJwks"] = Unavailable("down", retry_delay=30.0)
    waiting = asyncio.Event()

    async def long_wait(delay: float) -> None:
        waiting.set()
        await asyncio.sleep(delay)

    sdk = AsyncClient(config=mesh.config, retry=FAST, clock=Clock(async_sleep=long_wait))
    call = asyncio.ensure_future(sdk.auth.get_jwks(timeout=60))
    await asyncio.wait_for(waiting.wait(), 5)
    await sdk.close()
    with pytest.raises(Unavailable) as info:
        await asyncio.wait_for(call, 5)
    assert "closed while waiting" in info.value.__notes__[-1]


async def test_closing_the_client_during_a_call_cancels_it(start_mesh: StartMesh) -> None:
    mesh, server = await scripted_mesh(start_mesh)
    server.default["GetJwks"] = 30.0  # the server stalls
    sdk = AsyncClient(config=mesh.config)
    call = asyncio.ensure_future(sdk.auth.get_jwks(timeout=60))
    await asyncio.wait_for(server.arrived.wait(), 5)
    await sdk.close()
    with pytest.raises(Cancelled) as info:
        await asyncio.wait_for(call, 5)
    assert info.value.trace_id == server.seen["GetJwks"][0].trace_id
    # Cancelling the caller's own task stays a task cancellation.
    server.arrived.clear()
    sdk = AsyncClient(config=mesh.config)
    call = asyncio.ensure_future(sdk.auth.get_jwks(timeout=60))
    await asyncio.wait_for(server.arrived.wait(), 5)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await sdk.close()


async def test_the_sync_client_retries_the_same_way(start_mesh: StartMesh) -> None:
    mesh, server = await scripted_mesh(start_mesh)
    server.script["GetJwks"] = [Unavailable("down"), Unavailable("down")]
    server.default["IssueToken"] = Unavailable("down")
    fake = FakeClock()

    def run() -> None:
        with Client(config=mesh.config, clock=fake.clock(), retry=FAST) as sdk:
            reply, call = sdk.auth.get_jwks.with_call()
            assert call.attempts == 3 and reply.keys[0].kid == call.trace_id
            with pytest.raises(Unavailable):
                sdk.auth.issue_token(client_id="a", client_secret="b")

    await asyncio.to_thread(run)
    assert len(server.seen["GetJwks"]) == 3 and len(server.seen["IssueToken"]) == 1
    assert fake.sleeps == pytest.approx([0.05, 0.1])
