"""infra-manager's Redis persistence: applications, status, operations, history.

Keys (``<prefix>infra-manager:`` first; one hash tag per application, so an
application's keys share a Redis Cluster slot):

- ``apps``: sorted set of application names (paging by name);
- ``app:{<name>}``: hash with ``spec``, ``status``, ``op`` (the current or last
  operation), ``auto`` (the last automated sync: revision and outcome) and
  ``next_id`` (the history id counter);
- ``app:{<name>}:history``: list of history entries, newest first, trimmed to
  the application's limit;
- ``app:{<name>}:manifests:<digest>``: the manifests a history entry
  deployed (zlib-compressed JSON), deleted with the last entry using them;
- ``app:{<name>}:lock``: the running operation's id, with a lease.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import redis.asyncio as aioredis

from autoecoops.kernel.infra_manager.manifests import Document
from autoecoops.kernel.infra_manager.model import Application, AppStatus, HistoryEntry, Operation
from autoecoops.kernel.mesh.errors import AlreadyExists, NotFound

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)


def not_found(name: str) -> NotFound:
    """The NOT_FOUND of an unknown application."""
    return NotFound(
        f"application {name!r} does not exist",
        reason="APPLICATION_NOT_FOUND",
        resource_type="autoecoops.infra.v1.Application",
        resource_name=name,
    )


class InfraStore:
    """Applications and their history in Redis under ``prefix`` (``<key_prefix>infra-manager``)."""

    def __init__(self, redis: aioredis.Redis, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix
        self._release = redis.register_script(_RELEASE)
        self._renew = redis.register_script(_RENEW)

    def _app(self, name: str) -> str:
        return f"{self.prefix}:app:{{{name}}}"

    # -- applications --------------------------------------------------------

    async def create(self, app: Application) -> None:
        """Store a new application; ALREADY_EXISTS if the name is taken."""
        created = await self.redis.hsetnx(self._app(app.name), "spec", _dumps(app.to_dict()))  # type: ignore[misc]
        if not created:
            raise AlreadyExists(
                f"application {app.name!r} already exists",
                reason="APPLICATION_EXISTS",
                resource_type="autoecoops.infra.v1.Application",
                resource_name=app.name,
            )
        await self.redis.zadd(f"{self.prefix}:apps", {app.name: 0})

    async def put(self, app: Application) -> None:
        """Replace an existing application's spec."""
        await self.redis.hset(self._app(app.name), "spec", _dumps(app.to_dict()))  # type: ignore[misc]

    async def get(self, name: str) -> Application:
        """The application; NOT_FOUND if there is none."""
        raw = await self.redis.hget(self._app(name), "spec")  # type: ignore[misc]
        if raw is None:
            raise not_found(name)
        return Application.from_dict(json.loads(raw))

    async def exists(self, name: str) -> bool:
        """Whether the application exists."""
        return bool(await self.redis.hexists(self._app(name), "spec"))  # type: ignore[misc]

    async def names(self, after: str = "", limit: int = 1000) -> list[str]:
        """Application names in order, strictly after ``after``."""
        start = f"({after}" if after else "-"
        raw = await self.redis.zrangebylex(f"{self.prefix}:apps", start, "+", start=0, num=limit)
        return [_text(r) for r in raw]

    async def delete(self, name: str) -> None:
        """Delete the application and everything stored for it."""
        keys = [k async for k in self.redis.scan_iter(match=f"{self._app(name)}:*", count=1000)]
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._app(name), *keys)
            pipe.zrem(f"{self.prefix}:apps", name)
            await pipe.execute()

    # -- status and operations -------------------------------------------------

    async def set_status(self, name: str, status: AppStatus) -> None:
        """Record the last reconcile's observation."""
        await self.redis.hset(self._app(name), "status", _dumps(status.to_dict()))  # type: ignore[misc]

    async def status(self, name: str) -> AppStatus | None:
        """The last observation, if any."""
        raw = await self.redis.hget(self._app(name), "status")  # type: ignore[misc]
        return AppStatus.from_dict(json.loads(raw)) if raw else None

    async def set_operation(self, name: str, op: Operation) -> None:
        """Record the current (or last) operation's state."""
        await self.redis.hset(self._app(name), "op", _dumps(op.to_dict()))  # type: ignore[misc]

    async def operation(self, name: str) -> Operation | None:
        """The current or last operation."""
        raw = await self.redis.hget(self._app(name), "op")  # type: ignore[misc]
        return Operation.from_dict(json.loads(raw)) if raw else None

    async def set_auto(self, name: str, record: dict[str, Any]) -> None:
        """Remember the last automated sync (revision, time, outcome)."""
        await self.redis.hset(self._app(name), "auto", _dumps(record))  # type: ignore[misc]

    async def auto(self, name: str) -> dict[str, Any]:
        """The last automated sync record ({} when none)."""
        raw = await self.redis.hget(self._app(name), "auto")  # type: ignore[misc]
        return dict(json.loads(raw)) if raw else {}

    async def drift(self, name: str) -> str:
        """The signature of the last drift reported ('' when in sync)."""
        raw = await self.redis.hget(self._app(name), "drift")  # type: ignore[misc]
        return _text(raw) if raw else ""

    async def set_drift(self, name: str, signature: str) -> None:
        """Remember the drift reported last ('' clears it)."""
        if signature:
            await self.redis.hset(self._app(name), "drift", signature)  # type: ignore[misc]
        else:
            await self.redis.hdel(self._app(name), "drift")  # type: ignore[misc]

    async def lock(self, name: str, op_id: str, ttl: float) -> bool:
        """Take the application's operation lease; False if another operation holds it."""
        return bool(
            await self.redis.set(f"{self._app(name)}:lock", op_id, nx=True, px=int(ttl * 1000))
        )

    async def renew(self, name: str, op_id: str, ttl: float) -> bool:
        """Extend the lease if ``op_id`` still holds it."""
        return bool(
            await self._renew(keys=[f"{self._app(name)}:lock"], args=[op_id, int(ttl * 1000)])
        )

    async def unlock(self, name: str, op_id: str) -> None:
        """Release the lease if ``op_id`` holds it."""
        await self._release(keys=[f"{self._app(name)}:lock"], args=[op_id])

    async def locked_by(self, name: str) -> str:
        """The id of the operation holding the lease ('' when free)."""
        raw = await self.redis.get(f"{self._app(name)}:lock")
        return _text(raw) if raw else ""

    # -- history ---------------------------------------------------------------

    async def add_history(
        self, name: str, entry: HistoryEntry, docs: list[Document], limit: int
    ) -> HistoryEntry:
        """Append an entry (its id assigned here) with its manifests; keep the newest ``limit``."""
        key = self._app(name)
        new_id = int(await self.redis.hincrby(key, "next_id", 1))  # type: ignore[misc]
        entry = HistoryEntry(
            new_id,
            entry.revision,
            entry.manifest_digest,
            entry.deploy_time,
            entry.initiated_by,
            entry.source,
        )
        blob = zlib.compress(_dumps([{"where": d.where, "obj": d.obj} for d in docs]).encode())
        history = f"{key}:history"
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(f"{key}:manifests:{entry.manifest_digest}", blob)
            pipe.lpush(history, _dumps(entry.to_dict()))
            pipe.lrange(history, limit, -1)
            pipe.ltrim(history, 0, limit - 1)
            pipe.lrange(history, 0, -1)
            _, _, dropped, _, kept = await pipe.execute()
        kept_digests = {json.loads(r)["manifest_digest"] for r in kept}
        gone = {json.loads(r)["manifest_digest"] for r in dropped} - kept_digests
        if gone:
            await self.redis.delete(*(f"{key}:manifests:{d}" for d in gone))
        return entry

    async def history(self, name: str) -> list[HistoryEntry]:
        """Every kept entry, newest first."""
        raw = await self.redis.lrange(f"{self._app(name)}:history", 0, -1)  # type: ignore[misc]
        return [HistoryEntry.from_dict(json.loads(r)) for r in raw]

    async def manifests(self, name: str, digest: str) -> list[Document] | None:
        """The manifests a history entry deployed (None if they are gone)."""
        raw = await self.redis.get(f"{self._app(name)}:manifests:{digest}")
        if raw is None:
            return None
        return [
            Document(d["where"], d["obj"])
            for d in json.loads(
                zlib.decompress(bytes(raw) if not isinstance(raw, str) else raw.encode("latin-1"))
            )
        ]
