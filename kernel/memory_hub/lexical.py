"""BM25 over a namespace's chunks, with bm25s (sparse matrices, Snowball stems).

bm25s indexes are static, so the index is rebuilt from the chunk texts when
a lexical search finds it out of date; ``build`` runs in a worker thread.
Scores are computed for every chunk at once (a sparse product), so a filter
is an exact mask over them and can never starve the top k.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

import bm25s  # type: ignore[import-untyped]
import numpy as np
import numpy.typing as npt

Labels = npt.NDArray[np.int64]


@cache
def _stemmer() -> Any:
    import Stemmer  # type: ignore[import-not-found]

    return Stemmer.Stemmer("english")


def tokenize(texts: Sequence[str]) -> list[list[str]]:
    """Lowercased, stop-word-free, stemmed word tokens, one list per text."""
    out = bm25s.tokenize(
        list(texts), stopwords="en", stemmer=_stemmer(), return_ids=False, show_progress=False
    )
    return [list(t) for t in out]


class LexicalIndex:
    """A BM25 index whose rows are chunk labels in ascending order."""

    def __init__(self, labels: Labels, bm25: Any) -> None:
        self.labels = labels
        self._bm25 = bm25

    @classmethod
    def build(cls, labels: Labels, texts: Sequence[str]) -> LexicalIndex:
        """Index ``texts`` under ``labels``; CPU-bound, run it in a worker thread."""
        order = np.argsort(labels, kind="stable")
        labels = np.ascontiguousarray(labels[order], dtype=np.int64)
        if len(labels) == 0:
            return cls(labels, None)
        bm25 = bm25s.BM25()
        bm25.index(tokenize([texts[i] for i in order]), show_progress=False)
        return cls(labels, bm25)

    def __len__(self) -> int:
        return len(self.labels)

    def search(
        self, query: str, k: int, allowed: Labels | None = None
    ) -> tuple[Labels, npt.NDArray[np.float32]]:
        """The best ``k`` labels by BM25 (only chunks sharing a term), best first."""
        if self._bm25 is None or k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        terms = tokenize([query])[0]
        if not terms:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        scores = np.asarray(self._bm25.get_scores(terms), dtype=np.float32)
        if allowed is not None:
            mask = np.zeros(len(scores), dtype=bool)
            wanted = np.asarray(allowed, dtype=np.int64)
            rows = np.searchsorted(self.labels, wanted)
            inside = rows < len(self.labels)
            rows, wanted = rows[inside], wanted[inside]
            mask[rows[self.labels[rows] == wanted]] = True
            scores = np.where(mask, scores, 0.0).astype(np.float32)
        candidates = np.flatnonzero(scores > 0)
        if len(candidates) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        top = min(k, len(candidates))
        part = candidates[np.argpartition(-scores[candidates], top - 1)[:top]]
        order = part[np.argsort(-scores[part], kind="stable")]
        return self.labels[order], scores[order]
