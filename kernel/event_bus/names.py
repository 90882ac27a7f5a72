"""Names and ids the bus accepts: consumer groups, consumers and stream ids.

Group and consumer names end up inside Redis key names, so they are held to
a strict alphabet: no glob characters (``* ? [ ]``), no key separator (``:``),
no braces (Redis Cluster hash tags), no whitespace. A bad name is
INVALID_ARGUMENT before any Redis call is made.
"""

from __future__ import annotations

import re

from autoecoops.kernel.mesh.errors import FieldViolation, InvalidArgument

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_STREAM_ID = re.compile(r"(\d{1,20})-(\d{1,20})")
MAX_U64 = (1 << 64) - 1


def check_name(value: str, field: str, what: str) -> str:
    """Return ``value`` if it is a valid group/consumer name, else raise InvalidArgument."""
    if _NAME.fullmatch(value):
        return value
    raise InvalidArgument(
        f"{field}: {what} name {value!r} is not allowed; use 1-128 letters, digits, '.', '_' "
        "or '-', starting with a letter or digit",
        reason="INVALID_NAME",
        field_violations=[FieldViolation(field, f"invalid {what} name")],
    )


def parse_stream_id(value: str, field: str) -> tuple[int, int]:
    """Split an event id (``<ms>-<seq>``) into its parts; InvalidArgument if malformed."""
    m = _STREAM_ID.fullmatch(value)
    if m:
        ms, seq = int(m[1]), int(m[2])
        if ms <= MAX_U64 and seq <= MAX_U64:
            return ms, seq
    raise InvalidArgument(
        f"{field}: {value!r} is not an event id (expected <milliseconds>-<sequence>)",
        reason="INVALID_EVENT_ID",
        field_violations=[FieldViolation(field, "not an event id")],
    )


def id_before(ms: int, seq: int) -> str:
    """The stream id just before ``ms-seq`` (for positioning a group before an event)."""
    if seq > 0:
        return f"{ms}-{seq - 1}"
    if ms > 0:
        return f"{ms - 1}-{MAX_U64}"
    return "0-0"


def id_ms(entry_id: str) -> int:
    """The millisecond timestamp part of a stream id."""
    return int(entry_id.partition("-")[0])
