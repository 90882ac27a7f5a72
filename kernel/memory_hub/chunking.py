"""Cutting extracted text into chunks sized in the embedding model's tokens.

Chunks follow the document's structure: a Markdown heading always starts a
new chunk, and inside a section chunks are packed from whole sentences (list
items, table rows and paragraphs count as sentences). Only a sentence longer
than a whole chunk is cut inside, at a word boundary. Consecutive chunks of a
section share up to ``overlap`` tokens, taken as whole trailing sentences
where they fit.

Sizes are counted with the model's own tokenizer (the offsets of one
tokenization of the whole text), so a chunk plus the heading path that is
prepended for embedding never exceeds the model's window and nothing is
silently truncated by the encoder.
"""

from __future__ import annotations

import itertools
import re
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass

_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$")
_FENCE = re.compile(r"^[ \t]*(```|~~~)")
#: A line that starts a unit of its own: list item, heading, table row, quote.
_LINE_UNIT = re.compile(r"\n(?=[ \t]*(?:[-*+][ \t]|\d+[.)][ \t]|#|\||>))")
#: A sentence end: terminal punctuation (and closing quotes/brackets), then
#: whitespace, then something that can start a sentence. Lowercase after the
#: dot ("e.g. this") does not end a sentence.
_SENTENCE_END = re.compile(r"[.!?\u3002\uff01\uff1f]+[\"')\]]*\s+(?=[A-Z0-9\"'(\[`*_])")
_BLANK = re.compile(r"\n[ \t]*\n")
#: A heading path longer than this share of the budget is cut to its last heading.
_HEADER_SHARE = 4


@dataclass(frozen=True, slots=True)
class Chunk:
    """One chunk: a span of the extracted text, and the text that is embedded."""

    #: Code-point offsets into the extracted text, end exclusive.
    start: int
    end: int
    text: str
    #: ``text`` with its section's heading path in front when the span does
    #: not already start with the heading; what the model embeds.
    embed_text: str
    #: Model tokens of ``embed_text`` (without the model's special tokens).
    tokens: int


@dataclass(frozen=True, slots=True)
class Section:
    """A run of text under one heading path."""

    start: int
    end: int
    path: tuple[str, ...]


def sections(text: str, markdown: bool) -> list[Section]:
    """Split at Markdown headings (not inside fenced code); one section otherwise."""
    if not markdown:
        return [Section(0, len(text), ())]
    out: list[Section] = []
    stack: list[str] = []
    start, pos, fenced = 0, 0, False
    path: tuple[str, ...] = ()
    for line in text.splitlines(keepends=True):
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced and (m := _HEADING.match(line.rstrip("\n"))):
            if pos > start:
                out.append(Section(start, pos, path))
            level = len(m.group(1))
            stack = [*stack[: level - 1], *([""] * max(0, level - 1 - len(stack))), m.group(2)]
            path = tuple(h for h in stack if h)
            start = pos
        pos += len(line)
    if pos > start:
        out.append(Section(start, pos, path))
    return out


def _trim(text: str, a: int, b: int) -> tuple[int, int]:
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return a, b


def sentence_spans(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """Sentence-like units in ``text[start:end]``: paragraphs, lines that are
    list items, headings, table rows or quotes, and sentences inside them."""
    cuts = {start, end}
    body = text[start:end]
    for pattern in (_BLANK, _LINE_UNIT, _SENTENCE_END):
        for m in pattern.finditer(body):
            cuts.add(start + m.end())
    bounds = sorted(cuts)
    spans = [_trim(text, a, b) for a, b in itertools.pairwise(bounds)]
    return [(a, b) for a, b in spans if b > a]


class _Tokens:
    """Token positions of the whole text, for counting tokens in any span."""

    def __init__(self, offsets: Sequence[tuple[int, int]]) -> None:
        toks = [(a, b) for a, b in offsets if b > a]
        self.starts = [a for a, _ in toks]
        self.ends = [b for _, b in toks]

    def first(self, pos: int) -> int:
        """Index of the first token starting at or after ``pos``."""
        return bisect_left(self.starts, pos)

    def count(self, a: int, b: int) -> int:
        """Tokens starting inside ``[a, b)``."""
        return bisect_left(self.starts, b) - bisect_left(self.starts, a)

    def word_start(self, i: int, lo: int) -> int:
        """The nearest token index <= i (and > lo) that begins a word, else i."""
        j = i
        while j > lo and self.starts[j] == self.ends[j - 1]:
            j -= 1
        return j if j > lo else i


def chunk_text(
    text: str,
    *,
    markdown: bool,
    max_tokens: int,
    overlap: int,
    offsets: Sequence[tuple[int, int]],
    count_tokens: Callable[[str], int],
) -> list[Chunk]:
    """Cut ``text`` into chunks of at most ``max_tokens`` model tokens.

    ``offsets`` are the character spans of the model's tokens over the whole
    of ``text`` (no special tokens); ``count_tokens`` counts the tokens of a
    heading path. ``overlap`` must be less than ``max_tokens``.
    """
    if not 0 <= overlap < max_tokens:
        raise ValueError("overlap must be in [0, max_tokens)")
    toks = _Tokens(offsets)
    out: list[Chunk] = []
    for sec in sections(text, markdown):
        header = _header(sec.path, max_tokens, count_tokens)
        header_tokens = count_tokens(header) if header else 0
        budget = max_tokens - header_tokens
        for a, b in _pack(text, sec, budget, overlap, toks):
            body = text[a:b]
            starts_with_heading = a == _trim(text, sec.start, sec.end)[0] and bool(sec.path)
            embed = body if starts_with_heading or not header else f"{header}\n{body}"
            tokens = toks.count(a, b) + (0 if embed is body else header_tokens)
            out.append(Chunk(a, b, body, embed, tokens))
    return out


def _header(path: tuple[str, ...], max_tokens: int, count: Callable[[str], int]) -> str:
    if not path:
        return ""
    for candidate in (" > ".join(path), path[-1]):
        if count(candidate) <= max_tokens // _HEADER_SHARE:
            return candidate
    return ""


def _pack(
    text: str, sec: Section, budget: int, overlap: int, toks: _Tokens
) -> list[tuple[int, int]]:
    """Greedy packing of a section's sentences into spans of <= budget tokens."""
    spans: list[tuple[int, int]] = []
    cur: list[tuple[int, int]] = []
    fresh = False  # whether ``cur`` holds anything beyond the carried overlap

    def flush() -> None:
        nonlocal cur, fresh
        if cur and fresh:
            spans.append((cur[0][0], cur[-1][1]))
            cur = _tail(cur, overlap, toks)
        fresh = False

    for a, b in sentence_spans(text, sec.start, sec.end):
        if toks.count(a, b) > budget:
            # A sentence longer than a chunk: cut it into windows on its own.
            flush()
            windows = _windows(a, b, budget, overlap, toks)
            spans.extend(windows)
            cur = _tail([windows[-1]], overlap, toks) if windows else []
            continue
        if cur and toks.count(cur[0][0], b) > budget:
            flush()
            while cur and toks.count(cur[0][0], b) > budget:
                cur.pop(0)  # the overlap must yield to the new sentence
        cur.append((a, b))
        fresh = True
    flush()
    return spans


def _tail(units: list[tuple[int, int]], overlap: int, toks: _Tokens) -> list[tuple[int, int]]:
    """The trailing whole sentences within ``overlap`` tokens; else the last
    ``overlap`` tokens of the last sentence, from a word start."""
    if overlap <= 0 or not units:
        return []
    end = units[-1][1]
    keep: list[tuple[int, int]] = []
    for a, b in reversed(units):
        if toks.count(a, end) > overlap:
            break
        keep.insert(0, (a, b))
    if keep:
        return keep
    a, b = units[-1]
    last = toks.first(b) - 1
    first_in = toks.first(a)
    i = toks.word_start(max(last - overlap + 1, first_in), first_in)
    if i > last or toks.starts[i] <= a:
        return []
    return [(toks.starts[i], b)]


def _windows(a: int, b: int, budget: int, overlap: int, toks: _Tokens) -> list[tuple[int, int]]:
    """Windows of <= budget tokens over one long sentence, cut at word starts."""
    first, last = toks.first(a), toks.first(b) - 1
    out: list[tuple[int, int]] = []
    i = first
    while i <= last:
        j = min(i + budget, last + 1)  # exclusive token index
        if j <= last:
            j = toks.word_start(j, i)
        out.append((toks.starts[i], toks.ends[j - 1]))
        if j > last:
            break
        step = toks.word_start(max(j - overlap, i + 1), i)
        i = step if step > i else j
    return out
