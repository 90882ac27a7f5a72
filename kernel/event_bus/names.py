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


_PARTITIONED_ID = re.compile(r"p(\d{1,4})-(\d{1,20}-\d{1,20})")


def partitioned_id(partitions: int, partition: int, entry_id: str) -> str:
    """The public id of a stream entry (a dead letter): ``p<partition>-<ms>-<seq>``
    on a partitioned topic, the bare stream id on a topic of one partition."""
    return f"p{partition}-{entry_id}" if partitions > 1 else entry_id


def parse_partitioned_id(value: str, partitions: int, field: str) -> tuple[int, str]:
    """(partition, stream id) of a public id; InvalidArgument if it is malformed
    or names a partition the topic does not have."""
    m = _PARTITIONED_ID.fullmatch(value)
    partition, entry_id = (int(m[1]), m[2]) if m else (0, value)
    if partitions > 1 and not m:
        raise InvalidArgument(
            f"{field}: {value!r} names no partition; on a topic of {partitions} partitions "
            "it is p<partition>-<milliseconds>-<sequence>",
            reason="INVALID_EVENT_ID",
            field_violations=[FieldViolation(field, "not a partitioned id")],
        )
    check_partition(partition, partitions, field)
    ms, seq = parse_stream_id(entry_id, field)
    return partition, f"{ms}-{seq}"


def check_partition(partition: int, partitions: int, field: str) -> int:
    """``partition`` if the topic has it, else InvalidArgument."""
    if 0 <= partition < partitions:
        return partition
    raise InvalidArgument(
        f"{field}: partition {partition} does not exist; the topic has {partitions} "
        f"(0 to {partitions - 1})",
        reason="INVALID_PARTITION",
        metadata={"partitions": str(partitions)},
        field_violations=[FieldViolation(field, f"must be 0 to {partitions - 1}")],
    )
