"""Typed errors of the credit-ledger client.

Every failed call raises a :class:`LedgerError` subclass. The server puts a serialized
``google.rpc.Status`` in the ``grpc-status-details-bin`` trailer whose details hold a
``google.rpc.ErrorInfo`` (domain ``credit-ledger``, a reason from ``ledger.v1.ErrorReason``
without its ``ERROR_REASON_`` prefix, and metadata such as ``available_micros``). The class is
chosen by that reason first and by the gRPC status code when there is no known reason.

The client depends on grpcio and protobuf only, so the two google.rpc messages are declared
here, under a private proto package in a private descriptor pool: same wire format, no
dependency on googleapis-common-protos and no clash with it when both are installed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import ClassVar, Protocol, cast

import grpc
import grpc.aio
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

__all__ = [
    "ERROR_DOMAIN",
    "AccountNotFound",
    "AlreadyExists",
    "AmountExceedsHold",
    "AmountExceedsRefundable",
    "Conflict",
    "DeadlineExceeded",
    "FailedPrecondition",
    "IdempotencyKeyReused",
    "InsufficientCredits",
    "InvalidArgument",
    "LedgerError",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "RateLimited",
    "ReservationExpired",
    "ReservationNotCommitted",
    "ReservationNotFound",
    "ReservationNotPending",
    "TooManyLots",
    "Unauthenticated",
    "Unavailable",
    "from_rpc_error",
]

ERROR_DOMAIN = "credit-ledger"
STATUS_DETAILS_TRAILER = "grpc-status-details-bin"
ERROR_INFO_TYPE_URL = "type.googleapis.com/google.rpc.ErrorInfo"


# The reason the server gives a DEADLINE_EXCEEDED of its own (ledger.v1.ErrorReason 45).
SERVER_TIMEOUT_REASON = "DEADLINE_EXCEEDED"
# The reason of the server's rate limit (ledger.v1.ErrorReason 44), the one RESOURCE_EXHAUSTED
# answered before the call's handler ran.
RATE_LIMIT_REASON = "RATE_LIMITED"


class LedgerError(Exception):
    """A failed ledger call: gRPC status code, ErrorInfo reason (may be empty), message and
    ErrorInfo metadata. Subclasses add typed accessors for the metadata they carry."""

    default_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code: grpc.StatusCode = code if code is not None else self.default_code
        self.reason = reason
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})
        # The key the client sent (a mutating call; "" otherwise): when the outcome is
        # unknown (DeadlineExceeded, Unavailable) a retry must send this same key, which the
        # client made itself when the caller passed none. Until the client sets it, the one
        # the server named (IdempotencyKeyReused).
        self.idempotency_key: str = self.metadata.get("idempotency_key", "")
        # Set by the client when it gives up: True when this call may have been applied by
        # one of its attempts (this one or an earlier one), so its outcome is unknown; retry
        # it with idempotency_key, which replays it if it was. A rate limit or an
        # authentication error that ends the retries after a dropped connection is such a
        # case: the error is this attempt's, the charge may be an earlier one's.
        self.outcome_unknown: bool = False

    def __str__(self) -> str:
        label = f"{self.code.name} {self.reason}" if self.reason else self.code.name
        return f"{label}: {self.message}"

    def _int(self, key: str) -> int:
        """An integer metadata value; 0 when the server did not send it."""
        try:
            return int(self.metadata.get(key, "0"))
        except ValueError:
            return 0


class InvalidArgument(LedgerError):
    """Bad input (INVALID_ARGUMENT, reason INVALID_FIELD). Nothing was changed."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT

    @property
    def field(self) -> str | None:
        """The request field that was rejected, such as ``"amount_micros"``."""
        return self.metadata.get("field")

    @property
    def violation(self) -> str:
        return self.metadata.get("violation", "")


class OutOfRange(LedgerError):
    """A report's total does not fit its int64 field (OUT_OF_RANGE, reason
    REPORT_OUT_OF_RANGE): ask for a shorter period or one account. Nothing was changed."""

    default_code = grpc.StatusCode.OUT_OF_RANGE

    @property
    def field(self) -> str | None:
        """The report field whose total is out of range, such as ``"allocated_micros"``."""
        return self.metadata.get("field")


class FailedPrecondition(LedgerError):
    """The request was valid but the ledger's state does not allow it."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class InsufficientCredits(FailedPrecondition):
    """Not enough spendable credits. Nothing was held or charged."""

    @property
    def available_micros(self) -> int:
        return self._int("available_micros")

    @property
    def requested_micros(self) -> int:
        return self._int("requested_micros")


class TooManyLots(FailedPrecondition):
    """The amount draws on more of the account's lots (grants) than one call can take
    (``max_lots``); nothing changed. Split it: at most ``max_amount_micros`` per call."""

    @property
    def max_lots(self) -> int:
        return self._int("max_lots")

    @property
    def max_amount_micros(self) -> int:
        return self._int("max_amount_micros")

    @property
    def requested_micros(self) -> int:
        return self._int("requested_micros")


class AlreadyExists(LedgerError):
    default_code = grpc.StatusCode.ALREADY_EXISTS


class IdempotencyKeyReused(AlreadyExists):
    """ALREADY_EXISTS: the idempotency key (``.idempotency_key``) was used before for a
    different request."""


class NotFound(LedgerError):
    default_code = grpc.StatusCode.NOT_FOUND


class AccountNotFound(NotFound):
    @property
    def account_id(self) -> str:
        return self.metadata.get("account_id", "")


class ReservationNotFound(NotFound):
    @property
    def reservation_id(self) -> str:
        return self.metadata.get("reservation_id", "")


class ReservationNotPending(FailedPrecondition):
    """The reservation was committed or released already (``status``: committed, released
    or failed)."""

    @property
    def reservation_id(self) -> str:
        return self.metadata.get("reservation_id", "")

    @property
    def status(self) -> str:
        return self.metadata.get("status", "")


class ReservationExpired(FailedPrecondition):
    """The reservation's time-to-live passed before the call was received. Its hold may
    still be held (``hold_returned`` false: for a minute's grace past its expiry, or a
    server that does not say), until a Release returns it (a Release of a returned hold
    answers it EXPIRED, changing nothing) or, after the grace, the account's next call or
    sweep does."""

    @property
    def reservation_id(self) -> str:
        return self.metadata.get("reservation_id", "")

    @property
    def hold_returned(self) -> bool:
        return self.metadata.get("hold_returned") == "true"


class AmountExceedsHold(FailedPrecondition):
    """A commit above the held amount."""

    @property
    def held_micros(self) -> int:
        return self._int("held_micros")

    @property
    def requested_micros(self) -> int:
        return self._int("requested_micros")


class AmountExceedsRefundable(FailedPrecondition):
    """A refund above what is left to refund."""

    @property
    def refundable_micros(self) -> int:
        return self._int("refundable_micros")

    @property
    def requested_micros(self) -> int:
        return self._int("requested_micros")


class ReservationNotCommitted(FailedPrecondition):
    """Only committed reservations can be refunded."""

    @property
    def reservation_id(self) -> str:
        return self.metadata.get("reservation_id", "")

    @property
    def status(self) -> str:
        return self.metadata.get("status", "")


class Unavailable(LedgerError):
    """The server or its database could not be reached. The client retries these itself;
    raised once its attempts or its deadline are spent. Safe to retry with the same key
    (``error.idempotency_key``)."""

    default_code = grpc.StatusCode.UNAVAILABLE


class Conflict(LedgerError):
    """ABORTED: the call lost a race with a concurrent one, or waited in an overloaded server
    longer than it may (reason WAITED_TOO_LONG); it changed nothing. The client retries these
    itself; raised once its attempts are spent. Safe to retry with the same idempotency key."""

    default_code = grpc.StatusCode.ABORTED


class DeadlineExceeded(LedgerError):
    """The call's deadline passed. For a mutating call the outcome is unknown: call again with
    ``idempotency_key=error.idempotency_key`` (the key this call sent) to get the original
    result or apply it once; a call without it makes a new key and may apply twice. With
    ``reason`` DEADLINE_EXCEEDED the server timed out itself and this attempt changed nothing
    (the client retries those while the deadline leaves time, see ``RetryPolicy``); unless
    ``outcome_unknown``: an earlier attempt, whose answer was lost, may have applied it."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class PermissionDenied(LedgerError):
    default_code = grpc.StatusCode.PERMISSION_DENIED


class RateLimited(LedgerError):
    """The caller's rate limit was reached (RESOURCE_EXHAUSTED, reason RATE_LIMITED); this
    attempt changed nothing. Not retried by the client: wait ``retry_after_ms``."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED

    @property
    def retry_after_ms(self) -> int:
        """How long the server asks to wait before the next call (0: not said)."""
        return self._int("retry_after_ms")


class Unauthenticated(LedgerError):
    default_code = grpc.StatusCode.UNAUTHENTICATED


_BY_REASON: dict[str, type[LedgerError]] = {
    "INVALID_FIELD": InvalidArgument,
    "INSUFFICIENT_CREDITS": InsufficientCredits,
    "TOO_MANY_LOTS": TooManyLots,
    "IDEMPOTENCY_KEY_REUSED": IdempotencyKeyReused,
    "ACCOUNT_NOT_FOUND": AccountNotFound,
    "RESERVATION_NOT_FOUND": ReservationNotFound,
    "RESERVATION_NOT_PENDING": ReservationNotPending,
    "RESERVATION_EXPIRED": ReservationExpired,
    "AMOUNT_EXCEEDS_HOLD": AmountExceedsHold,
    "AMOUNT_EXCEEDS_REFUNDABLE": AmountExceedsRefundable,
    "RESERVATION_NOT_COMMITTED": ReservationNotCommitted,
    "STORAGE_UNAVAILABLE": Unavailable,
    "CONFLICT": Conflict,
    "WAITED_TOO_LONG": Conflict,
    RATE_LIMIT_REASON: RateLimited,
}

_BY_CODE: dict[grpc.StatusCode, type[LedgerError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.ABORTED: Conflict,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    # RESOURCE_EXHAUSTED is RateLimited by its reason only: gRPC also answers it for a
    # message too large, where waiting helps nothing (and an answer too large to send or
    # receive comes after the call was applied: see may_have_been_applied).
}

# Codes after which a call may have been applied: the connection dropped or the deadline
# passed on the way (no answer from the server's error boundary), or the server failed in
# a way that says nothing of its transaction.
_UNKNOWN_OUTCOME_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.CANCELLED,
    }
)


def may_have_been_applied(error: LedgerError) -> bool:
    """Whether the attempt that failed with ``error`` may have changed the ledger. A
    DEADLINE_EXCEEDED the server answered itself (reason DEADLINE_EXCEEDED) rolled back;
    one without that reason passed on the client's side. A RESOURCE_EXHAUSTED other than the
    rate limit is gRPC's message too large: a request refused before any handler ran, or an
    answer larger than the server's send limit or the client's receive limit, refused after
    the ledger committed it (and its replay under the same key is as large)."""
    if error.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return error.reason != SERVER_TIMEOUT_REASON
    if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return error.reason != RATE_LIMIT_REASON
    return error.code in _UNKNOWN_OUTCOME_CODES


def given_up(error: LedgerError, request: object, applied_maybe: bool) -> LedgerError:
    """``error`` as a client raises it once it stops trying: with the key the call's request
    sent (none for a read) and whether one of its attempts may have applied it."""
    error.idempotency_key = getattr(request, "idempotency_key", "")
    error.outcome_unknown = applied_maybe
    return error


def client_closed(message: str) -> LedgerError:
    """The error of a call that the client's own ``close()`` ended: CANCELLED, no reason. The
    client sets its key and whether an attempt was sent (then its outcome is unknown)."""
    return LedgerError(message, code=grpc.StatusCode.CANCELLED)


# --- google.rpc.Status / ErrorInfo without googleapis-common-protos ------------------------


class _AnyView(Protocol):
    type_url: str
    value: bytes


class _StatusView(Protocol):
    code: int
    message: str

    @property
    def details(self) -> Sequence[_AnyView]: ...


class _ErrorInfoView(Protocol):
    reason: str
    domain: str

    @property
    def metadata(self) -> Mapping[str, str]: ...


def _message_classes() -> tuple[type[Message], type[Message]]:
    """google.rpc.Status (with its google.protobuf.Any) and google.rpc.ErrorInfo, declared
    field for field under the private package ``ledger_client._rpc``."""
    field = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(
        name="ledger_client/_rpc.proto", package="ledger_client._rpc", syntax="proto3"
    )

    def add(message: descriptor_pb2.DescriptorProto, name: str, number: int, kind: int) -> None:
        message.field.add(name=name, number=number, type=kind, label=field.LABEL_OPTIONAL)

    any_ = file.message_type.add(name="Any")
    add(any_, "type_url", 1, field.TYPE_STRING)
    add(any_, "value", 2, field.TYPE_BYTES)

    status = file.message_type.add(name="Status")
    add(status, "code", 1, field.TYPE_INT32)
    add(status, "message", 2, field.TYPE_STRING)
    status.field.add(
        name="details",
        number=3,
        type=field.TYPE_MESSAGE,
        label=field.LABEL_REPEATED,
        type_name=".ledger_client._rpc.Any",
    )

    info = file.message_type.add(name="ErrorInfo")
    add(info, "reason", 1, field.TYPE_STRING)
    add(info, "domain", 2, field.TYPE_STRING)
    entry = info.nested_type.add(name="MetadataEntry")
    entry.options.map_entry = True
    add(entry, "key", 1, field.TYPE_STRING)
    add(entry, "value", 2, field.TYPE_STRING)
    info.field.add(
        name="metadata",
        number=3,
        type=field.TYPE_MESSAGE,
        label=field.LABEL_REPEATED,
        type_name=".ledger_client._rpc.ErrorInfo.MetadataEntry",
    )

    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(file.SerializeToString())
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName("ledger_client._rpc.Status")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("ledger_client._rpc.ErrorInfo")),
    )


_Status, _ErrorInfo = _message_classes()


def _error_info(details_bin: bytes) -> tuple[str, _ErrorInfoView | None]:
    """(status message, the credit-ledger ErrorInfo or None) of a serialized google.rpc.Status."""
    status = _Status()
    try:
        status.ParseFromString(details_bin)
    except DecodeError:
        return "", None
    view = cast(_StatusView, status)
    for detail in view.details:
        if detail.type_url != ERROR_INFO_TYPE_URL:
            continue
        info = _ErrorInfo()
        try:
            info.ParseFromString(detail.value)
        except DecodeError:
            continue
        info_view = cast(_ErrorInfoView, info)
        if info_view.domain == ERROR_DOMAIN:
            return view.message, info_view
    return view.message, None


def _status_details(trailers: Iterable[tuple[str, str | bytes]] | None) -> bytes | None:
    for key, value in trailers or ():
        if key == STATUS_DETAILS_TRAILER and isinstance(value, bytes):
            return value
    return None


def error_for(
    code: grpc.StatusCode,
    message: str,
    reason: str = "",
    metadata: Mapping[str, str] | None = None,
) -> LedgerError:
    """The typed error for a status code and an ErrorInfo reason."""
    cls = _BY_REASON.get(reason) or _BY_CODE.get(code, LedgerError)
    return cls(message, code=code, reason=reason, metadata=metadata)


def from_rpc_error(error: grpc.RpcError) -> LedgerError:
    """Decodes a failed call (sync ``grpc.RpcError`` or ``grpc.aio.AioRpcError``)."""
    code = grpc.StatusCode.UNKNOWN
    message = str(error)
    trailers: Iterable[tuple[str, str | bytes]] | None = None
    if isinstance(error, grpc.aio.AioRpcError | grpc.Call):
        code, message = error.code(), error.details() or ""
        trailers = error.trailing_metadata()
    details_bin = _status_details(trailers)
    info = None
    if details_bin is not None:
        status_message, info = _error_info(details_bin)
        message = status_message or message
    if info is None:
        return error_for(code, message)
    return error_for(code, message, info.reason, dict(info.metadata))
