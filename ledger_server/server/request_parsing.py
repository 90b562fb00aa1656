"""Request bodies that do not parse (bad UTF-8 in a string, a truncated message, nesting
past protobuf's limit) are answered INVALID_ARGUMENT naming ``request``, like any bad
input. grpcio runs the method's deserializer before the handler and turns its exception
into UNKNOWN with no ErrorInfo; so the deserializer hands the handler an Undecodable
instead, which the error boundary refuses (server/error_boundary.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf.message import DecodeError

from ledger_server.errors import LedgerError, invalid_field

Deserializer = Callable[[bytes], Any]


class Undecodable:
    """What arrived in place of a request the method's message type could not parse."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def error(self) -> LedgerError:
        return invalid_field("request", f"is not a valid message of the method: {self.reason}")


def tolerant(deserialize: Deserializer | None) -> Deserializer | None:
    """``deserialize``, giving an Undecodable where it raises DecodeError."""
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as exc:
            return Undecodable(str(exc))

    return parse
