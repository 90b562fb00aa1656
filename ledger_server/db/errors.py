"""The one place psycopg errors become domain errors: by SQLSTATE or by
constraint name, never by message text. The ledger's SQL functions raise
SQLSTATE class LE with a JSON DETAIL holding the error's metadata."""

from __future__ import annotations

import json

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
}

# Constraints a request can run into with input that passed validation.
_CONSTRAINT_FIELDS: dict[str, str] = {
    "accounts_account_id_length": "account_id",
    "idempotency_keys_key_length": "idempotency_key",
}

# Unique violations two racing requests can cause; a retry finds the winner's row.
_RETRYABLE_UNIQUE = {
    "accounts_referral_code_unique",
    "accounts_pkey",
    "purchases_one_per_external_ref",
}

_RETRYABLE = (pg.SerializationFailure, pg.DeadlockDetected, pg.LockNotAvailable)


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


def translate(exc: psycopg.Error) -> LedgerError | None:
    """The domain error for a database error, or None when it is a bug (INTERNAL)."""
    sqlstate = exc.sqlstate or ""
    if sqlstate in _LEDGER_SQLSTATES:
        code, reason = _LEDGER_SQLSTATES[sqlstate]
        message = exc.diag.message_primary or reason.lower().replace("_", " ")
        metadata = _metadata(exc.diag.message_detail)
        if reason == "INVALID_FIELD" and "field" in metadata:
            return invalid_field(metadata["field"], metadata.get("violation", message))
        return LedgerError(code, reason, message, metadata)
    if isinstance(exc, pg.CheckViolation | pg.StringDataRightTruncation):
        field = _CONSTRAINT_FIELDS.get(exc.diag.constraint_name or "")
        if field is not None:
            return invalid_field(field, "is out of range")
        return None
    if isinstance(exc, pg.NumericValueOutOfRange):
        return LedgerError(
            grpc.StatusCode.FAILED_PRECONDITION,
            "BALANCE_LIMIT",
            "the amount would take a balance beyond what the ledger can hold",
        )
    if isinstance(exc, _RETRYABLE) or (
        isinstance(exc, pg.UniqueViolation) and exc.diag.constraint_name in _RETRYABLE_UNIQUE
    ):
        return LedgerError(
            grpc.StatusCode.ABORTED,
            "CONFLICT",
            "the operation conflicted with a concurrent one; retry with the same idempotency key",
        )
    if isinstance(exc, pg.QueryCanceled):
        return LedgerError(
            grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", "the database took too long"
        )
    if isinstance(exc, psycopg.OperationalError):
        return unavailable("the database is unavailable; retry with the same idempotency key")
    return None
