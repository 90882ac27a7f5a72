"""List pagination, the one way every service does it (AIP-158).

A page token is an opaque, url-safe cursor: the key of the last item
returned. A token this mesh did not issue is INVALID_ARGUMENT naming
``page_token``, never a 500, whatever bytes it holds.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterable
from typing import TypeVar

from autoecoops.kernel.mesh.errors import FieldViolation, InvalidArgument

T = TypeVar("T")
_VERSION = "p1:"


def page_size(requested: int, default: int = 100, maximum: int = 1000) -> int:
    """The page size to use: ``default`` for 0, at most ``maximum``; negative is invalid."""
    if requested < 0:
        raise InvalidArgument(
            "page_size must not be negative",
            reason="INVALID_PAGE_SIZE",
            field_violations=[FieldViolation("page_size", "must be 0 or more")],
        )
    return min(requested or default, maximum)


def encode_cursor(cursor: str) -> str:
    """An opaque page token for ``cursor``."""
    return base64.urlsafe_b64encode((_VERSION + cursor).encode()).decode().rstrip("=")


def decode_cursor(token: str) -> str:
    """The cursor inside a page token ('' for none); INVALID_ARGUMENT if it is not ours."""
    if not token:
        return ""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raw = ""
    if not raw.startswith(_VERSION):
        raise InvalidArgument(
            "page_token is not one this service issued",
            reason="INVALID_PAGE_TOKEN",
            field_violations=[FieldViolation("page_token", "malformed")],
        )
    return raw[len(_VERSION) :]


def page_by_key(
    items: Iterable[T],
    requested_size: int,
    token: str,
    key: Callable[[T], str],
    *,
    default: int = 100,
    maximum: int = 1000,
) -> tuple[list[T], str]:
    """One page of ``items`` in ``key`` order after the token's cursor, and the next token."""
    size = page_size(requested_size, default, maximum)
    after = decode_cursor(token)
    rest = sorted((i for i in items if key(i) > after), key=key)
    chunk = rest[:size]
    return chunk, encode_cursor(key(chunk[-1])) if len(rest) > size else ""
