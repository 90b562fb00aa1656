"""Opaque keyset page tokens. A token carries the position after the last row
returned and a digest of the filters it was issued for, so a token reused with
other filters, or altered, is refused as INVALID_ARGUMENT."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence

from ledger_server.errors import invalid_field

Position = list[int | str | None]


class Kind:
    """What one value of a position may be: the column it is compared with. A token is
    not signed; a value that is not of its column's type and range would reach the
    database as a cast error (INTERNAL), so it is refused here."""

    def __init__(self, low: int | None, high: int | None, nullable: bool = False) -> None:
        self.low, self.high, self.nullable = low, high, nullable  # low None: text

    def admits(self, value: object) -> bool:
        if value is None:
            return self.nullable
        if self.low is None or self.high is None:
            return isinstance(value, str) and len(value) <= 255 and _storable(value)
        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            and self.low <= value <= self.high
        )


def _storable(text: str) -> bool:
    """PostgreSQL text holds no NUL, and psycopg cannot encode a lone surrogate."""
    if "\x00" in text:
        return False
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


MAX_TOKEN_LENGTH = 2048

ID = Kind(0, 2**63 - 1)  # a bigint key
PRIORITY = Kind(-(2**15), 2**15 - 1)  # a smallint
# Microseconds since 1970 of a timestamp of the years 1 to 9999.
_MICROS = (-62_135_596_800_000_000, 253_402_300_799_999_999)
MICROS = Kind(*_MICROS)
MICROS_OR_NONE = Kind(*_MICROS, nullable=True)  # e.g. no expiry
TEXT = Kind(None, None)


def _filter_digest(filters: Sequence[object]) -> str:
    return hashlib.sha256(json.dumps(list(filters), default=str).encode()).hexdigest()[:16]


def encode(position: Position, filters: Sequence[object]) -> str:
    payload = json.dumps({"p": position, "f": _filter_digest(filters)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def decode(token: str, filters: Sequence[object], kinds: Sequence[Kind]) -> Position | None:
    if not token:
        return None
    # A token this server issues is a few hundred characters; past this, whatever the JSON
    # inside (nested 2,000 deep, say, which json.loads fails on with RecursionError).
    if len(token) > MAX_TOKEN_LENGTH:
        raise invalid_field("page_token", "is not a page token this server issued")
    try:
        padded = token + "=" * (-len(token) % 4)
        payload = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        raise invalid_field("page_token", "is not a page token this server issued") from None
    if not isinstance(payload, dict):
        raise invalid_field("page_token", "is not a page token this server issued")
    position = payload.get("p")
    if (
        not isinstance(position, list)
        or len(position) != len(kinds)
        or not all(kind.admits(v) for kind, v in zip(kinds, position, strict=True))
    ):
        raise invalid_field("page_token", "is not a page token this server issued")
    if payload.get("f") != _filter_digest(filters):
        raise invalid_field("page_token", "was issued for different filters")
    return position
