"""Text extraction and chunking, with the packaged model's real tokenizer."""

from __future__ import annotations

import itertools

import pytest

from autoecoops.kernel.memory_hub.chunking import chunk_text, sections, sentence_spans
from autoecoops.kernel.memory_hub.parsing import Format, check_size, content_hash, extract
from autoecoops.kernel.mesh.errors import InvalidArgument
from tests.unit.memory_hub.samples import embedder, make_pdf


def chunks(text: str, max_tokens: int, overlap: int, markdown: bool = True) -> list:  # type: ignore[type-arg]
    e = embedder()
    return chunk_text(
        text,
        markdown=markdown,
        max_tokens=max_tokens,
        overlap=overlap,
        offsets=e.offsets(text),
        count_tokens=e.count,
    )


# -- parsing ----------------------------------------------------------------------


def test_text_and_markdown_are_strict_utf8_with_newlines_normalised() -> None:
    out = extract("\ufeffCafé\r\nline two\r\n\r\n\r\n\r\nthree".encode(), Format.MARKDOWN, "d")
    assert out.text == "Café\nline two\n\nthree"
    assert out.markdown
    with pytest.raises(InvalidArgument) as info:
        extract(b"ok \xff\xfe not utf8", Format.TEXT, "documents[2].content")
    assert info.value.reason == "NOT_UTF8"
    assert info.value.field_violations[0].field == "documents[2].content"
    assert "byte 3" in info.value.field_violations[0].description


@pytest.mark.parametrize("raw", [b"", b"   \n\t  "])
def test_empty_documents_are_rejected(raw: bytes) -> None:
    with pytest.raises(InvalidArgument) as info:
        check_size(raw, 100, "d")
        extract(raw, Format.TEXT, "d")
    assert info.value.reason == "DOCUMENT_EMPTY"


def test_size_limit_names_the_sizes() -> None:
    with pytest.raises(InvalidArgument) as info:
        check_size(b"x" * 101, 100, "documents[0].content")
    assert info.value.reason == "DOCUMENT_TOO_LARGE"
    assert "101 bytes" in info.value.message and "100 bytes" in info.value.message


def test_html_keeps_headings_lists_and_text_and_drops_scripts() -> None:
    html = (
        b"<html><head><title> Disk  runbook </title><style>p{}</style></head><body>"
        b"<nav>menu</nav><h1>Disk <b>full</b></h1><p>Evicted pods. <script>evil()</script>Clean up.</p>"
        b"<ul><li>drain</li><li>prune</li></ul><h2>After</h2><p>Uncordon.</p></body></html>"
    )
    out = extract(html, Format.HTML, "d")
    assert out.title == "Disk runbook"
    assert out.markdown
    assert "evil" not in out.text and "p{}" not in out.text
    assert "# Disk full" in out.text and "## After" in out.text
    assert "- drain\n- prune" in out.text
    assert [s.path for s in sections(out.text, True)][-1] == ("Disk full", "After")


def test_pdf_text_layer_and_title() -> None:
    out = extract(
        make_pdf("Restart the kubelet.", "Then check the node.", title="Node"), Format.PDF, "d"
    )
    assert out.text == "Restart the kubelet.\n\nThen check the node."
    assert out.title == "Node"


@pytest.mark.parametrize(
    "raw",
    [b"%PDF-1.4 this is not a pdf", b"not a pdf at all", make_pdf("x")[:60]],
)
def test_unparsable_pdf_is_invalid_argument(raw: bytes) -> None:
    with pytest.raises(InvalidArgument) as info:
        extract(raw, Format.PDF, "documents[1].content")
    assert info.value.reason in {"PDF_UNPARSABLE", "DOCUMENT_EMPTY"}
    assert info.value.field_violations[0].field == "documents[1].content"


def test_pdf_without_text_is_empty() -> None:
    with pytest.raises(InvalidArgument) as info:
        extract(make_pdf(""), Format.PDF, "d")
    assert info.value.reason == "DOCUMENT_EMPTY"
    assert "text layer" in info.value.message


def test_content_hash() -> None:
    assert content_hash(b"abc") == (
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


# -- chunking ---------------------------------------------------------------------

RUNBOOK = """Preamble about the service.

# Disk full

When the disk is full, the node stops scheduling pods. Check usage with df -h. Then clean /var/log.

## Steps

- Drain the node with kubectl drain.
- Prune images with crictl rmi --prune.
- Uncordon the node.

```
# not a heading inside a fence
du -sh /var/lib/containerd
```

# Escalation

Page the storage team if usage stays above 90% for e.g. ten minutes. Dr. Who is not on call.
"""


def test_markdown_headings_start_chunks_and_fences_are_not_headings() -> None:
    secs = sections(RUNBOOK, True)
    assert [s.path for s in secs] == [(), ("Disk full",), ("Disk full", "Steps"), ("Escalation",)]
    out = chunks(RUNBOOK, 200, 20)
    assert [c.text.split("\n")[0] for c in out] == [
        "Preamble about the service.",
        "# Disk full",
        "## Steps",
        "# Escalation",
    ]


def test_sentences_and_list_items_are_units() -> None:
    text = "First one. Second one! Is it third? e.g. not a split.\n- item a\n- item b"
    spans = [text[a:b] for a, b in sentence_spans(text, 0, len(text))]
    assert spans == [
        "First one.",
        "Second one!",
        "Is it third? e.g. not a split.",
        "- item a",
        "- item b",
    ]


def test_chunks_respect_size_offsets_and_overlap() -> None:
    e = embedder()
    body = " ".join(f"Sentence number {i} talks about pods and nodes." for i in range(60))
    text = f"# Heading\n\n{body}\n"
    out = chunks(text, 48, 12)
    assert len(out) > 5
    for c in out:
        assert text[c.start : c.end] == c.text
        assert c.tokens <= 48
        assert e.count(c.embed_text) <= 48
    # Later chunks carry the heading for embedding; the first has it in its text.
    assert out[0].embed_text == out[0].text
    assert all(c.embed_text.startswith("Heading\n") for c in out[1:])
    # Consecutive chunks overlap by whole sentences, at most the overlap.
    for a, b in itertools.pairwise(out):
        assert b.start < a.end
        assert e.count(text[b.start : a.end]) <= 12
        assert text[b.start - 1] == " "  # starts at a sentence start
    # Nothing is lost: every sentence is in some chunk.
    covered: set[int] = set()
    for c in out:
        covered.update(range(c.start, c.end))
    assert all(i in covered for i, ch in enumerate(text) if not ch.isspace())


def test_a_sentence_longer_than_a_chunk_is_cut_at_word_starts() -> None:
    e = embedder()
    text = "word " * 300 + "internationalization " * 50
    out = chunks(text, 64, 8, markdown=False)
    assert len(out) > 5
    for c in out:
        assert c.tokens <= 64 and e.count(c.text) <= 64
        assert c.start == 0 or text[c.start - 1] == " "
    assert out[-1].end == len(text.rstrip())


def test_the_model_window_is_never_exceeded() -> None:
    e = embedder()
    assert e.window == 254 and e.dimensions == 384
    text = "\n\n".join(
        f"# Section {i}\n\n" + "Pods restart when probes fail. " * 40 for i in range(3)
    )
    for c in chunks(text, e.window, 32):
        assert e.count(c.embed_text) <= e.window


def test_overlap_must_be_less_than_size() -> None:
    with pytest.raises(ValueError):
        chunks("text", 10, 10)
