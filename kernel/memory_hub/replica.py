"""This process's copy of one namespace: documents, chunks and their indexes.

A replica is derived state. It is loaded from Redis (with the dense index
from a snapshot when the snapshot is still good), then follows the
namespace's change stream: every read first applies the changes written
since, by this process or any other replica, so a search always sees every
write that finished before it began.

A snapshot is trusted only when it belongs to the same incarnation of the
namespace (``epoch``), the stream still holds every change since it was
taken (``seq`` has no gap), and after replaying those changes its labels are
exactly the chunks in Redis. Otherwise the index is rebuilt from the vectors
in Redis.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from autoecoops.kernel.memory_hub.index import DenseIndex, IndexPolicy, Labels
from autoecoops.kernel.memory_hub.lexical import LexicalIndex
from autoecoops.kernel.memory_hub.store import (
    Change,
    ChunkRecord,
    DocRecord,
    MemoryStore,
    NamespaceRecord,
)

log = logging.getLogger("autoecoops.memory_hub")
#: Stream entries read per round trip while following.
PAGE = 1000


def _vectors(raw: Sequence[bytes], dim: int) -> np.ndarray:
    if not raw:
        return np.zeros((0, dim), dtype=np.float32)
    return np.frombuffer(b"".join(raw), dtype=np.float32).reshape(len(raw), dim).copy()


def net_effect(changes: Sequence[Change]) -> tuple[list[int], set[int]]:
    """Labels a run of changes adds (in order) and removes; labels are never
    reused, so a label added and removed within the run is neither."""
    added: dict[int, None] = {}
    removed: set[int] = set()
    for c in changes:
        for label in c.removed:
            if label in added:
                del added[label]
            else:
                removed.add(label)
        for label in c.added:
            added[label] = None
    return list(added), removed


class Replica:
    """One namespace in memory. Hold ``lock`` to read or change it."""

    def __init__(self, meta: NamespaceRecord, policy: IndexPolicy) -> None:
        self.name = meta.name
        self.meta = meta
        self.epoch = meta.epoch
        self.seq = meta.seq
        self.cursor = "0-0"
        self.docs: dict[str, DocRecord] = {}
        self.chunks: dict[int, ChunkRecord] = {}
        self.policy = policy
        self.dense = DenseIndex(meta.dimensions, policy)
        #: Bumped on every change; the lexical index and snapshots record theirs.
        self.version = 0
        #: The version last snapshotted; -1 until one is written or adopted.
        self.snapshot_version = -1
        self._lexical: LexicalIndex | None = None
        self._lexical_version = -1
        self.lock = asyncio.Lock()
        #: How it was loaded: "snapshot", "snapshot+replay" or "rebuild".
        self.loaded_from = ""
        #: Index changes made while a rebuild runs, replayed onto the new index.
        self._journal: list[tuple[str, Labels, np.ndarray | None]] | None = None

    # -- loading ---------------------------------------------------------------

    @classmethod
    async def load(
        cls, store: MemoryStore, name: str, policy: IndexPolicy, snapshots: Path
    ) -> Replica | None:
        """Load ``name`` from Redis, reusing a good snapshot; None if it does not exist."""
        snap = await asyncio.to_thread(DenseIndex.load, snapshots, name, policy)
        data = await store.load(name, with_vectors=False)
        if data is None:
            DenseIndex.discard(snapshots, name)
            return None
        rep = cls(data.meta, policy)
        rep.docs, rep.chunks, rep.cursor = data.docs, data.chunks, data.cursor
        if snap is not None and await rep._adopt(store, *snap):
            return rep
        data = await store.load(name, with_vectors=True)
        if data is None:
            return None
        rep = cls(data.meta, policy)
        rep.docs, rep.chunks, rep.cursor = data.docs, data.chunks, data.cursor
        vectors = data.vectors or {}
        labels = np.fromiter(vectors.keys(), dtype=np.int64, count=len(vectors))
        matrix = _vectors(list(vectors.values()), data.meta.dimensions)
        rep.dense = await asyncio.to_thread(
            DenseIndex.build, data.meta.dimensions, policy, labels, matrix
        )
        rep.loaded_from = "rebuild"
        log.info("memory-hub: %s rebuilt from Redis (%d chunks)", name, len(labels))
        return rep

    async def _adopt(self, store: MemoryStore, index: DenseIndex, head: Mapping[str, Any]) -> bool:
        """Use a snapshot's index if it is of this incarnation and can be brought up to date."""
        if head.get("epoch") != self.epoch or index.dim != self.meta.dimensions:
            return False
        snap_seq, snap_cursor = int(head.get("seq", -1)), str(head.get("cursor", ""))
        if snap_seq > self.seq or not snap_cursor:
            return False
        changes: list[Change] = []
        after = snap_cursor
        while len(changes) < self.seq - snap_seq:
            page = await store.changes(self.name, after, self.cursor, PAGE)
            if not page:
                break
            changes += page
            after = page[-1].id
        expected = list(range(snap_seq + 1, self.seq + 1))
        if [c.seq for c in changes] != expected:
            log.info("memory-hub: %s snapshot is stale past the change stream", self.name)
            return False
        added, removed = net_effect(changes)
        added = [label for label in added if label in self.chunks]
        raw = await store.vectors(self.name, added)
        if any(v is None for v in raw):
            return False
        index.remove(np.fromiter(removed, dtype=np.int64, count=len(removed)))
        index.add(np.asarray(added, dtype=np.int64), _vectors([v for v in raw if v], index.dim))
        labels, _ = index.live_items()
        if set(labels.tolist()) != set(self.chunks):
            log.info("memory-hub: %s snapshot does not match Redis; rebuilding", self.name)
            return False
        self.dense = index
        self.loaded_from = "snapshot+replay" if changes else "snapshot"
        self.snapshot_version = -1 if changes else self.version
        log.info("memory-hub: %s loaded from %s", self.name, self.loaded_from)
        return True

    # -- following -------------------------------------------------------------

    async def sync(self, store: MemoryStore) -> bool:
        """Apply every change written since; False when the namespace was
        deleted, recreated, or the stream lost changes (reload it then).
        Call with ``lock`` held."""
        epoch, seq, changes = await store.head(self.name, self.cursor, PAGE)
        if epoch != self.epoch:
            return False
        while changes:
            if changes[0].seq != self.seq + 1:
                return False
            await self._apply(store, changes)
            if len(changes) < PAGE:
                break
            changes = await store.changes(self.name, self.cursor, "+", PAGE)
        return self.seq >= seq

    async def _apply(self, store: MemoryStore, changes: Sequence[Change]) -> None:
        added, removed = net_effect(changes)
        touched = list(dict.fromkeys(c.doc_id for c in changes))
        docs = await store.documents(self.name, touched)
        chunks = await store.chunks(self.name, added)
        raw = await store.vectors(self.name, added)
        # A label whose chunk is gone again was removed by a later change that
        # the next sync brings; skipping it now keeps index and chunks equal.
        present = [(label, c, v) for label, c, v in zip(added, chunks, raw, strict=True) if c and v]
        gone = np.fromiter((x for x in removed if x in self.chunks), dtype=np.int64)
        labels = np.asarray([p[0] for p in present], dtype=np.int64)
        vectors = _vectors([p[2] for p in present], self.dense.dim)
        self.dense.remove(gone)
        self.dense.add(labels, vectors)
        if self._journal is not None:
            self._journal.append(("remove", gone, None))
            self._journal.append(("add", labels, vectors))
        for label in gone.tolist():
            self.chunks.pop(label, None)
        for label, chunk, _ in present:
            self.chunks[label] = chunk
        for doc_id in touched:
            hit = docs.get(doc_id)
            if hit is None:
                self.docs.pop(doc_id, None)
            else:
                self.docs[doc_id] = hit[0]
        self.cursor, self.seq = changes[-1].id, changes[-1].seq
        self.version += 1

    # -- reading ---------------------------------------------------------------

    def allowed(self, matcher: Callable[[Mapping[str, Any]], bool] | None) -> Labels | None:
        """Labels of the chunks whose document matches (None: no filter)."""
        if matcher is None:
            return None
        out = [
            label
            for doc in self.docs.values()
            if matcher(doc.metadata)
            for label in doc.labels
            if label in self.chunks
        ]
        return np.asarray(out, dtype=np.int64)

    async def lexical(self) -> LexicalIndex:
        """The BM25 index, rebuilt first if anything changed since it was built."""
        if self._lexical is None or self._lexical_version != self.version:
            labels = np.fromiter(self.chunks.keys(), dtype=np.int64, count=len(self.chunks))
            texts = [c.text for c in self.chunks.values()]
            self._lexical = await asyncio.to_thread(LexicalIndex.build, labels, texts)
            self._lexical_version = self.version
        return self._lexical

    # -- maintenance -----------------------------------------------------------

    async def rebuild_if_needed(self) -> bool:
        """Rebuild the dense index in a worker thread when it asks for it
        (size crossed the HNSW threshold, or too many tombstones); reads go
        on against the old index meanwhile. Call without ``lock`` held."""
        async with self.lock:
            if self._journal is not None or not self.dense.needs_rebuild():
                return False
            labels, vectors = self.dense.live_items()
            self._journal = []
            old = self.dense
        try:
            kind = self.policy.kind_for(len(labels), old.kind)
            fresh = await asyncio.to_thread(
                DenseIndex.build, old.dim, self.policy, labels, vectors, kind
            )
        except BaseException:
            self._journal = None
            raise
        async with self.lock:
            for op, lbls, vecs in self._journal or []:
                if op == "remove":
                    fresh.remove(lbls)
                elif vecs is not None:
                    fresh.add(lbls, vecs)
            self._journal = None
            self.dense = fresh
            self.version += 1
        log.info("memory-hub: %s dense index rebuilt as %s (%d)", self.name, fresh.kind, fresh.live)
        return True

    async def save(self, directory: Path) -> None:
        """Snapshot the dense index with where it stands in the stream."""
        async with self.lock:
            if self.snapshot_version == self.version:
                return
            meta = {"epoch": self.epoch, "seq": self.seq, "cursor": self.cursor}
            await asyncio.to_thread(self.dense.save, directory, self.name, meta)
            self.snapshot_version = self.version


def snapshot_dir(data_dir: Path, key_prefix: str) -> Path:
    """Where a key prefix's snapshots live: tenants of one Redis never share files."""
    return data_dir / "memory-hub" / (re.sub(r"[^A-Za-z0-9_.-]", "_", key_prefix) or "default")
