"""How the CLI prints: credits as decimals, plain tables, protobuf JSON for scripts,
and gRPC errors with their status code, message and ErrorInfo."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC
from decimal import Decimal, InvalidOperation
from typing import Any, TextIO, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status

MICROS_PER_CREDIT = 1_000_000
EnumValue = TypeVar("EnumValue", bound=int)


class UsageError(Exception):
    """Bad command-line input found after parsing (exit code 2)."""


def credits(micros: int) -> str:
    """96500000 -> "96.5": whole credits, then up to six decimals without trailing zeros."""
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), MICROS_PER_CREDIT)
    text = f"{whole:,}"
    if fraction:
        text += "." + f"{fraction:06d}".rstrip("0")
    return sign + text


# A comma is read only as a thousands separator: a decimal comma ("2,50") with its commas
# dropped would be 250, a hundred times the amount the operator meant.
_THOUSANDS = re.compile(r"\s*[+-]?\d{1,3}(,\d{3})+(\.\d*)?\s*")


def parse_credits(text: str, name: str = "credits") -> int:
    """ "96.5" -> 96500000, "1,000" -> 1000000000; at most six decimals, never a float on the
    way. ``name``: the argument, named in the usage error."""
    if "," in text and not _THOUSANDS.fullmatch(text):
        raise UsageError(
            f"{name}: {text!r} is not an amount of credits: a comma only separates thousands "
            "(1,000.5); write decimals with a point (2.5)"
        )
    try:
        value = Decimal(text.replace(",", "").replace("_", ""))
    except InvalidOperation:
        raise UsageError(
            f"{name}: {text!r} is not an amount of credits such as 10 or 96.5"
        ) from None
    micros = value * MICROS_PER_CREDIT
    if not value.is_finite() or micros != micros.to_integral_value():
        raise UsageError(f"{name}: {text!r}: credits have at most 6 decimals")
    # What a request's int64 of micro-credits carries; past it the request could not even
    # be built (1e30 crashed with a traceback). Within it, the server refuses amounts past
    # its own maximum (INVALID_FIELD), so this CLI does not repeat a limit it may not share.
    if int(micros) not in _INT64:
        raise UsageError(
            f"{name}: {text!r} is out of range: at most {credits(_INT64[-1])} credits either way"
        )
    return int(micros)


_INT64 = range(-(2**63), 2**63)
SECONDS_PER_DAY = 86_400
# google.protobuf.Duration's range (10,000 years): a longer lifetime is no valid duration.
_MOST_DAYS = 315_576_000_000 // SECONDS_PER_DAY


def parse_days(text: str, name: str) -> int:
    """ "30" or "0.5" days -> whole seconds (2592000, 43200), for a lifetime's Duration.
    Not a number, not finite (nan, inf), not positive, under a second or past what a
    Duration holds: a usage error (int(nan * 86400) and 1e300 days crashed the CLI)."""
    try:
        days = Decimal(text.strip().replace("_", ""))
    except InvalidOperation:
        raise UsageError(f"{name}: {text!r} is not a number of days such as 30 or 0.5") from None
    if not days.is_finite() or not 0 < days <= _MOST_DAYS:
        raise UsageError(f"{name}: {text!r}: days must be a number above 0, at most {_MOST_DAYS:,}")
    seconds = int(days * SECONDS_PER_DAY)
    if seconds < 1:
        raise UsageError(f"{name}: {text!r}: days must come to at least one second")
    return seconds


def when(ts: Timestamp) -> str:
    if not ts.seconds and not ts.nanos:
        return ""
    return ts.ToDatetime(UTC).strftime("%Y-%m-%d %H:%M:%S")


def enum_name(name_of: Callable[[EnumValue], str], value: EnumValue, prefix: str) -> str:
    """``value``'s name (``name_of``: an enum's ``Name``) without ``prefix``, in lower case;
    the number itself when this build does not know it (a newer server's value)."""
    try:
        return name_of(value).removeprefix(prefix).lower()
    except ValueError:
        return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], out: TextIO) -> None:
    """Left-aligned columns; a column whose header starts with '>' is right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    titles = [h.lstrip(">") for h in headers]
    widths = [max([len(t), *(len(r[i]) for r in cells)]) for i, t in enumerate(titles)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if h.startswith(">") else v.ljust(w)
            for v, w, h in zip(values, widths, headers, strict=True)
        ]
        return "  ".join(parts).rstrip()

    print(line(titles), file=out)
    for row in cells:
        print(line(row), file=out)
    if not cells:
        print("(none)", file=out)


def fields(pairs: Iterable[tuple[str, object]], out: TextIO) -> None:
    pairs = list(pairs)
    width = max((len(k) for k, _ in pairs), default=0)
    for key, value in pairs:
        print(f"{key.ljust(width)}  {value}", file=out)


def as_json(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def print_json(value: Message | dict[str, Any] | list[Any], out: TextIO) -> None:
    data = as_json(value) if isinstance(value, Message) else value
    json.dump(data, out, indent=2, sort_keys=False)
    out.write("\n")


def rpc_error(error: grpc.RpcError) -> dict[str, Any]:
    """The status code, message, and the ErrorInfo / BadRequest details of a failed call."""
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    out: dict[str, Any] = {"code": code.name, "message": details or ""}
    status = rpc_status.from_call(error) if isinstance(error, grpc.Call) else None
    details_list: list[Any] = list(status.details) if status is not None else []
    for detail in details_list:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            out["reason"] = info.reason
            out["metadata"] = dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out["field_violations"] = [
                {"field": v.field, "description": v.description} for v in bad.field_violations
            ]
    return out


def print_error(error: dict[str, Any], json_mode: bool, out: TextIO = sys.stderr) -> None:
    if json_mode:
        print_json({"error": error}, out)
        return
    print(f"error: {error['code']}: {error['message']}", file=out)
    if error.get("reason"):
        print(f"  reason: {error['reason']}", file=out)
    for key, value in sorted(error.get("metadata", {}).items()):
        if key.endswith("_micros") and value.lstrip("-").isdigit():
            value = f"{value} ({credits(int(value))} credits)"
        print(f"  {key}: {value}", file=out)
