"""Input checks done before any SQL runs: bad input changes nothing and gets
INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from ledger_server.errors import invalid_field

MAX_AMOUNT_MICROS = 10**15  # one billion credits in one request
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100

_ACCOUNT_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,128}$")
_CODE = re.compile(r"^[A-Za-z0-9._:/-]{1,64}$")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def account_id(value: str, field: str = "account_id") -> str:
    if not value:
        raise invalid_field(field, "must not be empty")
    if not _ACCOUNT_ID.match(value):
        raise invalid_field(
            field, "must be 1 to 128 characters of letters, digits and . _ : @ / + = -"
        )
    return value


def idempotency_key(value: str) -> str:
    if not value:
        raise invalid_field("idempotency_key", "is required on every mutating request")
    if not _IDEMPOTENCY_KEY.match(value):
        raise invalid_field("idempotency_key", "must be 1 to 128 printable ASCII characters")
    return value


def positive_amount(value: int, field: str = "amount_micros") -> int:
    if value <= 0:
        raise invalid_field(field, "must be positive")
    if value > MAX_AMOUNT_MICROS:
        raise invalid_field(field, f"must be at most {MAX_AMOUNT_MICROS}")
    return value


def non_negative_amount(value: int, field: str = "amount_micros") -> int:
    if value < 0:
        raise invalid_field(field, "must not be negative")
    if value > MAX_AMOUNT_MICROS:
        raise invalid_field(field, f"must be at most {MAX_AMOUNT_MICROS}")
    return value


def reservation_id(value: str) -> uuid.UUID:
    if not value:
        raise invalid_field("reservation_id", "must not be empty")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise invalid_field(
            "reservation_id", "must be a reservation id returned by Reserve"
        ) from None


def code(value: str, field: str) -> str:
    """Optional short identifiers such as feature or model codes."""
    if value and not _CODE.match(value):
        raise invalid_field(field, "must be at most 64 characters of letters, digits and . _ : / -")
    return value


def text(value: str, field: str, max_length: int = 1024) -> str:
    """Optional free text such as comments and reasons."""
    if len(value) > max_length:
        raise invalid_field(field, f"must be at most {max_length} characters")
    if _CONTROL.search(value):
        raise invalid_field(field, "must not contain control characters")
    return value


def future_time(value: datetime, now: datetime, field: str) -> datetime:
    if value <= now:
        raise invalid_field(field, "must be in the future")
    if value.year > 9000:
        raise invalid_field(field, "is too far in the future")
    return value


def duration(value: timedelta, field: str, maximum: timedelta) -> timedelta:
    if value <= timedelta():
        raise invalid_field(field, "must be positive")
    if value > maximum:
        raise invalid_field(field, f"must be at most {int(maximum.total_seconds())} seconds")
    return value


def page_size(value: int) -> int:
    if value < 0:
        raise invalid_field("page_size", "must not be negative")
    if value == 0:
        return DEFAULT_PAGE_SIZE
    return min(value, MAX_PAGE_SIZE)


def timestamp(value: Timestamp, field: str) -> datetime:
    try:
        return value.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise invalid_field(field, "is not a valid timestamp") from None


def duration_value(value: Duration, field: str) -> timedelta:
    try:
        return value.ToTimedelta()
    except (ValueError, OverflowError):
        raise invalid_field(field, "is not a valid duration") from None
