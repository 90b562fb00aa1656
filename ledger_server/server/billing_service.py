"""BillingService: paid credits (packs, recharges, subscription periods). Each grant
is one call into a ledger function; the rules (free-user purchases, recharge
tiers, upgrade carry-over) live there, next to the data they guard."""

from __future__ import annotations

import logging
import re
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import grpc
import stripe
from psycopg_pool import AsyncConnectionPool

from ledger.v1 import billing_service_pb2 as pb
from ledger.v1 import billing_service_pb2_grpc
from ledger_server.clock import Clock
from ledger_server.config import StripeSettings
from ledger_server.errors import LedgerError, invalid_field
from ledger_server.ledger import mapping, page_tokens, validation
from ledger_server.ledger.fingerprint import AsRead, request_fingerprint
from ledger_server.server.calls import Context, call_json, fetch_all, mark_replay
from ledger_server.server.stripe_checkout import (
    StripeCheckouts,
    checkout_error,
    session_params,
    stripe_answered,
    stripe_idempotency_key,
)

log = logging.getLogger(__name__)

_CHECKOUT_KINDS = {
    "pack": pb.CHECKOUT_KIND_PACK,
    "recharge": pb.CHECKOUT_KIND_RECHARGE,
    "subscription": pb.CHECKOUT_KIND_SUBSCRIPTION,
}
_EVENT_STATUSES = {
    "received": pb.PAYMENT_EVENT_STATUS_RECEIVED,
    "processing": pb.PAYMENT_EVENT_STATUS_PROCESSING,
    "processed": pb.PAYMENT_EVENT_STATUS_PROCESSED,
    "ignored": pb.PAYMENT_EVENT_STATUS_IGNORED,
    "failed": pb.PAYMENT_EVENT_STATUS_FAILED,
}
_EVENT_STATUS_NAMES = {value: name for name, value in _EVENT_STATUSES.items()}


def _checkout_session(data: dict[str, Any]) -> pb.CheckoutSession:
    out = pb.CheckoutSession(
        session_id=data["session_id"],
        account_id=data["account_id"],
        kind=_CHECKOUT_KINDS[data["kind"]],
        pack_id=data["pack_id"],
        plan_id=data["plan_id"],
        amount_minor=data["amount_minor"],
        currency=data["currency"],
        url=data["url"],
    )
    mapping.set_timestamp(out.create_time, data["create_time"])
    return out


def _redirect_url(value: str, field: str, default: str) -> str:
    url = validation.text(value, field, 2048) or default
    try:
        parts = urlsplit(url)
        _ = parts.port  # a port out of range or not a number raises only when read
    except ValueError:  # 'http://[', a host NFKC-normalising to a separator
        raise invalid_field(field, "must be an absolute http(s) URL") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise invalid_field(field, "must be an absolute http(s) URL")
    return url


def _currency(value: str, field: str) -> str:
    if not _CURRENCY.fullmatch(value):
        raise invalid_field(field, "must be an ISO 4217 code such as CNY or USD")
    return value.upper()


# Either case (the ledger compares upper-cased), ASCII letters only.
_CURRENCY = re.compile(r"[A-Za-z]{3}")


# A paid period's bounds, for a sanity check of what a backend sends (the payment worker
# applies Stripe's periods through the SQL, not this): a period from now to the year 9999
# made the account a subscriber for 8,000 years (helper-153's review).
MAX_PERIOD = timedelta(days=3653)  # ten years


def _period(
    request: pb.StartSubscriptionPeriodRequest | pb.ChangeSubscriptionPlanRequest, now: datetime
) -> tuple[datetime, datetime]:
    if not request.HasField("period_start"):
        raise invalid_field("period_start", "is required")
    if not request.HasField("period_end"):
        raise invalid_field("period_end", "is required")
    start = validation.timestamp(request.period_start, "period_start")
    end = validation.timestamp(request.period_end, "period_end")
    if end <= start:
        raise invalid_field("period_end", "must be after period_start")
    if end - start > MAX_PERIOD or end - now > MAX_PERIOD:
        raise invalid_field("period_end", "a period lasts at most ten years and ends within ten")
    return start, end


class BillingService(billing_service_pb2_grpc.BillingServiceServicer):
    def __init__(
        self, pool: AsyncConnectionPool, clock: Clock, stripe_settings: StripeSettings | None = None
    ) -> None:
        self._pool = pool
        self._clock = clock
        self._stripe_settings = stripe_settings or StripeSettings.from_env()
        self._stripe: StripeCheckouts | None = None
        if self._stripe_settings.api_key:
            self._stripe = StripeCheckouts(self._stripe_settings)

    def close(self) -> None:
        if self._stripe is not None:
            self._stripe.close()

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
        self,
        name: str,
        request: Any,
        context: Context,
        params: dict[str, object],
        as_read: AsRead | None = None,
    ) -> dict[str, Any]:
        params.update(
            account_id=validation.account_id(request.account_id),
            key=validation.idempotency_key(request.idempotency_key),
            external_ref=validation.reference(request.external_ref, "external_ref"),
            hash=request_fingerprint(name, request, as_read),
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
            "currency": _currency(request.currency, "currency"),
        }
        data = await call_json(self._pool, "quote_recharge", params)
        return pb.QuoteRechargeResponse(
            credits_micros=data["credits_micros"],
            bonus_micros=data["bonus_micros"],
            minimum_minor=data["minimum_minor"],
        )

    async def Recharge(self, request: pb.RechargeRequest, context: Context) -> pb.RechargeResponse:
        currency = _currency(request.currency, "currency")
        params: dict[str, object] = {
            "amount_minor": validation.positive_amount(request.amount_minor, "amount_minor"),
            "currency": currency,
        }
        # A retry may write the currency in another case: it is the same request.
        data = await self._grant("recharge", request, context, params, {"currency": currency})
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
        start, end = _period(request, self._clock.now())
        return {
            "plan_id": validation.code(request.plan_id, "plan_id"),
            "period_start": start,
            "period_end": end,
            "subscription_ref": validation.reference(request.subscription_ref, "subscription_ref"),
        }

    async def StartSubscriptionPeriod(
        self, request: pb.StartSubscriptionPeriodRequest, context: Context
    ) -> pb.StartSubscriptionPeriodResponse:
        params = self._subscription_params(request)
        data = await self._grant("start_subscription_period", request, context, params)
        return pb.StartSubscriptionPeriodResponse(
            lot=mapping.optional_lot(data["lot"]),
            subscription=mapping.optional_subscription(data["subscription"]),
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
            subscription=mapping.optional_subscription(data["subscription"]),
            balance=mapping.account_balance(data["balance"]),
        )

    # --- payments (issue 5) ------------------------------------------------------------------

    async def CreateCheckoutSession(
        self, request: pb.CreateCheckoutSessionRequest, context: Context
    ) -> pb.CreateCheckoutSessionResponse:
        account_id = validation.account_id(request.account_id)
        key = validation.idempotency_key(request.idempotency_key)
        params: dict[str, object] = {
            "account_id": account_id,
            "key": key,
            "pack_id": None,
            "amount_minor": None,
            "currency": None,
            "plan_id": None,
            "now": self._clock.now(),
        }
        as_read: AsRead = {}
        which = request.WhichOneof("purchase")
        if which == "pack_id":
            if not request.pack_id:
                raise invalid_field("pack_id", "must not be empty")
            params.update(kind="pack", pack_id=validation.code(request.pack_id, "pack_id"))
        elif which == "recharge":
            currency = _currency(request.recharge.currency, "recharge.currency")
            # A retry may write the currency in another case: it is the same request.
            as_read = {"recharge.currency": currency}
            params.update(
                kind="recharge",
                amount_minor=validation.positive_amount(
                    request.recharge.amount_minor, "recharge.amount_minor"
                ),
                currency=currency,
            )
        elif which == "plan_id":
            if not request.plan_id:
                raise invalid_field("plan_id", "must not be empty")
            params.update(kind="subscription", plan_id=validation.code(request.plan_id, "plan_id"))
        else:
            raise invalid_field("purchase", "set one of pack_id, recharge or plan_id")
        params["hash"] = request_fingerprint("create_checkout_session", request, as_read)
        settings = self._stripe_settings
        success_url = _redirect_url(
            request.success_url, "success_url", settings.checkout_success_url
        )
        cancel_url = _redirect_url(request.cancel_url, "cancel_url", settings.checkout_cancel_url)

        prepared = await call_json(self._pool, "checkout_prepare", params)
        if "replay" in prepared:
            mark_replay(context, {"replayed": True})
            return pb.CreateCheckoutSessionResponse(session=_checkout_session(prepared["replay"]))
        if self._stripe is None:
            raise LedgerError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "PAYMENTS_NOT_CONFIGURED",
                "payments are not configured: STRIPE_API_KEY is not set",
            )
        session_id, url = await self._create_stripe_session(
            params, prepared, success_url, cancel_url
        )
        one_time = prepared["kind"] != "subscription"  # a subscription's invoices grant
        stored = await call_json(
            self._pool,
            "record_checkout_session",
            {
                **params,
                "session_id": session_id,
                "kind": prepared["kind"],
                "pack_id": prepared.get("pack_id") or "",
                "plan_id": prepared.get("plan_id") or "",
                "amount_minor": prepared["amount_minor"],
                "currency": prepared["currency"],
                "credits_micros": prepared["credits_micros"] if one_time else None,
                "bonus_micros": prepared.get("bonus_micros", 0) if one_time else None,
                "url": url,
            },
        )
        return pb.CreateCheckoutSessionResponse(session=_checkout_session(stored))

    async def _create_stripe_session(
        self,
        params: dict[str, object],
        prepared: dict[str, Any],
        success_url: str,
        cancel_url: str,
    ) -> tuple[str, str]:
        """The Checkout Session at Stripe (id, URL), under an idempotency key derived from
        ours and the attempts Stripe answered with an error (stripe_checkout.py), so a retry
        never creates a second session a customer could pay."""
        assert self._stripe is not None
        account_id, key = str(params["account_id"]), str(params["key"])
        rows = await fetch_all(self._pool, "checkout_stripe_attempt", params)
        attempt = int(rows[0][0]) if rows else 0
        try:
            return await self._stripe.create(
                session_params(account_id, prepared, success_url, cancel_url),
                stripe_idempotency_key(account_id, key, attempt),
            )
        except stripe.StripeError as exc:
            log.warning("Stripe refused a checkout session for %s: %s", account_id, exc)
            if stripe_answered(exc):
                await fetch_all(
                    self._pool, "checkout_stripe_answered", {**params, "attempt": attempt}
                )
            raise checkout_error(exc) from exc

    async def ListPaymentEvents(
        self, request: pb.ListPaymentEventsRequest, context: Context
    ) -> pb.ListPaymentEventsResponse:
        account_id = validation.account_id(request.account_id) if request.account_id else None
        status: str | None = None
        if request.status != pb.PAYMENT_EVENT_STATUS_UNSPECIFIED:
            if request.status not in _EVENT_STATUS_NAMES:
                raise invalid_field("status", "is not a payment event status")
            status = _EVENT_STATUS_NAMES[request.status]
        page_size = validation.page_size(request.page_size)
        filters: list[object] = ["payment_events", account_id, status]
        position = page_tokens.decode(
            request.page_token, filters, (page_tokens.MICROS, page_tokens.TEXT)
        )
        before_time, before_id = position or (None, None)
        rows = await fetch_all(
            self._pool,
            "list_payment_events",
            {
                "account_id": account_id,
                "status": status,
                "before_time": before_time,
                "before_id": before_id,
                "limit": page_size + 1,
            },
        )
        response = pb.ListPaymentEventsResponse()
        for row in rows[:page_size]:
            event = response.events.add(
                event_id=row[0],
                type=row[1],
                status=_EVENT_STATUSES[row[2]],
                attempts=row[3],
                last_error=row[4],
                credits_micros=row[5],
                account_id=row[6],
            )
            mapping.set_timestamp(event.receive_time, row[7])
            mapping.set_timestamp(event.process_time, row[8])
        if len(rows) > page_size:
            last = rows[page_size - 1]
            response.next_page_token = page_tokens.encode([last[7], last[0]], filters)
        return response
