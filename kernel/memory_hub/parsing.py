"""Turning a document's content into text: plain text, Markdown, HTML and PDF.

HTML headings come out as Markdown headings, so chunking follows the
structure of a page as it does a Markdown file. Anything that cannot become
text (empty, not UTF-8, too large, a PDF that does not parse or has no text
layer) is INVALID_ARGUMENT naming the document's field, before anything is
written.
"""

from __future__ import annotations

import enum
import hashlib
import io
import logging
import re
from dataclasses import dataclass

from autoecoops.kernel.mesh.errors import FieldViolation, InvalidArgument

log = logging.getLogger("autoecoops.memory_hub")


class Format(enum.IntEnum):
    """The content formats, numbered as ``autoecoops.memory.v1.ContentType``."""

    TEXT = 1
    MARKDOWN = 2
    HTML = 3
    PDF = 4


@dataclass(frozen=True, slots=True)
class Extracted:
    """A document's extracted text and what chunking should know about it."""

    text: str
    #: Whether headings are marked up Markdown-style (``#``), so chunks follow them.
    markdown: bool
    #: A title found in the content (HTML ``<title>``, PDF metadata), or ''.
    title: str = ""


def content_hash(raw: bytes) -> str:
    """``sha256:<hex>`` of the content bytes (text as UTF-8)."""
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def _bad(field: str, message: str, reason: str) -> InvalidArgument:
    return InvalidArgument(
        f"{field}: {message}",
        reason=reason,
        field_violations=[FieldViolation(field, message)],
    )


def check_size(raw: bytes, limit: int, field: str) -> None:
    """Reject content over ``limit`` bytes, and empty content."""
    if len(raw) > limit:
        raise _bad(
            field,
            f"{len(raw)} bytes is over the limit of {limit} bytes",
            "DOCUMENT_TOO_LARGE",
        )
    if not raw:
        raise _bad(field, "the document is empty", "DOCUMENT_EMPTY")


def decode_utf8(raw: bytes, field: str) -> str:
    """Strict UTF-8 (a BOM is dropped); a bad byte is INVALID_ARGUMENT naming its offset."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise _bad(
            field, f"not valid UTF-8 (byte {err.start} is 0x{raw[err.start]:02x})", "NOT_UTF8"
        ) from None


_BLANK_RUNS = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")


def _normalise(text: str) -> str:
    # One newline convention, no NULs (they would end C strings in tokenizers),
    # at most one blank line in a row.
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    return _BLANK_RUNS.sub("\n\n", text)


def extract(raw: bytes, fmt: Format, field: str) -> Extracted:
    """The text of ``raw`` in format ``fmt``; INVALID_ARGUMENT if there is none."""
    if fmt is Format.PDF:
        out = _pdf(raw, field)
    elif fmt is Format.HTML:
        out = _html(decode_utf8(raw, field))
    else:
        out = Extracted(_normalise(decode_utf8(raw, field)), markdown=fmt is Format.MARKDOWN)
    if not out.text.strip():
        what = "has no text layer" if fmt is Format.PDF else "has no text"
        raise _bad(field, f"the document {what}", "DOCUMENT_EMPTY")
    return out


# -- HTML -------------------------------------------------------------------------

_DROP = "script, style, noscript, template, svg, head, iframe, object, canvas"
_BLOCKS = frozenset(
    {"p", "div", "section", "article", "main", "header", "footer", "aside", "nav"}
    | {"blockquote", "pre", "table", "tr", "ul", "ol", "dl", "dt", "dd", "figure"}
    | {"figcaption", "form", "fieldset", "details", "summary", "address", "hr", "br", "li"}
)
_HEADINGS = {f"h{i}": i for i in range(1, 7)}


def _html(text: str) -> Extracted:
    from selectolax.lexbor import LexborHTMLParser, LexborNode

    tree = LexborHTMLParser(text)
    title_node = tree.css_first("title")
    title = title_node.text(strip=True) if title_node is not None else ""
    for node in tree.css(_DROP):
        node.decompose()
    root = tree.body or tree.root
    parts: list[str] = []

    def walk(node: LexborNode) -> None:
        # Iterative over siblings, recursive over depth; HTML depth is bounded
        # by the parser (it caps nesting), so recursion is safe here.
        child = node.child
        while child is not None:
            tag = child.tag
            if tag == "-text":
                parts.append(child.text_content or "")
            elif tag in _HEADINGS:
                heading = " ".join(child.text(deep=True, separator=" ").split())
                if heading:
                    parts.append(f"\n\n{'#' * _HEADINGS[tag]} {heading}\n\n")
            elif tag in _BLOCKS:
                parts.append("\n- " if tag == "li" else "\n\n" if tag != "br" else "\n")
                walk(child)
                parts.append("\n\n" if tag not in ("li", "br") else "")
            elif tag in ("td", "th"):
                walk(child)
                parts.append(" | ")
            elif tag not in ("-comment", "-doctype", None):
                walk(child)
            child = child.next

    if root is not None:
        walk(root)
    lines = [" ".join(line.split()) for line in "".join(parts).split("\n")]
    body = _normalise("\n".join(lines)).strip()
    return Extracted(body, markdown=True, title=" ".join(title.split()))


# -- PDF --------------------------------------------------------------------------


def _pdf(raw: bytes, field: str) -> Extracted:
    from pypdf import PdfReader

    # Any failure inside the parser means "this is not a PDF we can read";
    # pypdf raises more than its own error types on hostile input.
    try:
        reader = PdfReader(io.BytesIO(raw), strict=False)
        if reader.is_encrypted:
            raise _bad(field, "the PDF is encrypted", "PDF_ENCRYPTED")
        pages = [page.extract_text() or "" for page in reader.pages]
        meta = reader.metadata
        title = str(meta.title) if meta is not None and meta.title else ""
    except InvalidArgument:
        raise
    except Exception as err:
        log.info("%s: PDF does not parse: %s", field, err)
        raise _bad(
            field, f"the PDF does not parse ({type(err).__name__})", "PDF_UNPARSABLE"
        ) from None
    text = _normalise("\n\n".join(p.strip() for p in pages if p.strip()))
    return Extracted(text, markdown=False, title=title.strip())
