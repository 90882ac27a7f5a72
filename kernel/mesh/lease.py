"""Leases with fencing tokens: what must run once among replicas runs once.

A ``Lease`` is a Redis key holding its owner's id with a TTL, beside a fence
counter (``<key>:fence``) that is INCRemented each time the lease is taken
by someone who did not hold it: the counter's value is the holder's
*fencing token*, and it strictly increases each time the lease changes hands.

Holding the lease is not enough to act safely: a holder paused longer than
the TTL (a GC pause, a stopped VM, a slow disk) still believes it holds it
while another replica has taken it over. So every write the lease guards is
a ``FencedScript``: its Lua script first compares the writer's token with
the fence counter, in the same script as the write, and refuses the write
(``LeaseLost``) when they differ. The check runs on the store, atomically
with the write; a check in Python before writing would race the takeover.

The token must *equal* the counter (not merely be at least it): tokens are
only ever handed out from the counter, so a token above it means the counter
was lost (a failover before replication, an operator's DEL), and both the
old and a new holder could then hold that number.

Keys: the fence is ``<key>:fence``, so a lease key with a hash tag
(``app:{web}:lock``) keeps its fence, and the data the caller derives from
the same tag, in one Redis Cluster slot; every script here touches one slot.

Settings (mesh-wide, read with the one config loader):

- ``AUTOECOOPS_LEASE_TTL_SECONDS`` (15): how long a lease outlives its last
  renewal, i.e. how long a dead replica's work waits before another takes it.
- ``AUTOECOOPS_LEASE_RENEW_SECONDS`` (5): how often a holder renews; less
  than the TTL, so a renewal or two may fail (a Redis blip) without losing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from autoecoops.kernel.mesh.backoff import Backoff
from autoecoops.kernel.mesh.config import PREFIX, read_seconds
from autoecoops.kernel.mesh.errors import Aborted, ConfigError

log = logging.getLogger("autoecoops.mesh.lease")

#: The error reply a fenced script gives for a stale token.
FENCED = "LEASE_LOST"

# KEYS: lease, fence. ARGV: owner, ttl ms. The holder's token (taken or kept), 0 if held by another.
_ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  local t = tonumber(redis.call('GET', KEYS[2]) or '0')
  if t > 0 then return t end
  return redis.call('INCR', KEYS[2])
end
if cur then return 0 end
local t = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return t
"""
# KEYS: lease, fence. ARGV: owner, ttl ms, token. 1 if still held with that token, else 0.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(redis.call('GET', KEYS[2]) or '0') ~= tonumber(ARGV[3]) then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
# KEYS: lease. ARGV: owner.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
#: Prepended to a fenced script: KEYS[1] is the fence, ARGV[1] the writer's token.
_FENCE_CHECK = f"""
local fence = tonumber(redis.call('GET', KEYS[1]) or '0')
if fence ~= tonumber(ARGV[1]) then
  return redis.error_reply('{FENCED} token ' .. ARGV[1] .. ' is not the fence ' .. fence)
end
"""


@dataclass(frozen=True, slots=True)
class LeaseSettings:
    """How long leases live and how often holders renew them (mesh-wide)."""

    #: Seconds a lease outlives its last renewal (``AUTOECOOPS_LEASE_TTL_SECONDS``).
    ttl: float = 15.0
    #: Seconds between renewals (``AUTOECOOPS_LEASE_RENEW_SECONDS``); below ``ttl``.
    renew: float = 5.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LeaseSettings:
        """Read and validate; a bad value fails start with one line."""
        env = os.environ if env is None else env
        d = cls()
        ttl = read_seconds(env, f"{PREFIX}LEASE_TTL_SECONDS", d.ttl, 3600)
        if ttl < 0.1:
            raise ConfigError(f"{PREFIX}LEASE_TTL_SECONDS={ttl:g}: at least 0.1 seconds")
        renew = read_seconds(env, f"{PREFIX}LEASE_RENEW_SECONDS", min(d.renew, ttl / 3), 3600)
        if not 0 < renew < ttl:
            raise ConfigError(
                f"{PREFIX}LEASE_RENEW_SECONDS={renew:g}: must be more than 0 and less than "
                f"{PREFIX}LEASE_TTL_SECONDS ({ttl:g})"
            )
        return cls(ttl=ttl, renew=renew)


class LeaseLost(Aborted):
    """A write guarded by a lease was refused: the writer's lease moved to another holder."""

    default_reason = "LEASE_LOST"


@dataclass(frozen=True, slots=True)
class Fence:
    """Proof of holding a lease: its fence key and the holder's token."""

    key: str
    token: int


def process_owner(tag: str = "") -> str:
    """An owner id unique to this process (and ``tag``), readable in ``redis-cli``."""
    return f"{socket.gethostname()}-{os.getpid()}" + (f"-{tag}" if tag else "")


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class Lease:
    """One lease: ``acquire`` (take or extend), ``renew``, ``release``, and ``fence``.

    Not shared between tasks that hold it independently: one ``Lease`` object
    per holder (its ``owner``); several objects may name the same key.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        key: str,
        owner: str,
        settings: LeaseSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.key = key
        self.fence_key = key + ":fence"
        self.owner = owner
        self.settings = settings or LeaseSettings()
        self._clock = clock
        #: The token while held (0: not held, as far as this holder knows).
        self.token = 0
        #: When the lease surely lapses if not renewed (this process's clock).
        self.expires = 0.0
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)

    @property
    def ttl_ms(self) -> int:
        """The TTL in milliseconds, as Redis takes it."""
        return max(1, int(self.settings.ttl * 1000))

    @property
    def held(self) -> bool:
        """Whether this holder holds it now, as far as it can know without asking Redis."""
        return self.token > 0 and self._clock() < self.expires

    @property
    def fence(self) -> Fence:
        """The fence to pass to guarded writes; ``LeaseLost`` if not held."""
        if self.token <= 0:
            raise LeaseLost(f"lease {self.key} is not held by {self.owner}", reason="LEASE_LOST")
        return Fence(self.fence_key, self.token)

    async def acquire(self) -> bool:
        """Take the lease, or extend it if already ours; False if another holds it."""
        started = self._clock()
        token = int(
            await self._acquire(keys=[self.key, self.fence_key], args=[self.owner, self.ttl_ms])
        )
        if token <= 0:
            self.token, self.expires = 0, 0.0
            return False
        if token != self.token and self.token:
            log.info("lease %s re-taken by %s with token %d", self.key, self.owner, token)
        self.token = token
        # Counted from before the call: the TTL ran from somewhere during it.
        self.expires = started + self.settings.ttl
        return True

    async def acquire_within(self, seconds: float) -> bool:
        """``acquire``, retrying with backoff for up to ``seconds`` while another holds it."""
        end = self._clock() + seconds
        backoff = Backoff(0.02, min(0.5, self.settings.renew))
        while not await self.acquire():
            left = end - self._clock()
            if left <= 0:
                return False
            await asyncio.sleep(min(backoff.next(), left))
        return True

    async def renew(self) -> bool:
        """Extend the lease if still ours with the same token; False (and forget it) if not."""
        if self.token <= 0:
            return False
        started = self._clock()
        ok = int(
            await self._renew(
                keys=[self.key, self.fence_key], args=[self.owner, self.ttl_ms, self.token]
            )
        )
        if not ok:
            log.warning("lease %s (token %d) was lost by %s", self.key, self.token, self.owner)
            self.token, self.expires = 0, 0.0
            return False
        self.expires = started + self.settings.ttl
        return True

    async def release(self) -> None:
        """Give the lease up if ours (the fence stays: tokens never go back)."""
        token, self.token, self.expires = self.token, 0, 0.0
        if token:
            await self._release(keys=[self.key], args=[self.owner])

    async def holder(self) -> str:
        """Who holds the lease now ('' when nobody does)."""
        raw = await self.redis.get(self.key)
        return _text(raw) if raw else ""

    @contextlib.asynccontextmanager
    async def kept(self, on_lost: Callable[[], Any] | None = None) -> AsyncIterator[Lease]:
        """Renew the lease in the background while the block runs, then release it.

        Must be entered holding it. When it is lost (renewal refused, or no
        renewal succeeded for a whole TTL), ``on_lost`` is called (default:
        cancel the task running the block): the block's guarded writes
        would be refused anyway, and whatever it does outside Redis should stop.
        """
        if not self.token:
            raise LeaseLost(f"lease {self.key} is not held by {self.owner}", reason="LEASE_LOST")
        task = asyncio.current_task()

        def lost() -> None:
            if on_lost is not None:
                on_lost()
            elif task is not None:
                task.cancel()

        keeper = asyncio.create_task(self._keep(lost), name=f"lease:{self.key}")
        try:
            yield self
        finally:
            keeper.cancel()
            with contextlib.suppress(BaseException):
                await keeper
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                await self.release()

    async def _keep(self, lost: Callable[[], None]) -> None:
        while True:
            await asyncio.sleep(self.settings.renew)
            try:
                if await self.renew():
                    continue
            except (redis.exceptions.RedisError, OSError) as err:
                # Redis unreachable: the lease may still be ours; keep trying until it lapses.
                if self._clock() < self.expires:
                    log.warning("renewing lease %s failed (%s); retrying", self.key, err)
                    continue
                self.token, self.expires = 0, 0.0
            lost()
            return


class FencedScript:
    """A Lua write that runs only for the current holder of a lease.

    Its body sees the caller's keys from ``KEYS[2]`` and arguments from
    ``ARGV[2]`` on (``KEYS[1]``/``ARGV[1]`` are the fence and the token).
    A stale token makes the call raise ``LeaseLost`` with nothing written.
    """

    def __init__(self, redis: aioredis.Redis, body: str) -> None:
        self.script = redis.register_script(_FENCE_CHECK + body)

    async def __call__(self, fence: Fence, keys: Sequence[str], args: Sequence[Any] = ()) -> Any:
        """Run the write with ``fence``'s token."""
        try:
            return await self.script(keys=[fence.key, *keys], args=[fence.token, *args])
        except redis.exceptions.ResponseError as err:
            if FENCED in str(err):
                raise LeaseLost(
                    f"a write guarded by {fence.key} was refused: {err}",
                    reason="LEASE_LOST",
                    metadata={"fence": fence.key, "token": str(fence.token)},
                ) from None
            raise


async def fenced_transaction(
    client: aioredis.Redis, fence: Fence, build: Callable[[Any], None]
) -> list[Any]:
    """Run the commands ``build`` queues on a MULTI/EXEC pipeline, only for the lease's
    current holder: WATCH the fence, compare it with the token, then EXEC, which
    Redis refuses if the fence changed in between. ``LeaseLost`` when refused.

    The MULTI/EXEC form of ``FencedScript``, for writes already written as
    pipelines; the fence must share the written keys' Redis Cluster slot.
    """
    async with client.pipeline(transaction=True) as pipe:
        await pipe.watch(fence.key)
        raw = await pipe.get(fence.key)
        current = int(raw or 0)
        if current != fence.token:
            raise LeaseLost(
                f"a write guarded by {fence.key} was refused: token {fence.token} is not "
                f"the fence {current}",
                reason="LEASE_LOST",
                metadata={"fence": fence.key, "token": str(fence.token)},
            )
        pipe.multi()  # type: ignore[no-untyped-call]
        build(pipe)
        try:
            return list(await pipe.execute())
        except redis.exceptions.WatchError:
            raise LeaseLost(
                f"a write guarded by {fence.key} was refused: the lease moved while writing",
                reason="LEASE_LOST",
                metadata={"fence": fence.key, "token": str(fence.token)},
            ) from None
