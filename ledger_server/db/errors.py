"""The one place psycopg errors become domain errors: by SQLSTATE or by
constraint name, never by message text. The ledger's SQL functions raise
SQLSTATE class LE with a JSON DETAIL holding the error's metadata."""

from __future__ import annotations

import json
from dataclasses import dataclass

import grpc
import psycopg
from psycopg import errors as pg

from ledger_server.errors import LedgerError, invalid_field, unavailable

_LEDGER_SQLSTATES: dict[str, tuple[grpc.StatusCode, str]] = {
    "LE001": (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_CREDITS"),
    "LE002": (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED"),
    "LE003": (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND"),
    "LE004": (grpc.StatusCode.NOT_FOUND, "RESERVATION_NOT_FOUND"),
    "LE005": (grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_NOT_PENDING"),
    "LE006": (grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_EXPIRED"),
    "LE007": (grpc.StatusCode.FAILED_PRECONDITION, "AMOUNT_EXCEEDS_HOLD"),
    "LE008": (grpc.StatusCode.FAILED_PRECONDITION, "AMOUNT_EXCEEDS_REFUNDABLE"),
    "LE009": (grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_NOT_COMMITTED"),
    "LE010": (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD"),
    "LE011": (grpc.StatusCode.FAILED_PRECONDITION, "DAILY_REWARD_ALREADY_CLAIMED"),
    "LE012": (grpc.StatusCode.FAILED_PRECONDITION, "SOURCE_DISABLED"),
    "LE013": (grpc.StatusCode.NOT_FOUND, "REFERRAL_CODE_NOT_FOUND"),
    "LE014": (grpc.StatusCode.ALREADY_EXISTS, "ACCOUNT_EXISTS"),
    "LE015": (grpc.StatusCode.NOT_FOUND, "REDEMPTION_CODE_NOT_FOUND"),
    "LE016": (grpc.StatusCode.FAILED_PRECONDITION, "REDEMPTION_CODE_EXPIRED"),
    "LE017": (grpc.StatusCode.FAILED_PRECONDITION, "REDEMPTION_CODE_DISABLED"),
    "LE018": (grpc.StatusCode.FAILED_PRECONDITION, "REDEMPTION_CODE_EXHAUSTED"),
    "LE019": (grpc.StatusCode.ALREADY_EXISTS, "REDEMPTION_CODE_ALREADY_REDEEMED"),
    "LE020": (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_REWARD_BALANCE"),
    "LE021": (grpc.StatusCode.NOT_FOUND, "PACK_NOT_FOUND"),
    "LE022": (grpc.StatusCode.FAILED_PRECONDITION, "PACK_INACTIVE"),
    "LE023": (grpc.StatusCode.FAILED_PRECONDITION, "PURCHASE_REQUIRES_SUBSCRIPTION"),
    "LE024": (grpc.StatusCode.NOT_FOUND, "PLAN_NOT_FOUND"),
    "LE025": (grpc.StatusCode.ALREADY_EXISTS, "ALREADY_FULFILLED"),
    "LE026": (grpc.StatusCode.ALREADY_EXISTS, "ALREADY_EXISTS"),
    "LE027": (grpc.StatusCode.NOT_FOUND, "SETTING_NOT_FOUND"),
    "LE028": (grpc.StatusCode.NOT_FOUND, "REDEMPTION_BATCH_NOT_FOUND"),
    "LE029": (grpc.StatusCode.NOT_FOUND, "FEATURE_NOT_FOUND"),
    "LE030": (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"),
    "LE031": (grpc.StatusCode.NOT_FOUND, "PRICE_NOT_FOUND"),
    # Payments (sql/functions/0004_payments.sql).
    "LE040": (grpc.StatusCode.NOT_FOUND, "PURCHASE_NOT_FOUND"),
    "LE041": (grpc.StatusCode.FAILED_PRECONDITION, "PROVIDER_PRICE_MISSING"),
    "LE042": (grpc.StatusCode.FAILED_PRECONDITION, "PLAN_INACTIVE"),
    "LE043": (grpc.StatusCode.FAILED_PRECONDITION, "OVERDRAFT_IN_USE"),
    "LE044": (grpc.StatusCode.FAILED_PRECONDITION, "ALREADY_SUBSCRIBED"),
    "LE045": (grpc.StatusCode.FAILED_PRECONDITION, "PLAN_IN_USE"),
    # A call drawing on more lots than one journal entry can number (0001_ledger.sql).
    "LE046": (grpc.StatusCode.FAILED_PRECONDITION, "TOO_MANY_LOTS"),
}

# Constraints a request can run into with input that passed validation.
_CONSTRAINT_FIELDS: dict[str, str] = {
    "accounts_account_id_length": "account_id",
    "idempotency_keys_key_length": "idempotency_key",
}

# Unique violations of a value another row holds, answered as the request's field
# (migration 0030: one active plan per provider price; a paid invoice names only its price).
_UNIQUE_FIELDS: dict[str, tuple[str, str]] = {
    "subscription_plans_one_active_per_price": (
        "plan.provider_price_id",
        "another active plan has this provider price: a paid invoice names only its price",
    ),
}

# Unique violations two racing requests can cause; a retry finds the winner's row.
_RETRYABLE_UNIQUE = {
    "accounts_referral_code_unique",
    "accounts_pkey",
    "purchases_one_per_external_ref",
    "checkout_sessions_pkey",
    "checkout_sessions_one_per_key",
    # A ledger call and a checkout taking one key at once: the checkout locks no account.
    "idempotency_keys_one_per_account",
}


def _metadata(detail: str | None) -> dict[str, str]:
    if not detail:
        return {}
    try:
        parsed = json.loads(detail)
    except ValueError:
        return {}
    if not isinstance(parsed, dict):
        return {}
    return {str(k): str(v) for k, v in parsed.items() if v is not None}


@dataclass(frozen=True)
class DatabaseFailure:
    """What PostgreSQL said about a failed statement, from a psycopg exception or from
    a batch function that caught it per call (sql/functions/0007_coalesced.sql)."""

    sqlstate: str
    message: str = ""
    detail: str | None = None
    constraint: str | None = None


_INPUT_OUT_OF_RANGE = {pg.CheckViolation.sqlstate, pg.StringDataRightTruncation.sqlstate}
_RETRYABLE_STATES = {pg.SerializationFailure.sqlstate, pg.DeadlockDetected.sqlstate}
# statement_timeout / lock_timeout, set from the call's deadline (db/deadlines.py); the
# ledger's SQL takes no lock with NOWAIT, so LockNotAvailable is always the time-out.
_TIMED_OUT = {pg.QueryCanceled.sqlstate, pg.LockNotAvailable.sqlstate}


def translate(exc: psycopg.Error) -> LedgerError | None:
    """The domain error for a database error, or None when it is a bug (INTERNAL)."""
    failure = DatabaseFailure(
        exc.sqlstate or "",
        exc.diag.message_primary or "",
        exc.diag.message_detail,
        exc.diag.constraint_name,
    )
    translated = translate_failure(failure)
    if translated is None and isinstance(exc, psycopg.OperationalError):
        return unavailable("the database is unavailable; retry with the same idempotency key")
    return translated


def translate_failure(failure: DatabaseFailure) -> LedgerError | None:
    """By SQLSTATE and constraint name only, never by message text."""
    sqlstate = failure.sqlstate
    if sqlstate in _LEDGER_SQLSTATES:
        code, reason = _LEDGER_SQLSTATES[sqlstate]
        message = failure.message or reason.lower().replace("_", " ")
        metadata = _metadata(failure.detail)
        if reason == "INVALID_FIELD" and "field" in metadata:
            return invalid_field(metadata["field"], metadata.get("violation", message))
        return LedgerError(code, reason, message, metadata)
    if sqlstate in _INPUT_OUT_OF_RANGE:
        field = _CONSTRAINT_FIELDS.get(failure.constraint or "")
        return invalid_field(field, "is out of range") if field is not None else None
    if sqlstate == pg.UniqueViolation.sqlstate and failure.constraint in _UNIQUE_FIELDS:
        return invalid_field(*_UNIQUE_FIELDS[failure.constraint])
    if sqlstate == pg.NumericValueOutOfRange.sqlstate:
        return LedgerError(
            grpc.StatusCode.FAILED_PRECONDITION,
            "BALANCE_LIMIT",
            "the amount would take a balance beyond what the ledger can hold",
        )
    if sqlstate in _RETRYABLE_STATES or (
        sqlstate == pg.UniqueViolation.sqlstate and failure.constraint in _RETRYABLE_UNIQUE
    ):
        return LedgerError(
            grpc.StatusCode.ABORTED,
            "CONFLICT",
            "the operation conflicted with a concurrent one; retry with the same idempotency key",
        )
    if sqlstate in _TIMED_OUT:
        return LedgerError(
            grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", "the database took too long"
        )
    if sqlstate.startswith("08"):  # connection exceptions
        return unavailable("the database is unavailable; retry with the same idempotency key")
    return None
