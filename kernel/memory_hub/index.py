"""A namespace's dense index: exact (IDMap2 + Flat) while small, HNSW when large.

Vectors are L2-normalised, so inner product is cosine similarity. Labels
are the namespace's int64 chunk ids.

HNSW cannot delete in place, so a delete there is a tombstone: the label
stays in the graph but is excluded from every search through an ID
selector. When tombstones pass a share of the index, or the index crosses
the size threshold either way, ``needs_rebuild`` says so and the owner
builds a fresh index from ``live()`` in a worker thread (``build``), then
replays the changes made meanwhile and swaps it in.

Filtered searches never starve: with a filter the search is restricted to
the allowed labels by a selector; the exact index answers exactly, and an
HNSW search that returns fewer than k is repeated deeper (a wider beam) and
finally answered exactly over the allowed labels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

# faiss logs at INFO every CPU-specific build it tries before the one it
# loads; that is noise in `autoecoops up`.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

import faiss as _faiss  # noqa: E402

#: faiss's own stubs lack the search-parameter and HNSW classes used here.
faiss: Any = _faiss
Labels = npt.NDArray[np.int64]
Vectors = npt.NDArray[np.float32]
FLAT, HNSW = "flat", "hnsw"
#: With a filter allowing at most this many chunks, search them exactly.
EXACT_SUBSET = 4096
SNAPSHOT_VERSION = 1


@dataclass(frozen=True, slots=True)
class IndexPolicy:
    """When to use HNSW, how to build it, and when to rebuild it."""

    hnsw_threshold: int = 20_000
    m: int = 32
    ef_construction: int = 80
    ef_search: int = 96
    tombstone_ratio: float = 0.2

    def kind_for(self, size: int, current: str | None = None) -> str:
        """The index kind for ``size`` live vectors (with hysteresis around the threshold)."""
        if current == HNSW and size > self.hnsw_threshold // 2:
            return HNSW
        return HNSW if size > self.hnsw_threshold else FLAT


def _labels(values: Any) -> Labels:
    return np.ascontiguousarray(np.asarray(values, dtype=np.int64).reshape(-1))


class DenseIndex:
    """A faiss IndexIDMap2 over a Flat or HNSW index, with tombstones for HNSW."""

    def __init__(self, dim: int, policy: IndexPolicy, kind: str = FLAT) -> None:
        self.dim = dim
        self.policy = policy
        self.kind = kind
        if kind == HNSW:
            inner: Any = faiss.IndexHNSWFlat(dim, policy.m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = policy.ef_construction
            inner.hnsw.efSearch = policy.ef_search
        else:
            inner = faiss.IndexFlatIP(dim)
        self.index: Any = faiss.IndexIDMap2(inner)
        self.tombstones: set[int] = set()
        self._not_dead: Any = None

    # -- size ----------------------------------------------------------------

    @property
    def live(self) -> int:
        """Vectors that searches can return."""
        return int(self.index.ntotal) - len(self.tombstones)

    def __len__(self) -> int:
        return self.live

    def memory_bytes(self) -> int:
        """The serialized size of the index: a close measure of its memory."""
        return int(faiss.serialize_index(self.index).nbytes)

    def needs_rebuild(self) -> bool:
        """Whether the kind no longer fits the size, or tombstones pile up."""
        if self.policy.kind_for(self.live, self.kind) != self.kind:
            return True
        total = int(self.index.ntotal)
        return bool(total) and len(self.tombstones) > self.policy.tombstone_ratio * total

    # -- changes -------------------------------------------------------------

    def add(self, labels: Labels, vectors: Vectors) -> None:
        """Add vectors under ``labels`` (which must not be in the index)."""
        if len(labels) == 0:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        self.index.add_with_ids(vectors, _labels(labels))

    def remove(self, labels: Labels) -> None:
        """Remove ``labels``: at once from Flat, as tombstones from HNSW."""
        if len(labels) == 0:
            return
        if self.kind == FLAT:
            self.index.remove_ids(_labels(labels))
            return
        known = set(self._all_labels().tolist())
        self.tombstones.update(int(x) for x in labels if int(x) in known)
        self._not_dead = None

    def _all_labels(self) -> Labels:
        return _labels(faiss.vector_to_array(self.index.id_map))

    def live_items(self) -> tuple[Labels, Vectors]:
        """Copies of every live label and vector, for a rebuild in another thread."""
        labels = self._all_labels()
        n = len(labels)
        vectors = self.index.index.reconstruct_n(0, n) if n else np.zeros((0, self.dim), np.float32)
        if self.tombstones:
            keep = ~np.isin(labels, np.fromiter(self.tombstones, np.int64))
            labels, vectors = labels[keep], vectors[keep]
        return labels.copy(), np.ascontiguousarray(vectors, dtype=np.float32)

    @classmethod
    def build(
        cls,
        dim: int,
        policy: IndexPolicy,
        labels: Labels,
        vectors: Vectors,
        kind: str | None = None,
    ) -> DenseIndex:
        """A new index over ``labels``/``vectors``; safe to run in a worker thread."""
        out = cls(dim, policy, kind or policy.kind_for(len(labels)))
        out.add(labels, vectors)
        return out

    # -- search --------------------------------------------------------------

    def _dead_selector(self) -> Any:
        if not self.tombstones:
            return None
        if self._not_dead is None:
            batch = faiss.IDSelectorBatch(_labels(sorted(self.tombstones)))
            self._not_dead = (faiss.IDSelectorNot(batch), batch)  # keep batch alive
        return self._not_dead[0]

    def search(
        self, query: Vectors, k: int, allowed: Labels | None = None
    ) -> tuple[Labels, npt.NDArray[np.float32]]:
        """The best ``k`` labels and cosine scores, best first.

        With ``allowed``, only those labels are considered, and as many as
        ``min(k, live allowed)`` come back: the search goes deeper, then exact,
        rather than returning fewer because of the filter.
        """
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, self.dim)
        if k <= 0 or self.live == 0:
            return _labels([]), np.zeros(0, np.float32)
        if allowed is not None:
            if self.tombstones:
                allowed = allowed[~np.isin(allowed, np.fromiter(self.tombstones, np.int64))]
            if len(allowed) == 0:
                return _labels([]), np.zeros(0, np.float32)
            if self.kind == HNSW and len(allowed) <= EXACT_SUBSET:
                return self.exact(q, k, allowed)
        want = min(k, self.live if allowed is None else len(allowed))
        # Selectors are held in locals for the whole search: the parameters
        # object does not keep them alive on its own.
        sel: Any = faiss.IDSelectorBatch(allowed) if allowed is not None else None
        if self.kind == FLAT:
            return self._run(q, want, faiss.SearchParameters(sel=sel) if sel else None)
        if sel is None:
            sel = self._dead_selector()
        ef = max(self.policy.ef_search, want)
        total = int(self.index.ntotal)
        while True:
            params = (
                faiss.SearchParametersHNSW(sel=sel, efSearch=ef)
                if sel is not None
                else faiss.SearchParametersHNSW(efSearch=ef)
            )
            labels, scores = self._run(q, want, params)
            if len(labels) >= want or ef >= total:
                break
            ef = min(ef * 4, total)  # deeper: a wider beam reaches more allowed labels
        if len(labels) >= want:
            return labels, scores
        # The graph could not reach enough of them: answer exactly.
        pool = allowed if allowed is not None else self.live_items()[0]
        return self.exact(q, k, pool)

    def _run(self, q: Vectors, k: int, params: Any) -> tuple[Labels, npt.NDArray[np.float32]]:
        scores, labels = self.index.search(q, k, params=params)
        found = labels[0] >= 0
        return _labels(labels[0][found]), scores[0][found].astype(np.float32)

    def exact(self, q: Vectors, k: int, labels: Labels) -> tuple[Labels, npt.NDArray[np.float32]]:
        """Exact top-k over the given labels (all must be live)."""
        if len(labels) == 0:
            return _labels([]), np.zeros(0, np.float32)
        vectors = self.index.reconstruct_batch(_labels(labels))
        scores = (vectors @ q.reshape(-1)).astype(np.float32)
        top = min(k, len(labels))
        part = np.argpartition(-scores, top - 1)[:top]
        order = part[np.argsort(-scores[part], kind="stable")]
        return _labels(labels)[order], scores[order]

    # -- snapshots -----------------------------------------------------------

    def save(self, directory: Path, name: str, meta: dict[str, Any]) -> None:
        """Write ``<name>.faiss`` and then ``<name>.json`` (the commit marker)
        atomically, with a checksum of the index bytes."""
        directory.mkdir(parents=True, exist_ok=True)
        data = faiss.serialize_index(self.index).tobytes()
        head = {
            **meta,
            "version": SNAPSHOT_VERSION,
            "kind": self.kind,
            "dim": self.dim,
            "tombstones": sorted(self.tombstones),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        for suffix, payload in ((".faiss", data), (".json", json.dumps(head).encode())):
            tmp = directory / f".{name}{suffix}.tmp"
            tmp.write_bytes(payload)
            os.replace(tmp, directory / f"{name}{suffix}")

    @classmethod
    def load(
        cls, directory: Path, name: str, policy: IndexPolicy
    ) -> tuple[DenseIndex, dict[str, Any]] | None:
        """The snapshot ``name`` and its metadata, or None when absent or damaged."""
        try:
            head = json.loads((directory / f"{name}.json").read_text())
            data = (directory / f"{name}.faiss").read_bytes()
        except (OSError, ValueError):
            return None
        if (
            not isinstance(head, dict)
            or head.get("version") != SNAPSHOT_VERSION
            or hashlib.sha256(data).hexdigest() != head.get("sha256")
        ):
            return None
        try:
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except RuntimeError:
            return None
        out = cls.__new__(cls)
        out.dim = int(head["dim"])
        out.policy = policy
        out.kind = str(head["kind"])
        # deserialize_index already returns the concrete class; a downcast
        # would be a second, non-owning wrapper whose owner is then freed.
        out.index = index
        if out.kind == HNSW:
            faiss.downcast_index(out.index.index).hnsw.efSearch = policy.ef_search
        out.tombstones = {int(x) for x in head.get("tombstones", [])}
        out._not_dead = None
        if out.index.d != out.dim:
            return None
        return out, head

    @staticmethod
    def discard(directory: Path, name: str) -> None:
        """Delete the snapshot ``name`` if there is one."""
        for suffix in (".json", ".faiss"):
            (directory / f"{name}{suffix}").unlink(missing_ok=True)
