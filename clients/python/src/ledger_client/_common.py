"""What the sync and the asyncio clients share: configuration, channel credentials,
the retry policy, argument conversion and request building (one idempotency key per
logical call, built into the request once so every retry sends the same one)."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Protocol, TypeAlias

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from ledger.v1 import billing_service_pb2 as billing_pb
from ledger.v1 import ledger_service_pb2 as pb
from ledger.v1 import report_service_pb2 as report_pb
from ledger.v1 import types_pb2
from ledger_client.errors import SERVER_TIMEOUT_REASON, LedgerError

__all__ = [
    "MICROS_PER_CREDIT",
    "TLS",
    "BalanceKindLike",
    "ClientConfig",
    "Credentials",
    "QuantitiesLike",
    "RetryPolicy",
    "SourceLike",
    "TransactionKindLike",
    "TransactionStatusLike",
    "UsageLike",
    "UsageUnitLike",
    "new_idempotency_key",
]

MICROS_PER_CREDIT = 1_000_000
USER_AGENT = "credit-ledger-client/0.1.0"

SourceLike: TypeAlias = types_pb2.CreditSource.ValueType | str
"""A credit source: ``types_pb2.CREDIT_SOURCE_PURCHASE`` or ``"purchase"``."""
BalanceKindLike: TypeAlias = types_pb2.BalanceKind.ValueType | str
"""A balance: ``types_pb2.BALANCE_KIND_REWARD`` or ``"reward"``."""
TransactionKindLike: TypeAlias = pb.TransactionKind.ValueType | str
"""A journal entry kind: ``ledger_service_pb2.TRANSACTION_KIND_CHARGE`` or ``"charge"``."""
TransactionStatusLike: TypeAlias = pb.TransactionStatus.ValueType | str
"""A journal entry status: ``ledger_service_pb2.TRANSACTION_STATUS_PENDING`` or
``"pending"``."""
UsageUnitLike: TypeAlias = types_pb2.UsageUnit.ValueType | str
"""A unit of usage: ``types_pb2.USAGE_UNIT_OUTPUT_TOKENS`` or ``"output_tokens"``."""


class QuantitiesLike(Protocol):
    """Quantities of usage by unit, a mapping: ``{"input_tokens": 1200, "output_tokens": 300}``,
    its keys unit names or ``types_pb2.UsageUnit`` values (or both).

    A protocol on ``items()`` rather than ``Mapping[UsageUnitLike, int]``: a Mapping is
    invariant in its key, so mypy refused a ``dict[str, int]`` variable; nor a union of
    Mappings, under which mypy refuses a literal that mixes names and values."""

    def items(self) -> Iterable[tuple[UsageUnitLike, int]]: ...


UsageLike: TypeAlias = QuantitiesLike | types_pb2.Usage
"""A usage: quantities by unit, or a ``types_pb2.Usage`` (to name a feature and model too)."""


@dataclass(frozen=True)
class TLS:
    """TLS settings. All ``None`` means TLS with the system's root certificates; a client
    certificate and key together turn on mutual TLS. PEM bytes."""

    root_certificates: bytes | None = None
    client_certificate: bytes | None = None
    client_private_key: bytes | None = None

    def __post_init__(self) -> None:
        if (self.client_certificate is None) != (self.client_private_key is None):
            raise ValueError("mutual TLS needs both client_certificate and client_private_key")

    def __repr__(self) -> str:  # never print the private key (nor certificates in full)
        def size(pem: bytes | None) -> str:
            return "None" if pem is None else f"<{len(pem)} bytes>"

        key = "None" if self.client_private_key is None else "'***'"
        return (
            f"TLS(root_certificates={size(self.root_certificates)}, "
            f"client_certificate={size(self.client_certificate)}, client_private_key={key})"
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.client_private_key,
            certificate_chain=self.client_certificate,
        )


@dataclass(frozen=True)
class Credentials:
    """How the client proves who it is. ``token`` is sent on every call as
    ``authorization: Bearer <token>``; ``tls`` None means a plaintext channel (local
    development, or a sidecar that terminates TLS)."""

    token: str | None = None
    tls: TLS | None = None

    def __repr__(self) -> str:  # never print the token
        token = "None" if self.token is None else "'***'"
        return f"Credentials(token={token}, tls={self.tls!r})"

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        if self.token is None:
            return ()
        return (("authorization", f"Bearer {self.token}"),)


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of one logical call: up to ``max_attempts`` attempts in all, after a failure
    whose code is in ``retryable_codes``, sleeping a random time between 0 and
    ``min(max_backoff, initial_backoff * multiplier ** (retry - 1))`` seconds (exponential
    backoff with full jitter). Every attempt sends the same idempotency key, so a retry of a
    call the server did apply returns the original response instead of applying it twice.

    UNAVAILABLE is an outage or a dropped connection; ABORTED is the server's CONFLICT
    ("lost a race, retry with the same idempotency key"); CANCELLED that reaches the client
    is a call the other side cancelled (grpc cancels the calls arriving as a server shuts
    down; the client's own cancellation raises instead, and a call that the client's
    ``close()`` ended is never retried: it raises CANCELLED with its key, outcome unknown).
    With ``retry_server_timeouts``, a
    DEADLINE_EXCEEDED that the server itself answered (ErrorInfo reason DEADLINE_EXCEEDED:
    its database time-out cancelled the statement and rolled the transaction back, nothing
    was changed) is retried too while the call's deadline leaves time; one that passed on the
    client's side carries no ErrorInfo, its outcome is unknown, and it is never retried."""

    max_attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 3.0
    multiplier: float = 2.0
    retryable_codes: frozenset[grpc.StatusCode] = frozenset(
        {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED}
    )
    retry_server_timeouts: bool = True

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be non-negative and multiplier at least 1")

    def retries(self, error: LedgerError) -> bool:
        """Whether a call that failed with ``error`` may be sent again (with the same key)."""
        if error.code in self.retryable_codes:
            return True
        return (
            self.retry_server_timeouts
            and error.code == grpc.StatusCode.DEADLINE_EXCEEDED
            and error.reason == SERVER_TIMEOUT_REASON
        )

    def backoff(self, attempt: int) -> float:
        """Seconds to sleep after failed attempt number ``attempt`` (1-based)."""
        try:
            grown = self.initial_backoff * self.multiplier ** (attempt - 1)
        except OverflowError:
            # Past a float's range (2.0 ** 1024, some 1025 attempts at the default multiplier)
            # the backoff reached its cap long ago, unless it starts at zero. The error must not
            # escape: it is no LedgerError, and the caller would lose the call's key.
            grown = self.max_backoff if self.initial_backoff else 0.0
        return random.uniform(0, min(self.max_backoff, grown))

    def delay_before_retry(
        self, error: LedgerError, attempt: int, remaining: float | None
    ) -> float | None:
        """Seconds to wait before the next attempt, or None to give up and raise ``error``:
        not retryable, attempts spent, or the next attempt would start past the deadline."""
        if not self.retries(error) or attempt >= self.max_attempts:
            return None
        delay = self.backoff(attempt)
        if remaining is not None and delay >= remaining:
            return None
        return delay


@dataclass(frozen=True)
class ClientConfig:
    """Everything a client needs in one place. ``timeout`` is the default deadline of one
    logical call in seconds, retries included (None: no deadline)."""

    target: str
    credentials: Credentials = field(default_factory=Credentials)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout: float | None = 10.0
    options: tuple[tuple[str, str | int], ...] = ()

    def channel_options(self) -> list[tuple[str, str | int]]:
        return [("grpc.primary_user_agent", USER_AGENT), *self.options]


def new_idempotency_key() -> str:
    return str(uuid.uuid4())


# --- argument conversion ---------------------------------------------------------------------


def _enum_value(prefix: str, value: int | str, values: Mapping[str, int], what: str) -> int:
    if isinstance(value, bool):  # an int to Python, never meant as an enum value
        raise TypeError(f"a {what} is an enum value or its name, not {value!r}")
    if isinstance(value, int):
        # Zero is the _UNSPECIFIED value, which the server refuses.
        if value == 0 or value not in values.values():
            raise ValueError(f"unknown {what} {value!r}")
        return value
    name = value.strip().upper()
    if not name.startswith(prefix):
        name = prefix + name
    if name not in values or name.endswith("_UNSPECIFIED"):
        raise ValueError(f"unknown {what} {value!r}")
    return values[name]


def to_credit_source(value: SourceLike) -> types_pb2.CreditSource.ValueType:
    values = dict(types_pb2.CreditSource.items())
    return types_pb2.CreditSource.ValueType(
        _enum_value("CREDIT_SOURCE_", value, values, "credit source")
    )


def to_balance_kind(value: BalanceKindLike) -> types_pb2.BalanceKind.ValueType:
    values = dict(types_pb2.BalanceKind.items())
    return types_pb2.BalanceKind.ValueType(
        _enum_value("BALANCE_KIND_", value, values, "balance kind")
    )


def to_transaction_kind(value: TransactionKindLike) -> pb.TransactionKind.ValueType:
    values = dict(pb.TransactionKind.items())
    return pb.TransactionKind.ValueType(
        _enum_value("TRANSACTION_KIND_", value, values, "transaction kind")
    )


def to_transaction_status(value: TransactionStatusLike) -> pb.TransactionStatus.ValueType:
    values = dict(pb.TransactionStatus.items())
    return pb.TransactionStatus.ValueType(
        _enum_value("TRANSACTION_STATUS_", value, values, "transaction status")
    )


def to_usage_unit(value: UsageUnitLike) -> types_pb2.UsageUnit.ValueType:
    values = dict(types_pb2.UsageUnit.items())
    return types_pb2.UsageUnit.ValueType(_enum_value("USAGE_UNIT_", value, values, "usage unit"))


def to_usage(value: UsageLike, *, feature: str = "", model: str = "") -> types_pb2.Usage:
    """A ``Usage`` message: a copy of one (``feature`` and ``model`` fill in what it leaves
    empty, and may not contradict it), or built from quantities by unit with ``feature`` and
    ``model``. An unknown or repeated unit raises ValueError."""
    if isinstance(value, types_pb2.Usage):
        for name, given in (("feature", feature), ("model", model)):
            named = getattr(value, name)
            if given and named and given != named:
                raise ValueError(f"{name} {given!r} contradicts the usage's {named!r}")
        out = types_pb2.Usage()
        out.CopyFrom(value)
        out.feature = out.feature or feature
        out.model = out.model or model
        return out
    if not isinstance(value, Mapping):
        raise TypeError("usage must map units to quantities, e.g. {'output_tokens': 812}")
    quantities = [
        types_pb2.UsageQuantity(unit=to_usage_unit(unit), quantity=quantity)
        for unit, quantity in value.items()
    ]
    units = [quantity.unit for quantity in quantities]
    if len(set(units)) != len(units):
        raise ValueError(f"a unit appears twice in the usage {dict(value)!r}")
    return types_pb2.Usage(feature=feature, model=model, quantities=quantities)


def timestamp(value: datetime, name: str) -> timestamp_pb2.Timestamp:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware (for example datetime.now(UTC))")
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value)
    return out


def duration(value: timedelta) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromTimedelta(value)
    return out


# --- requests --------------------------------------------------------------------------------


def grant_request(
    account_id: str,
    amount_micros: int,
    source: SourceLike,
    *,
    expires_at: datetime | None,
    expires_in: timedelta | None,
    external_ref: str,
    comment: str,
    balance_kind: BalanceKindLike | None,
    idempotency_key: str | None,
) -> pb.GrantRequest:
    if expires_at is not None and expires_in is not None:
        raise ValueError("give expires_at or expires_in, not both")
    request = pb.GrantRequest(
        account_id=account_id,
        idempotency_key=key_or_new(idempotency_key),
        amount_micros=amount_micros,
        source=to_credit_source(source),
        external_ref=external_ref,
        comment=comment,
    )
    if expires_at is not None:
        request.expires_at.CopyFrom(timestamp(expires_at, "expires_at"))
    if expires_in is not None:
        request.expires_in.CopyFrom(duration(expires_in))
    if balance_kind is not None:
        request.balance_kind = to_balance_kind(balance_kind)
    return request


def _amount_or_usage(
    request: pb.ReserveRequest | pb.ConsumeRequest,
    amount_micros: int | None,
    usage: UsageLike | None,
    *,
    feature: str,
    model: str,
) -> None:
    """Sets exactly one of the request's amount and usage (a usage given as quantities by
    unit names ``feature`` and ``model``)."""
    if (amount_micros is None) == (usage is None):
        raise ValueError("give exactly one of amount_micros and usage")
    if amount_micros is not None:
        if model:
            raise ValueError("model applies to a usage; an amount names a feature only")
        request.amount_micros = amount_micros
        return
    assert usage is not None
    request.usage.CopyFrom(to_usage(usage, feature=feature, model=model))


def reserve_request(
    account_id: str,
    amount_micros: int | None,
    *,
    usage: UsageLike | None = None,
    ttl: timedelta | None,
    feature: str,
    model: str = "",
    comment: str,
    idempotency_key: str | None,
) -> pb.ReserveRequest:
    request = pb.ReserveRequest(
        account_id=account_id,
        idempotency_key=key_or_new(idempotency_key),
        feature=feature,
        comment=comment,
    )
    _amount_or_usage(request, amount_micros, usage, feature=feature, model=model)
    if ttl is not None:
        request.ttl.CopyFrom(duration(ttl))
    return request


def commit_request(
    account_id: str,
    reservation_id: str,
    amount_micros: int | None,
    *,
    usage: UsageLike | None,
    comment: str,
    idempotency_key: str | None,
) -> pb.CommitRequest:
    if (amount_micros is None) == (usage is None):
        raise ValueError("give exactly one of amount_micros and usage")
    request = pb.CommitRequest(
        account_id=account_id,
        reservation_id=reservation_id,
        idempotency_key=key_or_new(idempotency_key),
        comment=comment,
    )
    if amount_micros is not None:
        request.amount_micros = amount_micros  # zero too: "charge nothing" is a commit
    if usage is not None:
        # Without a feature and model the reservation's are used.
        request.usage.CopyFrom(to_usage(usage))
    return request


def release_request(
    account_id: str,
    reservation_id: str,
    *,
    reason: str,
    job_failed: bool,
    idempotency_key: str | None,
) -> pb.ReleaseRequest:
    return pb.ReleaseRequest(
        account_id=account_id,
        reservation_id=reservation_id,
        idempotency_key=key_or_new(idempotency_key),
        reason=reason,
        job_failed=job_failed,
    )


def refund_request(
    account_id: str,
    reservation_id: str,
    amount_micros: int | None,
    *,
    reason: str,
    idempotency_key: str | None,
) -> pb.RefundRequest:
    request = pb.RefundRequest(
        account_id=account_id,
        reservation_id=reservation_id,
        idempotency_key=key_or_new(idempotency_key),
        reason=reason,
    )
    if amount_micros is not None:
        request.amount_micros = amount_micros
    return request


def consume_request(
    account_id: str,
    amount_micros: int | None,
    *,
    usage: UsageLike | None = None,
    feature: str,
    model: str = "",
    comment: str,
    idempotency_key: str | None,
) -> pb.ConsumeRequest:
    request = pb.ConsumeRequest(
        account_id=account_id,
        idempotency_key=key_or_new(idempotency_key),
        feature=feature,
        comment=comment,
    )
    _amount_or_usage(request, amount_micros, usage, feature=feature, model=model)
    return request


@dataclass(frozen=True)
class JournalFilters:
    """The filters ListTransactions and ListJournal share; each empty or None means all."""

    kinds: tuple[TransactionKindLike, ...] = ()
    start_time: datetime | None = None
    end_time: datetime | None = None
    feature: str = ""
    model: str = ""
    statuses: tuple[TransactionStatusLike, ...] = ()

    @classmethod
    def of(
        cls,
        kinds: Iterable[TransactionKindLike],
        start_time: datetime | None,
        end_time: datetime | None,
        feature: str,
        model: str,
        statuses: Iterable[TransactionStatusLike],
    ) -> JournalFilters:
        return cls(tuple(kinds), start_time, end_time, feature, model, tuple(statuses))

    def fill(self, request: pb.ListTransactionsRequest | report_pb.ListJournalRequest) -> None:
        request.kinds.extend(to_transaction_kind(kind) for kind in self.kinds)
        request.statuses.extend(to_transaction_status(status) for status in self.statuses)
        request.feature = self.feature or ""  # None, as the message constructor took it
        request.model = self.model or ""
        if self.start_time is not None:
            request.start_time.CopyFrom(timestamp(self.start_time, "start_time"))
        if self.end_time is not None:
            request.end_time.CopyFrom(timestamp(self.end_time, "end_time"))


def list_transactions_request(
    account_id: str, *, page_size: int, page_token: str, filters: JournalFilters
) -> pb.ListTransactionsRequest:
    request = pb.ListTransactionsRequest(
        account_id=account_id, page_size=page_size, page_token=page_token
    )
    filters.fill(request)
    return request


def list_journal_request(
    account_id: str, *, page_size: int, page_token: str, filters: JournalFilters
) -> report_pb.ListJournalRequest:
    request = report_pb.ListJournalRequest(
        account_id=account_id, page_size=page_size, page_token=page_token
    )
    filters.fill(request)
    return request


def summary_request(
    account_id: str,
    *,
    day: date | str | None,
    month: date | str | None,
    start_time: datetime | None,
    end_time: datetime | None,
) -> report_pb.GetSummaryRequest:
    """Exactly one period: a day, a month (a date stands for its month), or a range."""
    ranged = start_time is not None or end_time is not None
    if sum((day is not None, month is not None, ranged)) != 1:
        raise ValueError("give exactly one period: day, month, or start_time and end_time")
    if isinstance(day, datetime) or isinstance(month, datetime):
        # Which day an instant falls on depends on the ledger's time zone (the server's).
        raise TypeError("day and month take a date or a string, not a datetime")
    request = report_pb.GetSummaryRequest(account_id=account_id)
    if day is not None:
        request.day = day.isoformat() if isinstance(day, date) else day
    elif month is not None:
        # isoformat: four-digit years (strftime's %Y gives "999" for the year 999).
        request.month = month.isoformat()[:7] if isinstance(month, date) else month
    else:
        if start_time is None or end_time is None:
            raise ValueError("a range needs both start_time and end_time")
        request.range.start_time.CopyFrom(timestamp(start_time, "start_time"))
        request.range.end_time.CopyFrom(timestamp(end_time, "end_time"))
    return request


def create_account_request(
    account_id: str, *, referral_code: str, idempotency_key: str | None
) -> pb.CreateAccountRequest:
    return pb.CreateAccountRequest(
        account_id=account_id,
        idempotency_key=key_or_new(idempotency_key),
        referral_code=referral_code,
    )


def claim_daily_reward_request(
    account_id: str, *, idempotency_key: str | None
) -> pb.ClaimDailyRewardRequest:
    return pb.ClaimDailyRewardRequest(
        account_id=account_id, idempotency_key=key_or_new(idempotency_key)
    )


def redeem_request(account_id: str, code: str, *, idempotency_key: str | None) -> pb.RedeemRequest:
    return pb.RedeemRequest(
        account_id=account_id,
        idempotency_key=key_or_new(idempotency_key),
        code=code,
    )


def transfer_reward_request(
    account_id: str, amount_micros: int | None, *, idempotency_key: str | None
) -> pb.TransferRewardRequest:
    request = pb.TransferRewardRequest(
        account_id=account_id, idempotency_key=key_or_new(idempotency_key)
    )
    if amount_micros is not None:
        request.amount_micros = amount_micros
    return request


def estimate_request(feature: str, quantities: QuantitiesLike, *, model: str) -> pb.EstimateRequest:
    return pb.EstimateRequest(usage=to_usage(quantities, feature=feature, model=model))


def key_or_new(idempotency_key: str | None) -> str:
    """The caller's key, or a new one when it passed None. An empty key is refused here:
    it is a caller's bug (an unset variable, say), and replacing it with a new key each
    call would make every retry a new request."""
    if idempotency_key is None:
        return new_idempotency_key()
    if not idempotency_key:
        raise ValueError("idempotency_key is empty: pass None to let the client make one")
    return idempotency_key


def checkout_request(
    account_id: str,
    *,
    pack_id: str,
    recharge: tuple[int, str] | None,
    plan_id: str,
    success_url: str,
    cancel_url: str,
    idempotency_key: str | None,
) -> billing_pb.CreateCheckoutSessionRequest:
    chosen = [name for name, given in (("pack_id", pack_id), ("plan_id", plan_id)) if given]
    if recharge is not None:
        chosen.append("recharge")
    if len(chosen) != 1:
        raise ValueError("give exactly one of pack_id, recharge=(amount_minor, currency), plan_id")
    request = billing_pb.CreateCheckoutSessionRequest(
        account_id=account_id,
        idempotency_key=key_or_new(idempotency_key),
        success_url=success_url,
        cancel_url=cancel_url,
    )
    if pack_id:
        request.pack_id = pack_id
    elif plan_id:
        request.plan_id = plan_id
    elif recharge is not None:
        request.recharge.amount_minor, request.recharge.currency = recharge
    return request
