"""kernel/mesh/lease.py against a real Redis: tokens, takeover, and the fenced write."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from autoecoops.kernel.mesh.errors import ConfigError
from autoecoops.kernel.mesh.lease import (
    FencedScript,
    Lease,
    LeaseLost,
    LeaseSettings,
    fenced_transaction,
)
from autoecoops.kernel.mesh.redis import connect

# KEYS[2]: a hash; ARGV[2]: the value. What a guarded store write looks like.
WRITE = """
redis.call('HSET', KEYS[2], 'v', ARGV[2])
return 1
"""
SHORT = LeaseSettings(ttl=0.3, renew=0.1)


@pytest.fixture
async def r(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = connect(redis_url)
    yield client
    await client.aclose()


async def lapse(lease: Lease) -> None:
    """Wait until Redis has expired ``lease`` (a paused holder's view of time)."""
    for _ in range(200):
        if not await lease.redis.exists(lease.key):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{lease.key} never expired")


async def test_tokens_strictly_increase_each_time_the_lease_changes_hands(
    r: aioredis.Redis, key_prefix: str
) -> None:
    key = f"{key_prefix}svc:thing:{{t}}:lease"
    a, b = Lease(r, key, "a", SHORT), Lease(r, key, "b", SHORT)
    assert await a.acquire()
    first = a.token
    assert not await b.acquire() and b.token == 0  # held by a
    assert await a.acquire() and a.token == first  # extending keeps the token
    assert await a.renew()
    await lapse(a)
    assert await b.acquire() and b.token > first
    assert await b.holder() == "b"
    assert not await a.renew() and a.token == 0  # a learns it lost it
    await b.release()
    assert await b.holder() == ""
    assert await a.acquire() and a.token > first + 1  # back to a: a new token again


async def test_a_paused_holders_write_is_refused_after_its_lease_moved(
    r: aioredis.Redis, key_prefix: str
) -> None:
    key = f"{key_prefix}svc:thing:{{t}}:lease"
    data = f"{key_prefix}svc:thing:{{t}}"
    write = FencedScript(r, WRITE)
    old, new = Lease(r, key, "old", SHORT), Lease(r, key, "new", SHORT)
    assert await old.acquire()
    stale = old.fence
    assert await write(stale, [data], ["old-1"]) == 1
    await lapse(old)  # old is "paused" past its TTL; new takes over
    assert await new.acquire()
    await write(new.fence, [data], ["new-1"])
    with pytest.raises(LeaseLost) as err:
        await write(stale, [data], ["old-late"])  # the late write of the paused holder
    assert err.value.reason == "LEASE_LOST" and err.value.metadata["token"] == str(stale.token)
    assert await r.hget(data, "v") == b"new-1"  # nothing of the refused write landed
    # Even re-taking the lease does not make an old token good again.
    await new.release()
    assert await old.acquire()
    with pytest.raises(LeaseLost):
        await write(stale, [data], ["old-late"])
    await write(old.fence, [data], ["old-2"])
    assert await r.hget(data, "v") == b"old-2"


async def test_a_lost_fence_counter_refuses_every_outstanding_token(
    r: aioredis.Redis, key_prefix: str
) -> None:
    # A failover that lost the INCR, or an operator's DEL: the counter went back,
    # so an old token is above it. Equality (not >=) refuses that token.
    key = f"{key_prefix}svc:{{t}}:lease"
    write = FencedScript(r, WRITE)
    a = Lease(r, key, "a", SHORT)
    for _ in range(3):
        assert await a.acquire()
        await a.release()
    assert await a.acquire()
    high = a.fence
    await r.delete(key, a.fence_key)
    b = Lease(r, key, "b", SHORT)
    assert await b.acquire() and b.token == 1
    with pytest.raises(LeaseLost):
        await write(high, [f"{key_prefix}svc:{{t}}"], ["x"])


async def test_kept_renews_while_the_block_runs_and_cancels_it_when_lost(
    r: aioredis.Redis, key_prefix: str
) -> None:
    key = f"{key_prefix}svc:{{t}}:lease"
    a = Lease(r, key, "a", SHORT)
    assert await a.acquire()
    async with a.kept():
        await asyncio.sleep(SHORT.ttl * 3)  # outlives the TTL thanks to renewals
        assert await a.holder() == "a"
    assert await a.holder() == ""  # released at the end
    assert await a.acquire()

    async def held_forever() -> None:
        async with a.kept():
            await r.delete(key)  # someone removed it: the next renewal finds it gone
            await asyncio.sleep(30)

    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(held_forever(), timeout=10)
    assert a.token == 0
    with pytest.raises(LeaseLost):
        _ = a.fence


def test_settings_come_from_the_environment_and_are_checked() -> None:
    assert LeaseSettings.from_env({}) == LeaseSettings(ttl=15.0, renew=5.0)
    got = LeaseSettings.from_env(
        {"AUTOECOOPS_LEASE_TTL_SECONDS": "3", "AUTOECOOPS_LEASE_RENEW_SECONDS": "0.5"}
    )
    assert got == LeaseSettings(ttl=3.0, renew=0.5)
    assert LeaseSettings.from_env({"AUTOECOOPS_LEASE_TTL_SECONDS": "6"}).renew == 2.0
    with pytest.raises(ConfigError, match="LEASE_RENEW_SECONDS"):
        LeaseSettings.from_env(
            {"AUTOECOOPS_LEASE_TTL_SECONDS": "2", "AUTOECOOPS_LEASE_RENEW_SECONDS": "2"}
        )
    with pytest.raises(ConfigError, match="LEASE_TTL_SECONDS"):
        LeaseSettings.from_env({"AUTOECOOPS_LEASE_TTL_SECONDS": "soon"})


async def test_a_fenced_transaction_is_refused_for_a_stale_token(
    r: aioredis.Redis, key_prefix: str
) -> None:
    key = f"{key_prefix}svc:{{t}}:lease"
    data = f"{key_prefix}svc:{{t}}"
    old, new = Lease(r, key, "old", SHORT), Lease(r, key, "new", SHORT)
    assert await old.acquire()
    stale = old.fence
    assert await fenced_transaction(r, stale, lambda p: p.hset(data, "v", "old")) == [1]
    await lapse(old)
    assert await new.acquire()
    with pytest.raises(LeaseLost):
        await fenced_transaction(r, stale, lambda p: p.hset(data, "v", "late"))
    await fenced_transaction(r, new.fence, lambda p: p.hset(data, "v", "new"))
    assert await r.hget(data, "v") == b"new"
