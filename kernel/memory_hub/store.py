"""memory-hub's Redis persistence: the source of truth for everything.

Per namespace, every key shares the hash tag ``{<name>}`` so that one Lua
script can change them together (and would on a Redis Cluster):

- ``ns:{n}:meta``   HASH  the namespace: settings, ``epoch`` (a fresh id per
  creation), ``seq`` (changes so far), counts and times
- ``ns:{n}:docs``   HASH  document id -> document record (JSON, with its chunk labels)
- ``ns:{n}:revs``   HASH  document id -> revision, for compare-and-set
- ``ns:{n}:ids``    ZSET  document ids, for paging in id order
- ``ns:{n}:chunks`` HASH  chunk label -> chunk record (JSON: text, offsets, ...)
- ``ns:{n}:vecs``   HASH  chunk label -> float32 vector bytes
- ``ns:{n}:next``   STRING the last chunk label handed out
- ``ns:{n}:log``    STREAM one entry per change (``seq``, doc, labels added
  and removed): replicas follow it, snapshots record where they stand in it

and ``namespaces`` (ZSET) lists the names, for ListNamespaces.

Every write is one Lua script that checks first and writes after, so a
batch lands whole or not at all, and concurrent writers to the same
document resolve by revision (compare-and-set) rather than by luck.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from autoecoops.events.v1 import events_pb2
from autoecoops.kernel.mesh.errors import Aborted, AlreadyExists, FailedPrecondition, NotFound
from autoecoops.kernel.mesh.outbox import Outbox, make_event
from autoecoops.memory.v1 import events_pb2 as memory_events_pb2

_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""

# Only if it still exists: an HSET on a deleted namespace would revive a husk.
_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""

# KEYS: meta docs revs ids chunks vecs log
# ARGV: epoch now maxlen ndocs, then per document:
#   id expected_rev record nremove remove... nadd (label chunk vector)...
_COMMIT = """
local epoch, now, maxlen, ndocs = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
if redis.call('HGET', KEYS[1], 'epoch') ~= epoch then return {'GONE'} end
local i = 5
local docs = {}
for d = 1, ndocs do
  local id, rev = ARGV[i], ARGV[i + 1]
  local cur = redis.call('HGET', KEYS[3], id) or ''
  if cur ~= rev then return {'CONFLICT', id} end
  local nrem = tonumber(ARGV[i + 3])
  local nadd = tonumber(ARGV[i + 4 + nrem])
  docs[d] = {id = id, rev = rev, rec = ARGV[i + 2], rem = i + 4, nrem = nrem,
             add = i + 5 + nrem, nadd = nadd}
  i = i + 5 + nrem + 3 * nadd
end
local ids = {}
for _, d in ipairs(docs) do
  for j = 0, d.nrem - 1 do
    local label = ARGV[d.rem + j]
    redis.call('HDEL', KEYS[5], label)
    redis.call('HDEL', KEYS[6], label)
  end
  local added = {}
  for j = 0, d.nadd - 1 do
    local p = d.add + 3 * j
    redis.call('HSET', KEYS[5], ARGV[p], ARGV[p + 1])
    redis.call('HSET', KEYS[6], ARGV[p], ARGV[p + 2])
    added[#added + 1] = ARGV[p]
  end
  local removed = {}
  for j = 0, d.nrem - 1 do removed[#removed + 1] = ARGV[d.rem + j] end
  if d.rev == '' then redis.call('HINCRBY', KEYS[1], 'doc_count', 1) end
  redis.call('HINCRBY', KEYS[1], 'chunk_count', d.nadd - d.nrem)
  redis.call('HSET', KEYS[2], d.id, d.rec)
  redis.call('HINCRBY', KEYS[3], d.id, 1)
  redis.call('ZADD', KEYS[4], 0, d.id)
  local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
  ids[#ids + 1] = redis.call('XADD', KEYS[7], 'MAXLEN', '~', maxlen, '*',
    'seq', seq, 'op', 'upsert', 'doc', d.id,
    'add', table.concat(added, ','), 'remove', table.concat(removed, ','))
end
redis.call('HSET', KEYS[1], 'update_time', now)
return {'OK', unpack(ids)}
"""

# KEYS: meta docs revs ids chunks vecs log
# ARGV: epoch now maxlen, then pairs (id expected_rev); expected '' = any.
_DELETE = """
local epoch, now, maxlen = ARGV[1], ARGV[2], ARGV[3]
if redis.call('HGET', KEYS[1], 'epoch') ~= epoch then return -1 end
local n = 0
for i = 4, #ARGV, 2 do
  local id, want = ARGV[i], ARGV[i + 1]
  local rec = redis.call('HGET', KEYS[2], id)
  local rev = redis.call('HGET', KEYS[3], id)
  if rec and (want == '' or want == rev) then
    local labels = cjson.decode(rec)['labels']
    local removed = {}
    for _, label in ipairs(labels) do
      local l = tostring(label)
      redis.call('HDEL', KEYS[5], l)
      redis.call('HDEL', KEYS[6], l)
      removed[#removed + 1] = l
    end
    redis.call('HDEL', KEYS[2], id)
    redis.call('HDEL', KEYS[3], id)
    redis.call('ZREM', KEYS[4], id)
    redis.call('HINCRBY', KEYS[1], 'doc_count', -1)
    redis.call('HINCRBY', KEYS[1], 'chunk_count', -#labels)
    local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
    redis.call('XADD', KEYS[7], 'MAXLEN', '~', maxlen, '*',
      'seq', seq, 'op', 'delete', 'doc', id, 'add', '', 'remove', table.concat(removed, ','))
    n = n + 1
  end
end
if n > 0 then redis.call('HSET', KEYS[1], 'update_time', now) end
return n
"""

# KEYS: meta docs revs ids chunks vecs log next ; ARGV: force
_DROP = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if ARGV[1] ~= '1' and redis.call('HLEN', KEYS[2]) > 0 then return -2 end
redis.call('DEL', unpack(KEYS))
return 1
"""


def namespace_not_found(ns: str) -> NotFound:
    """The error for a namespace that does not exist (or was deleted meanwhile)."""
    return NotFound(
        f"namespace {ns!r} does not exist",
        reason="NAMESPACE_NOT_FOUND",
        resource_type="memory.namespace",
        resource_name=ns,
    )


@dataclass(frozen=True, slots=True)
class NamespaceRecord:
    """A namespace as stored."""

    name: str
    description: str
    labels: dict[str, str]
    model: str
    dimensions: int
    max_tokens: int
    overlap_tokens: int
    epoch: str
    create_time: float
    update_time: float
    document_count: int = 0
    chunk_count: int = 0
    seq: int = 0

    @classmethod
    def from_hash(cls, name: str, h: Mapping[bytes, bytes]) -> NamespaceRecord:
        """Decode the meta HASH."""
        g = {k.decode(): v.decode() for k, v in h.items()}
        return cls(
            name=name,
            description=g.get("description", ""),
            labels=json.loads(g.get("labels", "{}")),
            model=g.get("model", ""),
            dimensions=int(g.get("dimensions", 0)),
            max_tokens=int(g.get("max_tokens", 0)),
            overlap_tokens=int(g.get("overlap_tokens", 0)),
            epoch=g.get("epoch", ""),
            create_time=float(g.get("create_time", 0)),
            update_time=float(g.get("update_time", 0)),
            document_count=int(g.get("doc_count", 0)),
            chunk_count=int(g.get("chunk_count", 0)),
            seq=int(g.get("seq", 0)),
        )


@dataclass(slots=True)
class DocRecord:
    """A document as stored: its attributes and the labels of its chunks."""

    id: str
    content_hash: str
    content_type: int
    title: str = ""
    source_uri: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    labels: list[int] = field(default_factory=list)
    create_time: float = 0.0
    update_time: float = 0.0

    def to_json(self) -> str:
        """The stored form."""
        return json.dumps(
            {
                "content_hash": self.content_hash,
                "content_type": self.content_type,
                "title": self.title,
                "source_uri": self.source_uri,
                "metadata": self.metadata,
                "labels": self.labels,
                "create_time": self.create_time,
                "update_time": self.update_time,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, doc_id: str, raw: bytes | str) -> DocRecord:
        """Decode the stored form."""
        d = json.loads(raw)
        return cls(
            id=doc_id,
            content_hash=d["content_hash"],
            content_type=int(d["content_type"]),
            title=d.get("title", ""),
            source_uri=d.get("source_uri", ""),
            metadata=d.get("metadata") or {},
            labels=[int(x) for x in d.get("labels", [])],
            create_time=float(d.get("create_time", 0)),
            update_time=float(d.get("update_time", 0)),
        )


@dataclass(frozen=True, slots=True)
class ChunkRecord:
    """A chunk as stored (its vector is stored apart)."""

    label: int
    doc_id: str
    ordinal: int
    text: str
    start: int
    end: int
    #: Hash of the embedded text and model, so unchanged chunks keep their vectors.
    embed_hash: str

    def to_json(self) -> str:
        """The stored form."""
        return json.dumps(
            {
                "d": self.doc_id,
                "o": self.ordinal,
                "t": self.text,
                "s": self.start,
                "e": self.end,
                "h": self.embed_hash,
            },
            separators=(",", ":"),
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, label: int, raw: bytes | str) -> ChunkRecord:
        """Decode the stored form."""
        c = json.loads(raw)
        return cls(label, c["d"], int(c["o"]), c["t"], int(c["s"]), int(c["e"]), c["h"])


@dataclass(frozen=True, slots=True)
class Change:
    """One entry of a namespace's change stream."""

    id: str
    seq: int
    op: str
    doc_id: str
    added: tuple[int, ...]
    removed: tuple[int, ...]


def _labels(raw: bytes | None) -> tuple[int, ...]:
    return tuple(int(x) for x in raw.split(b",") if x) if raw else ()


@dataclass(frozen=True, slots=True)
class DocWrite:
    """One document of a commit: its new record, and chunk changes."""

    record: DocRecord
    #: The revision it must still be at ('' when it must not exist yet).
    expected_rev: str
    remove: Sequence[int]
    #: (chunk, vector bytes) to add.
    add: Sequence[tuple[ChunkRecord, bytes]]


@dataclass(frozen=True, slots=True)
class NamespaceSnapshot:
    """A namespace's documents and chunks read at one point of its stream."""

    meta: NamespaceRecord
    cursor: str
    docs: dict[str, DocRecord]
    chunks: dict[int, ChunkRecord]
    vectors: dict[int, bytes] | None


SOURCE = "//autoecoops/kernel/memory-hub"


def ingested(ns: str, writes: Sequence[DocWrite]) -> list[events_pb2.PublishRequest]:
    """DocumentIngested for each write of a commit (published with it, through the outbox)."""
    out = []
    for w in writes:
        r = w.record
        payload = memory_events_pb2.DocumentIngested(
            namespace=ns,
            document_id=r.id,
            content_hash=r.content_hash,
            content_type=r.content_type,  # type: ignore[arg-type]
            chunk_count=len(r.labels),
            source_uri=r.source_uri,
            replaced=bool(w.expected_rev),
        )
        out.append(
            make_event(
                payload,
                source=SOURCE,
                subject=r.id,
                resource=f"memory/namespaces/{ns}/documents/{r.id}",
                key=f"memory.document.ingested:{ns}:{r.id}:{r.content_hash}:{r.update_time!r}",
            )
        )
    return out


def deleted(ns: str, doc_id: str) -> events_pb2.PublishRequest:
    """DocumentDeleted of one document."""
    return make_event(
        memory_events_pb2.DocumentDeleted(namespace=ns, document_id=doc_id),
        source=SOURCE,
        subject=doc_id,
        resource=f"memory/namespaces/{ns}/documents/{doc_id}",
        key=f"memory.document.deleted:{ns}:{doc_id}:{uuid.uuid4().hex}",
    )


class MemoryStore:
    """Namespaces, documents, chunks and vectors in Redis."""

    def __init__(
        self,
        redis: aioredis.Redis,
        prefix: str,
        change_log_len: int = 100_000,
        outbox: Outbox | None = None,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.change_log_len = change_log_len

        def script(source: str, ok: str) -> Any:
            # With an outbox, a script that changed something also commits
            # the audited call's record (``ok`` tells when it did).
            return outbox.script(source, ok) if outbox else redis.register_script(source)

        self._outbox = outbox
        self._create = script(_CREATE, "r == 1")
        self._update = script(_UPDATE, "r == 1")
        self._commit = script(_COMMIT, "type(r) == 'table' and r[1] == 'OK'")
        self._delete = script(_DELETE, "r > 0")
        self._drop = script(_DROP, "r == 1")

    def _events(self, events: list[events_pb2.PublishRequest]) -> dict[str, Any]:
        # Events ride in the write's script only with an outbox (the mesh's);
        # a bare store (tests, tools) publishes none.
        return {"events": events} if self._outbox is not None else {}

    # -- keys -----------------------------------------------------------------

    def key(self, ns: str, part: str) -> str:
        """The key of one part of namespace ``ns``."""
        return f"{self.prefix}:ns:{{{ns}}}:{part}"

    def _keys(self, ns: str, *parts: str) -> list[str]:
        return [self.key(ns, p) for p in parts]

    def _doc_keys(self, ns: str) -> list[str]:
        return self._keys(ns, "meta", "docs", "revs", "ids", "chunks", "vecs", "log")

    @property
    def _registry(self) -> str:
        return f"{self.prefix}:namespaces"

    # -- namespaces -----------------------------------------------------------

    async def create_namespace(self, rec: NamespaceRecord) -> NamespaceRecord:
        """Store a new namespace; ALREADY_EXISTS when the name is taken."""
        now = time.time()
        fields = {
            "description": rec.description,
            "labels": json.dumps(rec.labels),
            "model": rec.model,
            "dimensions": rec.dimensions,
            "max_tokens": rec.max_tokens,
            "overlap_tokens": rec.overlap_tokens,
            "epoch": uuid.uuid4().hex,
            "create_time": repr(now),
            "update_time": repr(now),
            "doc_count": 0,
            "chunk_count": 0,
            "seq": 0,
        }
        flat = [str(x) for kv in fields.items() for x in kv]
        created = await self._create(keys=[self.key(rec.name, "meta")], args=flat)
        if not created:
            raise AlreadyExists(
                f"namespace {rec.name!r} already exists",
                resource_type="memory.namespace",
                resource_name=rec.name,
            )
        await self.redis.zadd(self._registry, {rec.name: 0})
        got = await self.namespace(rec.name)
        assert got is not None
        return got

    async def namespace(self, ns: str) -> NamespaceRecord | None:
        """The namespace, or None."""
        h: dict[bytes, bytes] = await self.redis.hgetall(self.key(ns, "meta"))  # type: ignore[assignment]
        return NamespaceRecord.from_hash(ns, h) if h else None

    async def require(self, ns: str) -> NamespaceRecord:
        """The namespace, or NOT_FOUND."""
        rec = await self.namespace(ns)
        if rec is None:
            raise namespace_not_found(ns)
        return rec

    async def update_namespace(
        self, ns: str, description: str | None, labels: dict[str, str] | None
    ) -> NamespaceRecord:
        """Change the mutable attributes of a namespace."""
        fields: dict[str, str] = {"update_time": repr(time.time())}
        if description is not None:
            fields["description"] = description
        if labels is not None:
            fields["labels"] = json.dumps(labels)
        flat = [x for kv in fields.items() for x in kv]
        if not await self._update(keys=[self.key(ns, "meta")], args=flat):
            raise namespace_not_found(ns)
        return await self.require(ns)

    async def delete_namespace(self, ns: str, force: bool) -> None:
        """Delete a namespace (and with ``force`` its documents)."""
        keys = [*self._doc_keys(ns), self.key(ns, "next")]
        result = await self._drop(keys=keys, args=["1" if force else "0"])
        if result == -1:
            await self.redis.zrem(self._registry, ns)
            raise namespace_not_found(ns)
        if result == -2:
            raise FailedPrecondition(
                f"namespace {ns!r} still holds documents; delete with force to remove them too",
                reason="NAMESPACE_NOT_EMPTY",
            )
        await self.redis.zrem(self._registry, ns)

    async def namespace_names(self, after: str, count: int) -> list[str]:
        """Up to ``count`` names after ``after``, in order."""
        lo = f"({after}" if after else "-"
        raw: list[bytes] = await self.redis.zrangebylex(self._registry, lo, "+", start=0, num=count)  # type: ignore[assignment]
        return [r.decode() for r in raw]

    async def namespaces(self, names: Sequence[str]) -> list[NamespaceRecord]:
        """The records of the existing ones among ``names``, in order."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for n in names:
                pipe.hgetall(self.key(n, "meta"))
            rows = await pipe.execute()
        return [NamespaceRecord.from_hash(n, h) for n, h in zip(names, rows, strict=True) if h]

    # -- documents --------------------------------------------------------------

    async def documents(self, ns: str, ids: Sequence[str]) -> dict[str, tuple[DocRecord, str]]:
        """The stored records and revisions of those of ``ids`` that exist."""
        if not ids:
            return {}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hmget(self.key(ns, "docs"), list(ids))
            pipe.hmget(self.key(ns, "revs"), list(ids))
            recs, revs = await pipe.execute()
        return {
            i: (DocRecord.from_json(i, r), v.decode())
            for i, r, v in zip(ids, recs, revs, strict=True)
            if r is not None and v is not None
        }

    async def all_documents(self, ns: str) -> dict[str, tuple[DocRecord, str]]:
        """Every document of ``ns`` with its revision."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(self.key(ns, "docs"))
            pipe.hgetall(self.key(ns, "revs"))
            recs, revs = await pipe.execute()
        out: dict[str, tuple[DocRecord, str]] = {}
        for k, v in recs.items():
            doc_id = k.decode()
            rev = revs.get(k)
            if rev is not None:
                out[doc_id] = (DocRecord.from_json(doc_id, v), rev.decode())
        return out

    async def document_ids(self, ns: str, after: str, count: int) -> list[str]:
        """Up to ``count`` document ids after ``after``, in order."""
        lo = f"({after}" if after else "-"
        raw: list[bytes] = await self.redis.zrangebylex(
            self.key(ns, "ids"), lo, "+", start=0, num=count
        )  # type: ignore[assignment]
        return [r.decode() for r in raw]

    async def chunks(self, ns: str, labels: Sequence[int]) -> list[ChunkRecord | None]:
        """Chunk records by label (None where gone)."""
        if not labels:
            return []
        raw = await self.redis.hmget(self.key(ns, "chunks"), [str(x) for x in labels])
        return [
            ChunkRecord.from_json(lb, r) if r is not None else None
            for lb, r in zip(labels, raw, strict=True)
        ]

    async def vectors(self, ns: str, labels: Sequence[int]) -> list[bytes | None]:
        """Vector bytes by label (None where gone)."""
        if not labels:
            return []
        raw: list[bytes | None] = await self.redis.hmget(  # type: ignore[assignment]
            self.key(ns, "vecs"), [str(x) for x in labels]
        )
        return raw

    async def allocate(self, ns: str, n: int) -> range:
        """``n`` fresh chunk labels (never reused within a namespace's life)."""
        if n <= 0:
            return range(0)
        last = int(await self.redis.incrby(self.key(ns, "next"), n))
        return range(last - n + 1, last + 1)

    async def commit(self, ns: str, epoch: str, writes: Sequence[DocWrite]) -> list[str]:
        """Apply ``writes`` atomically; Aborted naming the document on a
        revision conflict, NOT_FOUND when the namespace went away."""
        args: list[Any] = [epoch, repr(time.time()), self.change_log_len, len(writes)]
        for w in writes:
            args += [w.record.id, w.expected_rev, w.record.to_json(), len(w.remove)]
            args += [str(x) for x in w.remove]
            args.append(len(w.add))
            for chunk, vec in w.add:
                args += [str(chunk.label), chunk.to_json(), vec]
        result = await self._commit(
            keys=self._doc_keys(ns), args=args, **self._events(ingested(ns, writes))
        )
        status = result[0].decode() if isinstance(result[0], bytes) else str(result[0])
        if status == "GONE":
            raise namespace_not_found(ns)
        if status == "CONFLICT":
            doc = result[1].decode()
            raise Aborted(
                f"document {doc!r} changed while this batch was prepared",
                reason="CONCURRENT_CHANGE",
                metadata={"document_id": doc},
            )
        return [r.decode() for r in result[1:]]

    async def delete_documents(
        self, ns: str, epoch: str, targets: Sequence[tuple[str, str]]
    ) -> int:
        """Delete (id, expected revision or '') pairs atomically; the number deleted."""
        if not targets:
            return 0
        args: list[Any] = [epoch, repr(time.time()), self.change_log_len]
        for doc_id, rev in targets:
            args += [doc_id, rev]
        n = int(
            await self._delete(
                keys=self._doc_keys(ns),
                args=args,
                **self._events([deleted(ns, doc_id) for doc_id, _ in targets]),
            )
        )
        if n < 0:
            raise namespace_not_found(ns)
        return n

    # -- following and loading --------------------------------------------------

    async def head(self, ns: str, after: str, count: int = 1000) -> tuple[str, int, list[Change]]:
        """The namespace's epoch and seq ('' when gone) and changes after ``after``."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hmget(self.key(ns, "meta"), ["epoch", "seq"])
            pipe.xrange(self.key(ns, "log"), min=f"({after}", max="+", count=count)
            (epoch, seq), entries = await pipe.execute()
        if epoch is None:
            return "", 0, []
        return epoch.decode(), int(seq or 0), [_change(i, f) for i, f in entries]

    async def changes(self, ns: str, after: str, upto: str, count: int = 1000) -> list[Change]:
        """Changes in ``(after, upto]``."""
        entries: list[tuple[bytes, dict[bytes, bytes]]] = await self.redis.xrange(  # type: ignore[assignment]
            self.key(ns, "log"), min=f"({after}", max=upto, count=count
        )
        return [_change(i, f) for i, f in entries]

    async def load(self, ns: str, with_vectors: bool) -> NamespaceSnapshot | None:
        """Everything of ``ns`` at one point of its stream (one MULTI), or None."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(self.key(ns, "meta"))
            pipe.xrevrange(self.key(ns, "log"), max="+", min="-", count=1)
            pipe.hgetall(self.key(ns, "docs"))
            pipe.hgetall(self.key(ns, "chunks"))
            if with_vectors:
                pipe.hgetall(self.key(ns, "vecs"))
            rows = await pipe.execute()
        meta, last, docs, chunks = rows[:4]
        if not meta:
            return None
        return NamespaceSnapshot(
            meta=NamespaceRecord.from_hash(ns, meta),
            cursor=last[0][0].decode() if last else "0-0",
            docs={k.decode(): DocRecord.from_json(k.decode(), v) for k, v in docs.items()},
            chunks={int(k): ChunkRecord.from_json(int(k), v) for k, v in chunks.items()},
            vectors={int(k): v for k, v in rows[4].items()} if with_vectors else None,
        )


def _change(entry_id: bytes, f: Mapping[bytes, bytes]) -> Change:
    return Change(
        id=entry_id.decode(),
        seq=int(f[b"seq"]),
        op=f[b"op"].decode(),
        doc_id=f[b"doc"].decode(),
        added=_labels(f.get(b"add")),
        removed=_labels(f.get(b"remove")),
    )
