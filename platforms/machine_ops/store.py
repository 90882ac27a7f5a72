"""All of MachineNativeOps's Redis: nodes, baselines, enrollment tokens,
evaluations, inventory and its history, request-id replays, the per-node
applied sequence that makes resends idempotent, and the session registry
that routes commands to the replica holding an agent's stream.

Keys live under ``<prefix>machine-ops:``. Records are their proto bytes.
Anything that must change together with "this message was applied" is
written in one MULTI/EXEC guarded by WATCH on the node's applied-sequence
key, so a crash between the two cannot apply a message without recording
it, or record it without applying it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from google.protobuf import message
from redis.exceptions import WatchError

from autoecoops.machineops.v1 import machineops_pb2 as pb

#: Evaluations kept per node (newest first), and inventory changes.
EVALUATIONS_KEPT = 200
CHANGES_KEPT = 1000
REQUEST_TTL = 24 * 3600
#: A replica that has not refreshed its liveness key for this long holds no sessions.
REPLICA_TTL = 15

Writer = Callable[[Any], None]


class MachineStore:
    """Redis persistence of machine-ops."""

    def __init__(self, redis: aioredis.Redis, prefix: str) -> None:
        # Any: redis-py's async stubs type replies as bytes | str (decode_responses).
        self.redis: Any = redis
        self.prefix = prefix
        # A WATCH/MULTI holds a pooled connection across round trips; bound
        # how many run at once so a burst of sessions queues here instead of
        # exhausting the shared pool (which fails calls rather than waiting).
        self._tx = asyncio.Semaphore(32)

    def k(self, *parts: str) -> str:
        """A key under this service's prefix."""
        return ":".join([self.prefix, *parts])

    # -- generic records ---------------------------------------------------

    async def get(self, collection: str, id: str, cls: type[Any]) -> Any:
        """The record ``id`` of ``collection`` parsed as ``cls``, or None."""
        raw = await self.redis.hget(self.k(collection), id)
        return None if raw is None else cls.FromString(raw)

    async def all(self, collection: str, cls: type[Any]) -> list[Any]:
        """Every record of ``collection``."""
        raw = await self.redis.hgetall(self.k(collection))
        return [cls.FromString(v) for v in raw.values()]

    async def create(self, collection: str, id: str, record: message.Message) -> bool:
        """Store a new record; False when ``id`` exists."""
        return bool(await self.redis.hsetnx(self.k(collection), id, record.SerializeToString()))

    async def replace(
        self,
        collection: str,
        id: str,
        update: Callable[[Any], Awaitable[message.Message | None]],
        cls: type[Any],
    ) -> message.Message | None:
        """Read-modify-write one record under WATCH; ``update`` returns the new record
        (or None to delete it). Returns what was stored."""
        key = self.k(collection)
        async with self._tx:
            return await self._replace(key, id, update, cls)

    async def _replace(
        self,
        key: str,
        id: str,
        update: Callable[[Any], Awaitable[message.Message | None]],
        cls: type[Any],
    ) -> message.Message | None:
        while True:
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(key)
                    raw = await pipe.hget(key, id)
                    new = await update(None if raw is None else cls.FromString(raw))
                    pipe.multi()
                    if new is None:
                        pipe.hdel(key, id)
                    else:
                        pipe.hset(key, id, new.SerializeToString())
                    await pipe.execute()
                    return new
                except WatchError:
                    continue

    async def delete(self, collection: str, id: str) -> bool:
        """Delete a record; False when absent."""
        return bool(await self.redis.hdel(self.k(collection), id))

    # -- enrollment secrets --------------------------------------------------

    async def put_secret_hash(self, token_id: str, digest: str) -> None:
        """Store an enrollment secret's hash."""
        await self.redis.hset(self.k("token-secrets"), token_id, digest)

    async def secret_hash(self, token_id: str) -> str | None:
        """An enrollment secret's hash."""
        raw = await self.redis.hget(self.k("token-secrets"), token_id)
        return None if raw is None else raw.decode()

    # -- request-id replays (AIP-155) ------------------------------------------

    async def replay(self, rpc: str, request_id: str) -> bytes | None:
        """The stored response of an earlier call with this request id."""
        if not request_id:
            return None
        raw: bytes | None = await self.redis.get(self.k("req", rpc, request_id))
        return raw

    async def remember(self, rpc: str, request_id: str, response: message.Message) -> None:
        """Keep a response for replays of ``request_id`` for a day."""
        if request_id:
            await self.redis.set(
                self.k("req", rpc, request_id), response.SerializeToString(), ex=REQUEST_TTL
            )

    # -- exactly-once application of agent messages ----------------------------

    async def applied(self, node: str, epoch: str) -> int:
        """The highest sequence of ``epoch`` applied for ``node`` (0 for none)."""
        raw = await self.redis.hget(self.k("applied", node), epoch)
        return int(raw or 0)

    async def apply_once(
        self, node: str, epoch: str, seq: int, writes: Callable[[Any], None]
    ) -> bool:
        """Run ``writes`` (pipeline commands) and record ``seq`` as applied, atomically;
        False (nothing written) when ``seq`` was applied before."""
        key = self.k("applied", node)
        async with self._tx:
            return await self._apply_once(key, epoch, seq, writes)

    async def _apply_once(
        self, key: str, epoch: str, seq: int, writes: Callable[[Any], None]
    ) -> bool:
        while True:
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(key)
                    done = int(await pipe.hget(key, epoch) or 0)
                    if seq <= done:
                        return False
                    pipe.multi()
                    writes(pipe)
                    pipe.hset(key, epoch, seq)
                    await pipe.execute()
                    return True
                except WatchError:
                    continue

    # -- evaluations ------------------------------------------------------------

    def write_evaluation(self, pipe: Any, node: str, evaluation: pb.Evaluation) -> None:
        """Queue an evaluation's writes on ``pipe`` (newest first, bounded)."""
        key = self.k("evaluations", node)
        pipe.lpush(key, evaluation.SerializeToString())
        pipe.ltrim(key, 0, EVALUATIONS_KEPT - 1)

    async def evaluations(self, node: str, limit: int = EVALUATIONS_KEPT) -> list[pb.Evaluation]:
        """A node's evaluations, newest first."""
        raw = await self.redis.lrange(self.k("evaluations", node), 0, limit - 1)
        return [pb.Evaluation.FromString(r) for r in raw]

    async def latest_evaluation(self, node: str) -> pb.Evaluation | None:
        """A node's latest evaluation."""
        raw = await self.redis.lindex(self.k("evaluations", node), 0)
        return None if raw is None else pb.Evaluation.FromString(raw)

    # -- inventory -----------------------------------------------------------------

    async def inventory(self, node: str) -> tuple[dict[str, list[dict[str, str]]], float]:
        """A node's tables and when they were last collected."""
        raw = await self.redis.hgetall(self.k("inventory", node))
        tables = {k.decode(): json.loads(v) for k, v in raw.items() if k != b"@collect_time"}
        return tables, float(raw.get(b"@collect_time", 0) or 0)

    def write_inventory(
        self,
        pipe: Any,
        node: str,
        changed: dict[str, list[dict[str, str]]],
        removed: list[str],
        collect_time: float,
        history: list[dict[str, Any]],
    ) -> None:
        """Queue an inventory delta's writes on ``pipe``."""
        key = self.k("inventory", node)
        mapping: dict[str, str] = {t: json.dumps(rows) for t, rows in changed.items()}
        mapping["@collect_time"] = repr(collect_time)
        pipe.hset(key, mapping=mapping)
        if removed:
            pipe.hdel(key, *removed)
        if history:
            hkey = self.k("inventory-changes", node)
            pipe.lpush(hkey, *[json.dumps(h) for h in history])
            pipe.ltrim(hkey, 0, CHANGES_KEPT - 1)

    async def inventory_changes(self, node: str) -> list[dict[str, Any]]:
        """A node's inventory changes, newest first."""
        raw = await self.redis.lrange(self.k("inventory-changes", node), 0, CHANGES_KEPT - 1)
        return [json.loads(r) for r in raw]

    def write_status(self, pipe: Any, node: str, fields: dict[str, str]) -> None:
        """Queue writes of a node's observed status fields (score, OS, kernel) on ``pipe``.

        Kept apart from the node record, so an agent's report never races a
        user's label update for the record (and its etag).
        """
        pipe.hset(self.k("status", node), mapping=fields)

    async def statuses(self, nodes: list[str]) -> dict[str, dict[str, str]]:
        """Observed status fields of ``nodes``."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for n in nodes:
                pipe.hgetall(self.k("status", n))
            raw = await pipe.execute()
        return {
            n: {k.decode(): v.decode() for k, v in r.items()}
            for n, r in zip(nodes, raw, strict=True)
        }

    async def drop_node_data(self, node: str) -> None:
        """Delete everything recorded about ``node``."""
        await self.redis.delete(
            self.k("evaluations", node),
            self.k("inventory", node),
            self.k("inventory-changes", node),
            self.k("applied", node),
            self.k("status", node),
        )
        await self.redis.hdel(self.k("seen"), node)

    # -- liveness and sessions ---------------------------------------------------

    async def seen(self, node: str, when: float | None = None) -> None:
        """Record that ``node``'s agent was heard from."""
        await self.redis.hset(self.k("seen"), node, repr(time.time() if when is None else when))

    async def last_seen(self) -> dict[str, float]:
        """Every node's last-heard time."""
        raw = await self.redis.hgetall(self.k("seen"))
        return {k.decode(): float(v) for k, v in raw.items()}

    async def replica_alive(self, replica: str) -> None:
        """Refresh this replica's liveness key."""
        await self.redis.set(self.k("replica", replica), "1", ex=REPLICA_TTL)

    async def hold_session(self, node: str, replica: str) -> None:
        """Record that ``replica`` holds ``node``'s session."""
        await self.redis.hset(self.k("sessions"), node, replica)

    async def release_session(self, node: str, replica: str) -> None:
        """Forget ``node``'s session if ``replica`` still holds it."""
        key = self.k("sessions")
        async with self._tx, self.redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(key)
                if (await pipe.hget(key, node) or b"").decode() == replica:
                    pipe.multi()
                    pipe.hdel(key, node)
                    await pipe.execute()
            except WatchError:
                pass  # someone else took it over: theirs now

    async def sessions(self) -> dict[str, str]:
        """node -> replica holding its session, for live replicas only."""
        raw = {
            k.decode(): v.decode()
            for k, v in (await self.redis.hgetall(self.k("sessions"))).items()
        }
        replicas = sorted(set(raw.values()))
        if not replicas:
            return {}
        alive = await self.redis.mget([self.k("replica", r) for r in replicas])
        live = {r for r, a in zip(replicas, alive, strict=True) if a is not None}
        return {n: r for n, r in raw.items() if r in live}

    async def session_of(self, node: str) -> str | None:
        """The live replica holding ``node``'s session, or None."""
        raw = await self.redis.hget(self.k("sessions"), node)
        if raw is None or await self.redis.get(self.k("replica", raw.decode())) is None:
            return None
        return str(raw.decode())

    def channel(self, replica: str) -> str:
        """The pub/sub channel commands for ``replica``'s sessions arrive on."""
        return self.k("commands", replica)

    def reply_key(self, command_id: str) -> str:
        """The list a command's answer is pushed to."""
        return self.k("reply", command_id)
