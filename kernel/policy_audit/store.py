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

On a Redis Cluster the base starts with policy-audit's service tag
(``<prefix>{policy-audit}:{audit}``), which puts the log, its index keys
(named inside the script, always under the base) and policy-audit's outbox in
one slot: the log is one ordered sequence on one shard by design. A group is
acknowledged only once ``wait_replicas`` replicas confirmed it (``WAIT``,
``replicated`` in kernel/mesh/redis.py), so a failover cannot lose it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from autoecoops.kernel.mesh.redis import confirm_replicated
from autoecoops.kernel.policy_audit.merkle import HASH_SIZE, Node

#: Complete nodes per tree chunk key: 2 MiB strings, far below Redis's 512 MiB limit.
CHUNK_BITS = 16
INDEX_KINDS = ("type", "actor", "resource", "trace")

# KEYS: head, requests, entries, time, events outbox, then tree chunk keys.
# ARGV: expected size, vkey, note, time_ns, index key prefix, entry count, the
# group's EntryAppended events packed ('' for none), then
# one packed argument per entry (length-prefixed fields: index, leaf bytes,
# request id, fingerprint, time us, then attribute kind/value pairs), then
# tree chunk appends (KEYS position, bytes). One argument per entry rather
# than thirty: packing the arguments was half the cost of a group.
_COMMIT = """
local head = KEYS[1]
local size = tonumber(redis.call('HGET', head, 'size') or '0')
if size ~= tonumber(ARGV[1]) then return {'size', tostring(size)} end
local vkey = redis.call('HGET', head, 'vkey')
if vkey and vkey ~= ARGV[2] then return {'key', vkey} end
local function fields(s)
  local out, pos = {}, 1
  while pos <= #s do
    local sp = string.find(s, ' ', pos, true)
    local n = tonumber(string.sub(s, pos, sp - 1))
    out[#out + 1] = string.sub(s, sp + 1, sp + n)
    pos = sp + n + 1
  end
  return out
end
local n = tonumber(ARGV[6])
local entries = {}
for i = 1, n do
  local f = fields(ARGV[7 + i])
  if f[3] ~= '' and redis.call('HEXISTS', KEYS[2], f[3]) == 1 then return {'dup', f[3]} end
  entries[i] = f
end
local prefix = ARGV[5]
for i = 1, n do
  local f = entries[i]
  redis.call('XADD', KEYS[3], f[1] .. '-1', 'e', f[2])
  if f[3] ~= '' then redis.call('HSET', KEYS[2], f[3], f[1] .. ' ' .. f[4]) end
  redis.call('ZADD', KEYS[4], f[5], f[1])
  for j = 6, #f, 2 do
    -- Index keys share the log's hash tag (in the prefix), so one slot.
    redis.call('ZADD', prefix .. f[j] .. ':' .. f[j + 1], f[1], f[1])
  end
end
for i = 8 + n, #ARGV, 2 do
  redis.call('APPEND', KEYS[tonumber(ARGV[i])], ARGV[i + 1])
end
if ARGV[7] ~= '' then redis.call('XADD', KEYS[5], '*', 'ev', ARGV[7]) end
redis.call('HSET', head, 'size', size + n, 'note', ARGV[3], 'time_ns', ARGV[4], 'vkey', ARGV[2])
return {'ok'}
"""


def _pack(*fields: bytes | str | int) -> bytes:
    out = bytearray()
    for f in fields:
        raw = f if isinstance(f, bytes) else str(f).encode()
        out += b"%d %s" % (len(raw), raw)
    return bytes(out)


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

    def __init__(
        self,
        redis: aioredis.Redis,
        base: str,
        events_key: str = "",
        *,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
    ) -> None:
        self.redis = redis
        self.base = base
        #: Replicas that must confirm a group before ``commit`` returns (0: none).
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        #: Where each group's EntryAppended events are committed with it (an
        #: events outbox the relay publishes from); '' publishes none.
        self.events_key = events_key
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
        events: bytes = b"",
    ) -> None:
        """Write one group atomically, or raise ``CommitConflict`` and write nothing.

        With ``wait_replicas``, return only once that many replicas have the
        group; else raise ``Unavailable`` (``REPLICATION_PENDING``, metadata
        ``committed: "true"``): the group is in the master's log but a failover
        could still lose it, and an append retried under the same request id
        is answered from the log if it is there, appended again if it was lost.
        """
        keys: list[str] = [
            self.head_key,
            self.requests_key,
            self.entries_key,
            self.time_key,
            self.events_key or self.head_key,
        ]
        args: list[Any] = [expected_size, vkey, note, time_ns, f"{self.base}:idx:", len(entries)]
        args.append(events if self.events_key else b"")
        for p in entries:
            attrs = [x for kv in p.attrs.items() for x in kv]
            args.append(_pack(p.index, p.data, p.request_id, p.fingerprint, p.time_us, *attrs))
        # Nodes of one chunk are consecutive, so each chunk gets one APPEND.
        chunks: dict[str, list[bytes]] = {}
        for (level, index), h in nodes:
            chunks.setdefault(self.tree_key(level, index), []).append(h)
        for key, hashes in chunks.items():
            keys.append(key)
            args += [len(keys), b"".join(hashes)]
        reply = await self._commit(keys=keys, args=args)
        status = _text(reply[0])
        if status != "ok":
            raise CommitConflict(status, _text(reply[1]))
        await self.confirm_replicated(f"up to size {expected_size + len(entries)}")

    async def confirm_replicated(self, what: str = "") -> None:
        """Return once ``wait_replicas`` replicas have every write the log's master
        took so far; else raise ``Unavailable`` (``REPLICATION_PENDING``).

        For a commit, and for an append answered from the log (a retry): the
        entry it finds may be one whose own commit was refused for want of
        replicas, so it is acknowledged only once it is replicated too.
        """
        await confirm_replicated(
            self.redis,
            self.head_key,
            self.wait_replicas,
            self.wait_timeout_ms,
            f"the audit log ({what or 'its entries'})",
        )

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
