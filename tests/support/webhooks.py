"""Stripe webhook events for tests: payloads shaped like Stripe's (the fields the payment
jobs read), signed with Stripe's real scheme, and posted to the webhook receiver."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import time
import urllib.parse
import uuid
from typing import Any

SECRET = "whsec_test_secret"
WEBHOOK_PATH = "/stripe/webhook"


def sign(payload: bytes, secret: str = SECRET, timestamp: int | None = None) -> str:
    """The Stripe-Signature header: t=<ts>,v1=<HMAC-SHA256(secret, "<ts>.<payload>")>."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def new_event_id() -> str:
    return f"evt_{uuid.uuid4().hex}"


def event(
    event_type: str,
    obj: dict[str, Any],
    event_id: str | None = None,
    *,
    created: int | None = None,
    **extra: Any,
) -> bytes:
    body = {
        "id": event_id or new_event_id(),
        "object": "event",
        "api_version": "2026-10-28.endive",
        "created": int(time.time()) if created is None else created,
        "livemode": False,
        "pending_webhooks": 1,
        "type": event_type,
        "data": {"object": obj, **extra},
    }
    return json.dumps(body, separators=(",", ":")).encode()


def checkout_pack(
    account_id: str,
    pack_id: str,
    payment_intent: str | None = None,
    event_id: str | None = None,
    amount_total: int = 2500,
    session_id: str | None = None,
) -> bytes:
    metadata = {"account_id": account_id, "kind": "pack", "pack_id": pack_id}
    return event(
        "checkout.session.completed",
        {
            "id": session_id or f"cs_test_{uuid.uuid4().hex}",
            "object": "checkout.session",
            "mode": "payment",
            "payment_status": "paid",
            "status": "complete",
            "client_reference_id": account_id,
            "metadata": metadata,
            "payment_intent": payment_intent or f"pi_{uuid.uuid4().hex}",
            "amount_total": amount_total,
            "currency": "usd",
        },
        event_id,
    )


def checkout_recharge(
    account_id: str,
    amount_minor: int,
    currency: str = "cny",
    payment_intent: str | None = None,
    event_id: str | None = None,
    session_id: str | None = None,
) -> bytes:
    metadata = {"account_id": account_id, "kind": "recharge", "amount_minor": str(amount_minor)}
    return event(
        "checkout.session.completed",
        {
            "id": session_id or f"cs_test_{uuid.uuid4().hex}",
            "object": "checkout.session",
            "mode": "payment",
            "payment_status": "paid",
            "client_reference_id": account_id,
            "metadata": metadata,
            "payment_intent": payment_intent or f"pi_{uuid.uuid4().hex}",
            "amount_total": amount_minor,
            "currency": currency,
        },
        event_id,
    )


def charge_refunded(
    payment_intent: str,
    amount: int,
    amount_refunded: int,
    currency: str = "usd",
    account_id: str | None = None,
    event_id: str | None = None,
    *,
    charge_id: str | None = None,
    created: int | None = None,
) -> bytes:
    return event(
        "charge.refunded",
        {
            "id": charge_id or f"ch_{uuid.uuid4().hex}",
            "object": "charge",
            "payment_intent": payment_intent,
            "amount": amount,
            "amount_refunded": amount_refunded,
            "refunded": amount_refunded >= amount,
            "currency": currency,
            "metadata": {"account_id": account_id} if account_id else {},
        },
        event_id,
        created=created,
    )


def refund_updated(
    refund_id: str,
    charge_id: str,
    payment_intent: str,
    amount: int,
    *,
    refund_created: int,
    created: int,
    status: str = "failed",
    event_type: str = "charge.refund.updated",
    currency: str = "usd",
) -> bytes:
    """An event of a Refund object (charge.refund.updated; refund.updated and refund.failed
    since API version 2024-10-28): a refund made at refund_created, now in `status`."""
    failed = status == "failed"
    return event(
        event_type,
        {
            "id": refund_id,
            "object": "refund",
            "amount": amount,
            "charge": charge_id,
            "payment_intent": payment_intent,
            "created": refund_created,
            "currency": currency,
            "status": status,
            "failure_reason": "expired_or_canceled_card" if failed else None,
            "metadata": {},
        },
        created=created,
    )


def charge_dispute_closed(
    payment_intent: str, amount: int, status: str, currency: str = "usd"
) -> bytes:
    return event(
        "charge.dispute.closed",
        {
            "id": f"du_{uuid.uuid4().hex}",
            "object": "dispute",
            "charge": f"ch_{uuid.uuid4().hex}",
            "payment_intent": payment_intent,
            "amount": amount,
            "currency": currency,
            "status": status,
            "reason": "fraudulent",
            "metadata": {},
        },
    )


def invoice_payment_paid(invoice_id: str, payment_intent: str, amount: int = 1000) -> bytes:
    """invoice_payment.paid (API version 2025-03-31 and later): which payment paid it."""
    return event(
        "invoice_payment.paid",
        {
            "id": f"inpay_{uuid.uuid4().hex}",
            "object": "invoice_payment",
            "invoice": invoice_id,
            "amount_paid": amount,
            "status": "paid",
            "payment": {"type": "payment_intent", "payment_intent": payment_intent},
        },
    )


def invoice_line(
    price_id: str, start: int, end: int, proration: bool = False, amount: int | None = None
) -> dict[str, Any]:
    """A line in the shape of API version 2025-03-31 and later (parent, pricing)."""
    return {
        "object": "line_item",
        **({} if amount is None else {"amount": amount}),
        "period": {"start": start, "end": end},
        "pricing": {"type": "price_details", "price_details": {"price": price_id}},
        "parent": {
            "type": "subscription_item_details",
            "subscription_item_details": {"proration": proration},
        },
    }


def invoice_paid(
    account_id: str,
    subscription: str,
    price_id: str,
    start: int,
    end: int,
    invoice_id: str | None = None,
    billing_reason: str = "subscription_create",
    event_id: str | None = None,
    lines: list[dict[str, Any]] | None = None,
) -> bytes:
    """An invoice in the shape of API version 2025-03-31 and later (parent, pricing); its
    one line is for `price_id` over [start, end] unless `lines` are given."""
    return event(
        "invoice.paid",
        {
            "id": invoice_id or f"in_{uuid.uuid4().hex}",
            "object": "invoice",
            "billing_reason": billing_reason,
            "status": "paid",
            "parent": {
                "type": "subscription_details",
                "subscription_details": {
                    "subscription": subscription,
                    "metadata": {"account_id": account_id, "kind": "subscription"},
                },
            },
            "lines": {
                "object": "list",
                "data": lines if lines is not None else [invoice_line(price_id, start, end)],
            },
        },
        event_id,
    )


def subscription_updated(
    account_id: str,
    subscription: str,
    price_id: str,
    start: int,
    end: int,
    status: str = "active",
    previous_price_id: str | None = None,
    created: int | None = None,
    prices_before: tuple[str, ...] = (),
) -> bytes:
    """customer.subscription.updated, the period on the items (API 2025-03-31 and later):
    the items of `prices_before` (add-ons, an old plan's item), then the one of `price_id`."""
    items = [
        {"price": {"id": price}, "current_period_start": start, "current_period_end": end}
        for price in (*prices_before, price_id)
    ]
    previous = (
        {"items": {"data": [{"price": {"id": previous_price_id}}]}} if previous_price_id else {}
    )
    return event(
        "customer.subscription.updated",
        {
            "id": subscription,
            "object": "subscription",
            "status": status,
            "metadata": {"account_id": account_id},
            "items": {"data": items},
        },
        created=created,
        previous_attributes=previous,
    )


def subscription_deleted(
    account_id: str, subscription: str, ended_at: int, created: int | None = None
) -> bytes:
    """customer.subscription.deleted: the subscription ended at `ended_at`."""
    return event(
        "customer.subscription.deleted",
        {
            "id": subscription,
            "object": "subscription",
            "status": "canceled",
            "canceled_at": ended_at,
            "ended_at": ended_at,
            "metadata": {"account_id": account_id},
        },
        created=created,
    )


def post(url: str, body: bytes, signature: str | None) -> tuple[int, dict[str, Any]]:
    """POSTs to the receiver (base URL) and returns (status, JSON body)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        headers = {"Content-Type": "application/json"}
        if signature is not None:
            headers["Stripe-Signature"] = signature
        conn.request("POST", WEBHOOK_PATH, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else {}
    finally:
        conn.close()


def deliver(url: str, body: bytes, secret: str = SECRET) -> int:
    status, _ = post(url, body, sign(body, secret))
    return status
