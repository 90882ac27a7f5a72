"""Canonical bytes: RFC 8785 (JCS) JSON, and the leaf encoding of audit entries.

An audit entry's leaf is the RFC 8785 canonical JSON of the entry's proto3
JSON form (lowerCamelCase names, int64 as strings, enums by name, defaults
omitted). Canonical JSON rather than deterministic protobuf because any
language can recompute it from the JSON a user sees, and protobuf's
"deterministic" serialization is explicitly not canonical across
implementations or versions.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf import json_format

from autoecoops.audit.v1 import audit_pb2


def canonical_json(value: Any) -> bytes:
    """The RFC 8785 canonical UTF-8 encoding of a JSON value.

    Raises ``ValueError`` for values JSON cannot carry (NaN, infinities,
    non-string keys, lone surrogates).
    """
    plain = _plainly(value)
    if plain is not _SLOW:
        # No fractional floats, no integers beyond 2**53 and no keys outside
        # the BMP (integral floats, which Struct numbers always are, made
        # ints, as ECMAScript prints them): then the C encoder's output is
        # already canonical (BMP code point order is UTF-16 order; strings
        # are escaped as ECMAScript does).
        try:
            text = json.dumps(plain, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
            return text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"not valid Unicode: {err.reason}") from None
    parts: list[str] = []
    _emit(value, parts)
    try:
        return "".join(parts).encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"not valid Unicode: {err.reason}") from None


_SLOW = object()


def _plainly(value: Any) -> Any:
    """``value`` with integral floats as ints when json.dumps then writes it
    canonically, else ``_SLOW``."""
    t = type(value)  # exact types first: this runs for every value of every entry
    if t is str or t is bool or value is None:
        return value
    if t is dict:
        out = {}
        for k, v in value.items():
            if type(k) is not str or (not k.isascii() and max(k) > "\uffff"):
                return _SLOW
            tv = type(v)
            p = v if tv is str or tv is bool else _plainly(v)
            if p is _SLOW:
                return _SLOW
            out[k] = p
        return out
    if isinstance(value, str | bool):
        return value
    if isinstance(value, int):
        return value if abs(value) < 2**53 else _SLOW
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 2**53:
            return int(value)
        return _SLOW
    if isinstance(value, list | tuple):
        items = []
        for v in value:
            p = _plainly(v)
            if p is _SLOW:
                return _SLOW
            items.append(p)
        return items
    return _SLOW


def with_index(data: bytes, index: int) -> bytes:
    """Canonical entry bytes with ``"index"`` added, without re-encoding.

    Entries always have a top-level ``outcome`` (it is required), which
    sorts right after ``index``; every top-level key after it holds a plain
    string, and a quote inside a JSON string is escaped, so the last
    ``,"outcome":`` in the bytes is the top-level one.
    """
    if not index:
        return data  # proto3 JSON omits a zero int64
    at = data.rfind(b',"outcome":')
    if at < 0:
        raise ValueError("an entry has a top-level outcome")
    return b'%s,"index":"%d"%s' % (data[:at], index, data[at:])


def _emit(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        # json.dumps without ASCII escaping escapes exactly what ECMAScript's
        # JSON.stringify does: quote, backslash and C0 controls (\u00xx lowercase).
        out.append(json.dumps(value, ensure_ascii=False))
    elif isinstance(value, int):
        out.append(_number(float(value)) if abs(value) >= 2**53 else str(value))
    elif isinstance(value, float):
        out.append(_number(value))
    elif isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise ValueError(f"object keys must be strings, not {type(key).__name__}")
        # Keys sort by their UTF-16 code units (RFC 8785 section 3.2.3).
        keys = sorted(value, key=lambda k: k.encode("utf-16-be", "surrogatepass"))
        out.append("{")
        for i, key in enumerate(keys):
            if i:
                out.append(",")
            out.append(json.dumps(key, ensure_ascii=False))
            out.append(":")
            _emit(value[key], out)
        out.append("}")
    elif isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _emit(item, out)
        out.append("]")
    else:
        raise ValueError(f"{type(value).__name__} is not a JSON value")


def _number(x: float) -> str:
    """ECMAScript Number.prototype.toString for a double (RFC 8785 section 3.2.2.3)."""
    if not math.isfinite(x):
        raise ValueError("NaN and infinities are not JSON numbers")
    if x == 0:
        return "0"
    sign = "-" if x < 0 else ""
    # repr gives the shortest digits that round-trip, as ECMAScript requires;
    # only the layout (where the point and exponent go) differs.
    text = repr(abs(x))
    mantissa, _, exp = text.partition("e")
    whole, _, frac = mantissa.partition(".")
    frac = "" if frac == "0" else frac
    raw = whole + frac
    stripped = raw.lstrip("0")
    n = len(whole) + int(exp or 0) - (len(raw) - len(stripped))
    digits = stripped.rstrip("0")
    k = len(digits)
    if k <= n <= 21:
        body = digits + "0" * (n - k)
    elif 0 < n <= 21:
        body = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        body = "0." + "0" * (-n) + digits
    else:
        e = n - 1
        esign = "+" if e >= 0 else "-"
        head = digits if k == 1 else digits[0] + "." + digits[1:]
        body = f"{head}e{esign}{abs(e)}"
    return sign + body


def entry_json(entry: audit_pb2.AuditEntry) -> dict[str, Any]:
    """The proto3 JSON form of an entry, as a dict (json_format.MessageToDict's, field for field).

    Built by hand for the fixed fields, because MessageToDict's reflection was
    a third of an append's cost; ``details`` (a Struct) still goes through
    json_format. tests/unit/policy_audit checks the two agree.
    """
    doc: dict[str, Any] = {}
    if entry.index:
        doc["index"] = str(entry.index)
    if entry.HasField("time"):
        doc["time"] = entry.time.ToJsonString()
    if entry.type:
        doc["type"] = entry.type
    if entry.service:
        doc["service"] = entry.service
    if entry.HasField("actor"):
        actor: dict[str, Any] = {}
        a = entry.actor
        if a.subject:
            actor["subject"] = a.subject
        if a.issuer:
            actor["issuer"] = a.issuer
        if a.actors:
            actor["actors"] = list(a.actors)
        doc["actor"] = actor
    if entry.action:
        doc["action"] = entry.action
    if entry.resource:
        doc["resource"] = entry.resource
    if entry.outcome:
        try:
            doc["outcome"] = audit_pb2.Outcome.Name(entry.outcome)
        except ValueError:
            doc["outcome"] = entry.outcome  # an unknown value, as MessageToDict writes it
    if entry.trace_id:
        doc["traceId"] = entry.trace_id
    if entry.decision_id:
        doc["decisionId"] = entry.decision_id
    if entry.HasField("details"):
        doc["details"] = json_format.MessageToDict(entry.details)
    return doc


def entry_bytes(entry: audit_pb2.AuditEntry) -> bytes:
    """The canonical leaf bytes of an entry: RFC 8785 JSON of its proto3 JSON form."""
    return canonical_json(entry_json(entry))


def parse_entry(data: bytes) -> audit_pb2.AuditEntry:
    """An entry from its leaf bytes; ``ValueError`` if they are not an entry."""
    entry = audit_pb2.AuditEntry()
    try:
        json_format.Parse(data.decode("utf-8"), entry)
    except (json_format.ParseError, UnicodeDecodeError) as err:
        raise ValueError(f"not an audit entry: {err}") from None
    return entry
