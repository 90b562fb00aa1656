"""Typed Python client for the credit-ledger gRPC service.

``LedgerClient`` (blocking) and ``AsyncLedgerClient`` (asyncio) wrap
``ledger.v1.LedgerService`` with plain Python arguments, one idempotency key per logical
call, retries with backoff on UNAVAILABLE/ABORTED/CANCELLED, a deadline per call, typed errors
(``ledger_client.errors``) and a reservation context manager. The generated messages and
stubs live in the ``ledger.v1`` package next to this one.
"""

from ledger_client._common import (
    MICROS_PER_CREDIT,
    TLS,
    BalanceKindLike,
    ClientConfig,
    Credentials,
    QuantitiesLike,
    RetryPolicy,
    SourceLike,
    TransactionKindLike,
    TransactionStatusLike,
    UsageLike,
    UsageUnitLike,
    new_idempotency_key,
)
from ledger_client.aio import AsyncHold, AsyncLedgerClient
from ledger_client.client import Hold, LedgerClient
from ledger_client.errors import (
    AccountNotFound,
    AlreadyExists,
    AmountExceedsHold,
    AmountExceedsRefundable,
    Conflict,
    DeadlineExceeded,
    FailedPrecondition,
    IdempotencyKeyReused,
    InsufficientCredits,
    InvalidArgument,
    LedgerError,
    NotFound,
    OutOfRange,
    PermissionDenied,
    RateLimited,
    ReservationExpired,
    ReservationNotCommitted,
    ReservationNotFound,
    ReservationNotPending,
    TooManyLots,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "MICROS_PER_CREDIT",
    "TLS",
    "AccountNotFound",
    "AlreadyExists",
    "AmountExceedsHold",
    "AmountExceedsRefundable",
    "AsyncHold",
    "AsyncLedgerClient",
    "BalanceKindLike",
    "ClientConfig",
    "Conflict",
    "Credentials",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Hold",
    "IdempotencyKeyReused",
    "InsufficientCredits",
    "InvalidArgument",
    "LedgerClient",
    "LedgerError",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "QuantitiesLike",
    "RateLimited",
    "ReservationExpired",
    "ReservationNotCommitted",
    "ReservationNotFound",
    "ReservationNotPending",
    "RetryPolicy",
    "SourceLike",
    "TooManyLots",
    "TransactionKindLike",
    "TransactionStatusLike",
    "Unauthenticated",
    "Unavailable",
    "UsageLike",
    "UsageUnitLike",
    "new_idempotency_key",
]
