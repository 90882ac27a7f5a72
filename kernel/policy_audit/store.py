"""policy-audit's Redis persistence: the audit log, its tree, and policy bundles.

Every key of the log shares the hash tag ``{audit}`` so that, on Redis
Cluster, one append's writes land in one slot and run as one script.

    <base>:head              hash: size, note (latest signed checkpoint), time_ns, vkey
    <base>:entries           stream: entry ``i`` has id ``i-1``, field ``e`` = leaf bytes
    <base>:tree:<L>:<c>      string: complete nodes of level L, 2**16 per chunk, 32 bytes each
    <base>:requests          hash: request_id -> "<index> <fingerprint>"
    <base>:time              zset: index by entry time (microseconds)
    <base>:idx:<kind>:<v>    zset: index by index, per type / actor / resource / trace value

An append group is one Lua script: it checks the expected size and that no
request id was used, then writes the entries, the tree nodes, the request
ids, the indexes and the new head. Scripts run atomically, so a reader never
sees a half-written group and a crashed writer leaves nothing behind.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from autoecoops.kernel.policy_audit.merkle import HASH_SIZE, Node

#: Complete nodes per tree chunk key: 2 MiB strings, far below Redis's 512 MiB limit.
CHUNK_BITS = 16
INDEX_KINDS = ("type", "actor", "resource", "trace")

_COMMIT = """
local head = KEYS[1]
local size = tonumber(redis.call('HGET', head, 'size') or '0')
if size ~= tonumber(ARGV[1]) then return {'size', tostring(size)} end
local nreq = tonumber(ARGV[2])
local i = 3
for _ = 1, nreq do
  if redis.call('HEXISTS', KEYS[2], ARGV[i]) == 1 then return {'dup', ARGV[i]} end
  i = i + 1
end
local vkey = redis.call('HGET', head, 'vkey')
if vkey and vkey ~= ARGV[i] then return {'key', vkey} end
i = i + 1
while i <= #ARGV do
  local op = ARGV[i]
  local k = KEYS[tonumber(ARGV[i + 1])]
  if op == 'X' then
    redis.call('XADD', k, ARGV[i + 2], 'e', ARGV[i + 3]); i = i + 4
  elseif op == 'A' then
    redis.call('APPEND', k, ARGV[i + 2]); i = i + 3
  elseif op == 'H' then
    redis.call('HSET', k, ARGV[i + 2], ARGV[i + 3]); i = i + 4
  elseif op == 'Z' then
    redis.call('ZADD', k, ARGV[i + 2], ARGV[i + 3]); i = i + 4
  else
    return redis.error_reply('unknown op ' .. tostring(op))
  end
end
return {'ok'}
"""


@dataclass(slots=True)
class Prepared:
    """One entry ready to write: its index, leaf bytes and index attributes."""

    index: int
    data: bytes
    request_id: str = ""
    fingerprint: str = ""
    time_us: int = 0
    attrs: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Head:
    """The log's stored head: its size and latest signed checkpoint."""

    size: int
    note: str
    time_ns: int
    vkey: str


class CommitConflict(Exception):
    """The log changed under a commit (another writer, or a reused request id)."""

    def __init__(self, kind: str, value: str) -> None:
        super().__init__(f"{kind}: {value}")
        self.kind = kind
        self.value = value


class AuditStore:
    """The audit log's keys in Redis."""

    def __init__(self, redis: aioredis.Redis, base: str) -> None:
        self.redis = redis
        self.base = base
        self.head_key = f"{base}:head"
        self.entries_key = f"{base}:entries"
        self.requests_key = f"{base}:requests"
        self.time_key = f"{base}:time"
        self._commit = redis.register_script(_COMMIT)

    def tree_key(self, level: int, index: int) -> str:
        """The chunk key holding node (level, index)."""
        return f"{self.base}:tree:{level}:{index >> CHUNK_BITS}"

    def index_key(self, kind: str, value: str) -> str:
        """The zset of entry indexes whose ``kind`` attribute equals ``value``."""
        return f"{self.base}:idx:{kind}:{value}"

    # -- writes -------------------------------------------------------------

    async def commit(
        self,
        expected_size: int,
        entries: Sequence[Prepared],
        nodes: Sequence[tuple[Node, bytes]],
        note: str,
        time_ns: int,
        vkey: str,
    ) -> None:
        """Write one group atomically, or raise ``CommitConflict`` and write nothing."""
        keys: list[str] = [self.head_key, self.requests_key]
        slots: dict[str, int] = {k: i + 1 for i, k in enumerate(keys)}

        def slot(key: str) -> int:
            at = slots.get(key)
            if at is None:
                keys.append(key)
                at = slots[key] = len(keys)
            return at

        request_ids = [p.request_id for p in entries if p.request_id]
        args: list[Any] = [expected_size, len(request_ids), *request_ids, vkey]
        stream = slot(self.entries_key)
        for p in entries:
            args += ["X", stream, f"{p.index}-1", p.data]
        # Nodes of one chunk are consecutive, so each chunk gets one APPEND.
        chunks: dict[str, list[bytes]] = {}
        for (level, index), h in nodes:
            chunks.setdefault(self.tree_key(level, index), []).append(h)
        for key, hashes in chunks.items():
            args += ["A", slot(key), b"".join(hashes)]
        for p in entries:
            if p.request_id:
                args += ["H", 2, p.request_id, f"{p.index} {p.fingerprint}"]
            args += ["Z", slot(self.time_key), p.time_us, p.index]
            for kind, value in p.attrs.items():
                args += ["Z", slot(self.index_key(kind, value)), p.index, p.index]
        new_size = expected_size + len(entries)
        head = slot(self.head_key)
        args += ["H", head, "size", new_size, "H", head, "note", note]
        args += ["H", head, "time_ns", time_ns, "H", head, "vkey", vkey]
        reply = await self._commit(keys=keys, args=args)
        status = _text(reply[0])
        if status != "ok":
            raise CommitConflict(status, _text(reply[1]))

    # -- reads --------------------------------------------------------------

    async def head(self) -> Head:
        """The stored head (size 0 and no note for an empty log)."""
        raw = await self.redis.hgetall(self.head_key)
        got = {_text(k): _text(v) for k, v in raw.items()}
        return Head(
            size=int(got.get("size", "0")),
            note=got.get("note", ""),
            time_ns=int(got.get("time_ns", "0")),
            vkey=got.get("vkey", ""),
        )

    async def nodes(self, coords: Sequence[Node]) -> list[bytes]:
        """The hashes of stored complete nodes, in one round trip.

        A missing or short node comes back as b"" so a verifier can report it.
        """
        if not coords:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for level, index in coords:
            off = (index & ((1 << CHUNK_BITS) - 1)) * HASH_SIZE
            pipe.getrange(self.tree_key(level, index), off, off + HASH_SIZE - 1)
        got = await pipe.execute()
        return [g if isinstance(g, bytes) and len(g) == HASH_SIZE else b"" for g in got]

    async def entry(self, index: int) -> bytes | None:
        """The leaf bytes of entry ``index``, or None."""
        got: Any = await self.redis.xrange(self.entries_key, f"{index}-1", f"{index}-1")
        return bytes(got[0][1][b"e"]) if got else None

    async def entries(self, indexes: Sequence[int]) -> dict[int, bytes]:
        """The leaf bytes of several entries (missing ones are left out)."""
        pipe = self.redis.pipeline(transaction=False)
        for i in indexes:
            pipe.xrange(self.entries_key, f"{i}-1", f"{i}-1")
        out: dict[int, bytes] = {}
        for i, got in zip(indexes, await pipe.execute(), strict=True):
            if got:
                out[i] = got[0][1][b"e"]
        return out

    async def scan(
        self, start: int, stop: int, batch: int = 5000
    ) -> AsyncIterator[list[tuple[int, bytes]]]:
        """Entries with start <= index < stop as (stream position, bytes), in batches.

        The position comes from the stream id, so a verifier sees gaps.
        """
        cursor = f"{start}-0"
        while True:
            got: Any = await self.redis.xrange(
                self.entries_key, cursor, f"{stop - 1}-18446744073709551615", count=batch
            )
            if not got:
                return
            out: list[tuple[int, bytes]] = []
            for sid, fields in got:
                ms, _, seq = _text(sid).partition("-")
                out.append((int(ms), bytes(fields.get(b"e", b""))))
            yield out
            last = _text(got[-1][0])
            ms, _, seq = last.partition("-")
            cursor = f"{ms}-{int(seq) + 1}"
            if len(got) < batch:
                return

    async def request(self, request_id: str) -> tuple[int, str] | None:
        """The (index, fingerprint) a request id was committed at, if any."""
        raw = await self.redis.hget(self.requests_key, request_id)
        if raw is None:
            return None
        index, _, fingerprint = _text(raw).partition(" ")
        return int(index), fingerprint

    async def requests(self, request_ids: Sequence[str]) -> dict[str, tuple[int, str]]:
        """The (index, fingerprint) of each request id already committed."""
        if not request_ids:
            return {}
        got = await self.redis.hmget(self.requests_key, list(request_ids))
        out: dict[str, tuple[int, str]] = {}
        for rid, raw in zip(request_ids, got, strict=True):
            if raw is not None:
                index, _, fingerprint = _text(raw).partition(" ")
                out[rid] = (int(index), fingerprint)
        return out

    async def by_attr(self, kind: str, value: str, after: int, limit: int) -> list[int]:
        """Indexes > ``after`` whose ``kind`` attribute is ``value``, ascending."""
        got = await self.redis.zrangebyscore(
            self.index_key(kind, value), f"({after}", "+inf", start=0, num=limit
        )
        return [int(_text(m)) for m in got]

    async def by_time(self, start_us: float, end_us: float) -> list[int]:
        """Indexes of entries whose time is in [start_us, end_us), ascending by index."""
        got = await self.redis.zrangebyscore(self.time_key, start_us, f"({end_us}")
        return sorted(int(_text(m)) for m in got)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def dumps(value: Any) -> str:
    """Compact JSON for stored records."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True)
