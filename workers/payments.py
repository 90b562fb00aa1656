"""Payment jobs: turn stored Stripe events into ledger operations, once each.

`process_event(event_id)` runs on the payments queue (enqueued by the webhook receiver with
job_id = event id, re-queued by `requeue_stalled_payment_events`). One PostgreSQL transaction
per event: lock the event row, run the ledger function the event calls for (under the
idempotency key 'stripe:<event id>'), record the outcome. A job killed half-way leaves
nothing behind but the row still unfinished; a second run of a finished event does nothing;
two runs at once serialize on the row lock. Lock order: the event row, then (inside the ledger
function) the account row; nothing locks an event row while holding an account, so this
cannot deadlock.

Event types:
- checkout.session.completed / checkout.session.async_payment_succeeded (mode payment):
  what the session sold when BillingService.CreateCheckoutSession made it
  (ledger_fulfil_checkout: no sale rule is asked again once the customer has paid), else
  the pack (ledger_purchase_pack) or recharge (ledger_recharge) named in the session's
  metadata; fulfilled under the payment intent's id. Mode subscription: the subscription id
  is linked to the account (subscription_accounts); the credits come with the invoice. A
  session this ledger prepared for another account than the event names fails the event
  (its metadata is not trusted over the session); a payment intent another account's
  purchase has is not granted again (ignored).
- Every subscription event (invoice.paid, customer.subscription.updated and .deleted) is
  for the account its subscription is linked to: by its checkout, else by its first applied
  paid invoice (whose metadata names the account). A paid invoice or plan change whose
  metadata names another account fails (ConflictingAccount) and credits neither; an end
  is applied to the linked account, and a refund, failed refund or lost dispute to the
  account of the purchase the payment made, whatever the metadata names (noted).
- invoice.paid: the subscription period of the plan whose provider_price_id is the price
  of the invoice's first line that is not a proration (ledger_start_subscription_period),
  once per invoice. An invoice for a plan change (billing_reason subscription_update) that
  starts a new period (the billing cycle was reset) changes the plan
  (ledger_change_subscription_plan); one with prorations only grants nothing (the event
  below granted the change) and is recorded as paying the change to its positive line's
  plan (invoice_payments), so its refund finds it; it waits while its period is not
  applied. A price no plan has (the admin has not created it yet) fails the event, which is
  retried until the plan exists (an invoice of prorations too, when no positive line is a
  plan's; one of a plan change charging a subscription item's whole period is of a reset
  cycle, never of prorations only). An invoice naming its payment intent (before
  2025-03-31) is recorded as paid by it. A late invoice of an older period (a subscription
  that ended) leaves the account's newer subscription as it is.
- customer.subscription.updated to another plan within the current period, the
  subscription active or trialing, unless a newer such event of the subscription for the
  same period is stored: ledger_change_subscription_plan (upgrade carry-over, seed 001).
  The plan is that of any item whose price is a plan's (add-ons are not), the higher
  ranked of two; a change of items to a price no plan has fails and is retried, as
  invoice.paid (an update that changed no item, of a price no plan has, is ignored). A
  change that comes with a new period (a change scheduled for the renewal, or a reset
  billing cycle) is granted by that period's paid invoice instead (applied here too, the
  period's credits would be granted twice, and before anyone paid): the event waits for
  that invoice (EventNotReady), then is decided again.
- customer.subscription.deleted: the subscription ended (cancelled at once, at its
  period's end, or unpaid): the account is a subscriber no longer from its ended_at
  (ledger_end_subscription), not from the end of the period it paid for; that period's
  credits stay. A paid invoice of the subscription applied later grants its credits and
  keeps the end; a plan change applied later is not applied.
- charge.refunded: the unspent part of the refunded share is clawed back
  (ledger_claw_back_purchase); it waits (EventNotReady) while the event of the payment it
  refunds is stored but not yet applied (for an upgrade's proration invoice, the
  customer.subscription.updated that grants the upgrade). One handled before that event was
  delivered finds no purchase and is ignored; recording the purchase, or the invoice
  payment that joins it to its payment, wakes it, through every payment that reaches the
  purchase (wake_claw_backs: back to 'received', the sweeper re-queues it).
  A charge naming an account the ledger lacks is ignored.
- charge.dispute.closed, lost: a chargeback, clawed back as a refund of the disputed
  amount would be. A refund's or a dispute's share is of all the charge's applied returns
  (the latest cumulative refund, less the refunds that failed since, plus lost disputes)
  over what was paid, in the charge's currency only, read under the account's lock: they
  compose in any order. A dispute of a charge whose amount in its currency is unknown (the
  payment recorded in another) fails (UnknownChargeAmount) instead of taking the whole.
- charge.refund.updated, refund.updated, refund.failed (a Refund object) with status failed
  or canceled: the customer got nothing back, so what the refund's charge.refunded took is
  given back to the lots it came from (ledger_restore_claw_back), once per refund; a failed
  refund the ledger never applied gives nothing. Other statuses: ignored.
- invoice_payment.paid: which payment intent paid an invoice, for the refunds of a
  subscription's payments (since API version 2025-03-31 a charge no longer names its
  invoice); wakes the refunds of that payment handled before it.
- anything else: recorded as 'ignored'.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import TupleRow
from rq import get_current_job

from ledger_server.db.errors import translate
from ledger_server.db.queries import query
from ledger_server.ledger.reserved_keys import STRIPE_EVENT_KEY_PREFIX
from ledger_server.observability.metrics import WORKER_CREDITS_KEY, Credits, credits_in_result
from workers.db import connection
from workers.queues import PAYMENTS_QUEUE, RETRY_MAX, redis_connection, requeue

log = logging.getLogger(__name__)

# An event is tried this often by RQ (the first run and its retries); the sweeper re-queues
# failed events below it at once, and past it once their last attempt is PARKED_RETRY_SECONDS
# old: a paid event is never given up, and once its cause is fixed (the payment log shows
# the error) it is applied without an operator, whatever Redis kept of its failed job.
MAX_ATTEMPTS = 1 + RETRY_MAX
PARKED_RETRY_SECONDS = 3600
SWEEP_BATCH = 1000

# SQLSTATEs that end an event without an effect instead of failing it.
_ALREADY_FULFILLED = "LE025"
_PURCHASE_NOT_FOUND = "LE040"
_ACCOUNT_NOT_FOUND = "LE003"

Json = dict[str, Any]
Conn = psycopg.Connection[TupleRow]


class EventNotReady(RuntimeError):
    """The event cannot be applied yet (e.g. the account of a subscription is not known
    until its checkout is processed): the job fails and RQ retries it later."""


@dataclass(frozen=True)
class Outcome:
    status: str  # 'processed' or 'ignored'
    account_id: str | None = None
    credits_micros: int = 0
    note: str | None = None


def idempotency_key(event_id: str) -> str:
    return f"{STRIPE_EVENT_KEY_PREFIX}{event_id}"


def request_hash(event_id: str) -> bytes:
    return hashlib.sha256(event_id.encode()).digest()


# --- reading Stripe objects (dicts of the raw event, any recent API version) ---------------------


def _id(value: Any) -> str:
    """An expandable field: an id string, or the expanded object's id."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        return str(value.get("id") or "")
    return ""


def _dig(obj: Any, *path: str) -> Any:
    for step in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(step)
    return obj


def _metadata(obj: Any) -> Mapping[str, Any]:
    value = _dig(obj, "metadata")
    return value if isinstance(value, Mapping) else {}


def _invoice_subscription(invoice: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """The subscription id and its metadata: `subscription`/`subscription_details` before
    API version 2025-03-31, `parent.subscription_details` since."""
    details = _dig(invoice, "parent", "subscription_details") or invoice.get("subscription_details")
    sub = _id(invoice.get("subscription")) or _id(_dig(details, "subscription"))
    return sub, _metadata(details)


def _line_price(line: Mapping[str, Any]) -> str:
    return (
        _id(line.get("price"))
        or _id(_dig(line, "pricing", "price_details", "price"))
        or _id(line.get("plan"))
    )


def _period_bound(sub: Mapping[str, Any], bound: str) -> int | None:
    """A subscription's current period start or end (epoch seconds): on the subscription
    before API version 2025-03-31, on its first item since."""
    items = _dig(sub, "items", "data") or [{}]
    value = sub.get(f"current_period_{bound}") or _dig(items[0], f"current_period_{bound}")
    return int(value) if isinstance(value, int | float) else None


def _is_proration(line: Mapping[str, Any]) -> bool:
    """`proration` before API version 2025-03-31, under the line's parent since."""
    return bool(
        line.get("proration")
        or _dig(line, "parent", "subscription_item_details", "proration")
        or _dig(line, "parent", "invoice_item_details", "proration")
    )


def _charges_a_subscription_item(line: Mapping[str, Any]) -> bool:
    """A line that charges a subscription item's whole period (not a proration, not a
    one-off invoice item): `type` before API version 2025-03-31, the parent's since. An
    invoice of a plan change with one starts a new period (a reset billing cycle)."""
    if _is_proration(line):
        return False
    return line.get("type") == "subscription" or (
        _dig(line, "parent", "type") == "subscription_item_details"
    )


def _timestamp(value: Any) -> datetime | None:
    return datetime.fromtimestamp(int(value), UTC) if isinstance(value, int | float) else None


def account_hint(payload: Mapping[str, Any]) -> str | None:
    """The account an event names directly (metadata, client_reference_id), if any."""
    obj = _dig(payload, "data", "object")
    if not isinstance(obj, Mapping):
        return None
    candidates = [_metadata(obj).get("account_id"), obj.get("client_reference_id")]
    if payload.get("type", "").startswith("invoice."):
        candidates.append(_invoice_subscription(obj)[1].get("account_id"))
    for candidate in candidates:
        if isinstance(candidate, str) and candidate:
            return candidate
    return None


# --- the job -------------------------------------------------------------------------------------


def process_event(event_id: str) -> str:
    """Applies one stored event (an RQ job). Returns the event's final status."""
    now = datetime.now(UTC)
    try:
        with connection() as conn:
            outcome = apply_event(conn, event_id, now)
            # Read back as the ledger stored it, whether this run applied the event or an
            # earlier one did and stopped before counting.
            granted = _granted(conn, event_id)
    except Exception as exc:
        _mark_failed(event_id, exc)
        raise
    _count_granted(event_id, granted)  # after the commit: a rolled-back grant never counts
    return outcome.status if outcome else "done"


def apply_event(conn: Conn, event_id: str, now: datetime) -> Outcome | None:
    """The event's ledger operation and its row, in one transaction; None when an earlier
    run finished the event."""
    if conn.execute(query("start_payment_event"), {"event_id": event_id}).fetchone() is None:
        return None  # processed or ignored already (or not stored: nothing to do)
    with conn.transaction():
        row = conn.execute(query("lock_payment_event"), {"event_id": event_id}).fetchone()
        if row is None or row[2] in ("processed", "ignored"):
            return None
        event_type, payload = str(row[0]), row[1]
        outcome = _dispatch(conn, event_id, event_type, payload, now)
        conn.execute(
            query("finish_payment_event"),
            {
                "event_id": event_id,
                "status": outcome.status,
                "account_id": outcome.account_id or "",
                "credits_micros": outcome.credits_micros,
                "idempotency_key": idempotency_key(event_id),
                "note": outcome.note,
                "now": now,
            },
        )
    return outcome


def _granted(conn: Conn, event_id: str) -> Credits:
    """The new credits, by source, of a processed event's ledger operation."""
    row = conn.execute(query("processed_payment_response"), {"event_id": event_id}).fetchone()
    return credits_in_result(str(row[0]), row[1])[0] if row else {}


# Adds an event's credits to the metrics hash unless that event was counted already (a
# marker per event), in one atomic step: neither a client that re-sends the command after a
# lost reply nor a second run of the job can count an event twice.
_COUNT_ONCE = """
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[1]) then
    for i = 2, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
    return 1
end
return 0
"""
COUNTED_MARKER_SECONDS = 30 * 24 * 3600


def _count_granted(event_id: str, granted: Credits) -> None:
    """Adds the event's new credits to the Redis hash the servers' /metrics report. Best
    effort: the ledger has them whatever happens here, and the job's outcome stands."""
    if not granted:
        return
    try:
        job = get_current_job()  # the Redis the job came from; REDIS_URL when run directly
        redis = job.connection if job is not None else redis_connection()
        args: list[str | int] = [COUNTED_MARKER_SECONDS]
        for source, micros in sorted(granted.items()):
            args += [source, micros]
        marker = f"{WORKER_CREDITS_KEY}:counted:{event_id}"
        redis.eval(_COUNT_ONCE, 2, WORKER_CREDITS_KEY, marker, *args)
    except Exception as error:
        log.warning("could not count the credits of payment event %s: %s", event_id, error)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, psycopg.Error):
        domain = translate(exc)
        if domain is not None:
            return f"{domain.reason}: {domain.message}"
        return f"{type(exc).__name__} ({exc.sqlstate}): {exc}".strip()
    return f"{type(exc).__name__}: {exc}"


def _mark_failed(event_id: str, exc: BaseException) -> None:
    """Records the error in its own transaction (the job's was rolled back). Best effort:
    when the database itself is down the row stays 'processing' and the sweeper finds it."""
    try:
        with connection() as conn:
            conn.execute(
                query("fail_payment_event"), {"event_id": event_id, "error": _describe(exc)[:2000]}
            )
    except Exception:
        log.exception("could not record the failure of payment event %s", event_id)


def _ledger_call(
    conn: Conn, name: str, params: dict[str, object], ends: tuple[str, ...] = ()
) -> Json | str:
    """Runs a ledger function in a savepoint. Returns its JSON, or the SQLSTATE of an error
    that ends the event without effect (already fulfilled, purchase not found, `ends`)."""
    result = _ledger_call_or_none(conn, name, params, ends)
    assert result is not None
    return result


def _ledger_call_or_none(
    conn: Conn, name: str, params: dict[str, object], ends: tuple[str, ...] = ()
) -> Json | str | None:
    """_ledger_call of a function that may answer NULL (None)."""
    try:
        with conn.transaction():
            row = conn.execute(query(name), params).fetchone()
    except psycopg.Error as exc:
        if exc.sqlstate in (_ALREADY_FULFILLED, _PURCHASE_NOT_FOUND, *ends):
            return str(exc.sqlstate)
        raise
    assert row is not None and (row[0] is None or isinstance(row[0], dict))
    return row[0]


def _base_params(event_id: str, account_id: str, now: datetime) -> dict[str, object]:
    return {
        "account_id": account_id,
        "key": idempotency_key(event_id),
        "hash": request_hash(event_id),
        "now": now,
    }


def _dispatch(conn: Conn, event_id: str, event_type: str, payload: Json, now: datetime) -> Outcome:
    obj = _dig(payload, "data", "object")
    if not isinstance(obj, Mapping):
        return Outcome("ignored", note="the event has no data.object")
    if event_type in ("checkout.session.completed", "checkout.session.async_payment_succeeded"):
        return _checkout_completed(conn, event_id, obj, now)
    if event_type == "invoice.paid":
        return _invoice_paid(conn, event_id, obj, now)
    if event_type == "customer.subscription.updated":
        items_changed = "items" in (_dig(payload, "data", "previous_attributes") or {})
        return _subscription_updated(
            conn, event_id, int(payload.get("created") or 0), obj, items_changed, now
        )
    if event_type == "customer.subscription.deleted":
        return _subscription_deleted(conn, obj, int(payload.get("created") or 0), now)
    if event_type == "charge.refunded":
        return _charge_refunded(conn, event_id, obj, now)
    if event_type == "charge.dispute.closed":
        return _dispute_closed(conn, event_id, obj, now)
    if event_type in _REFUND_UPDATES:
        return _refund_updated(conn, event_id, obj, now)
    if event_type == "invoice_payment.paid":
        return _invoice_payment_paid(conn, obj, now)
    return Outcome("ignored", account_id=account_hint(payload), note="event type not handled")


def _already(account_id: str, what: str) -> Outcome:
    return Outcome("ignored", account_id, note=f"{what} was fulfilled already by another request")


def _checkout_completed(conn: Conn, event_id: str, session: Any, now: datetime) -> Outcome:
    metadata = _metadata(session)
    account_id = str(metadata.get("account_id") or session.get("client_reference_id") or "")
    if not account_id:
        return Outcome("ignored", note="the session names no account (metadata, client reference)")
    _require_own_session(conn, _id(session), account_id)
    subscription_ref = _id(session.get("subscription"))
    conn.execute(
        query("complete_checkout_session"),
        {"session_id": _id(session), "subscription_ref": subscription_ref, "now": now},
    )
    if session.get("mode") == "subscription":
        _link_subscription(conn, subscription_ref, account_id, now)
        return Outcome(
            "processed", account_id, note=f"subscription {subscription_ref} linked to the account"
        )
    if session.get("payment_status") not in ("paid", "no_payment_required"):
        return Outcome(
            "ignored", account_id, note=f"payment_status {session.get('payment_status')}: not paid"
        )
    external_ref = _id(session.get("payment_intent")) or _id(session)
    _wake_claw_backs(conn, [external_ref, _id(session)])
    if _paid_for_another_account(conn, external_ref, account_id):
        return Outcome(
            "ignored",
            account_id,
            note=f"payment {external_ref} was fulfilled for another account: not granted again",
        )
    params = _base_params(event_id, account_id, now)
    params["external_ref"] = external_ref
    sold = _ledger_call_or_none(conn, "fulfil_checkout", {**params, "session_id": _id(session)})
    if sold is not None:  # a session this ledger prepared: what it sold
        if isinstance(sold, str):
            return _already(account_id, f"payment {external_ref}")
        return Outcome("processed", account_id, _sold_credits(sold))
    kind = metadata.get("kind")
    if kind == "pack":
        params["pack_id"] = str(metadata.get("pack_id") or "")
        data = _ledger_call(conn, "purchase_pack", params)
        if isinstance(data, str):
            return _already(account_id, f"payment {external_ref}")
        return Outcome("processed", account_id, _sold_credits(data))
    if kind == "recharge":
        params["amount_minor"] = int(session.get("amount_total") or 0)
        params["currency"] = str(session.get("currency") or "").upper()
        data = _ledger_call(conn, "recharge", params)
        if isinstance(data, str):
            return _already(account_id, f"payment {external_ref}")
        return Outcome("processed", account_id, _sold_credits(data))
    return Outcome("ignored", account_id, note=f"unknown checkout kind {kind!r} in metadata")


class ForeignCheckoutSession(RuntimeError):
    """The session the event completes was created for another account than the event names:
    its metadata is not to be trusted over what the ledger prepared, and the session's own
    account is not the one the event asks to credit. The event fails (the payment log shows
    why) and grants nobody."""


def _require_own_session(conn: Conn, session_id: str, account_id: str) -> None:
    row = conn.execute(query("checkout_session_account"), {"session_id": session_id}).fetchone()
    if row is not None and row[0] != account_id:
        raise ForeignCheckoutSession(
            f"checkout session {session_id} was created for another account than {account_id},"
            " which the event names: nothing granted"
        )


def _paid_for_another_account(conn: Conn, external_ref: str, account_id: str) -> bool:
    """Whether another account's purchase was paid by this payment: a purchase is unique per
    account and payment only (BillingService's contract, and a table keyed by account), so
    a second checkout event naming the payment intent for another account would credit one
    payment twice. Serialized per payment (an advisory lock, taken before the ledger call
    locks the account): two such events at once cannot both pass."""
    conn.execute(query("lock_payment_ref"), {"external_ref": external_ref})
    row = conn.execute(query("account_for_payment"), {"external_refs": [external_ref]}).fetchone()
    return row is not None and row[0] != account_id


def _sold_credits(sale: Json) -> int:
    """The credits a pack's or recharge's answer granted: its lot and any bonus lot."""
    bonus = sale.get("bonus_lot") or {}
    return int(sale["lot"]["amount_micros"]) + int(bonus.get("amount_micros") or 0)


class ConflictingAccount(RuntimeError):
    """A paid invoice or plan change names (metadata) another account than the one its
    subscription is linked to (subscription_accounts). Metadata is the merchant's own
    code's to write, and some integrations share one Stripe customer between accounts: on
    its word one account got another's subscription period or plan change, and the
    subscription. Whether the payment was meant for the other account is not the worker's
    to decide: the event fails, the payment log saying why, and credits neither
    (an operator decides; its retries are refused the same way while the link stands)."""


def _linked_account(conn: Conn, subscription_ref: str) -> str:
    if not subscription_ref:
        return ""
    row = conn.execute(
        query("subscription_account"), {"subscription_ref": subscription_ref}
    ).fetchone()
    return str(row[0]) if row else ""


def _names_another(owner: str, metadata: Mapping[str, Any]) -> bool:
    """Whether the event's metadata names another account than `owner`, the ledger's. The
    payment log of one account never names the other (a log is read per account, as
    ForeignCheckoutSession's is)."""
    named = str(metadata.get("account_id") or "")
    return bool(owner and named and named != owner)


def _subscription_owner(
    conn: Conn, subscription_ref: str, metadata: Mapping[str, Any]
) -> tuple[str, bool]:
    """The account the subscription is linked to, else (not linked yet) the one the event's
    metadata names; and whether the metadata names another than the linked account.
    EventNotReady when neither is known."""
    linked = _linked_account(conn, subscription_ref)
    account_id = linked or str(metadata.get("account_id") or "")
    if not account_id:
        raise EventNotReady(
            f"no account is linked to subscription {subscription_ref!r} yet "
            "(its checkout.session.completed may not be processed yet)"
        )
    return account_id, _names_another(linked, metadata)


def _subscription_account(conn: Conn, subscription_ref: str, metadata: Mapping[str, Any]) -> str:
    """The account a grant of the subscription (its paid invoice, a plan change) is for:
    _subscription_owner's, the event failing when its metadata names another account."""
    account_id, conflict = _subscription_owner(conn, subscription_ref, metadata)
    if conflict:
        raise ConflictingAccount(
            f"subscription {subscription_ref} is linked to another account than"
            f" {metadata.get('account_id')}, which the event's metadata names: nothing granted"
            " to either"
        )
    return account_id


def _link_subscription(conn: Conn, subscription_ref: str, account_id: str, now: datetime) -> None:
    """Links the subscription to the account its first applied checkout or paid invoice is
    for; from then on its events go to that account only. A link another job made first
    (committed while this one waited on it) for another account fails this event. Before
    any account lock (lock order: event rows, then the account)."""
    if not subscription_ref:
        return
    conn.execute(
        query("link_subscription_account"),
        {"subscription_ref": subscription_ref, "account_id": account_id, "now": now},
    )
    linked = _linked_account(conn, subscription_ref)
    if linked != account_id:
        raise ConflictingAccount(
            f"subscription {subscription_ref} is linked to another account than {account_id},"
            " which the event is for: nothing granted to either"
        )


def _plan_for_price(
    conn: Conn, price_id: str, account_id: str, subscription_ref: str
) -> str | None:
    """The plan of an invoice line's price, as _plan_of_prices finds it."""
    if not price_id:
        return None
    return _plan_of_prices(conn, [price_id], account_id, subscription_ref)


def _item_prices(sub: Mapping[str, Any]) -> list[str]:
    """The prices of every item of a subscription: add-ons may be listed before the plan,
    and an integration may upgrade by deleting the old item and appending the new one."""
    items = _dig(sub, "items", "data") or []
    prices = [_id(item.get("price")) or _id(item.get("plan")) for item in items]
    return [price for price in prices if price]


def _plan_of_prices(
    conn: Conn, prices: list[str], account_id: str, subscription_ref: str
) -> str | None:
    """The plan of the items whose price is a plan's; of two, the higher ranked; of plans
    sharing a price, the subscription's own, or its checkout's (subscription_plan_of_prices
    says why)."""
    row = conn.execute(
        query("subscription_plan_of_prices"),
        {"price_ids": prices, "account_id": account_id, "subscription_ref": subscription_ref},
    ).fetchone()
    return str(row[0]) if row else None


def _current_subscription(conn: Conn, account_id: str) -> tuple[str, datetime] | None:
    """The account's plan and the start of its current period, if it has a subscription."""
    row = conn.execute(query("current_subscription_plan"), {"account_id": account_id}).fetchone()
    return (str(row[0]), row[1]) if row else None


def _plan_change_ref(subscription_ref: str, plan_id: str, start: datetime) -> str:
    """One plan change per subscription, plan and period (customer.subscription.updated)."""
    return f"{subscription_ref}:{plan_id}:{int(start.timestamp())}"


def _invoice_paid(conn: Conn, event_id: str, invoice: Any, now: datetime) -> Outcome:
    subscription_ref, metadata = _invoice_subscription(invoice)
    if not subscription_ref:
        return Outcome("ignored", note="the invoice is not for a subscription")
    account_id = _subscription_account(conn, subscription_ref, metadata)
    _link_subscription(conn, subscription_ref, account_id, now)
    plan_change = invoice.get("billing_reason") == "subscription_update"
    lines = _dig(invoice, "lines", "data") or []
    for line in lines:
        if _is_proration(line):  # the unused time of the old plan, the rest of the new one
            continue
        plan_id = _plan_for_price(conn, _line_price(line), account_id, subscription_ref)
        start = _timestamp(_dig(line, "period", "start"))
        end = _timestamp(_dig(line, "period", "end"))
        if plan_id is None or start is None or end is None:
            continue
        params = _base_params(event_id, account_id, now)
        params.update(
            plan_id=plan_id,
            period_start=start,
            period_end=end,
            external_ref=_id(invoice),
            subscription_ref=subscription_ref,
        )
        if plan_change and _current_subscription(conn, account_id) == (plan_id, start):
            return Outcome("ignored", account_id, note="the plan change was applied already")
        # Before the ledger call locks the account: an event row is never locked after an
        # account (lock_payment_event), or this job and the waiting event's, holding its
        # row and asking for the account, deadlock. Rolled back with the job if it fails.
        conn.execute(query("wake_subscription_updates"), {"subscription_ref": subscription_ref})
        _record_invoice_intent(conn, invoice, now)
        _wake_claw_backs(conn, [_id(invoice), _id(invoice.get("payment_intent"))])
        if plan_change:
            # Under the invoice, as every paid period: its refund finds it there.
            data = _ledger_call(conn, "change_subscription_plan", params)
        else:
            data = _ledger_call(conn, "start_subscription_period", params)
        if isinstance(data, str):
            return _already(account_id, f"invoice {_id(invoice)}")
        # Paid before its subscription ended, applied after: the credits are granted, and
        # the end stays.
        _keep_stored_end(conn, account_id, subscription_ref, now)
        lot = data.get("lot") or {}
        return Outcome("processed", account_id, int(lot.get("amount_micros") or 0))
    if plan_change and not any(_charges_a_subscription_item(line) for line in lines):
        _record_invoice_intent(conn, invoice, now)
        return _link_proration_invoice(conn, invoice, subscription_ref, account_id, lines, now)
    prices = [_line_price(line) for line in lines]
    raise LookupError(f"no subscription plan has the provider price of the invoice lines {prices}")


def _link_proration_invoice(
    conn: Conn,
    invoice: Any,
    subscription_ref: str,
    account_id: str,
    lines: list[Any],
    now: datetime,
) -> Outcome:
    """An invoice of prorations only paid for a plan change within the period, which
    customer.subscription.updated granted under a reference of its own
    (_plan_change_ref): the invoice is recorded as paying that change, so a refund or a
    lost dispute of its payment takes the change's credits back. The plan it paid for is
    its positive line's (the new plan's remaining time; the negative one is the old plan's
    unused time), whatever the plan is now; the period is the account's subscription
    period the change fell in. It waits (EventNotReady) while that period is not applied."""
    prorations = [line for line in lines if _is_proration(line)]
    bought = [line for line in prorations if int(line.get("amount") or 0) > 0]
    if not bought and len(prorations) == 1:  # a line without its amount: the one there is
        bought = prorations
    period = conn.execute(query("plan_change_period"), {"account_id": account_id}).fetchone()
    refs: list[str] = []
    unknown: list[str] = []
    for line in bought:
        price = _line_price(line)
        changed_at = _timestamp(_dig(line, "period", "start"))
        if not price or changed_at is None:
            continue
        if period is not None and period[2] == subscription_ref and period[0] > changed_at:
            return Outcome(
                "ignored", account_id, note="prorations of a period that has been renewed since"
            )
        if period is None or period[2] != subscription_ref or changed_at >= period[1]:
            raise EventNotReady("the subscription period of these prorations is not applied yet")
        plan_id = _plan_for_price(conn, price, account_id, subscription_ref)
        if plan_id is None:
            unknown.append(price)  # an add-on's, or a plan's the admin has not created yet
        else:
            refs.append(_plan_change_ref(subscription_ref, plan_id, period[0]))
    if unknown and not refs:
        # Paid for no plan the ledger has: retried (as invoice.paid of an unknown price) until
        # the admin creates it, then linked, so its refund finds the change.
        raise LookupError(
            f"no subscription plan has the provider price of the prorations {unknown}"
        )
    invoice_ref = _id(invoice)
    for ref in refs:
        conn.execute(
            query("record_invoice_payment"),
            {"payment_ref": invoice_ref, "invoice_ref": ref, "now": now},
        )
    _wake_claw_backs(conn, [invoice_ref, _id(invoice.get("payment_intent"))])
    return Outcome(
        "processed" if refs else "ignored",
        account_id,
        note=f"prorations paying for {', '.join(refs) or 'no plan of the rate card'}:"
        " their refunds take it back",
    )


def _record_invoice_intent(conn: Conn, invoice: Any, now: datetime) -> None:
    """Before API version 2025-03-31 an invoice names the payment intent that paid it (no
    invoice_payment.paid comes): recorded as its invoice_payment would be, for a dispute,
    which names the payment intent and the charge only."""
    payment_intent = _id(invoice.get("payment_intent"))
    if payment_intent:
        conn.execute(
            query("record_invoice_payment"),
            {"payment_ref": payment_intent, "invoice_ref": _id(invoice), "now": now},
        )


def _wake_claw_backs(conn: Conn, refs: list[str]) -> None:
    """Refunds and lost disputes of these payments handled before the purchase (or the
    link) was recorded found nothing to take back: they run again. `refs` are what the
    purchase is recorded under; the payments that reach it through invoice_payments (an
    invoice's payment intents since API version 2025-03-31, the proration invoice of a plan
    change and its payments) are woken too: a refund names only its payment intent
    (helper-96). Called before any account is locked (lock order: event rows, then the
    account)."""
    refs = [ref for ref in refs if ref]
    if refs:
        paying = conn.execute(query("payments_reaching"), {"refs": refs}).fetchall()
        refs += [str(row[0]) for row in paying if row[0] not in refs]
        conn.execute(query("wake_claw_backs"), {"external_refs": refs})


def _subscription_updated(
    conn: Conn, event_id: str, created: int, sub: Any, items_changed: bool, now: datetime
) -> Outcome:
    subscription_ref = _id(sub)
    if _stored_end(conn, subscription_ref) is not None:
        account = str(_metadata(sub).get("account_id") or "") or None
        return Outcome("ignored", account, note="the subscription has ended")
    newer = conn.execute(
        query("newer_subscription_update"),
        {
            "subscription_ref": subscription_ref,
            "created": created,
            "period_start": _period_bound(sub, "start"),
        },
    ).fetchone()
    if newer is not None:
        return Outcome(
            "ignored",
            str(_metadata(sub).get("account_id") or "") or None,
            note=f"superseded by the newer event {newer[0]}",
        )
    account_id = _subscription_account(conn, subscription_ref, _metadata(sub))
    prices = _item_prices(sub)
    if not prices:
        return Outcome("ignored", account_id, note="the subscription lists no item's price")
    plan_id = _plan_of_prices(conn, prices, account_id, subscription_ref)
    current = _current_subscription(conn, account_id)
    if current is None:
        return Outcome("ignored", account_id, note="no subscription yet: invoice.paid starts it")
    current_plan, current_start = current
    if current_plan == plan_id:
        return Outcome("ignored", account_id, note="the plan did not change")
    status = sub.get("status")
    if status not in ("active", "trialing"):
        return Outcome(
            "ignored", account_id, note=f"subscription {status}: a plan change waits for payment"
        )
    start = _timestamp(_period_bound(sub, "start"))
    end = _timestamp(_period_bound(sub, "end"))
    if start is None or end is None:
        raise ValueError("the subscription has no current period")
    if start < current_start:
        return Outcome("ignored", account_id, note="a change of a period that has ended")
    if start > current_start:
        # The new period's paid invoice grants its plan; then this change is decided again
        # (the same plan: nothing to do; another: a change made after the renewal). That
        # invoice puts the event back to 'received' for the sweeper, however long it took.
        raise EventNotReady("the subscription's new period is not started yet (its invoice)")
    if plan_id is None and not items_changed:
        # Another change (cancel_at_period_end, say) of a subscription whose plan has since
        # moved to another price: no plan change to wait for (helper-81).
        return Outcome("ignored", account_id, note="no item's price is a plan's; no item changed")
    if plan_id is None:
        # Not final: the customer pays for it, and once the admin creates its plan the
        # retried event (the sweeper's parked retries) applies it, as invoice.paid does.
        raise LookupError(f"no subscription plan has the provider price of the items {prices}")
    params = _base_params(event_id, account_id, now)
    external_ref = _plan_change_ref(subscription_ref, plan_id, start)
    params.update(
        plan_id=plan_id,
        period_start=start,
        period_end=end,
        external_ref=external_ref,
        subscription_ref=subscription_ref,
    )
    # The change's purchase is recorded now: a refund or lost dispute of the proration
    # invoice's payment handled before found nothing and was ignored (helper-96). Before the
    # ledger call locks the account (lock order: event rows, then the account).
    _wake_claw_backs(conn, [external_ref])
    data = _ledger_call(conn, "change_subscription_plan", params)
    if data == _ALREADY_FULFILLED:  # this plan's credits for this period: granted before
        conn.execute(query("record_subscription_plan"), params)
        return Outcome(
            "ignored",
            account_id,
            note="the plan's credits for this period were granted by an earlier change;"
            " the plan is recorded",
        )
    if isinstance(data, str):
        return _already(account_id, "the plan change")
    lot = data.get("lot") or {}
    return Outcome("processed", account_id, int(lot.get("amount_micros") or 0))


def _ended_at(sub: Any, created: int) -> datetime:
    """When a deleted subscription ended: its ended_at, else when it was cancelled, else
    when the event was made."""
    for value in (sub.get("ended_at"), sub.get("canceled_at")):
        moment = _timestamp(value)
        if moment is not None:
            return moment
    return datetime.fromtimestamp(created, UTC)


def _stored_end(conn: Conn, subscription_ref: str) -> datetime | None:
    """When the subscription ended, if its customer.subscription.deleted event is stored
    (applied or not yet): events of one subscription arrive in any order."""
    if not subscription_ref:
        return None
    row = conn.execute(query("subscription_end"), {"subscription_ref": subscription_ref}).fetchone()
    return _ended_at(row[0], int(row[1] or 0)) if row else None


def _keep_stored_end(conn: Conn, account_id: str, subscription_ref: str, now: datetime) -> None:
    ended_at = _stored_end(conn, subscription_ref)
    if ended_at is not None:
        _end_subscription(conn, account_id, subscription_ref, ended_at, now)


def _end_subscription(
    conn: Conn, account_id: str, subscription_ref: str, ended_at: datetime, now: datetime
) -> bool:
    params = {
        "account_id": account_id,
        "subscription_ref": subscription_ref,
        "ended_at": ended_at,
        "now": now,
    }
    row = conn.execute(query("end_subscription"), params).fetchone()
    return bool(row and row[0])


def _subscription_deleted(conn: Conn, sub: Any, created: int, now: datetime) -> Outcome:
    """The subscription ended: the account is no longer a subscriber from then on; the
    credits of the periods it paid for stay."""
    subscription_ref = _id(sub)
    ended_at = _ended_at(sub, created)
    try:
        # Metadata naming another account changes nothing: the subscription ended, whoever
        # the merchant's code names, and only its own account's subscription is it (a
        # stored end is read by its account's later events whatever its metadata says).
        account_id, conflict = _subscription_owner(conn, subscription_ref, _metadata(sub))
    except EventNotReady:
        # Not an error to retry: an invoice of the subscription applied later ends it too.
        return Outcome("ignored", note="no account is linked to the subscription")
    suffix = " (its metadata names another account than the subscription's)" if conflict else ""
    if _end_subscription(conn, account_id, subscription_ref, ended_at, now):
        return Outcome(
            "processed", account_id, note=f"subscription ended at {ended_at.isoformat()}{suffix}"
        )
    return Outcome(
        "ignored", account_id, note=f"no period of the subscription lasts beyond its end{suffix}"
    )


def _invoice_payment_paid(conn: Conn, payment: Any, now: datetime) -> Outcome:
    """Records which payment paid an invoice, for its refunds (the charge does not say)."""
    invoice_ref = _id(payment.get("invoice"))
    paid_by = _dig(payment, "payment") or {}
    payment_ref = _id(paid_by.get("payment_intent")) or _id(paid_by.get("charge"))
    if not invoice_ref or not payment_ref:
        return Outcome("ignored", note="the invoice payment names no invoice or payment")
    conn.execute(
        query("record_invoice_payment"),
        {"payment_ref": payment_ref, "invoice_ref": invoice_ref, "now": now},
    )
    _wake_claw_backs(conn, [payment_ref, invoice_ref])
    return Outcome("processed", note=f"invoice {invoice_ref} paid by {payment_ref}")


def _require_no_unfinished_payment(conn: Conn, event_id: str, refs: list[str]) -> None:
    """A refund handled before the event of the payment it refunds would find no purchase
    and be dropped for good, while the payment's credits came later and stayed."""
    row = conn.execute(
        query("unfinished_event_paid_by"), {"event_id": event_id, "external_refs": refs}
    ).fetchone()
    if row is not None:
        raise EventNotReady(f"the payment's own event {row[0]} is not applied yet")


class UnknownChargeAmount(RuntimeError):
    """A lost dispute names only its own amount, in the charge's currency; its share of the
    purchase needs the charge's amount in that currency (a refund of the charge gives it,
    else the payment's applied event). None is known when the payment was recorded in
    another currency (its presentment currency, say, or inconsistent data): the dispute,
    maybe of part of the charge, is not read as the whole purchase, nor its amount compared
    with one in another currency. The event fails for an operator; a refund of the charge
    stored since (which names the charge's amount) lets its retry apply the share."""


@dataclass(frozen=True)
class _Return:
    """What one refund, failed refund or lost dispute says of its charge, in the charge's
    minor units (its cumulative amount refunded is read back from the stored events)."""

    disputed_minor: int  # a lost dispute's amount; 0 for a refund
    charge_minor: int | None  # the charge's amount, when the event gives it
    currency: str


# Events of a Refund object: one whose status is failed or canceled gives back what its
# charge.refunded took (refund.* are sent since API version 2024-10-28 for every refund).
_REFUND_UPDATES = ("charge.refund.updated", "refund.updated", "refund.failed")


def _charge_refunded(conn: Conn, event_id: str, charge: Any, now: datetime) -> Outcome:
    payment_intent = _id(charge.get("payment_intent"))
    refs = [r for r in (payment_intent, _id(charge.get("invoice")), _id(charge)) if r]
    refunded, paid = int(charge.get("amount_refunded") or 0), int(charge.get("amount") or 0)
    currency = str(charge.get("currency") or "").upper()
    return _claw_back(
        conn,
        event_id,
        now,
        refs,
        _metadata(charge),
        _Return(0, paid, currency),
        f"payment {payment_intent or _id(charge)} refunded: {refunded} of {paid} {currency}",
    )


def _dispute_closed(conn: Conn, event_id: str, dispute: Any, now: datetime) -> Outcome:
    """A chargeback the merchant lost: the bank took the disputed amount back, as a refund
    of it would (a dispute may be for part of a charge, and is for what its refunds left).
    Won or accepted-and-reinstated disputes change nothing."""
    if dispute.get("status") != "lost":
        return Outcome("ignored", note=f"dispute {dispute.get('status')}: the payment stands")
    payment_intent = _id(dispute.get("payment_intent"))
    refs = [r for r in (payment_intent, _id(dispute.get("charge"))) if r]
    amount = int(dispute.get("amount") or 0)
    currency = str(dispute.get("currency") or "").upper()
    return _claw_back(
        conn,
        event_id,
        now,
        refs,
        _metadata(dispute),
        _Return(amount, None, currency),
        f"payment {refs[0] if refs else _id(dispute)} disputed and lost: {amount} {currency}",
    )


def _returned_share(
    conn: Conn, event_id: str, refs: list[str], this: _Return
) -> tuple[int, int] | None:
    """(returned, paid) of the charge, in its minor units, for ledger_claw_back_purchase's
    cumulative share: the latest cumulative refund, less the refunds that failed since, and
    every lost dispute of the charge applied so far, this event's included (charge_returns),
    of the charge's amount (from a refund of it, else from its payment's applied event).
    Amounts in another currency than this event's are never counted: one rule for refunds
    and disputes. Refunds, their failures and disputes then compose in any order. None: a
    charge whose amount is unknown in this currency."""
    row = conn.execute(
        query("charge_returns"),
        {"event_id": event_id, "external_refs": refs, "currency": this.currency},
    ).fetchone()
    refunded, disputed, charged = (row[0], row[1], row[2]) if row else (None, 0, None)
    charge = this.charge_minor or charged
    if charge is None:
        paid = conn.execute(
            query("amount_paid"), {"external_refs": refs, "currency": this.currency}
        ).fetchone()
        charge = int(paid[0]) if paid else None
    if not charge:
        return None
    return int(refunded or 0) + int(disputed), int(charge)


def _claw_back(
    conn: Conn,
    event_id: str,
    now: datetime,
    refs: list[str],
    metadata: Mapping[str, Any],
    this: _Return,
    comment: str,
) -> Outcome:
    """Takes back the returned share of the purchase paid by one of `refs`, or by an
    invoice one of them paid (a subscription period's purchase is under the invoice)."""
    refs = _paid_refs(conn, refs)
    _require_no_unfinished_payment(conn, event_id, refs)
    account_id, conflict = _payment_account(conn, refs, metadata)
    if not account_id:
        # Woken (wake_claw_backs) if the purchase is recorded later: Stripe's order is any.
        return Outcome("ignored", note="no purchase was paid by this charge")
    conn.execute(query("lock_claw_back_account"), {"account_id": account_id})
    share = _returned_share(conn, event_id, refs, this)
    if share is None and this.disputed_minor > 0:
        raise UnknownChargeAmount(
            f"{comment}: no amount of the charge in {this.currency or 'its currency'} is"
            " known (its payment was recorded in another currency, or without an amount), so"
            " its share of the purchase is not: nothing taken back"
        )
    returned, paid = share or (0, 0)
    if paid <= 0:
        return Outcome("ignored", account_id, note="the event names no amount paid")
    params = _base_params(event_id, account_id, now)
    params.update(external_refs=refs, refunded_minor=returned, paid_minor=paid, comment=comment)
    data = _ledger_call(conn, "claw_back_purchase", params, ends=(_ACCOUNT_NOT_FOUND,))
    if data == _ACCOUNT_NOT_FOUND:  # the charge's metadata names an account the ledger lacks
        return Outcome("ignored", account_id, note="the account the charge names does not exist")
    if isinstance(data, str):
        return Outcome("ignored", account_id, note="no purchase of the account was paid by it")
    taken = int(data["clawed_back_micros"]) + int(data["bonus_clawed_back_micros"])
    return Outcome("processed", account_id, -taken, note=conflict)


def _paid_refs(conn: Conn, refs: list[str]) -> list[str]:
    """`refs` and what they paid: a subscription period's purchase is under its invoice."""
    invoices = conn.execute(query("invoices_paid_by"), {"external_refs": refs}).fetchall()
    return refs + [str(row[0]) for row in invoices if row[0] not in refs]


def _payment_account(
    conn: Conn, refs: list[str], metadata: Mapping[str, Any]
) -> tuple[str, str | None]:
    """The account whose purchase a ref paid, else the one the event's metadata names (no
    purchase is recorded yet: nothing to take back); and a note when the metadata names
    another account than the purchase's. A refund, its failure or a lost dispute is of the
    payment, whose purchase is that account's whatever the metadata says (taken from the
    account the metadata named, which had no such purchase, a refund was ignored and the
    purchase's account kept the refunded credits)."""
    row = conn.execute(query("account_for_payment"), {"external_refs": refs}).fetchone()
    paid_for = str(row[0]) if row else ""
    conflict = _names_another(paid_for, metadata)
    note = (
        "the event's metadata names another account than the purchase's: applied to the purchase's"
        if conflict
        else None
    )
    return paid_for or str(metadata.get("account_id") or ""), note


def _refund_updated(conn: Conn, event_id: str, refund: Any, now: datetime) -> Outcome:
    """A refund that failed or was canceled: the money went back to the merchant, not to the
    customer, so what its charge.refunded took back is given back (ledger_restore_claw_back)
    down to the share of what the charge's standing refunds and lost disputes return
    (charge_returns leaves the failed refund out from then on; a later refund of the payment
    takes its share again). Once per refund, whichever of its events comes. A failed refund
    the ledger never applied changes nothing: the share never counted it. Other updates of
    a refund change nothing."""
    refund_id, status = _id(refund), str(refund.get("status") or "")
    payment_intent = _id(refund.get("payment_intent"))
    refs = [r for r in (payment_intent, _id(refund.get("charge"))) if r]
    refs = _paid_refs(conn, refs) if refs else []
    account_id, conflict = _payment_account(conn, refs, _metadata(refund))
    if status not in ("failed", "canceled"):
        note = f"refund {refund_id} {status}: nothing to undo"
        return Outcome("ignored", account_id or None, note=note)
    if not account_id:
        return Outcome("ignored", note="no purchase was paid by the refunded charge")
    conn.execute(query("lock_claw_back_account"), {"account_id": account_id})
    applied = conn.execute(
        query("refund_failure_applied"), {"event_id": event_id, "refund_id": refund_id}
    ).fetchone()
    if applied is not None:
        return Outcome(
            "ignored",
            account_id,
            note=f"refund {refund_id}: its failure was applied by {applied[0]}",
        )
    currency = str(refund.get("currency") or "").upper()
    share = _returned_share(conn, event_id, refs, _Return(0, None, currency))
    if share is None:
        return Outcome("ignored", account_id, note="no refund of the charge was applied")
    params = _base_params(event_id, account_id, now)
    params.update(
        external_refs=refs,
        refunded_minor=share[0],
        paid_minor=share[1],
        comment=f"refund {refund_id} of payment {refs[0]} {status}: credits given back",
    )
    data = _ledger_call(conn, "restore_claw_back", params, ends=(_ACCOUNT_NOT_FOUND,))
    if isinstance(data, str):
        return Outcome("ignored", account_id, note="no purchase of the account was paid by it")
    given = int(data["restored_micros"]) + int(data["bonus_restored_micros"])
    note = f"refund {refund_id} {status}" + (f" ({conflict})" if conflict else "")
    return Outcome("processed", account_id, given, note=note)


# --- the sweeper ----------------------------------------------------------------------------------


def requeue_stalled_payment_events(older_than_seconds: int = 60, as_of: str | None = None) -> int:
    """Re-queues stored events whose job never finished: status received, or processing or
    failed (below MAX_ATTEMPTS, or past it with a last attempt PARKED_RETRY_SECONDS old),
    received more than older_than_seconds before as_of (ISO time, default now), not being
    processed right now (row locked), and whose RQ job is gone (Redis lost it), dead (started
    by a worker that died) or finished without finishing the event. A job still waiting in
    the queue or for a retry is left alone. Safe to run at any time and concurrently: a
    duplicate run of an event does nothing. Returns the events re-queued."""
    now = datetime.fromisoformat(as_of) if as_of else datetime.now(UTC)
    before = now - timedelta(seconds=older_than_seconds)
    with connection() as conn, conn.transaction():
        rows = conn.execute(
            query("stalled_payment_events"),
            {
                "before": before,
                "max_attempts": MAX_ATTEMPTS,
                "parked_before": now - timedelta(seconds=PARKED_RETRY_SECONDS),
                "limit": SWEEP_BATCH,
            },
        ).fetchall()
    requeued = 0
    for event_id, _status, _attempts in rows:
        if requeue(
            PAYMENTS_QUEUE, process_event, str(event_id), job_id=str(event_id), stale_before=before
        ):
            requeued += 1
    if requeued:
        log.info("re-queued %d stalled payment events", requeued)
    return requeued
