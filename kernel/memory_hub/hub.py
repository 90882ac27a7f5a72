"""memory-hub's use cases: namespaces, ingestion, search and context.

Redis (``store.py``) is the source of truth and every write goes straight
to it, atomically per batch. Searches run on in-memory replicas
(``replica.py``) that catch up with the change stream before each read.
Background tasks keep idle replicas following, rebuild dense indexes that
ask for it, and snapshot changed ones to the data directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from autoecoops.kernel.memory_hub import context as ctx
from autoecoops.kernel.memory_hub import search as srch
from autoecoops.kernel.memory_hub.chunking import Chunk, chunk_text
from autoecoops.kernel.memory_hub.embedder import Embedder
from autoecoops.kernel.memory_hub.index import DenseIndex, IndexPolicy
from autoecoops.kernel.memory_hub.parsing import Format, check_size, content_hash, extract
from autoecoops.kernel.memory_hub.replica import Replica
from autoecoops.kernel.memory_hub.settings import MemoryHubSettings
from autoecoops.kernel.memory_hub.store import (
    ChunkRecord,
    DocRecord,
    DocWrite,
    MemoryStore,
    NamespaceRecord,
    namespace_not_found,
)
from autoecoops.kernel.mesh.errors import (
    Aborted,
    FieldViolation,
    InvalidArgument,
    NotFound,
)

log = logging.getLogger("autoecoops.memory_hub")
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
MAX_ID_CHARS = 512
MAX_METADATA_BYTES = 64 * 1024
MAX_QUERY_CHARS = 8192
#: Times an ingest is re-planned after losing a race on one of its documents.
COMMIT_ATTEMPTS = 4


def check_namespace_name(name: str, field_name: str = "name") -> None:
    """Names are lowercase letters, digits and hyphens, at most 63 characters."""
    if not _NAME.match(name):
        raise InvalidArgument(
            f"{name!r} is not a namespace name (lowercase letters, digits and hyphens, at most 63)",
            reason="INVALID_NAMESPACE_NAME",
            field_violations=[FieldViolation(field_name, "invalid namespace name")],
        )


@dataclass(frozen=True, slots=True)
class DocumentInput:
    """One document of an ingest request, as the service received it."""

    id: str
    raw: bytes
    format: Format
    title: str = ""
    source_uri: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    #: Whether the content came as text (so a PDF given as text is refused).
    as_text: bool = False
    #: The request path of this document, for errors: ``documents[3]``.
    path: str = "documents[0]"


@dataclass(frozen=True, slots=True)
class IngestResult:
    """The outcome of one document."""

    document_id: str
    chunk_count: int
    skipped_unchanged: bool
    content_hash: str


@dataclass
class _Plan:
    doc: DocumentInput
    hash: str
    existing: DocRecord | None
    rev: str
    title: str = ""
    chunks: list[Chunk] = field(default_factory=list)
    unchanged: bool = False

    def record(self, title: str, labels: list[int], created: float, updated: float) -> DocRecord:
        """The document record to store for this plan."""
        d = self.doc
        return DocRecord(
            d.id,
            self.hash,
            int(d.format),
            title,
            d.source_uri,
            d.metadata,
            labels,
            created,
            updated,
        )


def _embed_hash(model: str, text: str) -> str:
    return hashlib.sha256(f"{model}\x00{text}".encode()).hexdigest()[:32]


class MemoryHub:
    """Namespaces, documents and search, over one Redis and local snapshots."""

    def __init__(self, store: MemoryStore, settings: MemoryHubSettings, snapshots: Path) -> None:
        self.store = store
        self.settings = settings
        self.snapshots = snapshots
        self.policy = IndexPolicy(
            hnsw_threshold=settings.hnsw_threshold,
            m=settings.hnsw_m,
            ef_construction=settings.hnsw_ef_construction,
            ef_search=settings.hnsw_ef_search,
            tombstone_ratio=settings.tombstone_ratio,
        )
        self._embedders: dict[str, Embedder] = {}
        self._replicas: dict[str, Replica] = {}
        self._loading: dict[str, asyncio.Lock] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._rebuilds: set[asyncio.Task[bool]] = set()

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Start the background work; returns at once (nothing heavy loads here)."""
        self._tasks.append(asyncio.create_task(self._warm(), name="memory-hub-warm"))
        self._tasks.append(asyncio.create_task(self._follow(), name="memory-hub-follow"))

    def load_default_model(self) -> None:
        """Load the default model in the background, once the process serves.

        Importing torch and reading the weights takes seconds on an idle host
        and tens of seconds on a busy one; left to the first query, a new
        replica made that query wait for all of it (a search through a fresh
        replica of a loaded cluster ran into its 30 s deadline). Run after
        every server of the process is SERVING, so it never delays start-up;
        a query that comes first waits only for the rest of the load.
        """
        emb = self.embedder(self.settings.default_model)

        async def load() -> None:
            began = time.monotonic()
            try:
                await asyncio.to_thread(emb.load)
            except Exception:  # the first query loads it (and reports why it cannot)
                log.warning("memory-hub: cannot preload model %s", emb.name, exc_info=True)
                return
            log.info("memory-hub: model %s loaded in %.1fs", emb.name, time.monotonic() - began)

        self._tasks.append(asyncio.create_task(load(), name="memory-hub-model"))

    async def close(self) -> None:
        """Stop background work and snapshot every changed replica."""
        for task in [*self._tasks, *self._rebuilds]:
            task.cancel()
        for task in [*self._tasks, *self._rebuilds]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        await self.snapshot_all()

    async def snapshot_all(self) -> None:
        """Snapshot every replica that changed since its last snapshot."""
        for rep in list(self._replicas.values()):
            try:
                await rep.save(self.snapshots)
            except OSError:
                log.warning("memory-hub: cannot snapshot %s", rep.name, exc_info=True)

    async def _warm(self) -> None:
        # Load every namespace after start, one at a time, so the first
        # search of each does not pay for it; a request that comes first
        # loads its namespace itself (the per-namespace lock shares the work).
        after = ""
        while names := await self.store.namespace_names(after, 100):
            for name in names:
                try:
                    await self.replica(name)
                except NotFound:
                    pass
                except Exception:
                    log.warning("memory-hub: cannot load %s", name, exc_info=True)
            after = names[-1]

    async def _follow(self) -> None:
        last_snapshot = time.monotonic()
        interval = self.settings.follow_interval or 2.0
        while True:
            await asyncio.sleep(interval)
            for name in list(self._replicas):
                try:
                    await self.replica(name)
                except NotFound:
                    pass
                except Exception:
                    log.warning("memory-hub: cannot follow %s", name, exc_info=True)
            every = self.settings.snapshot_interval
            if every and time.monotonic() - last_snapshot >= every:
                last_snapshot = time.monotonic()
                await self.snapshot_all()

    # -- models ----------------------------------------------------------------

    def embedder(self, model: str, field_name: str = "namespace.embedding_model") -> Embedder:
        """The embedder of ``model``; INVALID_ARGUMENT when it is not configured."""
        emb = self._embedders.get(model)
        if emb is None:
            path = self.settings.model_path(model)
            if path is None:
                known = ", ".join(sorted(self.settings.models)) or "none"
                raise InvalidArgument(
                    f"unknown embedding model {model!r} (known: {known})",
                    reason="UNKNOWN_MODEL",
                    field_violations=[FieldViolation(field_name, "not a configured model")],
                )
            emb = self._embedders[model] = Embedder(model, path, self.settings.batch_size)
        return emb

    # -- namespaces --------------------------------------------------------------

    async def create_namespace(
        self,
        name: str,
        description: str = "",
        labels: Mapping[str, str] | None = None,
        model: str = "",
        max_tokens: int = 0,
        overlap_tokens: int | None = None,
    ) -> NamespaceRecord:
        """Create a namespace with a model and chunking fixed for its life.

        ``max_tokens`` 0 is the default size (capped at the model's window);
        ``overlap_tokens`` None is the default overlap (at most half a chunk).
        """
        check_namespace_name(name, "namespace.name")
        emb = self.embedder(model or self.settings.default_model)
        window = emb.window
        bad: list[FieldViolation] = []
        size = max_tokens or min(self.settings.chunk_tokens, window)
        overlap = (
            min(self.settings.chunk_overlap, size // 2)
            if overlap_tokens is None
            else overlap_tokens
        )
        if not 16 <= size <= window:
            bad.append(
                FieldViolation(
                    "namespace.chunking.max_tokens",
                    f"must be 16 to {window} (the model's window less its special tokens)",
                )
            )
        if not 0 <= overlap < size:
            bad.append(
                FieldViolation(
                    "namespace.chunking.overlap_tokens",
                    "must be 0 or more and less than max_tokens",
                )
            )
        if bad:
            raise InvalidArgument(
                "invalid chunking: " + "; ".join(v.description for v in bad),
                reason="INVALID_CHUNKING",
                field_violations=bad,
            )
        return await self.store.create_namespace(
            NamespaceRecord(
                name=name,
                description=description,
                labels=dict(labels or {}),
                model=emb.name,
                dimensions=emb.dimensions,
                max_tokens=size,
                overlap_tokens=overlap,
                epoch="",
                create_time=0.0,
                update_time=0.0,
            )
        )

    async def delete_namespace(self, name: str, force: bool) -> None:
        """Delete a namespace, its replica here and its snapshot."""
        await self.store.delete_namespace(name, force)
        self._replicas.pop(name, None)
        DenseIndex.discard(self.snapshots, name)

    # -- replicas ----------------------------------------------------------------

    async def replica(self, name: str) -> Replica:
        """The namespace's replica, loaded if need be and caught up with every
        write that finished before this call; NOT_FOUND if there is none."""
        rep = self._replicas.get(name)
        if rep is not None:
            async with rep.lock:
                if await rep.sync(self.store):
                    self._maybe_rebuild(rep)
                    return rep
            if self._replicas.get(name) is rep:
                del self._replicas[name]
        lock = self._loading.setdefault(name, asyncio.Lock())
        async with lock:
            rep = self._replicas.get(name)
            if rep is None:
                rep = await Replica.load(self.store, name, self.policy, self.snapshots)
                if rep is None:
                    raise namespace_not_found(name)
                self._replicas[name] = rep
                self._maybe_rebuild(rep)
        return rep

    def _maybe_rebuild(self, rep: Replica) -> None:
        if rep.dense.needs_rebuild():
            task = asyncio.create_task(
                rep.rebuild_if_needed(), name=f"memory-hub-rebuild-{rep.name}"
            )
            self._rebuilds.add(task)
            task.add_done_callback(self._rebuilds.discard)

    def loaded(self, name: str) -> Replica | None:
        """The replica of ``name`` if this process has loaded it (for tests and metrics)."""
        return self._replicas.get(name)

    # -- ingestion ---------------------------------------------------------------

    async def ingest(self, ns: str, docs: Sequence[DocumentInput]) -> list[IngestResult]:
        """Add or replace ``docs`` in one atomic batch.

        The whole batch is validated (parsed and chunked) before anything is
        embedded or written; documents whose content hash is unchanged are
        not re-embedded, nor are unchanged chunks of changed documents; a
        lost race on a document re-plans the batch with the vectors already
        computed, so no embedding work is thrown away.
        """
        meta = await self.store.require(ns)
        emb = self.embedder(meta.model)
        self._check_batch(docs)
        cache: dict[str, bytes] = {}
        for attempt in range(COMMIT_ATTEMPTS):
            try:
                return await self._ingest_once(meta, emb, docs, cache)
            except Aborted:
                if attempt == COMMIT_ATTEMPTS - 1:
                    raise
                meta = await self.store.require(ns)
        raise AssertionError("unreachable")

    def _check_batch(self, docs: Sequence[DocumentInput]) -> None:
        bad: list[FieldViolation] = []
        reasons: set[str] = set()
        seen: set[str] = set()
        for d in docs:
            if not d.id or len(d.id) > MAX_ID_CHARS or any(ord(c) < 32 for c in d.id):
                bad.append(
                    FieldViolation(
                        f"{d.path}.id", f"1 to {MAX_ID_CHARS} characters, no control characters"
                    )
                )
            elif d.id in seen:
                bad.append(
                    FieldViolation(f"{d.path}.id", f"document {d.id!r} appears twice in the batch")
                )
            seen.add(d.id)
            if d.format is Format.PDF and d.as_text:
                bad.append(FieldViolation(f"{d.path}.text", "a PDF must be sent as content bytes"))
            try:
                check_size(d.raw, self.settings.max_document_bytes, _body(d))
            except InvalidArgument as err:
                bad += err.field_violations
                reasons.add(err.reason)
            if len(repr(d.metadata)) > MAX_METADATA_BYTES:
                bad.append(FieldViolation(f"{d.path}.metadata", f"over {MAX_METADATA_BYTES} bytes"))
        if not docs:
            bad.append(FieldViolation("documents", "at least one document is required"))
        if bad:
            raise _invalid(bad, reasons)

    async def _ingest_once(
        self,
        meta: NamespaceRecord,
        emb: Embedder,
        docs: Sequence[DocumentInput],
        cache: dict[str, bytes],
    ) -> list[IngestResult]:
        ns = meta.name
        existing = await self.store.documents(ns, [d.id for d in docs])
        plans: list[_Plan] = []
        for d in docs:
            old, rev = existing.get(d.id, (None, ""))
            h = content_hash(d.raw)
            same = old is not None and old.content_hash == h and old.content_type == int(d.format)
            plans.append(_Plan(d, h, old, rev, unchanged=same))
        changed = [p for p in plans if not p.unchanged]
        await asyncio.to_thread(self._prepare, changed, emb, meta)
        # Vectors to reuse: unchanged chunks of replaced documents.
        reuse_labels: dict[str, int] = {}
        old_labels = [lb for p in changed if p.existing for lb in p.existing.labels]
        for chunk in await self.store.chunks(ns, old_labels):
            if chunk is not None:
                reuse_labels.setdefault(chunk.embed_hash, chunk.label)
        wanted = {
            _embed_hash(meta.model, c.embed_text): c.embed_text for p in changed for c in p.chunks
        }
        missing = [h for h in wanted if h not in cache and h in reuse_labels]
        for h, vec in zip(
            missing,
            await self.store.vectors(ns, [reuse_labels[h] for h in missing]),
            strict=True,
        ):
            if vec is not None:
                cache[h] = vec
        to_encode = [h for h in wanted if h not in cache]
        if to_encode:
            vectors = await asyncio.to_thread(emb.encode, [wanted[h] for h in to_encode])
            for h, row in zip(to_encode, vectors, strict=True):
                cache[h] = row.astype(np.float32).tobytes()
        labels = iter(await self.store.allocate(ns, sum(len(p.chunks) for p in changed)))
        now = time.time()
        writes: list[DocWrite] = []
        results: list[IngestResult] = []
        for p in plans:
            d = p.doc
            title = d.title or p.title or (p.existing.title if p.existing and p.unchanged else "")

            if p.unchanged and p.existing is not None:
                old = p.existing
                if (title, d.source_uri, d.metadata) != (old.title, old.source_uri, old.metadata):
                    writes.append(
                        DocWrite(p.record(title, old.labels, old.create_time, now), p.rev, (), ())
                    )
                results.append(IngestResult(d.id, len(old.labels), True, p.hash))
                continue
            add: list[tuple[ChunkRecord, bytes]] = []
            for ordinal, c in enumerate(p.chunks):
                h = _embed_hash(meta.model, c.embed_text)
                rec = ChunkRecord(next(labels), d.id, ordinal, c.text, c.start, c.end, h)
                add.append((rec, cache[h]))
            created = p.existing.create_time if p.existing else now
            remove = p.existing.labels if p.existing else []
            new = p.record(title, [c.label for c, _ in add], created, now)
            writes.append(DocWrite(new, p.rev, remove, add))
            results.append(IngestResult(d.id, len(add), False, p.hash))
        if writes:
            await self.store.commit(ns, meta.epoch, writes)
        return results

    def _prepare(self, plans: Sequence[_Plan], emb: Embedder, meta: NamespaceRecord) -> None:
        """Parse and chunk (CPU-bound, in a worker thread); all errors at once."""
        bad: list[FieldViolation] = []
        reasons: set[str] = set()
        for p in plans:
            d = p.doc
            try:
                out = extract(d.raw, d.format, _body(d))
            except InvalidArgument as err:
                bad += err.field_violations
                reasons.add(err.reason)
                continue
            p.title = out.title
            p.chunks = chunk_text(
                out.text,
                markdown=out.markdown,
                max_tokens=meta.max_tokens,
                overlap=meta.overlap_tokens,
                offsets=emb.offsets(out.text),
                count_tokens=emb.count,
            )
            if not p.chunks:
                bad.append(FieldViolation(_body(d), "the document has no text"))
        if bad:
            raise _invalid(bad, reasons)

    # -- documents ---------------------------------------------------------------

    async def delete_document(self, ns: str, doc_id: str) -> None:
        """Delete one document; NOT_FOUND if it is not there."""
        meta = await self.store.require(ns)
        if not await self.store.delete_documents(ns, meta.epoch, [(doc_id, "")]):
            raise NotFound(
                f"document {doc_id!r} is not in namespace {ns!r}",
                reason="DOCUMENT_NOT_FOUND",
                resource_type="memory.document",
                resource_name=f"{ns}/{doc_id}",
            )

    async def delete_documents(
        self,
        ns: str,
        ids: Sequence[str],
        matcher: Callable[[Mapping[str, Any]], bool] | None,
        validate_only: bool = False,
    ) -> int:
        """Delete documents named in ``ids`` or matching ``matcher``, atomically."""
        if not ids and matcher is None:
            raise InvalidArgument(
                "name documents by id, or give a filter",
                reason="NOTHING_TO_DELETE",
                field_violations=[FieldViolation("filter", "set document_ids or filter")],
            )
        meta = await self.store.require(ns)
        if matcher is None:
            found = await self.store.documents(ns, list(dict.fromkeys(ids)))
        else:
            found = await self.store.all_documents(ns)
            named = set(ids)
            found = {i: v for i, v in found.items() if i in named or matcher(v[0].metadata)}
        if validate_only:
            return len(found)
        # Each document only at the revision that matched: a concurrent
        # replacement that no longer matches the filter is not deleted.
        return await self.store.delete_documents(
            ns, meta.epoch, [(i, rev) for i, (_, rev) in found.items()]
        )

    async def document(
        self, ns: str, doc_id: str, with_chunks: bool
    ) -> tuple[DocRecord, list[ChunkRecord]]:
        """A document and, on request, its chunks in order."""
        await self.store.require(ns)
        found = await self.store.documents(ns, [doc_id])
        if doc_id not in found:
            raise NotFound(
                f"document {doc_id!r} is not in namespace {ns!r}",
                reason="DOCUMENT_NOT_FOUND",
                resource_type="memory.document",
                resource_name=f"{ns}/{doc_id}",
            )
        doc = found[doc_id][0]
        chunks = await self.store.chunks(ns, doc.labels) if with_chunks else []
        return doc, sorted((c for c in chunks if c is not None), key=lambda c: c.ordinal)

    # -- search ------------------------------------------------------------------

    def check_k(self, k: int) -> int:
        """The number of results: 10 by default, at most the configured maximum."""
        if k == 0:
            return min(10, self.settings.max_k)
        if not 1 <= k <= self.settings.max_k:
            raise InvalidArgument(
                f"k={k}: must be 1 to {self.settings.max_k}",
                reason="K_OUT_OF_RANGE",
                field_violations=[FieldViolation("k", f"must be 1 to {self.settings.max_k}")],
            )
        return k

    @staticmethod
    def check_query(text: str) -> None:
        """A query must have text, and not be absurdly long."""
        if not text.strip() or len(text) > MAX_QUERY_CHARS:
            raise InvalidArgument(
                f"query: 1 to {MAX_QUERY_CHARS} characters of text are required",
                reason="INVALID_QUERY",
                field_violations=[FieldViolation("query", f"1 to {MAX_QUERY_CHARS} characters")],
            )

    async def search(self, ns: str, q: srch.Query) -> list[srch.Hit]:
        """Search namespace ``ns`` after catching up with every finished write."""
        return (await self._search(ns, q))[1]

    async def _search(self, ns: str, q: srch.Query) -> tuple[Replica, list[srch.Hit]]:
        self.check_query(q.text)
        rep = await self.replica(ns)
        vector = None
        if q.mode is not srch.Mode.LEXICAL:
            emb = self.embedder(rep.meta.model)
            vector = (await asyncio.to_thread(emb.encode, [q.text]))[0]
        async with rep.lock:
            lexical = await rep.lexical() if q.mode is not srch.Mode.DENSE else None
            return rep, srch.run(rep, q, vector, lexical)

    async def context(self, ns: str, q: srch.Query, budget: int) -> ctx.Context:
        """The best chunks for ``q`` assembled within ``budget`` tokens (0: the default)."""
        if not 0 <= budget <= self.settings.max_context_tokens:
            raise InvalidArgument(
                f"max_tokens={budget}: must be 1 to {self.settings.max_context_tokens}",
                reason="BUDGET_OUT_OF_RANGE",
                field_violations=[
                    FieldViolation("max_tokens", f"must be 1 to {self.settings.max_context_tokens}")
                ],
            )
        rep, hits = await self._search(ns, q)
        emb = self.embedder(rep.meta.model)
        return ctx.assemble(hits, budget or self.settings.context_tokens, emb.count)


def _body(d: DocumentInput) -> str:
    """The request field that carried a document's content."""
    return f"{d.path}.{'text' if d.as_text else 'content'}"


def _invalid(bad: Sequence[FieldViolation], reasons: Set[str] = frozenset()) -> InvalidArgument:
    # One kind of problem keeps its own reason (DOCUMENT_TOO_LARGE, NOT_UTF8,
    # ...); a mix is INVALID_DOCUMENTS, with every violation listed.
    return InvalidArgument(
        "invalid documents: " + "; ".join(f"{v.field}: {v.description}" for v in bad[:10]),
        reason=next(iter(reasons)) if len(reasons) == 1 and len(bad) == 1 else "INVALID_DOCUMENTS",
        field_violations=bad,
    )
