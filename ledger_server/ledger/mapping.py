"""Turns the JSON the SQL functions return (and store for replays) into protos.
Fresh responses and replays go through the same code, so a replay is byte-for-byte
the original response."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from ledger.v1 import admin_service_pb2 as admin_pb2
from ledger.v1 import billing_service_pb2 as billing_pb2
from ledger.v1 import ledger_service_pb2 as pb
from ledger.v1 import types_pb2

Json = dict[str, Any]

_SOURCE_PREFIX = "CREDIT_SOURCE_"


def source_to_db(source: types_pb2.CreditSource.ValueType) -> str:
    return types_pb2.CreditSource.Name(source).removeprefix(_SOURCE_PREFIX).lower()


# A dict rather than CreditSource.Value(): the enum wrapper's look-up runs in Python, once
# per lot and posting of every answer.
_SOURCE_FROM_DB = {
    name.removeprefix(_SOURCE_PREFIX).lower(): value
    for name, value in types_pb2.CreditSource.items()
    if value != types_pb2.CREDIT_SOURCE_UNSPECIFIED
}


def source_from_db(source: str | None) -> types_pb2.CreditSource.ValueType:
    if not source:
        return types_pb2.CREDIT_SOURCE_UNSPECIFIED
    return _SOURCE_FROM_DB[source]


def balance_kind_to_db(kind: types_pb2.BalanceKind.ValueType) -> str:
    return "reward" if kind == types_pb2.BALANCE_KIND_REWARD else "main"


def _balance_kind(kind: str) -> types_pb2.BalanceKind.ValueType:
    return types_pb2.BALANCE_KIND_REWARD if kind == "reward" else types_pb2.BALANCE_KIND_MAIN


def set_timestamp(target: Timestamp, micros: int | None) -> None:
    # What Timestamp.FromMicroseconds does (floor division, so times before 1970 keep
    # nanos in [0, 1e9)), without its pure-Python method: 6% of filling a page of 100.
    if micros is not None:
        seconds, rest = divmod(int(micros), 1_000_000)
        target.seconds = seconds
        target.nanos = rest * 1000


_RESERVATION_STATUS = {
    "pending": pb.RESERVATION_STATUS_PENDING,
    "committed": pb.RESERVATION_STATUS_COMMITTED,
    "released": pb.RESERVATION_STATUS_RELEASED,
    "expired": pb.RESERVATION_STATUS_EXPIRED,
    "failed": pb.RESERVATION_STATUS_FAILED,
}


_BALANCE_FIELDS = (
    "account_id",
    "balance_micros",
    "available_micros",
    "held_micros",
    "reward_balance_micros",
)


# Present only for an account with an overdraft limit (ledger_balance_json), and absent
# from answers stored before overdrafts existed, which replays return as they were.
_OVERDRAFT_FIELDS = ("overdraft_limit_micros", "debt_micros")


def _balance_fields(data: Json) -> Json:
    fields = {field: data[field] for field in _BALANCE_FIELDS}
    for field in _OVERDRAFT_FIELDS:
        if field in data:
            fields[field] = data[field]
    return fields


def account_balance(data: Json) -> types_pb2.AccountBalance:
    out = types_pb2.AccountBalance(**_balance_fields(data))
    set_timestamp(out.as_of, data["as_of"])
    return out


def balance_response(data: Json) -> pb.BalanceResponse:
    """The same fields as AccountBalance, flat in the Balance response (the contract
    names available_micros there)."""
    out = pb.BalanceResponse(**_balance_fields(data))
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
        model=data["model"],
        usage=priced_usage(data["usage"]) if data.get("usage") else None,
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
    "overdraft": pb.TRANSACTION_KIND_OVERDRAFT,
}
TRANSACTION_KIND_TO_DB = {v: k for k, v in _TRANSACTION_KIND.items()}


_TRANSACTION_STATUS = {
    "succeeded": pb.TRANSACTION_STATUS_SUCCEEDED,
    "pending": pb.TRANSACTION_STATUS_PENDING,
    "released": pb.TRANSACTION_STATUS_RELEASED,
    "refunded": pb.TRANSACTION_STATUS_REFUNDED,
    "partially_refunded": pb.TRANSACTION_STATUS_PARTIALLY_REFUNDED,
    "committed": pb.TRANSACTION_STATUS_COMMITTED,
    "failed": pb.TRANSACTION_STATUS_FAILED,
}
TRANSACTION_STATUS_TO_DB = {v: k for k, v in _TRANSACTION_STATUS.items()}


def fill_transaction(out: pb.Transaction, row: Sequence[Any]) -> None:
    """Writes one row of the list_transactions query (sql/queries/ledger.sql), in its column
    order, into ``out`` (a page's ``transactions.add()``); the postings come as parallel
    arrays (NULL when the entry has none).

    Filled in place, field by field: a message built apart is copied again when it joins
    its page, and a page is 100 of them (half the mapping's time, BENCHMARKS.md item 24)."""
    (
        transaction_id, account_id, kind, amount_micros, reservation_id, feature, model, usage,
        comment, actor, external_ref, created_micros, status,
        posting_accounts, posting_lots, posting_sources, posting_amounts, posting_memos,
    ) = row  # fmt: skip
    out.transaction_id = str(transaction_id)
    out.account_id = account_id
    out.kind = _TRANSACTION_KIND[kind]
    out.status = _TRANSACTION_STATUS[status]
    out.amount_micros = amount_micros
    out.reservation_id = reservation_id or ""
    out.feature = feature or ""
    out.comment = comment or ""
    out.actor = actor or ""
    out.external_ref = external_ref or ""
    out.model = model or ""
    if usage:
        out.usage.CopyFrom(priced_usage(usage))
    add_posting = out.postings.add
    for ledger_account, lot_id, source, amount, memo in zip(
        posting_accounts or (),
        posting_lots or (),
        posting_sources or (),
        posting_amounts or (),
        posting_memos or (),
        strict=True,
    ):
        posting = add_posting(ledger_account=ledger_account, amount_micros=amount)
        if lot_id is not None:
            posting.lot_id = str(lot_id)
        if source:
            posting.source = _SOURCE_FROM_DB[source]
        if memo:
            posting.memo = memo
    set_timestamp(out.create_time, created_micros)


def optional_lot(data: Json | None) -> types_pb2.Lot | None:
    return lot(data) if data else None


def subscription(data: Json) -> types_pb2.Subscription:
    out = types_pb2.Subscription(plan_id=data["plan_id"], external_ref=data["external_ref"])
    set_timestamp(out.current_period_start, data["current_period_start"])
    set_timestamp(out.current_period_end, data["current_period_end"])
    return out


def optional_subscription(data: Json | None) -> types_pb2.Subscription | None:
    """None where the account has no running subscription (a period applied after it and
    its renewal grace ended)."""
    return subscription(data) if data else None


def account(data: Json) -> types_pb2.Account:
    out = types_pb2.Account(
        account_id=data["account_id"],
        referral_code=data["referral_code"],
        referred_by_account_id=data["referred_by_account_id"],
    )
    set_timestamp(out.create_time, data["create_time"])
    if data.get("subscription"):
        out.subscription.CopyFrom(subscription(data["subscription"]))
    return out


_PERIOD_UNIT = {
    "day": billing_pb2.BILLING_PERIOD_UNIT_DAY,
    "month": billing_pb2.BILLING_PERIOD_UNIT_MONTH,
    "year": billing_pb2.BILLING_PERIOD_UNIT_YEAR,
}
PERIOD_UNIT_TO_DB = {v: k for k, v in _PERIOD_UNIT.items()}


def credit_pack(row: tuple[Any, ...]) -> billing_pb2.CreditPack:
    pack_id, translation_key, credits, price, currency, price_id, active, created, updated = row
    out = billing_pb2.CreditPack(
        pack_id=pack_id,
        translation_key=translation_key,
        credits_micros=credits,
        price_minor=price,
        currency=currency,
        provider_price_id=price_id,
        active=active,
    )
    out.etag = _etag(out)
    set_timestamp(out.create_time, created)
    set_timestamp(out.update_time, updated)
    return out


def subscription_plan(row: tuple[Any, ...]) -> billing_pb2.SubscriptionPlan:
    plan_id, key, credits, unit, count, rank, price, currency, price_id, active = row
    out = billing_pb2.SubscriptionPlan(
        plan_id=plan_id,
        translation_key=key,
        credits_micros=credits,
        period_unit=_PERIOD_UNIT[unit],
        period_count=count,
        rank=rank,
        price_minor=price,
        currency=currency,
        provider_price_id=price_id,
        active=active,
    )
    out.etag = _etag(out)
    return out


def _etag(record: Message) -> str:
    """A digest of the fields an update may change (the record before its times and etag
    are set): an update's precondition holds while they are as read. Not the update time:
    plans have none, and a test clock may not move between two updates."""
    return hashlib.sha256(record.SerializeToString(deterministic=True)).hexdigest()[:32]


def redemption_batch(data: Json) -> admin_pb2.RedemptionBatch:
    out = admin_pb2.RedemptionBatch(
        batch_id=data["batch_id"],
        amount_micros=data["amount_micros"],
        code_count=data["code_count"],
        max_redemptions_per_code=data["max_redemptions_per_code"],
        disabled=data["disabled"],
        note=data["note"],
        created_by=data["created_by"],
        redemption_count=data["redemption_count"],
        # Absent from a stored response made before these fields existed (a replay).
        disabled_by=data.get("disabled_by", ""),
        disabled_reason=data.get("disabled_reason", ""),
        account_prefix=data.get("account_prefix", ""),
    )
    set_timestamp(out.code_expire_time, data["code_expire_time"])
    set_timestamp(out.create_time, data["create_time"])
    set_timestamp(out.disable_time, data.get("disable_time"))
    if data["credit_lifetime_seconds"] is not None:
        out.credit_lifetime.FromSeconds(int(data["credit_lifetime_seconds"]))
    return out


def format_code(code: str) -> str:
    return "-".join(code[i : i + 4] for i in range(0, len(code), 4))


def to_value(data: Json) -> struct_pb2.Value:
    out = struct_pb2.Value()
    json_format.ParseDict(data, out)
    return out


def from_value(value: struct_pb2.Value) -> Json:
    return json_format.MessageToDict(value)


_SETTING_SOURCE = {
    "environment": admin_pb2.SETTING_SOURCE_ENVIRONMENT,
    "admin": admin_pb2.SETTING_SOURCE_ADMIN,
}


def setting(data: Json, default: Json, env_var: str, description: str) -> admin_pb2.Setting:
    out = admin_pb2.Setting(
        key=data["key"],
        value=to_value(data["value"]),
        default_value=to_value(default),
        source=_SETTING_SOURCE[data["source"]],
        env_var=env_var,
        description=description,
        updated_by=data["updated_by"],
    )
    set_timestamp(out.update_time, data["updated_at"])
    return out


def setting_change(row: tuple[Any, ...]) -> admin_pb2.SettingChange:
    change_id, key, old, new, source, actor, reason, changed = row
    out = admin_pb2.SettingChange(
        change_id=str(change_id),
        key=key,
        new_value=to_value(new),
        source=_SETTING_SOURCE[source],
        actor=actor,
        reason=reason,
    )
    if old is not None:
        out.old_value.CopyFrom(to_value(old))
    set_timestamp(out.change_time, changed)
    return out


def unit_from_db(unit: str) -> types_pb2.UsageUnit.ValueType:
    return types_pb2.UsageUnit.Value("USAGE_UNIT_" + unit.upper())


def priced_usage(data: Json) -> types_pb2.PricedUsage:
    return types_pb2.PricedUsage(
        feature=data["feature"],
        model=data["model"],
        cost_micros=data["cost_micros"],
        lines=[
            types_pb2.PriceLine(
                unit=unit_from_db(line["unit"]),
                quantity=line["quantity"],
                unit_price_micros=line["unit_price_micros"],
                unit_size=line["unit_size"],
                multiplier_ppm=line["multiplier_ppm"],
                price_version=line["price_version"],
                multiplier_version=line["multiplier_version"] or "",
            )
            for line in data["lines"]
        ],
    )


def price(data: Json) -> admin_pb2.Price:
    out = admin_pb2.Price(
        feature=data["feature"],
        model=data["model"],
        unit=unit_from_db(data["unit"]),
        unit_size=data["unit_size"],
        unit_price_micros=data["unit_price_micros"],
        price_version=data["price_version"],
        updated_by=data["updated_by"],
    )
    set_timestamp(out.update_time, data["update_time"])
    return out


def model_multiplier(data: Json) -> admin_pb2.ModelMultiplier:
    out = admin_pb2.ModelMultiplier(
        model=data["model"],
        multiplier_ppm=data["multiplier_ppm"],
        multiplier_version=data["multiplier_version"],
        updated_by=data["updated_by"],
    )
    set_timestamp(out.update_time, data["update_time"])
    return out


_ALERT_EMAIL_STATUS = {
    "pending": admin_pb2.ALERT_EMAIL_STATUS_PENDING,
    "sent": admin_pb2.ALERT_EMAIL_STATUS_SENT,
    "failed": admin_pb2.ALERT_EMAIL_STATUS_FAILED,
    "skipped": admin_pb2.ALERT_EMAIL_STATUS_SKIPPED,
}


def low_balance_alert(data: Json) -> admin_pb2.LowBalanceAlert:
    out = admin_pb2.LowBalanceAlert(
        alert_id=data["alert_id"],
        account_id=data["account_id"],
        threshold_micros=data["threshold_micros"],
        balance_micros=data["balance_micros"],
        transaction_id=data["transaction_id"],
        email_to=data["email_to"],
        email_status=_ALERT_EMAIL_STATUS[data["email_status"]],
        email_error=data["email_error"],
    )
    set_timestamp(out.create_time, data["create_time"])
    set_timestamp(out.email_sent_time, data["email_sent_time"])
    return out
