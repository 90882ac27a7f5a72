"""Dense, lexical and hybrid search over one namespace replica.

Hybrid ranking is reciprocal rank fusion (Cormack et al., 2009) with k = 60:
a chunk scores ``sum(w_i / (60 + rank_i))`` over the retrievers that found
it, so the two very differently scaled scores never have to be calibrated
against each other. Reported scores are in [0, 1]: the fused score divided
by its maximum (rank 1 in both lists), the cosine mapped as (1 + cos) / 2,
and BM25 divided by the query's best BM25 score.

Each retriever is filtered before ranking (a selector for the dense index,
a mask for BM25), so a selective filter returns the best k matching chunks,
never fewer because the unfiltered top-k happened not to match.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from autoecoops.kernel.memory_hub.replica import Replica
from autoecoops.kernel.memory_hub.store import ChunkRecord, DocRecord

RRF_K = 60
#: Candidates each retriever contributes to fusion: at least this many, or 4k.
MIN_DEPTH = 50

Ranked = tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]


class Mode(enum.IntEnum):
    """Search modes, numbered as ``autoecoops.memory.v1.SearchMode``."""

    DENSE = 1
    LEXICAL = 2
    HYBRID = 3


@dataclass(frozen=True, slots=True)
class Query:
    """A search, validated."""

    text: str
    k: int
    mode: Mode = Mode.HYBRID
    matcher: Callable[[Mapping[str, Any]], bool] | None = None
    dense_weight: float = 0.5
    lexical_weight: float = 0.5
    min_score: float = 0.0


@dataclass(frozen=True, slots=True)
class Scored:
    """A label with its fused and per-retriever scores, each in [0, 1]."""

    label: int
    score: float
    dense: float
    lexical: float


@dataclass(frozen=True, slots=True)
class Hit:
    """One result: the chunk, its document, and its scores."""

    chunk: ChunkRecord
    doc: DocRecord
    score: float
    dense: float
    lexical: float


def rank(
    mode: Mode,
    dense: Ranked | None,
    lexical: Ranked | None,
    k: int,
    dense_weight: float = 0.5,
    lexical_weight: float = 0.5,
) -> list[Scored]:
    """Order candidates by one retriever's scores, or fuse both by RRF."""
    dn = {int(lb): (1.0 + float(s)) / 2 for lb, s in zip(*(dense or _empty()), strict=True)}
    lx_labels, lx_scores = lexical or _empty()
    top = float(lx_scores[0]) if len(lx_scores) else 1.0
    lx = {int(lb): float(s) / top for lb, s in zip(lx_labels, lx_scores, strict=True)}
    if mode is Mode.DENSE:
        return [Scored(lb, min(s, 1.0), min(s, 1.0), 0.0) for lb, s in list(dn.items())[:k]]
    if mode is Mode.LEXICAL:
        return [Scored(lb, s, 0.0, s) for lb, s in list(lx.items())[:k]]
    total = dense_weight + lexical_weight
    wd, wl = (0.5, 0.5) if total <= 0 else (dense_weight / total, lexical_weight / total)
    fused: dict[int, float] = {}
    for weight, ranked in ((wd, dn), (wl, lx)):
        for position, label in enumerate(ranked, start=1):
            fused[label] = fused.get(label, 0.0) + weight / (RRF_K + position)
    best = 1.0 / (RRF_K + 1)  # rank 1 in both lists, weights summing to 1
    order = sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    return [
        Scored(lb, min(s / best, 1.0), min(dn.get(lb, 0.0), 1.0), lx.get(lb, 0.0))
        for lb, s in order
    ]


def _empty() -> Ranked:
    return np.zeros(0, np.int64), np.zeros(0, np.float32)


def run(
    replica: Replica, q: Query, vector: npt.NDArray[np.float32] | None, lexical: Any
) -> list[Hit]:
    """Search ``replica`` (lock held, already synced). ``vector`` is the
    embedded query for dense and hybrid modes; ``lexical`` the replica's
    current BM25 index for lexical and hybrid modes."""
    allowed = replica.allowed(q.matcher)
    depth = max(q.k * 4, MIN_DEPTH) if q.mode is Mode.HYBRID else q.k
    dense = (
        replica.dense.search(vector, depth, allowed)
        if vector is not None and q.mode is not Mode.LEXICAL
        else None
    )
    lex = lexical.search(q.text, depth, allowed) if lexical is not None else None
    hits: list[Hit] = []
    for s in rank(q.mode, dense, lex, q.k, q.dense_weight, q.lexical_weight):
        if s.score < q.min_score:
            continue
        chunk = replica.chunks.get(s.label)
        doc = replica.docs.get(chunk.doc_id) if chunk is not None else None
        if chunk is not None and doc is not None:
            hits.append(Hit(chunk, doc, s.score, s.dense, s.lexical))
    return hits
