"""Payment events whose data disagrees with what the ledger recorded: metadata naming
another account than the subscription's or the purchase's, and a lost dispute in another
currency than its payment. Through the webhook receiver and a burst RQ worker, as Stripe
sends them."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from ledger_server.db import migrate
from support import payments as payment_fixtures
from support.ledger import CREDIT, Ledger, new_account
from support.payments import PaymentsDb, bought_pack
from support.sources import Sources
from support.webhooks import (
    charge_dispute_closed,
    charge_refunded,
    event,
    invoice_paid,
    invoice_payment_paid,
    subscription_deleted,
    subscription_updated,
)
from workers import payments

AuditCheck = Callable[[], None]

payments_db = payment_fixtures.payments_db
payments_redis_url = payment_fixtures.payments_redis_url
webhook_url = payment_fixtures.webhook_url
sources = payment_fixtures.sources
apply_events = payment_fixtures.apply_events

DAYS_30 = 30 * 86400


def _subscription_checkout(account_id: str, subscription: str) -> bytes:
    """A subscription's checkout.session.completed (mode subscription): it links the
    subscription to the account."""
    return event(
        "checkout.session.completed",
        {
            "id": f"cs_test_{uuid.uuid4().hex}",
            "object": "checkout.session",
            "mode": "subscription",
            "payment_status": "paid",
            "status": "complete",
            "client_reference_id": account_id,
            "metadata": {"account_id": account_id, "kind": "subscription"},
            "subscription": subscription,
        },
    )


def _failed_with(payments_db: PaymentsDb, event_id: str, *texts: str) -> None:
    found = payments_db.event(event_id)
    assert found is not None
    assert (found["status"], found["credits_micros"]) == ("failed", 0), found
    for text in texts:
        assert text in found["last_error"], found["last_error"]


def _paid_for(payments_db: PaymentsDb, account: str) -> list[tuple[Any, ...]]:
    return payments_db.rows(
        "SELECT kind, external_ref FROM purchases WHERE account_id = %s ORDER BY created_at",
        (account,),
    )


def _subscription_of(payments_db: PaymentsDb, account: str) -> list[tuple[Any, ...]]:
    return payments_db.rows(
        "SELECT plan_id, external_ref FROM subscriptions WHERE account_id = %s", (account,)
    )


@pytest.mark.parametrize("linked_by", ["checkout", "first-invoice"])
def test_subscription_events_naming_another_account_go_to_the_subscriptions_or_fail(
    linked_by: str,
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    assert_audit_clean: AuditCheck,
) -> None:
    """The subscription is the owner's (its checkout, or its first paid invoice, linked it).
    Events whose metadata names another account (the merchant's code rewrote the
    subscription's metadata, or shares a customer between accounts): its renewal and a
    plan change fail, saying why (never naming the owner), and credit neither (the renewal
    credited the other account with the owner's period and made the subscription its own;
    the plan change granted the other account the upgrade); a refund of the owner's payment takes
    the owner's purchase back (it was ignored: the other account had no such purchase) and
    the subscription's end ends the owner's subscription, the payment log noting that the
    metadata named another account."""
    basic = sources.create_plan(100 * CREDIT, rank=1)
    pro = sources.create_plan(300 * CREDIT, rank=2)
    owner, other = new_account("sub-owner"), new_account("sub-other")
    sub, other_sub = f"sub_{uuid.uuid4().hex}", f"sub_{uuid.uuid4().hex}"
    invoice, intent = f"in_{uuid.uuid4().hex}", f"pi_{uuid.uuid4().hex}"
    start = int(time.time()) - 60
    end = start + DAYS_30
    if linked_by == "checkout":
        apply_events(_subscription_checkout(owner, sub))
    # The other account has a subscription of its own, on the basic plan too.
    apply_events(
        invoice_paid(owner, sub, basic.provider_price_id, start, end, invoice),
        invoice_payment_paid(invoice, intent),
        invoice_paid(other, other_sub, basic.provider_price_id, start, end),
    )
    ledger.consume(owner, 40 * CREDIT)

    upgrade, renewal = apply_events(
        subscription_updated(
            other, sub, pro.provider_price_id, start, end, previous_price_id=basic.provider_price_id
        ),
        invoice_paid(other, sub, basic.provider_price_id, end, end + DAYS_30),
    )
    for refused in (upgrade, renewal):
        _failed_with(
            payments_db, refused, f"{sub} is linked to another account than {other}, which"
        )
        assert owner not in payments_db.event(refused)["last_error"]  # type: ignore[index]
    assert ledger.balance(owner).balance_micros == 60 * CREDIT
    assert ledger.balance(other).balance_micros == 100 * CREDIT
    assert _paid_for(payments_db, owner) == [("subscription", invoice)]
    assert len(_paid_for(payments_db, other)) == 1
    assert _subscription_of(payments_db, other) == [(basic.plan_id, other_sub)]

    [refund] = apply_events(
        charge_refunded(intent, amount=1000, amount_refunded=1000, account_id=other)
    )
    refunded = payments_db.event(refund)
    assert refunded is not None
    assert (refunded["status"], refunded["credits_micros"], refunded["account_id"]) == (
        "processed",
        -60 * CREDIT,
        owner,
    )
    assert "metadata names another account than the purchase's" in refunded["last_error"]
    assert ledger.balance(owner).balance_micros == 0
    assert ledger.balance(other).balance_micros == 100 * CREDIT

    [ended] = apply_events(subscription_deleted(other, sub, int(time.time())))
    deleted = payments_db.event(ended)
    assert deleted is not None
    assert (deleted["status"], deleted["account_id"]) == ("processed", owner)
    assert "metadata names another account" in deleted["last_error"]
    [(ended_at,)] = payments_db.rows(
        "SELECT ended_at FROM subscriptions WHERE account_id = %s AND external_ref = %s",
        (owner, sub),
    )
    assert ended_at is not None
    assert payments_db.rows(
        "SELECT ended_at FROM subscriptions WHERE account_id = %s", (other,)
    ) == [(None,)]
    assert_audit_clean()


def test_a_subscriptions_checkout_for_another_account_than_its_first_invoice_fails(
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
) -> None:
    """The first paid invoice linked the subscription to its account; a checkout completing
    it for another then fails, and the other account's later invoices credit nobody."""
    plan = sources.create_plan(100 * CREDIT, rank=1)
    owner, other = new_account("first-invoice"), new_account("late-checkout")
    sub, start = f"sub_{uuid.uuid4().hex}", int(time.time()) - 60
    apply_events(invoice_paid(owner, sub, plan.provider_price_id, start, start + DAYS_30))
    [checkout] = apply_events(_subscription_checkout(other, sub))
    _failed_with(payments_db, checkout, f"{sub} is linked to another account than {other}")
    [renewal] = apply_events(
        invoice_paid(other, sub, plan.provider_price_id, start + DAYS_30, start + 2 * DAYS_30)
    )
    _failed_with(payments_db, renewal, f"{sub} is linked to another account than {other}")
    assert _paid_for(payments_db, other) == []


def test_a_checkout_a_previous_releases_worker_recorded_links_the_subscription(
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
) -> None:
    """In a rolling deploy a previous release's worker records a subscription's checkout
    session but no subscription_accounts row: the next invoice without account metadata
    failed EventNotReady for ever (the period never credited), and one naming another
    account credited it and took the subscription. The latest checkout session of the
    subscription stands for the link until one is made."""
    plan = sources.create_plan(100 * CREDIT, rank=1)
    owner, other = new_account("old-worker-owner"), new_account("old-worker-other")
    sub, start = f"sub_{uuid.uuid4().hex}", int(time.time()) - 60
    payments_db.rows(  # a session of this ledger, completed by the previous release: no link
        "INSERT INTO checkout_sessions (session_id, account_id, idempotency_key, request_hash,"
        " kind, plan_id, amount_minor, currency, url, subscription_ref, created_at,"
        " completed_at) VALUES (%s, %s, %s, '\\x00', 'subscription', %s, 1000, 'USD',"
        " 'https://checkout.example/s', %s, now(), now()) RETURNING 1",
        (f"cs_test_{uuid.uuid4().hex}", owner, f"old-{uuid.uuid4().hex}", plan.plan_id, sub),
    )

    [naming_other] = apply_events(
        invoice_paid(other, sub, plan.provider_price_id, start, start + DAYS_30)
    )
    _failed_with(payments_db, naming_other, f"{sub} is linked to another account than {other}")
    [anonymous] = apply_events(
        invoice_paid("", sub, plan.provider_price_id, start, start + DAYS_30)
    )
    paid = payments_db.event(anonymous)
    assert paid is not None
    assert (paid["status"], paid["credits_micros"]) == ("processed", 100 * CREDIT), paid
    assert ledger.balance(owner).balance_micros == 100 * CREDIT
    assert payments_db.rows(
        "SELECT account_id FROM subscription_accounts WHERE subscription_ref = %s", (sub,)
    ) == [(owner,)]


def test_a_partial_dispute_in_another_currency_than_the_payment_is_not_the_whole_purchase(
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    configure: Any,
    ledger_db_url: str,
    payments_redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    assert_audit_clean: AuditCheck,
) -> None:
    """The payment was recorded as 2000 USD; a lost dispute of 500 EUR (disputes are in the
    charge's currency) has no amount of the charge in EUR to be a share of: it fails for an
    operator, taking nothing (it took all 100 credits). Once a refund of the charge names
    the charge's amount in EUR, its retry takes its share, 500 of 2000 EUR."""
    account, intent = bought_pack(apply_events, sources, configure, "dispute-eur", 2000)
    [lost] = apply_events(charge_dispute_closed(intent, 500, "lost", currency="eur"))
    _failed_with(payments_db, lost, "500 EUR", "no amount of the charge in EUR is known")
    assert ledger.balance(account).balance_micros == 100 * CREDIT

    [refund] = apply_events(charge_refunded(intent, 2000, 500, currency="eur"))
    assert payments_db.event(refund)["credits_micros"] == -25 * CREDIT  # type: ignore[index]
    monkeypatch.setenv("DATABASE_URL", ledger_db_url)
    monkeypatch.setenv("REDIS_URL", payments_redis_url)
    assert payments.process_event(lost) == "processed"  # its retry
    assert payments_db.event(lost)["credits_micros"] == -25 * CREDIT  # type: ignore[index]
    assert ledger.balance(account).balance_micros == 50 * CREDIT
    assert_audit_clean()


def test_migration_0036_links_the_subscriptions_the_ledger_knew(
    ledger_db_url: str, sources: Sources
) -> None:
    """The link the previous release read (the latest checkout session of the subscription)
    stands; else the account of the subscription's earliest applied paid invoice (a later
    one naming another account is the defect's); else the account whose subscription it is
    (of two, the earliest)."""
    plan = sources.create_plan(10 * CREDIT, rank=1)
    [migration] = [m for m in migrate.migrations() if m.version == 36]
    older, checked_out, first_paid, later_paid, by_row, second_row = (
        new_account(f"m36-{n}") for n in ("older", "checkout", "first", "later", "row", "row2")
    )
    via_checkout, via_invoice, via_row = (f"sub_{uuid.uuid4().hex}" for _ in range(3))
    old_api = {"subscription": {"id": via_invoice, "object": "subscription"}}
    new_api = {"parent": {"subscription_details": {"subscription": via_invoice}}}
    with psycopg.connect(ledger_db_url) as conn:  # rolled back: leaves nothing behind
        conn.execute("DROP TABLE subscription_accounts")  # as before this release
        for account in (older, checked_out, first_paid, later_paid, by_row, second_row):
            conn.execute("SELECT ledger_open_account(%s, '', now())", (account,))
        for account, age in ((older, "2 days"), (checked_out, "1 day")):
            conn.execute(
                "INSERT INTO checkout_sessions (session_id, account_id, idempotency_key,"
                " request_hash, kind, plan_id, amount_minor, currency, url, subscription_ref,"
                " created_at) VALUES (%s, %s, 'k', '\\x00', 'subscription', %s, 1000, 'USD',"
                " 'https://x.example/', %s, now() - %s::interval)",
                (f"cs_old_{uuid.uuid4().hex}", account, plan.plan_id, via_checkout, age),
            )
        for account, invoice, age in (
            (later_paid, new_api, "1 day"),
            (first_paid, old_api, "2 days"),
        ):
            conn.execute(
                "INSERT INTO payment_events (event_id, type, account_id, payload, received_at,"
                " status, processed_at) VALUES (%s, 'invoice.paid', %s, %s, now() - %s::interval,"
                " 'processed', now())",
                (f"evt_{uuid.uuid4().hex}", account, Jsonb({"data": {"object": invoice}}), age),
            )
        for account, ref, age in (
            (later_paid, via_invoice, "1 day"),
            (second_row, via_row, "1 day"),
            (by_row, via_row, "3 days"),
            (older, via_checkout, "1 day"),
        ):
            conn.execute(
                "INSERT INTO subscriptions (account_id, plan_id, current_period_start,"
                " current_period_end, external_ref, updated_at)"
                " VALUES (%s, %s, now(), now() + interval '30 days', %s, now() - %s::interval)",
                (account, plan.plan_id, ref, age),
            )
        conn.execute(migration.sql.encode())
        links = conn.execute(
            "SELECT subscription_ref, account_id FROM subscription_accounts"
            " WHERE subscription_ref = ANY(%s)",
            ([via_checkout, via_invoice, via_row],),
        ).fetchall()
        conn.rollback()
    assert sorted(links) == sorted(
        [(via_checkout, checked_out), (via_invoice, first_paid), (via_row, by_row)]
    )
