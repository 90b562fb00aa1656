"""Input checks done before any SQL runs: bad input changes nothing and gets
INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from ledger.v1 import admin_service_pb2 as admin_pb
from ledger.v1 import ledger_service_pb2 as ledger_pb
from ledger.v1 import types_pb2 as types_pb
from ledger_server.errors import invalid_field
from ledger_server.ledger.account_ids import ACCOUNT_ID, account_prefix_problem
from ledger_server.ledger.reserved_keys import RESERVED_KEY_PREFIXES

MAX_AMOUNT_MICROS = 10**15  # one billion credits in one request
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100

_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,128}")
_CODE = re.compile(r"[A-Za-z0-9._:/-]{1,64}")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def account_id(value: str, field: str = "account_id") -> str:
    if not value:
        raise invalid_field(field, "must not be empty")
    if not ACCOUNT_ID.fullmatch(value):
        raise invalid_field(
            field, "must be 1 to 128 characters of letters, digits and . _ : @ / + = -"
        )
    return value


def account_prefix(value: str, field: str = "account_prefix") -> str:
    problem = account_prefix_problem(value)
    if problem is not None:
        raise invalid_field(field, problem)
    return value


def idempotency_key(value: str, *, account_namespace: bool = True) -> str:
    """A request's key. One of an account's key namespace (account_namespace, where the
    ledger's own jobs claim keys too) may not take their prefixes; the administrators'
    ledger-wide keys (admin_requests) may."""
    if not value:
        raise invalid_field("idempotency_key", "is required on every mutating request")
    if not _IDEMPOTENCY_KEY.fullmatch(value):
        raise invalid_field("idempotency_key", "must be 1 to 128 printable ASCII characters")
    for prefix in RESERVED_KEY_PREFIXES if account_namespace else ():
        if value.startswith(prefix):
            raise invalid_field(
                "idempotency_key",
                f"must not start with {prefix!r}: the prefix is reserved for the ledger's own keys",
            )
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


# The longest way to write a UUID that uuid.UUID reads ("urn:uuid:" and 36 characters):
# it also drops every dash, so without a limit an id padded with a million dashes was read.
_MAX_UUID_TEXT = 45


def uuid_value(value: str, field: str, returned_by: str) -> uuid.UUID:
    if not value:
        raise invalid_field(field, "must not be empty")
    if len(value) > _MAX_UUID_TEXT:
        raise invalid_field(field, f"must be an id returned by {returned_by}")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise invalid_field(field, f"must be an id returned by {returned_by}") from None


def reservation_id(value: str) -> uuid.UUID:
    return uuid_value(value, "reservation_id", "Reserve or Consume")


def code(value: str, field: str) -> str:
    """Optional short identifiers such as feature or model codes."""
    if value and not _CODE.fullmatch(value):
        raise invalid_field(field, "must be at most 64 characters of letters, digits and . _ : / -")
    return value


def text(value: str, field: str, max_length: int = 1024) -> str:
    """Optional free text such as comments and reasons."""
    if len(value) > max_length:
        raise invalid_field(field, f"must be at most {max_length} characters")
    if _CONTROL.search(value):
        raise invalid_field(field, "must not contain control characters")
    return value


# No whitespace or control characters: "pay-1" and "pay-1\n" must not be two payments.
_REFERENCE = re.compile(r"[^\s\x00-\x1f\x7f]{0,256}")


def reference(value: str, field: str) -> str:
    """An identifier from another system (a payment id, a price id): optional."""
    if not _REFERENCE.fullmatch(value):
        raise invalid_field(
            field, "must be at most 256 characters, without spaces or control characters"
        )
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


def ends_after(start: Timestamp, end: Timestamp) -> bool:
    """Whether a range ends after it starts, as asked (not as rounded by range_bound): a
    range within one microsecond is empty, not reversed."""
    return (end.seconds, end.nanos) > (start.seconds, start.nanos)


def range_bound(value: Timestamp, field: str) -> datetime:
    """A bound of a time range (start included, end excluded) in PostgreSQL's microseconds,
    rounded up: the ledger's times are whole microseconds, so one is in the range asked for
    exactly when it is in the rounded one (truncated, a range starting at 10:00:00.0000005
    took in an entry of 10:00:00.000000)."""
    moment = timestamp(value, field)
    # Past the last microsecond datetime holds no time of the ledger is later anyway.
    if value.nanos % 1000 and moment < datetime.max.replace(tzinfo=UTC):
        moment += timedelta(microseconds=1)
    return moment


# google.protobuf.Duration's own range (duration.proto): ToTimedelta checks none of it.
_MAX_DURATION_SECONDS = 315_576_000_000
_MAX_NANOS = 999_999_999


def duration_value(value: Duration, field: str) -> timedelta:
    seconds, nanos = value.seconds, value.nanos
    if (
        abs(seconds) > _MAX_DURATION_SECONDS
        or abs(nanos) > _MAX_NANOS
        or (seconds > 0 > nanos)
        or (seconds < 0 < nanos)
    ):
        raise invalid_field(field, "is not a valid duration")
    try:
        return value.ToTimedelta()
    except (ValueError, OverflowError):
        raise invalid_field(field, "is not a valid duration") from None


MAX_LOT_LIFETIME = timedelta(days=365 * 100)


def lot_expiry(
    message: ledger_pb.GrantRequest | admin_pb.GrantCreditsRequest, now: datetime
) -> datetime | None:
    """The expiry of a grant from its `expiry` oneof (expires_at or expires_in). That an
    absolute expires_at is still in the future is checked by ledger_grant after the
    idempotency lookup, so a retry after that moment still gets its original answer."""
    which = message.WhichOneof("expiry")
    if which == "expires_at":
        expires_at = timestamp(message.expires_at, "expires_at")
        if expires_at.year > 9000:
            raise invalid_field("expires_at", "is too far in the future")
        return expires_at
    if which == "expires_in":
        expires_in = duration_value(message.expires_in, "expires_in")
        return now + duration(expires_in, "expires_in", MAX_LOT_LIFETIME)
    return None


_REDEMPTION_CODE = re.compile(r"[A-Z0-9]{16}")


def redemption_code(value: str) -> str:
    """A code as printed (XXXX-XXXX-XXXX-XXXX), in any case, with or without dashes."""
    normalized = re.sub(r"[\s-]", "", value).upper()
    if not normalized:
        raise invalid_field("code", "must not be empty")
    if not _REDEMPTION_CODE.fullmatch(normalized):
        raise invalid_field("code", "must be 16 letters and digits (dashes and case do not matter)")
    return normalized


def referral_code(value: str) -> str:
    """Looked up as a redemption code is: without spaces or dashes, upper-cased. Codes are
    made of capitals and digits only (ledger_random_code: 10 of 23456789ABCDEFGHJKMNPQRSTUVWXYZ,
    no dash), so what this drops never told two codes apart, and '3akj4-mkepv' or
    '3AKJ4 MKEPV' typed from a printed code is that code. An unknown code is NOT_FOUND,
    not malformed: dashes alone stay a code (none has them), blanks alone name none."""
    read = re.sub(r"[\s-]", "", value) or value.strip()
    return text(read, "referral_code", 64).upper()


def required_text(value: str, field: str, max_length: int = 1024) -> str:
    if not value.strip():
        raise invalid_field(field, "is required")
    return text(value, field, max_length)


MAX_QUANTITY = 10**12


def usage(
    value: types_pb.Usage, field: str = "usage", require_feature: bool = True
) -> dict[str, object]:
    """A usage description as the ledger functions take it: feature, model, quantities."""
    if require_feature and not value.feature:
        raise invalid_field(f"{field}.feature", "must not be empty")
    code(value.feature, f"{field}.feature")
    code(value.model, f"{field}.model")
    if not value.quantities:
        raise invalid_field(f"{field}.quantities", "must name at least one quantity")
    quantities: list[dict[str, object]] = []
    seen: set[int] = set()
    for i, quantity in enumerate(value.quantities):
        where = f"{field}.quantities[{i}]"
        if quantity.unit == types_pb.USAGE_UNIT_UNSPECIFIED or quantity.unit not in (
            types_pb.UsageUnit.values()
        ):
            raise invalid_field(f"{where}.unit", "must be set to a known unit")
        if quantity.unit in seen:
            raise invalid_field(f"{where}.unit", "appears twice")
        seen.add(quantity.unit)
        if not 0 <= quantity.quantity <= MAX_QUANTITY:
            raise invalid_field(f"{where}.quantity", f"must be 0 to {MAX_QUANTITY}")
        quantities.append({"unit": unit_to_db(quantity.unit), "quantity": quantity.quantity})
    return {"feature": value.feature, "model": value.model, "quantities": quantities}


_UNIT_PREFIX = "USAGE_UNIT_"


def unit_to_db(unit: types_pb.UsageUnit.ValueType) -> str:
    return types_pb.UsageUnit.Name(unit).removeprefix(_UNIT_PREFIX).lower()
