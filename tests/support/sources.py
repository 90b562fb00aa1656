"""Helpers for the credit-source tests (issue 3): accounts, daily rewards, billing,
subscriptions, redemption codes, admin operations and run-time settings."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from google.protobuf import struct_pb2
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from ledger.v1 import admin_service_pb2 as admin_pb
from ledger.v1 import (
    admin_service_pb2_grpc,
    billing_service_pb2_grpc,
    ledger_service_pb2_grpc,
    types_pb2,
)
from ledger.v1 import billing_service_pb2 as billing_pb
from ledger.v1 import ledger_service_pb2 as pb
from support.ledger import CREDIT, new_account, new_key

DAY = timedelta(days=1)
ACTOR = "test-admin"
CODE_PATTERN = r"^[A-Z0-9]{4}-[A-Z0-9]{4}-[A-Z0-9]{4}-[A-Z0-9]{4}$"

# The built-in defaults of every run-time setting (DESIGN.md section 5, seeds 000-004).
DEFAULT_SETTINGS: dict[str, object] = {
    "signup.enabled": True,
    "signup.amount_micros": 100 * CREDIT,
    "signup.expire_days": 30,
    "daily.enabled": True,
    "daily.amount_micros": 10 * CREDIT,
    "daily.expire_days": 0,
    "daily.automatic": False,
    "ledger.timezone": "UTC",
    "monthly_free.enabled": False,
    "monthly_free.amount_micros": 1_500 * CREDIT,
    "purchase.allow_free_users": False,
    "recharge.currency": "CNY",
    "recharge.micros_per_minor_unit": 10_000,
    "recharge.minimum_minor": 3000,
    "recharge.bonus_tiers": [
        {"min_minor": 30000, "bonus_micros": 30 * CREDIT},
        {"min_minor": 100000, "bonus_micros": 150 * CREDIT},
    ],
    "referral.enabled": True,
    "referral.reward_micros": 10 * CREDIT,
}


def new_id(prefix: str) -> str:
    """A catalogue id (pack, plan) unique in the shared test database."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# --- time ---------------------------------------------------------------------------------------


def ts(moment: datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(moment)
    return out


def dt(stamp: Timestamp) -> datetime:
    return stamp.ToDatetime(tzinfo=UTC)


def whole_seconds(moment: datetime) -> datetime:
    return moment.replace(microsecond=0)


def next_day_start(moment: datetime, tz: str = "UTC") -> datetime:
    """The start of the day after ``moment``'s day in ``tz``, in UTC."""
    local = moment.astimezone(ZoneInfo(tz))
    start = datetime(local.year, local.month, local.day, tzinfo=ZoneInfo(tz)) + DAY
    # Re-normalise across DST changes: midnight of the next local date.
    start = datetime(start.year, start.month, start.day, tzinfo=ZoneInfo(tz))
    return start.astimezone(UTC)


def next_month_start(moment: datetime, tz: str = "UTC") -> datetime:
    """The start of the calendar month after ``moment``'s month in ``tz``, in UTC."""
    local = moment.astimezone(ZoneInfo(tz))
    year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
    return datetime(year, month, 1, tzinfo=ZoneInfo(tz)).astimezone(UTC)


# --- settings values ------------------------------------------------------------------------------


def py(value: struct_pb2.Value) -> object:
    """A google.protobuf.Value as plain Python (numbers come back as float)."""
    kind = value.WhichOneof("kind")
    if kind is None or kind == "null_value":
        return None
    if kind == "list_value":
        return [py(item) for item in value.list_value.values]
    if kind == "struct_value":
        return {name: py(item) for name, item in value.struct_value.fields.items()}
    return getattr(value, kind)


def value(obj: object) -> struct_pb2.Value:
    out = struct_pb2.Value()
    if obj is None:
        out.null_value = struct_pb2.NULL_VALUE
    elif isinstance(obj, bool):
        out.bool_value = obj
    elif isinstance(obj, int | float):
        out.number_value = float(obj)
    elif isinstance(obj, str):
        out.string_value = obj
    elif isinstance(obj, list):
        out.list_value.SetInParent()
        for item in obj:
            out.list_value.values.append(value(item))
    elif isinstance(obj, dict):
        out.struct_value.SetInParent()
        for name, item in obj.items():
            out.struct_value.fields[name].CopyFrom(value(item))
    else:
        raise TypeError(f"no Value for {obj!r}")
    return out


# --- the services ---------------------------------------------------------------------------------


class Sources:
    """Short-hands over LedgerService, BillingService and AdminService."""

    def __init__(
        self,
        stub: ledger_service_pb2_grpc.LedgerServiceStub,
        admin: admin_service_pb2_grpc.AdminServiceStub,
        billing: billing_service_pb2_grpc.BillingServiceStub,
    ) -> None:
        self.stub = stub
        self.admin = admin
        self.billing = billing

    # accounts and rewards

    def create_account(
        self, account_id: str | None = None, *, key: str | None = None, referral_code: str = ""
    ) -> pb.CreateAccountResponse:
        return self.stub.CreateAccount(
            pb.CreateAccountRequest(
                account_id=account_id or new_account(),
                idempotency_key=key or new_key("create"),
                referral_code=referral_code,
            )
        )

    def get_account(self, account_id: str) -> types_pb2.Account:
        return self.stub.GetAccount(pb.GetAccountRequest(account_id=account_id)).account

    def claim_daily(self, account_id: str, key: str | None = None) -> pb.ClaimDailyRewardResponse:
        return self.stub.ClaimDailyReward(
            pb.ClaimDailyRewardRequest(account_id=account_id, idempotency_key=key or new_key("day"))
        )

    def transfer_reward(
        self, account_id: str, micros: int | None = None, key: str | None = None
    ) -> pb.TransferRewardResponse:
        request = pb.TransferRewardRequest(
            account_id=account_id, idempotency_key=key or new_key("transfer")
        )
        if micros is not None:
            request.amount_micros = micros
        return self.stub.TransferReward(request)

    def redeem(self, account_id: str, code: str, key: str | None = None) -> pb.RedeemResponse:
        return self.stub.Redeem(
            pb.RedeemRequest(
                account_id=account_id, idempotency_key=key or new_key("redeem"), code=code
            )
        )

    # catalogue

    def create_pack(
        self,
        credits_micros: int,
        *,
        pack_id: str | None = None,
        price_minor: int = 2500,
        currency: str = "USD",
        active: bool = True,
    ) -> billing_pb.CreditPack:
        pack_id = pack_id or new_id("pack")
        return self.admin.CreateCreditPack(
            admin_pb.CreateCreditPackRequest(
                pack=billing_pb.CreditPack(
                    pack_id=pack_id,
                    translation_key=f"credit_{pack_id}",
                    credits_micros=credits_micros,
                    price_minor=price_minor,
                    currency=currency,
                    provider_price_id=f"price_{pack_id}",
                    active=active,
                ),
                idempotency_key=new_key(),
            )
        ).pack

    def create_plan(
        self,
        credits_micros: int,
        rank: int,
        *,
        plan_id: str | None = None,
        active: bool = True,
        provider_price_id: str | None = None,
    ) -> billing_pb.SubscriptionPlan:
        plan_id = plan_id or new_id("plan")
        return self.admin.CreateSubscriptionPlan(
            admin_pb.CreateSubscriptionPlanRequest(
                plan=billing_pb.SubscriptionPlan(
                    plan_id=plan_id,
                    translation_key=f"plan_{plan_id}",
                    credits_micros=credits_micros,
                    period_unit=billing_pb.BILLING_PERIOD_UNIT_MONTH,
                    period_count=1,
                    rank=rank,
                    price_minor=1000 * rank,
                    currency="USD",
                    provider_price_id=provider_price_id or f"price_{plan_id}",
                    active=active,
                ),
                idempotency_key=new_key(),
            )
        ).plan

    # billing

    def purchase(
        self,
        account_id: str,
        pack_id: str,
        *,
        key: str | None = None,
        external_ref: str | None = None,
    ) -> billing_pb.PurchasePackResponse:
        return self.billing.PurchasePack(
            billing_pb.PurchasePackRequest(
                account_id=account_id,
                idempotency_key=key or new_key("purchase"),
                pack_id=pack_id,
                external_ref=external_ref or new_id("pi"),
            )
        )

    def recharge(
        self,
        account_id: str,
        amount_minor: int,
        *,
        currency: str = "CNY",
        key: str | None = None,
        external_ref: str | None = None,
    ) -> billing_pb.RechargeResponse:
        return self.billing.Recharge(
            billing_pb.RechargeRequest(
                account_id=account_id,
                idempotency_key=key or new_key("recharge"),
                amount_minor=amount_minor,
                currency=currency,
                external_ref=external_ref or new_id("pay"),
            )
        )

    def quote(self, amount_minor: int, currency: str = "CNY") -> billing_pb.QuoteRechargeResponse:
        return self.billing.QuoteRecharge(
            billing_pb.QuoteRechargeRequest(amount_minor=amount_minor, currency=currency)
        )

    def start_period(
        self,
        account_id: str,
        plan_id: str,
        start: datetime,
        end: datetime,
        *,
        key: str | None = None,
        external_ref: str | None = None,
        subscription_ref: str = "sub_test",
    ) -> billing_pb.StartSubscriptionPeriodResponse:
        return self.billing.StartSubscriptionPeriod(
            billing_pb.StartSubscriptionPeriodRequest(
                account_id=account_id,
                idempotency_key=key or new_key("period"),
                plan_id=plan_id,
                period_start=ts(start),
                period_end=ts(end),
                external_ref=external_ref or new_id("in"),
                subscription_ref=subscription_ref,
            )
        )

    def change_plan(
        self,
        account_id: str,
        plan_id: str,
        start: datetime,
        end: datetime,
        *,
        key: str | None = None,
        external_ref: str | None = None,
        subscription_ref: str = "sub_test",
    ) -> billing_pb.ChangeSubscriptionPlanResponse:
        return self.billing.ChangeSubscriptionPlan(
            billing_pb.ChangeSubscriptionPlanRequest(
                account_id=account_id,
                idempotency_key=key or new_key("change"),
                plan_id=plan_id,
                period_start=ts(start),
                period_end=ts(end),
                external_ref=external_ref or new_id("in"),
                subscription_ref=subscription_ref,
            )
        )

    # admin

    def grant_credits(
        self,
        account_id: str,
        micros: int,
        reason: str,
        *,
        key: str | None = None,
        expires_in: timedelta | None = None,
    ) -> admin_pb.GrantCreditsResponse:
        request = admin_pb.GrantCreditsRequest(
            account_id=account_id,
            idempotency_key=key or new_key("admin-grant"),
            amount_micros=micros,
            reason=reason,
        )
        if expires_in is not None:
            request.expires_in.CopyFrom(Duration(seconds=int(expires_in.total_seconds())))
        return self.admin.GrantCredits(request)

    def adjust(
        self, account_id: str, micros: int, reason: str, *, key: str | None = None
    ) -> admin_pb.AdjustBalanceResponse:
        return self.admin.AdjustBalance(
            admin_pb.AdjustBalanceRequest(
                account_id=account_id,
                idempotency_key=key or new_key("adjust"),
                amount_micros=micros,
                reason=reason,
            )
        )

    def create_batch(
        self,
        amount_micros: int,
        code_count: int = 1,
        *,
        key: str | None = None,
        **fields: Any,
    ) -> admin_pb.CreateRedemptionBatchResponse:
        return self.admin.CreateRedemptionBatch(
            admin_pb.CreateRedemptionBatchRequest(
                idempotency_key=key or new_key("batch"),
                amount_micros=amount_micros,
                code_count=code_count,
                **fields,
            )
        )

    def get_batch(self, batch_id: str) -> admin_pb.RedemptionBatch:
        return self.admin.GetRedemptionBatch(
            admin_pb.GetRedemptionBatchRequest(batch_id=batch_id)
        ).batch

    # settings

    def settings(self) -> dict[str, admin_pb.Setting]:
        listed = self.admin.ListSettings(admin_pb.ListSettingsRequest()).settings
        return {setting.key: setting for setting in listed}

    def setting(self, key: str) -> admin_pb.Setting:
        return self.settings()[key]

    def update_setting(self, key: str, new_value: object, reason: str) -> admin_pb.Setting:
        return self.admin.UpdateSetting(
            admin_pb.UpdateSettingRequest(
                key=key, value=value(new_value), reason=reason, idempotency_key=new_key()
            )
        ).setting

    def reset_setting(self, key: str, reason: str = "back to the default") -> admin_pb.Setting:
        return self.admin.UpdateSetting(
            admin_pb.UpdateSettingRequest(
                key=key, reset=True, reason=reason, idempotency_key=new_key()
            )
        ).setting

    def setting_changes(self, key: str) -> list[admin_pb.SettingChange]:
        return list(
            self.admin.ListSettingChanges(
                admin_pb.ListSettingChangesRequest(key=key, page_size=100)
            ).changes
        )
