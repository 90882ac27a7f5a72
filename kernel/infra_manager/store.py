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
- ``app:{<name>}:lock``: the lease of the running operation (its id, with a TTL),
  and ``app:{<name>}:lock:fence`` its fencing counter (kernel/mesh/lease.py);
- ``app:{<name>}:reconcile`` (and ``:fence``): the lease of the replica
  reconciling the application now.

Writes made under one of those leases (status, drift, operation, automated-sync
record, history) take its ``Fence`` and are refused (``LeaseLost``) once the
lease has moved: a replica paused past its lease cannot overwrite its successor.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable
from typing import Any

import redis.asyncio as aioredis

from autoecoops.kernel.infra_manager.manifests import Document
from autoecoops.kernel.infra_manager.model import Application, AppStatus, HistoryEntry, Operation
from autoecoops.kernel.mesh.errors import AlreadyExists, NotFound
from autoecoops.kernel.mesh.lease import Fence, FencedScript, fenced_transaction
from autoecoops.kernel.mesh.outbox import Outbox

# KEYS: app hash, apps zset. ARGV: spec, name. 1 when created, 0 when the name is taken.
_CREATE = """
if redis.call('HSETNX', KEYS[1], 'spec', ARGV[1]) == 0 then return 0 end
redis.call('ZADD', KEYS[2], 0, ARGV[2])
return 1
"""
# Marks a dead operation ended, only if it is still the stored one and no operation
# holds the lease (a new one may have started since it was read).
# KEYS: app hash, operation lease. ARGV: the dead operation's id, its new state.
_EXPIRE_OPERATION = """
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
local cur = redis.call('HGET', KEYS[2], 'op')
if not cur or cjson.decode(cur)['id'] ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[2], 'op', ARGV[3])
return 1
"""
#: Seconds a declaration lives without a reconcile refreshing it.
DECLARED_TTL = 7 * 86400


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

    def __init__(self, redis: aioredis.Redis, prefix: str, outbox: Outbox | None = None) -> None:
        self.redis = redis
        self.prefix = prefix
        #: Commits an audited call's record with its change (kernel/mesh/outbox.py).
        self.outbox = outbox
        self._expire_operation = FencedScript(redis, _EXPIRE_OPERATION)
        self._create: Any = (
            outbox.script(_CREATE, ok="r == 1") if outbox else redis.register_script(_CREATE)
        )

    def _app(self, name: str) -> str:
        return f"{self.prefix}:app:{{{name}}}"

    # -- applications --------------------------------------------------------

    async def create(self, app: Application) -> None:
        """Store a new application; ALREADY_EXISTS if the name is taken."""
        created = await self._create(
            keys=[self._app(app.name), f"{self.prefix}:apps"],
            args=[_dumps(app.to_dict()), app.name],
        )
        if not int(created):
            raise AlreadyExists(
                f"application {app.name!r} already exists",
                reason="APPLICATION_EXISTS",
                resource_type="autoecoops.infra.v1.Application",
                resource_name=app.name,
            )

    async def put(self, app: Application) -> None:
        """Replace an existing application's spec."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._app(app.name), "spec", _dumps(app.to_dict()))
            await self._execute(pipe)

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

    def _declared(self, cluster: str, ident: str) -> str:
        return f"{self.prefix}:declared:{{{cluster}}}:{ident}"

    async def declare(self, name: str, cluster: str, idents: Iterable[str]) -> dict[str, list[str]]:
        """Record the objects ``name`` declares; per object, the other applications declaring it.

        One set per object (``declared:{<cluster>}:<group>/<kind>/<namespace>/<name>``)
        holds the applications that declare it, so each of two applications
        sharing an object learns of the other whichever synced last.
        """
        mine = f"{self._app(name)}:declares"
        new = set(idents)
        old = {_text(k) for k in await self.redis.smembers(mine)}  # type: ignore[misc]
        async with self.redis.pipeline(transaction=False) as pipe:
            for ident in old - new:
                pipe.srem(self._declared(cluster, ident), name)
            for ident in new - old:
                pipe.sadd(self._declared(cluster, ident), name)
            pipe.delete(mine)
            if new:
                pipe.sadd(mine, *sorted(new))
                pipe.expire(mine, DECLARED_TTL)
            ordered = sorted(new)
            for ident in ordered:
                pipe.expire(self._declared(cluster, ident), DECLARED_TTL)
                pipe.smembers(self._declared(cluster, ident))
            replies = await pipe.execute()
        members = replies[len(replies) - 2 * len(ordered) + 1 :: 2] if ordered else []
        shared: dict[str, list[str]] = {}
        for ident, apps in zip(ordered, members, strict=True):
            others = sorted(_text(a) for a in apps if _text(a) != name)
            if others and await self._still_declares(others, ident):
                shared[ident] = others
        return shared

    async def _still_declares(self, apps: list[str], ident: str) -> bool:
        # An application deleted without cleanup (a crash) must not warn for ever.
        for app in apps:
            if await self.redis.sismember(f"{self._app(app)}:declares", ident):  # type: ignore[misc]
                return True
        return False

    async def undeclare(self, name: str, cluster: str) -> None:
        """Forget every object ``name`` declared (the application is deleted)."""
        mine = f"{self._app(name)}:declares"
        idents = [_text(k) for k in await self.redis.smembers(mine)]  # type: ignore[misc]
        async with self.redis.pipeline(transaction=False) as pipe:
            for ident in idents:
                pipe.srem(self._declared(cluster, ident), name)
            pipe.delete(mine)
            await pipe.execute()

    async def delete(self, name: str) -> None:
        """Delete the application and everything stored for it."""
        keys = [k async for k in self.redis.scan_iter(match=f"{self._app(name)}:*", count=1000)]
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._app(name), *keys)
            pipe.zrem(f"{self.prefix}:apps", name)
            await self._execute(pipe)

    async def _execute(self, pipe: Any) -> list[Any]:
        # The audited call's record joins the transaction when there is an outbox.
        return await self.outbox.execute(pipe) if self.outbox else list(await pipe.execute())

    # -- status and operations -------------------------------------------------

    async def _hset(self, name: str, field: str, value: str, fence: Fence | None) -> None:
        # Fenced: only while the writer's lease is current (kernel/mesh/lease.py).
        if fence is None:
            await self.redis.hset(self._app(name), field, value)  # type: ignore[misc]
        else:
            await fenced_transaction(
                self.redis, fence, lambda pipe: pipe.hset(self._app(name), field, value)
            )

    def operation_lease(self, name: str) -> str:
        """The key of the lease of the application's running operation."""
        return f"{self._app(name)}:lock"

    def reconcile_lease(self, name: str) -> str:
        """The key of the lease of the replica reconciling the application."""
        return f"{self._app(name)}:reconcile"

    def _reconciled(self, name: str) -> str:
        return f"{self._app(name)}:reconciled"

    async def mark_reconciled(self, name: str, owner: str, ttl: float) -> None:
        """Note that ``owner`` has just compared the application; the note lapses after
        ``ttl`` seconds (Redis's clock, so replicas' clocks need not agree)."""
        await self.redis.set(self._reconciled(name), owner, px=max(1, round(ttl * 1000)))

    async def reconciled_by(self, name: str) -> tuple[str, float] | None:
        """(owner, seconds left) of the application's note from ``mark_reconciled``, if any."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(self._reconciled(name))
            pipe.pttl(self._reconciled(name))
            owner, left = await pipe.execute()
        if owner is None or left is None or left <= 0:
            return None
        return owner.decode() if isinstance(owner, bytes) else str(owner), left / 1000

    async def set_status(self, name: str, status: AppStatus, fence: Fence | None = None) -> None:
        """Record the last reconcile's observation."""
        await self._hset(name, "status", _dumps(status.to_dict()), fence)

    async def status(self, name: str) -> AppStatus | None:
        """The last observation, if any."""
        raw = await self.redis.hget(self._app(name), "status")  # type: ignore[misc]
        return AppStatus.from_dict(json.loads(raw)) if raw else None

    async def set_operation(self, name: str, op: Operation, fence: Fence | None = None) -> None:
        """Record the current (or last) operation's state."""
        await self._hset(name, "op", _dumps(op.to_dict()), fence)

    async def expire_operation(self, name: str, op: Operation, fence: Fence) -> bool:
        """Record how a dead operation ended (under the reconcile lease's ``fence``), unless
        another operation was stored or holds the lease meanwhile; True if recorded."""
        return bool(
            await self._expire_operation(
                fence,
                [self._app(name), self.operation_lease(name)],
                [op.id, _dumps(op.to_dict())],
            )
        )

    async def operation(self, name: str) -> Operation | None:
        """The current or last operation."""
        raw = await self.redis.hget(self._app(name), "op")  # type: ignore[misc]
        return Operation.from_dict(json.loads(raw)) if raw else None

    async def set_auto(self, name: str, record: dict[str, Any], fence: Fence | None = None) -> None:
        """Remember the last automated sync (revision, time, outcome)."""
        await self._hset(name, "auto", _dumps(record), fence)

    async def auto(self, name: str) -> dict[str, Any]:
        """The last automated sync record ({} when none)."""
        raw = await self.redis.hget(self._app(name), "auto")  # type: ignore[misc]
        return dict(json.loads(raw)) if raw else {}

    async def drift(self, name: str) -> str:
        """The signature of the last drift reported ('' when in sync)."""
        raw = await self.redis.hget(self._app(name), "drift")  # type: ignore[misc]
        return _text(raw) if raw else ""

    async def set_drift(self, name: str, signature: str, fence: Fence | None = None) -> None:
        """Remember the drift reported last ('' clears it)."""
        if signature:
            await self._hset(name, "drift", signature, fence)
        elif fence is None:
            await self.redis.hdel(self._app(name), "drift")  # type: ignore[misc]
        else:
            await fenced_transaction(
                self.redis, fence, lambda pipe: pipe.hdel(self._app(name), "drift")
            )

    async def request_terminate(self, name: str, op_id: str, by: str, ttl: float) -> None:
        """Ask whichever process runs operation ``op_id`` to stop it."""
        await self.redis.set(f"{self._app(name)}:terminate", f"{op_id}\n{by}", px=int(ttl * 1000))

    async def terminate_requested(self, name: str, op_id: str) -> str:
        """Who asked to terminate ``op_id`` ('' if nobody)."""
        raw = await self.redis.get(f"{self._app(name)}:terminate")
        if not raw:
            return ""
        wanted, _, by = _text(raw).partition("\n")
        return by if wanted == op_id else ""

    async def locked_by(self, name: str) -> str:
        """The id of the operation holding the lease ('' when free)."""
        raw = await self.redis.get(f"{self._app(name)}:lock")
        return _text(raw) if raw else ""

    # -- history ---------------------------------------------------------------

    async def add_history(
        self,
        name: str,
        entry: HistoryEntry,
        docs: list[Document],
        limit: int,
        fence: Fence | None = None,
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

        def build(pipe: Any) -> None:
            pipe.set(f"{key}:manifests:{entry.manifest_digest}", blob)
            pipe.lpush(history, _dumps(entry.to_dict()))
            pipe.lrange(history, limit, -1)
            pipe.ltrim(history, 0, limit - 1)
            pipe.lrange(history, 0, -1)

        if fence is not None:
            replies = await fenced_transaction(self.redis, fence, build)
        else:
            async with self.redis.pipeline(transaction=True) as pipe:
                build(pipe)
                replies = await pipe.execute()
        _, _, dropped, _, kept = replies
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
