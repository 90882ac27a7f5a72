"""autoops's Redis persistence: every key the platform reads or writes.

Layout under ``<prefix>autoops:``::

    slos                       hash  name -> Slo (protobuf)
    runbooks                   hash  name -> Runbook
    alerts                     hash  name -> Alert
    alerts:time                zset  name scored by fire time (newest first listing)
    alertstate:<slo>           hash  row index -> alert name of the firing episode
    remediations               hash  name -> Remediation
    remediations:time          zset  name scored by create time
    remediations:active        set   names not yet ended (resumed after a restart)
    remediation:<name>:steps   hash  step index -> "started" | "done" (never run a step twice)
    remediation:<name>:lease   string the replica running it, with a TTL (kernel/mesh/lease.py);
                               its fencing counter is remediation:<name>:lease:fence
    lease:evaluate(:fence)     the lease of the one SLO evaluation running at a time
    tick                       server time (ms) the last evaluation pass of the loop started
    targets:<target>           zset  remediation start times (rate limit, cooldown)
    sli:<slo>:m / sli:<slo>:h  hash  g<bucket>/t<bucket> -> good/total events per minute/hour
    sli:index                  zset  slo -> last write (retention sweeps)
    req:<method>:<request_id>  string the first response of a non-idempotent call (AIP-155)

Pushed samples go into both tiers at once (downsampling at ingest): minute
buckets for the short windows, hour buckets for the long ones and the period,
each trimmed to its own retention.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from google.protobuf import message

from autoecoops.autoops.v1 import autoops_pb2 as pb
from autoecoops.kernel.mesh.errors import Aborted, FieldViolation, InvalidArgument, NotFound
from autoecoops.kernel.mesh.lease import Fence, FencedScript

M = TypeVar("M", bound=message.Message)
FINE = 60
COARSE = 3600

# Adds pushed samples to both tiers once per request id.
# KEYS: req, fine hash, coarse hash, index zset; ARGV: ttl, slo, now, nfine, fine pairs..., coarse pairs...
_RECORD = """
if KEYS[1] ~= '' and ARGV[1] ~= '0' then
  if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return -1 end
end
local nfine = tonumber(ARGV[4])
local i = 5
for _ = 1, nfine do
  redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1])
  i = i + 2
end
while i <= #ARGV do
  redis.call('HINCRBY', KEYS[3], ARGV[i], ARGV[i + 1])
  i = i + 2
end
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[2])
return 1
"""

# Claims the loop's pass for this interval, on the server's clock (replicas'
# clocks may differ). KEYS: tick. ARGV: interval ms. 0 when claimed, else ms to wait.
_CLAIM_TICK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
local interval = tonumber(ARGV[1])
if last > 0 and now - last < interval and now >= last then return interval - (now - last) end
redis.call('SET', KEYS[1], now, 'PX', interval * 10)
return 0
"""
# A fenced alert write. KEYS: alerts, alerts:time, alertstate:<slo>.
# ARGV: alert name, alert bytes, fire time, row, firing (1/0).
_SAVE_ALERT = """
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
if ARGV[6] == '1' then
  redis.call('HSET', KEYS[4], ARGV[5], ARGV[2])
else
  redis.call('HDEL', KEYS[4], ARGV[5])
end
return 1
"""
# A fenced remediation write. KEYS: remediations, remediations:time, remediations:active.
# ARGV: name, bytes, create time, active (1/0).
_SAVE_REMEDIATION = """
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
if ARGV[5] == '1' then
  redis.call('SADD', KEYS[4], ARGV[2])
else
  redis.call('SREM', KEYS[4], ARGV[2])
end
return 1
"""
# A fenced step claim: 1 when the step was not started before. KEYS: steps. ARGV: index.
_CLAIM_STEP = """
return redis.call('HSETNX', KEYS[2], ARGV[2], 'started')
"""
# A fenced step mark. KEYS: remediation:<name>:steps. ARGV: index, mark.
_MARK_STEP = """
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
"""


def etag_of(msg: message.Message) -> str:
    """A fresh etag for a resource's stored form (its etag field excluded)."""
    raw = msg.SerializeToString(deterministic=True)
    return hashlib.sha256(raw + str(time.time_ns()).encode()).hexdigest()[:16]


def _bytes(raw: Any) -> bytes:
    """A Redis reply value as bytes (the client runs without decode_responses)."""
    return raw if isinstance(raw, bytes) else str(raw).encode()


def _text(raw: Any) -> str:
    """A Redis reply value as str."""
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def not_found(kind: str, name: str) -> NotFound:
    """NOT_FOUND naming the resource."""
    return NotFound(
        f"{kind} {name!r} does not exist",
        reason=f"{kind.upper()}_NOT_FOUND",
        resource_type=f"autoops.autoecoops.io/{kind.capitalize()}",
        resource_name=name,
    )


def check_etag(given: str, current: str, name: str) -> None:
    """ABORTED when ``given`` is set and stale (AIP-154)."""
    if given and given != current:
        raise Aborted(
            f"{name} changed since it was read (etag {given!r} is not the current one); read it again",
            reason="ETAG_MISMATCH",
            metadata={"current_etag": current},
            resource_name=name,
        )


class AutoOpsStore:
    """All of autoops's Redis state."""

    def __init__(self, redis: aioredis.Redis, prefix: str, fine: int = FINE) -> None:
        self.redis = redis
        self.prefix = prefix  # e.g. "autoecoops:autoops"
        #: Seconds per fine bucket (60; tests of the closed loop use 1).
        self.fine = fine
        self._record = redis.register_script(_RECORD)
        self._claim_tick = redis.register_script(_CLAIM_TICK)
        self._save_alert = FencedScript(redis, _SAVE_ALERT)
        self._save_remediation = FencedScript(redis, _SAVE_REMEDIATION)
        self._mark_step = FencedScript(redis, _MARK_STEP)
        self._claim_step = FencedScript(redis, _CLAIM_STEP)

    def key(self, *parts: str) -> str:
        """``<prefix>:<parts>``."""
        return ":".join([self.prefix, *parts])

    # -- resources stored as protobuf in a hash ------------------------------

    async def get(self, collection: str, name: str, cls: type[M]) -> M:
        """The stored resource, or NOT_FOUND."""
        raw = await self.redis.hget(self.key(collection), name)
        if raw is None:
            raise not_found(collection.rstrip("s"), name)
        return cls.FromString(_bytes(raw))

    async def find(self, collection: str, name: str, cls: type[M]) -> M | None:
        """The stored resource or None."""
        raw = await self.redis.hget(self.key(collection), name)
        return None if raw is None else cls.FromString(_bytes(raw))

    async def create(self, collection: str, name: str, msg: message.Message) -> bool:
        """Store a new resource; False if the name is taken."""
        return bool(await self.redis.hsetnx(self.key(collection), name, msg.SerializeToString()))

    async def put(self, collection: str, name: str, msg: message.Message) -> None:
        """Store (replace) a resource."""
        await self.redis.hset(self.key(collection), name, msg.SerializeToString())

    async def compare_and_put(
        self, collection: str, name: str, msg: message.Message, expected_etag: str, cls: type[M]
    ) -> None:
        """Replace a resource only while its etag is still ``expected_etag`` (WATCH/MULTI)."""
        key = self.key(collection)
        async with self.redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(key)
                raw = await pipe.hget(key, name)
                if raw is None:
                    raise not_found(collection.rstrip("s"), name)
                current = cls.FromString(_bytes(raw))
                check_etag(expected_etag, getattr(current, "etag", ""), name)
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.hset(key, name, msg.SerializeToString())
                await pipe.execute()
            except aioredis.WatchError:
                raise Aborted(
                    f"{name} changed while it was being updated; read it again",
                    reason="CONCURRENT_UPDATE",
                    resource_name=name,
                ) from None

    async def delete(self, collection: str, name: str) -> bool:
        """Delete a resource; False if it did not exist."""
        return bool(await self.redis.hdel(self.key(collection), name))

    async def all(self, collection: str, cls: type[M]) -> list[M]:
        """Every resource of a collection."""
        raw = await self.redis.hgetall(self.key(collection))
        return [cls.FromString(_bytes(v)) for v in raw.values()]

    async def many(self, collection: str, names: Sequence[str], cls: type[M]) -> list[M]:
        """The named resources that exist, in order."""
        if not names:
            return []
        raw = await self.redis.hmget(self.key(collection), list(names))
        return [cls.FromString(_bytes(v)) for v in raw if v is not None]

    # -- AIP-155 request ids -------------------------------------------------

    async def once(
        self,
        method: str,
        request_id: str,
        fingerprint: bytes,
        run: Callable[[], Awaitable[M]],
        cls: type[M],
        ttl: int = 86400,
    ) -> M:
        """Run ``run`` once per ``request_id``; a retry gets the first response."""
        if not request_id:
            return await run()
        if len(request_id) > 128 or not request_id.isprintable():
            raise InvalidArgument(
                "request_id must be at most 128 printable characters",
                reason="INVALID_REQUEST_ID",
                field_violations=[FieldViolation("request_id", "at most 128 printable characters")],
            )
        key = self.key("req", method, request_id)
        digest = hashlib.sha256(fingerprint).hexdigest()[:32].encode()
        if not await self.redis.set(key, b"P" + digest, nx=True, ex=120):
            got = await self.redis.get(key)
            if got is None:
                raise Aborted(
                    "the first call with this request_id just ended; retry", reason="RETRY"
                )
            raw = _bytes(got)
            if raw[1:33] != digest:
                raise InvalidArgument(
                    f"request_id {request_id!r} was already used for a different request",
                    reason="REQUEST_ID_REUSED",
                    field_violations=[FieldViolation("request_id", "already used")],
                )
            if raw[:1] == b"P":
                raise Aborted(
                    f"a call with request_id {request_id!r} is still in progress",
                    reason="REQUEST_IN_PROGRESS",
                    retry_delay=1.0,
                )
            return cls.FromString(raw[33:])
        try:
            result = await run()
        except BaseException:
            await self.redis.delete(key)
            raise
        await self.redis.set(key, b"D" + digest + result.SerializeToString(), ex=ttl)
        return result

    # -- pushed SLI buckets --------------------------------------------------

    async def record(
        self,
        slo: str,
        samples: Iterable[tuple[float, int, int]],
        request_id: str,
        now: float,
        *,
        dedup_ttl: int = 86400,
    ) -> bool:
        """Add (time, good, total) samples to both tiers; False when ``request_id`` was seen."""
        fine: dict[str, int] = {}
        coarse: dict[str, int] = {}
        for t, good, total in samples:
            fb, cb = int(t // self.fine), int(t // COARSE)
            for tier, b in ((fine, fb), (coarse, cb)):
                if good:
                    tier[f"g{b}"] = tier.get(f"g{b}", 0) + good
                tier[f"t{b}"] = tier.get(f"t{b}", 0) + total
        args: list[str | int | float] = [dedup_ttl if request_id else 0, slo, now, len(fine)]
        for pairs in (fine, coarse):
            for k, v in pairs.items():
                args += [k, v]
        # Without a request id the key is unused (TTL 0), but named in the store's slot:
        # an empty key would be another slot on a Redis Cluster.
        req = self.key("req", "RecordSli", slo, request_id or "-")
        keys = [req, self.key("sli", slo, "m"), self.key("sli", slo, "h"), self.key("sli", "index")]
        return int(await self._record(keys=keys, args=args)) == 1

    async def buckets(self, slo: str, tier: str) -> dict[int, tuple[int, int]]:
        """bucket -> (good, total) of one tier ("m" or "h")."""
        raw = await self.redis.hgetall(self.key("sli", slo, tier))
        out: dict[int, list[int]] = {}
        for k, v in raw.items():
            ks = k.decode() if isinstance(k, bytes) else k
            slot = out.setdefault(int(ks[1:]), [0, 0])
            slot[0 if ks[0] == "g" else 1] += int(v)
        return {b: (g, t) for b, (g, t) in out.items()}

    async def dense(
        self, slo: str, tier: str, size: int, last: int, span: int
    ) -> tuple[list[int], list[int]]:
        """(goods, totals) of the ``span`` buckets ending at ``last``, oldest first:
        one HMGET of exactly those fields, however long the tier's retention."""
        if span <= 0:
            return [], []
        first = last - span + 1
        fields = [f"g{b}" for b in range(first, last + 1)] + [
            f"t{b}" for b in range(first, last + 1)
        ]
        values = await self.redis.hmget(self.key("sli", slo, tier), fields)
        nums = [int(v) if v is not None else 0 for v in values]
        return nums[:span], nums[span:]

    async def trim(self, slo: str, now: float, fine_keep: float, coarse_keep: float) -> int:
        """Drop buckets past their tier's retention; the number of fields removed."""
        removed = 0
        for tier, size, keep in (("m", self.fine, fine_keep), ("h", COARSE, coarse_keep)):
            key = self.key("sli", slo, tier)
            oldest = int((now - keep) // size)
            fields = [
                f
                for f in await self.redis.hkeys(key)
                if int((f.decode() if isinstance(f, bytes) else f)[1:]) < oldest
            ]
            if fields:
                removed += int(await self.redis.hdel(key, *fields))
        return removed

    async def drop_slo_data(self, slo: str) -> None:
        """Delete an SLO's buckets and alert state."""
        await self.redis.delete(
            self.key("sli", slo, "m"), self.key("sli", slo, "h"), self.key("alertstate", slo)
        )
        await self.redis.zrem(self.key("sli", "index"), slo)

    # -- alerts --------------------------------------------------------------

    async def alert_state(self, slo: str) -> dict[int, str]:
        """row index -> the firing alert's name."""
        raw = await self.redis.hgetall(self.key("alertstate", slo))
        return {int(k): (v.decode() if isinstance(v, bytes) else v) for k, v in raw.items()}

    async def save_alert(
        self, alert: pb.Alert, slo: str, row: int, fence: Fence | None = None
    ) -> None:
        """Store an alert and whether its row is firing; with ``fence``, only while the
        evaluation lease is still the writer's (``LeaseLost`` otherwise, nothing written)."""
        if fence is not None:
            await self._save_alert(
                fence,
                [self.key("alerts"), self.key("alerts", "time"), self.key("alertstate", slo)],
                [
                    alert.name,
                    alert.SerializeToString(),
                    alert.fire_time.ToNanoseconds() / 1e9,
                    str(row),
                    "1" if alert.state == pb.ALERT_STATE_FIRING else "0",
                ],
            )
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.key("alerts"), alert.name, alert.SerializeToString())
            pipe.zadd(
                self.key("alerts", "time"), {alert.name: alert.fire_time.ToNanoseconds() / 1e9}
            )
            if alert.state == pb.ALERT_STATE_FIRING:
                pipe.hset(self.key("alertstate", slo), str(row), alert.name)
            else:
                pipe.hdel(self.key("alertstate", slo), str(row))
            await pipe.execute()

    async def alert_names(self) -> list[str]:
        """Every alert's name, newest first."""
        raw = await self.redis.zrevrange(self.key("alerts", "time"), 0, -1)
        return [_text(r) for r in raw]

    # -- remediations --------------------------------------------------------

    async def save_remediation(
        self, rem: pb.Remediation, active: bool, fence: Fence | None = None
    ) -> None:
        """Store a remediation and whether it still has to run; with ``fence``, only while
        the remediation's lease is still the writer's (``LeaseLost`` otherwise)."""
        if fence is not None:
            await self._save_remediation(
                fence,
                [
                    self.key("remediations"),
                    self.key("remediations", "time"),
                    self.key("remediations", "active"),
                ],
                [
                    rem.name,
                    rem.SerializeToString(),
                    rem.create_time.ToNanoseconds() / 1e9,
                    "1" if active else "0",
                ],
            )
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.key("remediations"), rem.name, rem.SerializeToString())
            pipe.zadd(
                self.key("remediations", "time"), {rem.name: rem.create_time.ToNanoseconds() / 1e9}
            )
            if active:
                pipe.sadd(self.key("remediations", "active"), rem.name)
            else:
                pipe.srem(self.key("remediations", "active"), rem.name)
            await pipe.execute()

    async def active_remediations(self) -> list[str]:
        """Remediations not yet ended."""
        raw = await self.redis.smembers(self.key("remediations", "active"))
        return sorted(r.decode() if isinstance(r, bytes) else r for r in raw)

    async def remediation_names(self) -> list[str]:
        """Every remediation's name, newest first."""
        raw = await self.redis.zrevrange(self.key("remediations", "time"), 0, -1)
        return [_text(r) for r in raw]

    async def claim_step(self, rem: str, index: int, fence: Fence | None = None) -> bool:
        """Mark a step started; False if it was started before (so never run it twice).
        With ``fence``, only while the remediation's lease is the caller's."""
        if fence is not None:
            key = self.key("remediation", rem, "steps")
            return bool(await self._claim_step(fence, [key], [index]))
        return bool(
            await self.redis.hsetnx(self.key("remediation", rem, "steps"), str(index), "started")
        )

    async def finish_step(self, rem: str, index: int, fence: Fence | None = None) -> None:
        """Mark a claimed step finished (with ``fence``: only while holding the lease)."""
        if fence is not None:
            await self._mark_step(fence, [self.key("remediation", rem, "steps")], [index, "done"])
            return
        await self.redis.hset(self.key("remediation", rem, "steps"), str(index), "done")

    def remediation_lease(self, rem: str) -> str:
        """The key of the lease of the replica running remediation ``rem``."""
        return self.key("remediation", rem, "lease")

    def evaluation_lease(self) -> str:
        """The key of the lease of the one SLO evaluation running at a time."""
        return self.key("lease", "evaluate")

    async def claim_tick(self, interval: float) -> float:
        """Claim the loop's evaluation pass of this interval: 0 when this caller has it,
        else the seconds until the next one may start (another replica had this one)."""
        wait = int(await self._claim_tick(keys=[self.key("tick")], args=[int(interval * 1000)]))
        return wait / 1000

    async def step_marks(self, rem: str) -> dict[int, str]:
        """step index -> "started" | "done"."""
        raw = await self.redis.hgetall(self.key("remediation", rem, "steps"))
        return {int(k): (v.decode() if isinstance(v, bytes) else v) for k, v in raw.items()}

    async def note_target_run(self, target: str, now: float) -> None:
        """Remember that a remediation of ``target`` started (rate limit, cooldown)."""
        key = self.key("targets", target)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(key, {f"{now:.6f}": now})
            pipe.zremrangebyscore(key, 0, now - 7 * 86400)
            pipe.expire(key, 7 * 86400)
            await pipe.execute()

    async def target_runs(self, target: str, since: float) -> list[float]:
        """Start times of remediations of ``target`` since ``since``."""
        raw = await self.redis.zrangebyscore(
            self.key("targets", target), since, "+inf", withscores=True
        )
        return [float(pair[1]) for pair in raw]
