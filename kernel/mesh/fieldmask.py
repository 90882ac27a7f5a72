"""The one update-mask merge (AIP-134) of the project's Update RPCs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from google.protobuf import field_mask_pb2
from google.protobuf.message import Message

M = TypeVar("M", bound=Message)


def merge_masked(current: M, patch: M, paths: Sequence[str]) -> M:
    """A copy of ``current`` with the fields ``paths`` names taken from ``patch``.

    As AIP-134 says, a named message or repeated field is replaced whole, never
    merged into (so ``{"ttl": "0.5s"}`` sets 0.5 s, not the old seconds plus
    500 ms). The caller checks first that ``paths`` are writable and exist.
    """
    merged = type(current)()
    merged.CopyFrom(current)
    field_mask_pb2.FieldMask(paths=list(paths)).MergeMessage(
        patch, merged, replace_message_field=True, replace_repeated_field=True
    )
    return merged
