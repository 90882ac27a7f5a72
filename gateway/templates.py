"""google.api.http path templates: parsing, matching and percent-decoding.

The grammar is the one of ``google/api/http.proto``::

    Template = "/" Segments [ Verb ] ;
    Segments = Segment { "/" Segment } ;
    Segment  = "*" | "**" | LITERAL | Variable ;
    Variable = "{" FieldPath [ "=" Segments ] "}" ;
    Verb     = ":" LITERAL ;

Matching works on the *raw* request path, split at ``/`` before any
decoding, so an encoded slash (``%2F``) never splits a segment. A variable
that spans one segment is decoded completely (``%2F`` becomes ``/``); one that
spans several keeps ``%2F`` as it is, as http.proto prescribes, so the value
can be split again unambiguously; except a variable that ends in ``**`` (the
rest of the path), which is decoded completely: the OpenAPI document must
describe it as one parameter, and every generated client escapes the slashes
of a parameter, so ``a%2Fb`` and ``a/b`` are the same value there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

#: Segment kinds of a compiled template.
LITERAL, STAR, DOUBLE_STAR = "literal", "*", "**"


class TemplateError(ValueError):
    """A path template that does not follow the http.proto grammar."""


class PathDecodeError(ValueError):
    """A path variable whose percent-decoding is not valid UTF-8."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        #: The field path of the variable, e.g. ``role.name``.
        self.field = field


@dataclass(frozen=True, slots=True)
class Segment:
    """One segment of a template: a literal or a wildcard."""

    kind: str
    text: str = ""


@dataclass(frozen=True, slots=True)
class Variable:
    """A ``{field.path=pattern}`` of a template, spanning segments[start:end]."""

    #: The request field the value goes to, e.g. ``("role", "name")``.
    field_path: tuple[str, ...]
    start: int
    #: Exclusive end; for a trailing ``**`` it is the template's segment count
    #: and the variable takes every remaining request segment.
    end: int
    #: The variable's own pattern, e.g. ``("projects", "*", "things", "*")``.
    pattern: tuple[Segment, ...]

    @property
    def dotted(self) -> str:
        """The field path as written in the template, e.g. ``role.name``."""
        return ".".join(self.field_path)

    @property
    def single_segment(self) -> bool:
        """True for ``{x}`` / ``{x=*}``: one segment, decoded completely."""
        return len(self.pattern) == 1 and self.pattern[0].kind == STAR

    @property
    def regex(self) -> str:
        """A regular expression for the decoded value (used in the OpenAPI document)."""
        parts = []
        for seg in self.pattern:
            if seg.kind == LITERAL:
                parts.append(re.escape(seg.text))
            elif seg.kind == STAR:
                parts.append("[^/]+")
            else:
                parts.append(".+")
        return "^" + "/".join(parts) + "$"


@dataclass(frozen=True, slots=True)
class PathTemplate:
    """A compiled template; ``match`` binds a raw request path to variables."""

    source: str
    segments: tuple[Segment, ...]
    variables: tuple[Variable, ...]
    verb: str

    @property
    def has_double_star(self) -> bool:
        """True when the last segment takes the rest of the path."""
        return bool(self.segments) and self.segments[-1].kind == DOUBLE_STAR

    @property
    def literal_count(self) -> int:
        """How many literal segments pin this template (more is more specific)."""
        return sum(1 for s in self.segments if s.kind == LITERAL)

    def match(self, parts: list[str]) -> dict[str, str] | None:
        """Bind raw path segments (already split, verb removed) to variable values.

        Returns None when the path does not match. Raises ``PathDecodeError``
        when it matches but a variable's decoded bytes are not UTF-8.
        """
        segs = self.segments
        if self.has_double_star:
            if len(parts) < len(segs):
                return None
        elif len(parts) != len(segs):
            return None
        for i, seg in enumerate(segs):
            if seg.kind == DOUBLE_STAR:
                if any(not p for p in parts[i:]):
                    return None
                break
            part = parts[i]
            if not part:
                return None
            if seg.kind == LITERAL and part != seg.text and not _same_literal(part, seg.text):
                return None
        values: dict[str, str] = {}
        for var in self.variables:
            end = len(parts) if var.end == len(segs) and self.has_double_star else var.end
            try:
                if var.single_segment:
                    values[var.dotted] = decode_all(parts[var.start])
                elif var.pattern[-1].kind == DOUBLE_STAR:
                    # The rest of the path: the OpenAPI document describes it
                    # as one parameter, which generic clients send with its
                    # slashes escaped, so "%2F" and "/" mean the same here.
                    value = decode_all("/".join(parts[var.start : end]))
                    if "" in value.split("/"):
                        return None  # an empty segment, encoded or not
                    values[var.dotted] = value
                else:
                    values[var.dotted] = decode_keep_slash("/".join(parts[var.start : end]))
            except UnicodeDecodeError:
                raise PathDecodeError(
                    var.dotted, f"path variable {var.dotted} is not valid UTF-8 once decoded"
                ) from None
        return values


def decode_all(raw: str) -> str:
    """Percent-decode a segment completely; ``UnicodeDecodeError`` if not UTF-8."""
    if "%" not in raw:
        return raw
    return unquote_to_bytes(raw).decode("utf-8")


def _same_literal(raw: str, text: str) -> bool:
    # An encoded literal (``%76%31`` for ``v1``) is the same segment.
    try:
        return "%" in raw and decode_all(raw) == text
    except UnicodeDecodeError:
        return False


_SLASH = re.compile(r"(%2[fF])")


def decode_keep_slash(raw: str) -> str:
    """Percent-decode a multi-segment value but leave ``%2F`` encoded (http.proto)."""
    if "%" not in raw:
        return raw
    return "".join(p if _SLASH.fullmatch(p) else decode_all(p) for p in _SLASH.split(raw))


_LITERAL = re.compile(r"^[A-Za-z0-9\-._~!$&'()*+,;=@%]+$")
_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def parse(source: str) -> PathTemplate:
    """Compile a template string; raise ``TemplateError`` naming what is wrong."""
    if not source.startswith("/"):
        raise TemplateError(f"{source!r}: a path template starts with '/'")
    body, verb = _split_verb(source)
    segments: list[Segment] = []
    variables: list[Variable] = []
    for token in _tokens(source, body[1:]):
        if token.startswith("{"):
            inner = token[1:-1]
            name, eq, pattern = inner.partition("=")
            if not _FIELD.match(name):
                raise TemplateError(f"{source!r}: bad field path {name!r}")
            pat = [_segment(source, p) for p in (pattern.split("/") if eq else ["*"])]
            if any(s.kind == DOUBLE_STAR for s in pat[:-1]):
                raise TemplateError(f"{source!r}: '**' must be the last segment")
            start = len(segments)
            segments += pat
            variables.append(Variable(tuple(name.split(".")), start, len(segments), tuple(pat)))
        else:
            segments.append(_segment(source, token))
    if any(s.kind == DOUBLE_STAR for s in segments[:-1]):
        raise TemplateError(f"{source!r}: '**' must be the last segment")
    names = [v.dotted for v in variables]
    if len(set(names)) != len(names):
        raise TemplateError(f"{source!r}: a field is bound twice")
    return PathTemplate(source, tuple(segments), tuple(variables), verb)


def _split_verb(source: str) -> tuple[str, str]:
    last = max(source.rfind("/"), source.rfind("}"))
    colon = source.find(":", last + 1)
    if colon < 0:
        return source, ""
    verb = source[colon + 1 :]
    if not _LITERAL.match(verb):
        raise TemplateError(f"{source!r}: bad verb {verb!r}")
    return source[:colon], verb


def _tokens(source: str, body: str) -> list[str]:
    """Split at '/' outside braces (a variable's pattern has slashes of its own)."""
    tokens, depth, cur = [], 0, ""
    for ch in body:
        if ch == "{":
            if depth:
                raise TemplateError(f"{source!r}: nested braces")
            depth = 1
        elif ch == "}":
            if not depth:
                raise TemplateError(f"{source!r}: unbalanced '}}'")
            depth = 0
        if ch == "/" and not depth:
            tokens.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise TemplateError(f"{source!r}: unbalanced '{{'")
    tokens.append(cur)
    for t in tokens:
        if not t:
            raise TemplateError(f"{source!r}: empty segment")
        if "{" in t and not (t.startswith("{") and t.endswith("}")):
            raise TemplateError(f"{source!r}: a variable must be a whole segment")
    return tokens


def _segment(source: str, text: str) -> Segment:
    if text == "*":
        return Segment(STAR)
    if text == "**":
        return Segment(DOUBLE_STAR)
    if not _LITERAL.match(text) or "*" in text:
        raise TemplateError(f"{source!r}: bad literal segment {text!r}")
    return Segment(LITERAL, text)
