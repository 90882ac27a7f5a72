"""IAOps's Redis persistence: deployment records, request ids, verification results.

Keys (under ``<prefix>iaops:``):

    deployments              hash  name -> Deployment (proto bytes)
    deployments:by-time      zset  name scored by create time (ns), for newest-first listing
    request:<kind>:<id>      string  the request's fingerprint and what it made, with a TTL
    verification:<id>        string  a VerifyArtifactResponse (proto bytes), with a TTL

A request id is claimed with SET NX before any work, so two concurrent
retries of one request do the work once; the loser reads what the winner
made. Updates are compare-and-set on the etag inside a WATCH transaction.
"""

from __future__ import annotations

import hashlib

import redis.asyncio as aioredis
from redis.exceptions import WatchError

from autoecoops.iaops.v1 import iaops_pb2 as pb
from autoecoops.kernel.mesh.errors import (
    Aborted,
    AlreadyExists,
    FieldViolation,
    InvalidArgument,
    NotFound,
)


def _bytes(raw: bytes | str) -> bytes:
    return raw if isinstance(raw, bytes) else raw.encode()


def etag_of(deployment: pb.Deployment) -> str:
    """A strong etag over the record's content (not its etag field)."""
    copy = pb.Deployment()
    copy.CopyFrom(deployment)
    copy.etag = ""
    return '"' + hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()[:32] + '"'


class IaOpsStore:
    """Deployments and idempotency records in Redis."""

    def __init__(self, redis: aioredis.Redis, prefix: str, request_ttl: float = 86400.0) -> None:
        self.redis = redis
        self.prefix = prefix
        self.request_ttl = max(int(request_ttl), 1)
        self._deployments = f"{prefix}:deployments"
        self._by_time = f"{prefix}:deployments:by-time"

    # -- request ids (AIP-155) -------------------------------------------------

    async def claim(self, kind: str, request_id: str, fingerprint: str, value: str) -> str | None:
        """Claim ``request_id`` for a request with ``fingerprint``; returns None when
        this call claimed it, else the value the first call stored. The same id
        with a different request is INVALID_ARGUMENT (REQUEST_ID_REUSED)."""
        key = f"{self.prefix}:request:{kind}:{request_id}"
        record = f"{fingerprint}|{value}"
        if await self.redis.set(key, record, nx=True, ex=self.request_ttl):
            return None
        raw = await self.redis.get(key)
        if raw is None:  # expired in between: claim again
            return await self.claim(kind, request_id, fingerprint, value)
        stored = raw.decode() if isinstance(raw, bytes) else str(raw)
        old_fp, _, old_value = stored.partition("|")
        if old_fp != fingerprint:
            raise InvalidArgument(
                "request_id was already used for a different request",
                reason="REQUEST_ID_REUSED",
                field_violations=[FieldViolation("request_id", "used for a different request")],
            )
        return old_value

    async def release(self, kind: str, request_id: str) -> None:
        """Forget a claim whose request failed before it made anything."""
        await self.redis.delete(f"{self.prefix}:request:{kind}:{request_id}")

    async def save_verification(self, request_id: str, reply: pb.VerifyArtifactResponse) -> None:
        """Keep a verification result for retries of its request."""
        await self.redis.set(
            f"{self.prefix}:verification:{request_id}",
            reply.SerializeToString(),
            ex=self.request_ttl,
        )

    async def verification(self, request_id: str) -> pb.VerifyArtifactResponse | None:
        """A kept verification result, or None."""
        raw = await self.redis.get(f"{self.prefix}:verification:{request_id}")
        return None if raw is None else pb.VerifyArtifactResponse.FromString(_bytes(raw))

    # -- deployments -------------------------------------------------------------

    async def create(self, deployment: pb.Deployment, created_ns: int) -> pb.Deployment:
        """Store a new record; ALREADY_EXISTS when the name is taken."""
        deployment.etag = etag_of(deployment)
        if not await self.redis.hsetnx(
            self._deployments, deployment.name, deployment.SerializeToString()
        ):
            raise AlreadyExists(
                f"{deployment.name} already exists",
                reason="DEPLOYMENT_EXISTS",
                resource_type="iaops.autoecoops.io/Deployment",
                resource_name=deployment.name,
            )
        await self.redis.zadd(self._by_time, {deployment.name: created_ns})
        return deployment

    async def put(self, deployment: pb.Deployment) -> pb.Deployment:
        """Overwrite the record (the flow's own progress), with a new etag."""
        deployment.etag = etag_of(deployment)
        await self.redis.hset(self._deployments, deployment.name, deployment.SerializeToString())
        return deployment

    async def get(self, name: str) -> pb.Deployment:
        """A record; NOT_FOUND when there is none."""
        raw = await self.redis.hget(self._deployments, name)
        if raw is None:
            raise NotFound(
                f"{name} does not exist",
                reason="DEPLOYMENT_NOT_FOUND",
                resource_type="iaops.autoecoops.io/Deployment",
                resource_name=name,
            )
        return pb.Deployment.FromString(_bytes(raw))

    async def update(self, name: str, etag: str, change: pb.Deployment) -> pb.Deployment:
        """Replace the description and labels if ``etag`` is current; ABORTED if stale."""
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(self._deployments)
                    raw = await pipe.hget(self._deployments, name)
                    if raw is None:
                        await pipe.reset()  # type: ignore[no-untyped-call]
                        return await self.get(name)  # raises NotFound
                    current = pb.Deployment.FromString(_bytes(raw))
                    if etag and etag != current.etag:
                        raise Aborted(
                            f"{name} changed since it was read (etag {etag} is stale; it is now {current.etag})",
                            reason="ETAG_MISMATCH",
                            resource_type="iaops.autoecoops.io/Deployment",
                            resource_name=name,
                        )
                    current.description = change.description
                    current.labels.clear()
                    current.labels.update(change.labels)
                    current.update_time.GetCurrentTime()
                    current.etag = etag_of(current)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.hset(self._deployments, name, current.SerializeToString())
                    await pipe.execute()
                    return current
                except WatchError:
                    continue

    async def page(self, after_score: float | None, size: int) -> list[tuple[str, float]]:
        """Up to ``size`` (name, score) pairs, newest first, older than ``after_score``."""
        top = "+inf" if after_score is None else f"({after_score}"
        rows = await self.redis.zrevrangebyscore(
            self._by_time, top, "-inf", start=0, num=size, withscores=True
        )
        out: list[tuple[str, float]] = []
        for row in rows:
            n, s = row[0], row[1]
            out.append((n.decode() if isinstance(n, bytes) else str(n), float(s)))
        return out

    async def many(self, names: list[str]) -> list[pb.Deployment]:
        """The records of ``names`` that still exist, in order."""
        if not names:
            return []
        raws = await self.redis.hmget(self._deployments, names)
        return [pb.Deployment.FromString(_bytes(r)) for r in raws if r is not None]
