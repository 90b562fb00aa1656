"""BillingService: paid credits (packs, recharges, subscription periods). Each grant
is one call into a ledger function; the rules (free-user purchases, recharge
tiers, upgrade carry-over) live there, next to the data they guard."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg_pool import AsyncConnectionPool

from ledger.v1 import billing_service_pb2 as pb
from ledger.v1 import billing_service_pb2_grpc
from ledger_server.clock import Clock
from ledger_server.errors import invalid_field
from ledger_server.ledger import mapping, validation
from ledger_server.ledger.fingerprint import request_fingerprint
from ledger_server.server.calls import Context, call_json, fetch_all, mark_replay


def _currency(value: str) -> str:
    if len(value) != 3 or not value.isalpha():
        raise invalid_field("currency", "must be an ISO 4217 code such as CNY or USD")
    return value.upper()


def _period(
    request: pb.StartSubscriptionPeriodRequest | pb.ChangeSubscriptionPlanRequest,
) -> tuple[datetime, datetime]:
    if not request.HasField("period_start"):
        raise invalid_field("period_start", "is required")
    if not request.HasField("period_end"):
        raise invalid_field("period_end", "is required")
    start = validation.timestamp(request.period_start, "period_start")
    end = validation.timestamp(request.period_end, "period_end")
    if end <= start:
        raise invalid_field("period_end", "must be after period_start")
    return start, end


class BillingService(billing_service_pb2_grpc.BillingServiceServicer):
    def __init__(self, pool: AsyncConnectionPool, clock: Clock) -> None:
        self._pool = pool
        self._clock = clock

    async def ListCreditPacks(
        self, request: pb.ListCreditPacksRequest, context: Context
    ) -> pb.ListCreditPacksResponse:
        rows = await fetch_all(self._pool, "list_credit_packs", {"include_inactive": False})
        return pb.ListCreditPacksResponse(packs=[mapping.credit_pack(row) for row in rows])

    async def ListSubscriptionPlans(
        self, request: pb.ListSubscriptionPlansRequest, context: Context
    ) -> pb.ListSubscriptionPlansResponse:
        rows = await fetch_all(self._pool, "list_subscription_plans", {"include_inactive": False})
        return pb.ListSubscriptionPlansResponse(
            plans=[mapping.subscription_plan(row) for row in rows]
        )

    async def _grant(
        self, name: str, request: Any, context: Context, params: dict[str, object]
    ) -> dict[str, Any]:
        params.update(
            account_id=validation.account_id(request.account_id),
            key=validation.idempotency_key(request.idempotency_key),
            external_ref=validation.text(request.external_ref, "external_ref", 256),
            hash=request_fingerprint(name, request),
            now=self._clock.now(),
        )
        data = await call_json(self._pool, name, params)
        mark_replay(context, data)
        return data

    async def PurchasePack(
        self, request: pb.PurchasePackRequest, context: Context
    ) -> pb.PurchasePackResponse:
        if not request.pack_id:
            raise invalid_field("pack_id", "must not be empty")
        pack_id = validation.code(request.pack_id, "pack_id")
        data = await self._grant("purchase_pack", request, context, {"pack_id": pack_id})
        return pb.PurchasePackResponse(
            lot=mapping.lot(data["lot"]),
            transaction_id=data["transaction_id"],
            balance=mapping.account_balance(data["balance"]),
        )

    async def QuoteRecharge(
        self, request: pb.QuoteRechargeRequest, context: Context
    ) -> pb.QuoteRechargeResponse:
        params: dict[str, object] = {
            "amount_minor": validation.positive_amount(request.amount_minor, "amount_minor"),
            "currency": _currency(request.currency),
        }
        data = await call_json(self._pool, "quote_recharge", params)
        return pb.QuoteRechargeResponse(
            credits_micros=data["credits_micros"],
            bonus_micros=data["bonus_micros"],
            minimum_minor=data["minimum_minor"],
        )

    async def Recharge(self, request: pb.RechargeRequest, context: Context) -> pb.RechargeResponse:
        params: dict[str, object] = {
            "amount_minor": validation.positive_amount(request.amount_minor, "amount_minor"),
            "currency": _currency(request.currency),
        }
        data = await self._grant("recharge", request, context, params)
        return pb.RechargeResponse(
            lot=mapping.lot(data["lot"]),
            bonus_lot=mapping.optional_lot(data["bonus_lot"]),
            transaction_id=data["transaction_id"],
            balance=mapping.account_balance(data["balance"]),
        )

    def _subscription_params(
        self, request: pb.StartSubscriptionPeriodRequest | pb.ChangeSubscriptionPlanRequest
    ) -> dict[str, object]:
        if not request.plan_id:
            raise invalid_field("plan_id", "must not be empty")
        start, end = _period(request)
        return {
            "plan_id": validation.code(request.plan_id, "plan_id"),
            "period_start": start,
            "period_end": end,
            "subscription_ref": validation.text(request.subscription_ref, "subscription_ref", 256),
        }

    async def StartSubscriptionPeriod(
        self, request: pb.StartSubscriptionPeriodRequest, context: Context
    ) -> pb.StartSubscriptionPeriodResponse:
        params = self._subscription_params(request)
        data = await self._grant("start_subscription_period", request, context, params)
        return pb.StartSubscriptionPeriodResponse(
            lot=mapping.optional_lot(data["lot"]),
            subscription=mapping.subscription(data["subscription"]),
            balance=mapping.account_balance(data["balance"]),
        )

    async def ChangeSubscriptionPlan(
        self, request: pb.ChangeSubscriptionPlanRequest, context: Context
    ) -> pb.ChangeSubscriptionPlanResponse:
        params = self._subscription_params(request)
        data = await self._grant("change_subscription_plan", request, context, params)
        return pb.ChangeSubscriptionPlanResponse(
            lot=mapping.optional_lot(data["lot"]),
            carry_over_lot=mapping.optional_lot(data["carry_over_lot"]),
            carried_over_micros=data["carried_over_micros"],
            subscription=mapping.subscription(data["subscription"]),
            balance=mapping.account_balance(data["balance"]),
        )
