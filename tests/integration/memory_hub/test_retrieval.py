"""Retrieval quality on the project's own operations test set: hybrid ranking
must beat dense alone on nDCG@10 (figures are printed; run with -s to see them)."""

from __future__ import annotations

import math

from autoecoops.kernel.memory_hub.hub import DocumentInput
from autoecoops.kernel.memory_hub.parsing import Format
from autoecoops.kernel.memory_hub.search import Mode, Query
from tests.integration.memory_hub.conftest import MakeHub
from tests.integration.memory_hub.opsdocs import DOCS, QUERIES


def ndcg_at_10(ranked: list[str], relevant: set[str]) -> float:
    """Binary-relevance nDCG@10 over distinct documents."""
    dcg = sum(1 / math.log2(i + 2) for i, d in enumerate(ranked[:10]) if d in relevant)
    ideal = sum(1 / math.log2(i + 2) for i in range(min(len(relevant), 10)))
    return dcg / ideal


async def test_hybrid_beats_dense_on_ndcg_at_10(make_hub: MakeHub) -> None:
    hub = await make_hub()
    await hub.create_namespace("ops-eval")
    await hub.ingest(
        "ops-eval",
        [
            DocumentInput(
                doc_id,
                f"# {title}\n\n{text}".encode(),
                Format.MARKDOWN,
                title=title,
                metadata={"kind": kind},
                path=f"documents[{i}]",
            )
            for i, (doc_id, kind, title, text) in enumerate(DOCS)
        ],
    )
    assert len(DOCS) >= 60 and len(QUERIES) >= 30
    scores: dict[Mode, float] = {}
    for mode in (Mode.DENSE, Mode.LEXICAL, Mode.HYBRID):
        total = 0.0
        for query, relevant in QUERIES:
            hits = await hub.search("ops-eval", Query(query, 30, mode))
            ranked = list(dict.fromkeys(h.chunk.doc_id for h in hits))
            total += ndcg_at_10(ranked, set(relevant))
        scores[mode] = total / len(QUERIES)
    print(
        f"\nnDCG@10 on {len(DOCS)} documents, {len(QUERIES)} queries: "
        + ", ".join(f"{m.name.lower()} {s:.3f}" for m, s in scores.items())
        + f"; hybrid/dense {scores[Mode.HYBRID] / scores[Mode.DENSE]:.3f}"
    )
    assert scores[Mode.HYBRID] > scores[Mode.DENSE]
