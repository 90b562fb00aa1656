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


def _filter_digest(filters: Sequence[object]) -> str:
    return hashlib.sha256(json.dumps(list(filters), default=str).encode()).hexdigest()[:16]


def encode(position: Position, filters: Sequence[object]) -> str:
    payload = json.dumps({"p": position, "f": _filter_digest(filters)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def decode(token: str, filters: Sequence[object], arity: int) -> Position | None:
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        payload = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise invalid_field("page_token", "is not a page token this server issued") from None
    if not isinstance(payload, dict):
        raise invalid_field("page_token", "is not a page token this server issued")
    position = payload.get("p")
    if (
        not isinstance(position, list)
        or len(position) != arity
        or not all(isinstance(v, int | str) or v is None for v in position)
    ):
        raise invalid_field("page_token", "is not a page token this server issued")
    if payload.get("f") != _filter_digest(filters):
        raise invalid_field("page_token", "was issued for different filters")
    return position
