"""Turns the JSON the SQL functions return (and store for replays) into protos.
Fresh responses and replays go through the same code, so a replay is byte-for-byte
the original response."""

from __future__ import annotations

from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from ledger.v1 import ledger_service_pb2 as pb
from ledger.v1 import types_pb2

Json = dict[str, Any]

_SOURCE_PREFIX = "CREDIT_SOURCE_"


def source_to_db(source: types_pb2.CreditSource.ValueType) -> str:
    return types_pb2.CreditSource.Name(source).removeprefix(_SOURCE_PREFIX).lower()


def source_from_db(source: str | None) -> types_pb2.CreditSource.ValueType:
    if not source:
        return types_pb2.CREDIT_SOURCE_UNSPECIFIED
    return types_pb2.CreditSource.Value(_SOURCE_PREFIX + source.upper())


def balance_kind_to_db(kind: types_pb2.BalanceKind.ValueType) -> str:
    return "reward" if kind == types_pb2.BALANCE_KIND_REWARD else "main"


def _balance_kind(kind: str) -> types_pb2.BalanceKind.ValueType:
    return types_pb2.BALANCE_KIND_REWARD if kind == "reward" else types_pb2.BALANCE_KIND_MAIN


def set_timestamp(target: Timestamp, micros: int | None) -> None:
    if micros is not None:
        target.FromMicroseconds(int(micros))


_RESERVATION_STATUS = {
    "pending": pb.RESERVATION_STATUS_PENDING,
    "committed": pb.RESERVATION_STATUS_COMMITTED,
    "released": pb.RESERVATION_STATUS_RELEASED,
    "expired": pb.RESERVATION_STATUS_EXPIRED,
}


def account_balance(data: Json) -> types_pb2.AccountBalance:
    out = types_pb2.AccountBalance(
        account_id=data["account_id"],
        balance_micros=data["balance_micros"],
        available_micros=data["available_micros"],
        held_micros=data["held_micros"],
        reward_balance_micros=data["reward_balance_micros"],
    )
    set_timestamp(out.as_of, data["as_of"])
    return out


def balance_response(data: Json) -> pb.BalanceResponse:
    out = pb.BalanceResponse(
        account_id=data["account_id"],
        balance_micros=data["balance_micros"],
        available_micros=data["available_micros"],
        held_micros=data["held_micros"],
        reward_balance_micros=data["reward_balance_micros"],
    )
    set_timestamp(out.as_of, data["as_of"])
    return out


def lot(data: Json) -> types_pb2.Lot:
    out = types_pb2.Lot(
        lot_id=data["lot_id"],
        account_id=data["account_id"],
        source=source_from_db(data["source"]),
        balance_kind=_balance_kind(data["balance_kind"]),
        amount_micros=data["amount_micros"],
        remaining_micros=data["remaining_micros"],
        held_micros=data["held_micros"],
        expired_micros=data["expired_micros"],
        priority=data["priority"],
        external_ref=data["external_ref"],
        parent_lot_id=data["parent_lot_id"],
    )
    set_timestamp(out.expires_at, data["expires_at"])
    set_timestamp(out.created_at, data["created_at"])
    return out


def reservation(data: Json) -> pb.Reservation:
    out = pb.Reservation(
        reservation_id=data["reservation_id"],
        account_id=data["account_id"],
        status=_RESERVATION_STATUS[data["status"]],
        held_micros=data["held_micros"],
        committed_micros=data["committed_micros"],
        refunded_micros=data["refunded_micros"],
        feature=data["feature"],
        comment=data["comment"],
        charge_transaction_id=data["charge_transaction_id"],
        lots=[
            pb.ReservationLot(
                lot_id=item["lot_id"],
                source=source_from_db(item["source"]),
                held_micros=item["held_micros"],
                committed_micros=item["committed_micros"],
                refunded_micros=item["refunded_micros"],
                refund_expired_micros=item["refund_expired_micros"],
            )
            for item in data["lots"]
        ],
    )
    set_timestamp(out.expires_at, data["expires_at"])
    set_timestamp(out.created_at, data["created_at"])
    set_timestamp(out.finalized_at, data["finalized_at"])
    return out


_TRANSACTION_KIND = {
    "grant": pb.TRANSACTION_KIND_GRANT,
    "hold": pb.TRANSACTION_KIND_HOLD,
    "charge": pb.TRANSACTION_KIND_CHARGE,
    "release": pb.TRANSACTION_KIND_RELEASE,
    "refund": pb.TRANSACTION_KIND_REFUND,
    "expiry": pb.TRANSACTION_KIND_EXPIRY,
    "adjustment": pb.TRANSACTION_KIND_ADJUSTMENT,
    "transfer": pb.TRANSACTION_KIND_TRANSFER,
}
TRANSACTION_KIND_TO_DB = {v: k for k, v in _TRANSACTION_KIND.items()}


def transaction_status(
    kind: str, reservation_status: str | None, committed: int | None, refunded: int | None
) -> pb.TransactionStatus.ValueType:
    if kind == "hold":
        if reservation_status == "pending":
            return pb.TRANSACTION_STATUS_PENDING
        if reservation_status == "committed":
            return pb.TRANSACTION_STATUS_COMMITTED
        return pb.TRANSACTION_STATUS_RELEASED
    if kind == "charge" and refunded:
        if refunded >= (committed or 0):
            return pb.TRANSACTION_STATUS_REFUNDED
        return pb.TRANSACTION_STATUS_PARTIALLY_REFUNDED
    return pb.TRANSACTION_STATUS_SUCCEEDED


def transaction(data: Json) -> pb.Transaction:
    out = pb.Transaction(
        transaction_id=str(data["transaction_id"]),
        account_id=data["account_id"],
        kind=_TRANSACTION_KIND[data["kind"]],
        status=transaction_status(
            data["kind"],
            data["reservation_status"],
            data["reservation_committed_micros"],
            data["reservation_refunded_micros"],
        ),
        amount_micros=data["amount_micros"],
        reservation_id=data["reservation_id"] or "",
        feature=data["feature"] or "",
        comment=data["comment"] or "",
        actor=data["actor"] or "",
        external_ref=data["external_ref"] or "",
        postings=[
            pb.Posting(
                ledger_account=p["ledger_account"],
                lot_id=str(p["lot_id"]) if p["lot_id"] is not None else "",
                source=source_from_db(p["source"]),
                amount_micros=p["amount_micros"],
                memo=p["memo"] or "",
            )
            for p in data["postings"]
        ],
    )
    set_timestamp(out.create_time, data["created_at"])
    return out
