"""The dense index (flat and HNSW, tombstones, filters, snapshots), BM25, fusion and context."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from autoecoops.kernel.memory_hub.context import assemble
from autoecoops.kernel.memory_hub.index import FLAT, HNSW, DenseIndex, IndexPolicy
from autoecoops.kernel.memory_hub.lexical import LexicalIndex
from autoecoops.kernel.memory_hub.replica import net_effect
from autoecoops.kernel.memory_hub.search import RRF_K, Hit, Mode, rank
from autoecoops.kernel.memory_hub.store import Change, ChunkRecord, DocRecord

DIM = 16
SMALL = IndexPolicy(hnsw_threshold=50, m=16, ef_construction=40, ef_search=32, tombstone_ratio=0.2)


def vectors(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    out: np.ndarray = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def exact_top(x: np.ndarray, labels: np.ndarray, q: np.ndarray, k: int) -> list[int]:
    return [int(labels[i]) for i in np.argsort(-(x @ q), kind="stable")[:k]]


@pytest.mark.parametrize("kind", [FLAT, HNSW])
def test_search_returns_nearest_and_removals_disappear(kind: str) -> None:
    x = vectors(200)
    labels = np.arange(1000, 1200, dtype=np.int64)
    index = DenseIndex.build(DIM, SMALL, labels, x, kind)
    assert index.kind == kind and index.live == 200
    got, scores = index.search(x[7], 5)
    assert got[0] == 1007 and scores[0] == pytest.approx(1.0, abs=1e-5)
    assert list(scores) == sorted(scores, reverse=True)
    index.remove(labels[:100])
    assert index.live == 100
    assert len(index.tombstones) == (100 if kind == HNSW else 0)
    got, _ = index.search(x[7], 10)
    assert not set(got.tolist()) & set(range(1000, 1100))
    assert len(got) == 10


@pytest.mark.parametrize("kind", [FLAT, HNSW])
def test_a_selective_filter_never_starves_the_top_k(kind: str) -> None:
    x = vectors(400, seed=1)
    labels = np.arange(400, dtype=np.int64)
    index = DenseIndex.build(DIM, SMALL, labels, x, kind)
    q = vectors(1, seed=9)[0]
    # Allowed: the 12 labels *farthest* from the query, which an unfiltered
    # top-k followed by a post-filter would never reach.
    far = np.argsort(x @ q)[:12].astype(np.int64)
    got, _ = index.search(q, 10, far)
    assert len(got) == 10
    assert got.tolist() == exact_top(x[far], far, q, 10)
    # Fewer allowed than k: all of them, nothing else.
    got, _ = index.search(q, 10, far[:3])
    assert sorted(got.tolist()) == sorted(far[:3].tolist())
    assert len(index.search(q, 10, np.zeros(0, np.int64))[0]) == 0


def test_hnsw_recall_against_exact() -> None:
    x = vectors(2000, seed=2)
    labels = np.arange(2000, dtype=np.int64)
    hnsw = DenseIndex.build(DIM, IndexPolicy(hnsw_threshold=10, ef_search=64), labels, x, HNSW)
    queries = vectors(50, seed=3)
    hit = sum(
        len(set(hnsw.search(q, 10)[0].tolist()) & set(exact_top(x, labels, q, 10))) for q in queries
    )
    assert hit / (10 * len(queries)) >= 0.9


def test_rebuild_is_asked_for_at_the_threshold_and_by_tombstones() -> None:
    x = vectors(120, seed=4)
    labels = np.arange(120, dtype=np.int64)
    flat = DenseIndex.build(DIM, SMALL, labels[:40], x[:40])
    assert flat.kind == FLAT and not flat.needs_rebuild()
    flat.add(labels[40:], x[40:])
    assert flat.needs_rebuild()  # 120 > 50: should be HNSW now
    hnsw = DenseIndex.build(DIM, SMALL, *flat.live_items())
    assert hnsw.kind == HNSW and hnsw.live == 120 and not hnsw.needs_rebuild()
    hnsw.remove(labels[:30])  # 30 tombstones of 120 > 20%
    assert hnsw.needs_rebuild()
    fresh = DenseIndex.build(DIM, SMALL, *hnsw.live_items())
    assert fresh.live == 90 and not fresh.tombstones
    assert fresh.kind == HNSW  # hysteresis: stays HNSW above half the threshold
    assert set(fresh.live_items()[0].tolist()) == set(range(30, 120))


def test_snapshots_round_trip_and_damage_is_detected(tmp_path: Path) -> None:
    x = vectors(80, seed=5)
    labels = np.arange(80, dtype=np.int64)
    index = DenseIndex.build(DIM, SMALL, labels, x, HNSW)
    index.remove(labels[:5])
    index.save(tmp_path, "ns", {"epoch": "e1", "seq": 7, "cursor": "1-0"})
    loaded = DenseIndex.load(tmp_path, "ns", SMALL)
    assert loaded is not None
    again, head = loaded
    assert head["epoch"] == "e1" and head["seq"] == 7
    assert again.kind == HNSW and again.live == 75 and again.tombstones == set(range(5))
    assert again.search(x[40], 1)[0].tolist() == [40]
    data = (tmp_path / "ns.faiss").read_bytes()
    (tmp_path / "ns.faiss").write_bytes(data[:-10] + b"0123456789")
    assert DenseIndex.load(tmp_path, "ns", SMALL) is None
    DenseIndex.discard(tmp_path, "ns")
    assert DenseIndex.load(tmp_path, "ns", SMALL) is None


def test_bm25_ranks_term_matches_and_masks_filters() -> None:
    texts = [
        "Restart the kubelet when the node is NotReady.",
        "Rotate TLS certificates before they expire.",
        "Kubelet restarts fixed the NotReady nodes last week.",
        "Unrelated text about lunch.",
    ]
    labels = np.asarray([40, 10, 30, 20], dtype=np.int64)
    lex = LexicalIndex.build(labels, texts)
    got, scores = lex.search("restarting kubelet", 10)
    assert set(got.tolist()) == {40, 30}  # stems match: restarting ~ restart(s)
    assert all(s > 0 for s in scores)
    got, _ = lex.search("kubelet", 10, np.asarray([30, 99], dtype=np.int64))
    assert got.tolist() == [30]
    assert len(lex.search("the a of", 10)[0]) == 0  # stop words only


def test_rrf_fusion() -> None:
    dense = (np.asarray([1, 2, 3]), np.asarray([0.9, 0.5, 0.1], dtype=np.float32))
    lexical = (np.asarray([3, 1]), np.asarray([8.0, 2.0], dtype=np.float32))
    out = rank(Mode.HYBRID, dense, lexical, 3, 0.5, 0.5)
    assert [s.label for s in out] == [1, 3, 2]
    best = 1 / (RRF_K + 1)
    assert out[0].score == pytest.approx((0.5 / 61 + 0.5 / 62) / best)
    assert out[1].dense == pytest.approx((1 + 0.1) / 2) and out[1].lexical == 1.0
    assert out[2].lexical == 0.0
    # Weights shift the order.
    assert next(s.label for s in rank(Mode.HYBRID, dense, lexical, 3, 0.1, 0.9)) == 3
    assert [s.label for s in rank(Mode.DENSE, dense, lexical, 2)] == [1, 2]
    assert [s.label for s in rank(Mode.LEXICAL, dense, lexical, 5)] == [3, 1]


def test_net_effect_of_changes() -> None:
    changes = [
        Change("1-0", 1, "upsert", "a", (1, 2), ()),
        Change("2-0", 2, "upsert", "a", (3,), (1, 2)),
        Change("3-0", 3, "delete", "b", (), (7,)),
    ]
    assert net_effect(changes) == ([3], {7})


def hit(doc: str, start: int, end: int, text: str) -> Hit:
    return Hit(
        ChunkRecord(start, doc, 0, text, start, end, ""),
        DocRecord(doc, "", 1),
        1.0,
        1.0,
        0.0,
    )


def test_context_fits_the_budget_cites_in_order_and_skips_repeats() -> None:
    words = len
    hits = [
        hit("a", 0, 100, "one two three"),
        hit("a", 10, 100, "two three"),  # mostly the same span: skipped
        hit("b", 0, 10, "four five"),
        hit("c", 0, 10, "six seven eight nine"),
    ]
    out = assemble(hits, 9, lambda s: words(s.split()))
    assert out.text == "[1] one two three\n\n[2] four five"
    assert [c.number for c in out.citations] == [1, 2]
    assert [c.hit.chunk.doc_id for c in out.citations] == ["a", "b"]
    assert out.tokens == 7 <= 9
    assert assemble([], 100, len).text == ""
