"""Delivery ids: opaque, URL-safe, tamper-proof references to one delivery.

A delivery id carries everything Ack, Nack and ExtendLease need (topic,
group, consumer, event, attempt), so settling needs no lookup table; an HMAC
with the bus's secret makes it unforgeable, and a tag of the subscriber's
identity makes it useless to anyone else. A token that fails either check is
"not found": the caller learns nothing about other groups' deliveries.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
from dataclasses import dataclass

from autoecoops.kernel.event_bus.names import parse_stream_id
from autoecoops.kernel.mesh.errors import InvalidArgument

_VERSION = 1
#: Version 2 adds the partition (two bytes after the attempt); a delivery on
#: partition 0 keeps version 1, so ids of unpartitioned topics are unchanged.
_VERSION_PARTITIONED = 2
_MAC_BYTES = 16
_TAG_BYTES = 8
_KEY_BYTES = 16


@dataclass(frozen=True, slots=True)
class DeliveryRef:
    """What a delivery id refers to."""

    topic: str
    group: str
    consumer: str
    #: The stream entry delivered.
    entry_id: str
    #: Which delivery of that entry this was (1 = the first).
    attempt: int
    #: A tag of the subscriber's subject (see ``subject_tag``).
    subject: bytes
    #: The event's idempotency-key digest (hex), so settling need not read the event.
    key: str = ""
    #: The partition of the topic the entry is in.
    partition: int = 0


def subject_tag(subject: str) -> bytes:
    """A short digest of a subject, bound into its delivery ids."""
    return hashlib.sha256(subject.encode()).digest()[:_TAG_BYTES]


def _pack_str(value: str) -> bytes:
    raw = value.encode()
    return struct.pack(">B", len(raw)) + raw


class DeliveryTokens:
    """Encodes and verifies delivery ids with one secret."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._secret, body, hashlib.sha256).digest()[:_MAC_BYTES]

    def encode(self, ref: DeliveryRef) -> str:
        """The delivery id of ``ref``."""
        ms, seq = parse_stream_id(ref.entry_id, "entry_id")
        where = struct.pack(">QQI", ms, seq, ref.attempt)
        if ref.partition:
            where += struct.pack(">H", ref.partition)
        body = b"".join(
            (
                struct.pack(">B", _VERSION_PARTITIONED if ref.partition else _VERSION),
                _pack_str(ref.topic),
                _pack_str(ref.group),
                _pack_str(ref.consumer),
                where,
                ref.subject,
                bytes.fromhex(ref.key),
            )
        )
        return base64.urlsafe_b64encode(body + self._mac(body)).rstrip(b"=").decode()

    def decode(self, token: str) -> DeliveryRef | None:
        """The reference of a delivery id, or None if it is malformed or forged."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (ValueError, TypeError):
            return None
        if len(raw) < 1 + 3 + 20 + _TAG_BYTES + _MAC_BYTES or raw[0] not in (
            _VERSION,
            _VERSION_PARTITIONED,
        ):
            return None
        body, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        if not hmac.compare_digest(mac, self._mac(body)):
            return None
        try:
            pos = 1
            parts: list[str] = []
            for _ in range(3):
                n = body[pos]
                parts.append(body[pos + 1 : pos + 1 + n].decode())
                pos += 1 + n
            ms, seq, attempt = struct.unpack_from(">QQI", body, pos)
            pos += 20
            partition = 0
            if body[0] == _VERSION_PARTITIONED:
                (partition,) = struct.unpack_from(">H", body, pos)
                pos += 2
            subject = body[pos : pos + _TAG_BYTES]
            key = body[pos + _TAG_BYTES :]
        except (IndexError, struct.error, UnicodeDecodeError):
            return None
        if len(subject) != _TAG_BYTES or len(key) not in (0, _KEY_BYTES):
            return None
        return DeliveryRef(
            parts[0], parts[1], parts[2], f"{ms}-{seq}", attempt, subject, key.hex(), partition
        )


def check_token_field(token: str, field: str) -> str:
    """Reject an empty or absurdly long delivery id before decoding it."""
    if not token or len(token) > 1024:
        raise InvalidArgument(f"{field}: not a delivery id", reason="INVALID_DELIVERY_ID")
    return token
