"""Assembling the best chunks into one context text within a token budget.

Chunks go in best first, each behind its citation marker ``[n]``, until
the next one would not fit; a chunk that mostly repeats one already used
(the overlap of neighbouring chunks of a document) is left out rather than
spending the budget twice on the same sentences.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from autoecoops.kernel.memory_hub.search import Hit

#: A chunk sharing more than this share of its span with a used chunk of
#: the same document is a repeat.
REPEAT_SHARE = 0.5


@dataclass(frozen=True, slots=True)
class Citation:
    """A chunk used in the context, under marker ``[number]``."""

    number: int
    hit: Hit


@dataclass(frozen=True, slots=True)
class Context:
    """The context text, the chunks it cites in order, and its size in tokens."""

    text: str
    citations: list[Citation]
    tokens: int


def _repeat(hit: Hit, used: Sequence[Hit]) -> bool:
    c = hit.chunk
    span = max(c.end - c.start, 1)
    for u in used:
        o = u.chunk
        if o.doc_id == c.doc_id:
            shared = min(c.end, o.end) - max(c.start, o.start)
            if shared / span > REPEAT_SHARE:
                return True
    return False


def assemble(hits: Sequence[Hit], budget: int, count: Callable[[str], int]) -> Context:
    """The context for ``hits`` (best first) in at most ``budget`` tokens."""
    blocks: list[str] = []
    citations: list[Citation] = []
    used = 0
    for hit in hits:
        if _repeat(hit, [c.hit for c in citations]):
            continue
        block = f"[{len(citations) + 1}] {hit.chunk.text}"
        cost = count(block)
        if used + cost > budget:
            break
        blocks.append(block)
        citations.append(Citation(len(citations) + 1, hit))
        used += cost
    text = "\n\n".join(blocks)
    return Context(text, citations, count(text) if text else 0)
