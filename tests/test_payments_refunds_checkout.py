"""Payments (issue 5): refunds claw back only unspent credits (must-show 4), subscription
invoices, Checkout Sessions against a local Stripe double, and the payment log RPC."""

from __future__ import annotations

import functools
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import grpc
import psycopg
import pytest

from ledger.v1 import admin_service_pb2 as admin_pb
from ledger.v1 import billing_service_pb2 as billing_pb
from ledger.v1 import billing_service_pb2_grpc, ledger_service_pb2_grpc, types_pb2
from ledger.v1 import ledger_service_pb2 as pb
from ledger_client import LedgerClient
from ledger_server.clock import OffsetClock
from ledger_server.config import Settings, StripeSettings
from ledger_server.db import migrate
from ledger_server.ledger import page_tokens
from ledger_server.server.stripe_checkout import STRIPE_THREADS, stripe_idempotency_key
from support import payments as payment_fixtures
from support.client import FAST_RETRY
from support.ledger import CREDIT, Ledger, expect_error, new_account, new_key
from support.payments import PaymentsDb, bought_pack
from support.rq_workers import run_burst_workers
from support.server import ServerThread
from support.sources import Sources
from support.stripe_double import StripeDouble
from support.webhooks import (
    charge_dispute_closed,
    charge_refunded,
    checkout_pack,
    checkout_recharge,
    deliver,
    event,
    invoice_line,
    invoice_paid,
    invoice_payment_paid,
    subscription_deleted,
    subscription_updated,
)
from workers import db as worker_db
from workers import payments, sweepers

AuditCheck = Callable[[], None]

# The shared fixtures of the payment tests (tests/support/payments.py).
payments_db = payment_fixtures.payments_db
payments_redis_url = payment_fixtures.payments_redis_url
webhook_url = payment_fixtures.webhook_url
sources = payment_fixtures.sources
apply_events = payment_fixtures.apply_events


@pytest.fixture
def rerun(
    ledger_db_url: str, payments_redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> Callable[[str], str]:
    """Runs an event's job again here, as RQ's retry of it would."""
    monkeypatch.setenv("DATABASE_URL", ledger_db_url)
    monkeypatch.setenv("REDIS_URL", payments_redis_url)
    return payments.process_event


def _clawbacks(ledger: Ledger, account: str) -> list[pb.Transaction]:
    return [t for t in ledger.transactions(account) if t.kind == pb.TRANSACTION_KIND_ADJUSTMENT]


# --- must-show 4: refunds ------------------------------------------------------------------------


def test_refund_of_a_partly_spent_pack_takes_back_only_the_unspent_unheld_part(
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    configure: Any,
    assert_audit_clean: AuditCheck,
) -> None:
    account, intent = bought_pack(apply_events, sources, configure, "refund", 2500)
    ledger.consume(account, 30 * CREDIT)
    ledger.reserve(account, 20 * CREDIT)  # held: not taken back either

    [refund] = apply_events(charge_refunded(intent, amount=2500, amount_refunded=2500))

    balance = ledger.balance(account)
    assert (balance.balance_micros, balance.held_micros) == (20 * CREDIT, 20 * CREDIT)
    assert balance.available_micros == 0
    event = payments_db.event(refund)
    assert event is not None
    assert (event["status"], event["credits_micros"]) == ("processed", -50 * CREDIT)
    [clawback] = _clawbacks(ledger, account)
    assert clawback.amount_micros == -50 * CREDIT
    assert intent in clawback.comment and clawback.external_ref == intent
    assert sorted(p.amount_micros for p in clawback.postings) == [-50 * CREDIT, 50 * CREDIT]

    # The same refund delivered again, or a second event saying the same, takes nothing more.
    apply_events(charge_refunded(intent, amount=2500, amount_refunded=2500))
    assert ledger.balance(account).balance_micros == 20 * CREDIT
    assert len(_clawbacks(ledger, account)) == 1
    assert_audit_clean()


def test_a_refund_that_takes_the_balance_below_the_threshold_records_an_alert(
    apply_events: Callable[..., list[str]],
    sources: Sources,
    ledger: Ledger,
    admin: Any,
    configure: Any,
) -> None:
    """DESIGN.md section 7: a crossing is alerted whatever lowered the balance."""
    account, intent = bought_pack(apply_events, sources, configure, "refund-alert", 2500)
    admin.SetLowBalanceAlert(
        admin_pb.SetLowBalanceAlertRequest(
            account_id=account, threshold_micros=20 * CREDIT, idempotency_key=new_key()
        )
    )
    apply_events(charge_refunded(intent, amount=2500, amount_refunded=2500))
    [clawback] = _clawbacks(ledger, account)
    alerts = admin.ListLowBalanceAlerts(
        admin_pb.ListLowBalanceAlertsRequest(account_id=account)
    ).alerts
    assert [(a.balance_micros, a.transaction_id) for a in alerts] == [(0, clawback.transaction_id)]


def test_partial_refunds_take_their_share_and_never_drive_the_balance_negative(
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    configure: Any,
    assert_audit_clean: AuditCheck,
) -> None:
    account, intent = bought_pack(apply_events, sources, configure, "partial", 2000)
    ledger.consume(account, 10 * CREDIT)

    # Half refunded: half the pack (50) is still there, so all of it goes.
    [half] = apply_events(charge_refunded(intent, amount=2000, amount_refunded=1000))
    assert ledger.balance(account).balance_micros == 40 * CREDIT
    # The rest refunded (amount_refunded is cumulative): 50 more are owed, 40 are left.
    ledger_event = apply_events(charge_refunded(intent, amount=2000, amount_refunded=2000))
    assert ledger.balance(account).balance_micros == 0
    assert [payments_db.event(e)["credits_micros"] for e in (half, *ledger_event)] == [  # type: ignore[index]
        -50 * CREDIT,
        -40 * CREDIT,
    ]
    assert [t.amount_micros for t in _clawbacks(ledger, account)] == [-40 * CREDIT, -50 * CREDIT]
    assert_audit_clean()


def test_credits_refunded_into_a_refunded_purchase_go_where_its_refund_sent_the_rest(
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    configure: Any,
    assert_audit_clean: AuditCheck,
) -> None:
    """Pay 100, spend 60, the payment refunded: 40 were unspent and taken back. A Refund of
    the 60's charge then put them back into the pack's lot, and the customer kept credits
    of a payment refunded in full (helper-62). What the refund still owed is taken as the
    credits come back."""
    account, intent = bought_pack(apply_events, sources, configure, "refunded-twice", 2000)
    spent = ledger.consume(account, 60 * CREDIT).reservation.reservation_id
    [refund] = apply_events(charge_refunded(intent, amount=2000, amount_refunded=2000))
    assert payments_db.event(refund)["credits_micros"] == -40 * CREDIT  # type: ignore[index]
    assert ledger.balance(account).balance_micros == 0
    answered = ledger.refund(account, spent)
    assert answered.refunded_micros == 60 * CREDIT
    assert answered.balance.balance_micros == 0
    assert ledger.balance(account).balance_micros == 0
    clawbacks = _clawbacks(ledger, account)
    assert sorted(-t.amount_micros for t in clawbacks) == [40 * CREDIT, 60 * CREDIT]
    assert all(t.external_ref == intent for t in clawbacks)
    [(clawed, owed)] = payments_db.rows(
        "SELECT clawed_back_micros, claw_back_owed_micros FROM purchases WHERE account_id = %s",
        (account,),
    )
    assert (clawed, owed) == (100 * CREDIT, 0)
    assert_audit_clean()


def test_only_what_a_refund_returns_is_taken_for_a_refunded_payment(
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    configure: Any,
    assert_audit_clean: AuditCheck,
) -> None:
    """Held when the payment was refunded, 60 credits stay the customer's once released;
    a later Refund of a 5-credit charge gives back 5, and only those 5 are taken for the
    payment (helper-66: the settle took all 60 then)."""
    account, intent = bought_pack(apply_events, sources, configure, "held-at-refund", 2000)
    held = ledger.reserve(account, 60 * CREDIT).reservation.reservation_id
    [refund] = apply_events(charge_refunded(intent, amount=2000, amount_refunded=2000))
    assert payments_db.event(refund)["credits_micros"] == -40 * CREDIT  # type: ignore[index]
    ledger.release(account, held)
    charged = ledger.consume(account, 5 * CREDIT).reservation.reservation_id
    assert ledger.balance(account).balance_micros == 55 * CREDIT
    answered = ledger.refund(account, charged)
    assert answered.balance.balance_micros == 55 * CREDIT
    [(clawed, owed)] = payments_db.rows(
        "SELECT clawed_back_micros, claw_back_owed_micros FROM purchases WHERE account_id = %s",
        (account,),
    )
    assert (clawed, owed) == (45 * CREDIT, 55 * CREDIT)
    assert_audit_clean()


def test_refund_of_a_recharge_takes_the_same_share_of_its_bonus(
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    ledger: Ledger,
    assert_audit_clean: AuditCheck,
) -> None:
    # Defaults: 1 credit per 1.00 CNY; 300.00 earns a 30-credit bonus lot (seed 002).
    account, intent = new_account("recharge"), f"pi_{uuid.uuid4().hex}"
    [paid] = apply_events(checkout_recharge(account, 30000, payment_intent=intent))
    assert payments_db.event(paid)["credits_micros"] == 330 * CREDIT  # type: ignore[index]
    ledger.consume(account, 100 * CREDIT)  # from the recharge lot (created first)

    # Half refunded: half the recharge (150 of its 200 left) and half the bonus (15).
    [refund] = apply_events(charge_refunded(intent, amount=30000, amount_refunded=15000))
    assert payments_db.event(refund)["credits_micros"] == -165 * CREDIT  # type: ignore[index]
    assert ledger.balance(account).balance_micros == 65 * CREDIT
    lots = {lot.source: lot for lot in ledger.lots(account, include_inactive=True)}
    assert [p.amount_micros for p in _clawbacks(ledger, account)[0].postings] == [
        -150 * CREDIT,
        150 * CREDIT,
        -15 * CREDIT,
        15 * CREDIT,
    ]
    assert len(lots) == 2
    assert_audit_clean()


def test_a_lost_chargeback_takes_back_what_is_left_of_the_purchase(
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    configure: Any,
    assert_audit_clean: AuditCheck,
) -> None:
    account, intent = bought_pack(apply_events, sources, configure, "disputed", 2500)
    ledger.consume(account, 30 * CREDIT)

    won, lost = apply_events(
        charge_dispute_closed(intent, 2500, "won"), charge_dispute_closed(intent, 2500, "lost")
    )
    assert payments_db.event(won)["status"] == "ignored"  # type: ignore[index]
    assert payments_db.event(lost)["credits_micros"] == -70 * CREDIT  # type: ignore[index]
    assert ledger.balance(account).balance_micros == 0
    [clawback] = _clawbacks(ledger, account)
    assert "disputed and lost" in clawback.comment and clawback.external_ref == intent
    assert_audit_clean()


def test_a_refunded_subscription_payment_is_found_through_its_invoice(
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    assert_audit_clean: AuditCheck,
) -> None:
    """Since API version 2025-03-31 a charge no longer names its invoice: the refund names
    the payment intent, the period's purchase is under the invoice, and invoice_payment.paid
    joins them."""
    plan = sources.create_plan(100 * CREDIT, rank=1)
    account, sub = new_account("sub-refund"), f"sub_{uuid.uuid4().hex}"
    invoice, intent = f"in_{uuid.uuid4().hex}", f"pi_{uuid.uuid4().hex}"
    start = int(time.time()) - 60
    ledger_events = apply_events(
        invoice_paid(account, sub, plan.provider_price_id, start, start + 30 * 86400, invoice),
        invoice_payment_paid(invoice, intent),
    )
    assert [payments_db.event(e)["status"] for e in ledger_events] == ["processed"] * 2  # type: ignore[index]
    ledger.consume(account, 25 * CREDIT)
    [refund] = apply_events(charge_refunded(intent, amount=1000, amount_refunded=1000))
    assert payments_db.event(refund)["credits_micros"] == -75 * CREDIT  # type: ignore[index]
    assert ledger.balance(account).balance_micros == 0
    assert_audit_clean()


def _upgraded_subscriber(
    apply_events: Callable[..., list[str]], sources: Sources, ledger: Ledger, name: str
) -> tuple[str, str, Callable[[str], bytes]]:
    """An account whose basic period (100 credits, paid by a payment intent, 40 spent) was
    upgraded to pro (300) mid-period: 60 carried over. Returns the account, the payment
    intent, and the event of a further upgrade to a plan's price."""
    basic = sources.create_plan(100 * CREDIT, rank=1)
    pro = sources.create_plan(300 * CREDIT, rank=2)
    account, sub = new_account(name), f"sub_{uuid.uuid4().hex}"
    invoice, intent = f"in_{uuid.uuid4().hex}", f"pi_{uuid.uuid4().hex}"
    start = int(time.time()) - 60
    end = start + 30 * 86400
    apply_events(
        invoice_paid(account, sub, basic.provider_price_id, start, end, invoice),
        invoice_payment_paid(invoice, intent),
    )
    ledger.consume(account, 40 * CREDIT)
    apply_events(
        subscription_updated(
            account,
            sub,
            pro.provider_price_id,
            start,
            end,
            previous_price_id=basic.provider_price_id,
        )
    )
    assert ledger.balance(account).balance_micros == 360 * CREDIT  # 60 carried + 300

    def upgrade(price_id: str) -> bytes:
        return subscription_updated(
            account, sub, price_id, start, end, previous_price_id=pro.provider_price_id,
            created=int(time.time()) + 1,
        )  # fmt: skip

    return account, intent, upgrade


def test_a_refunded_subscription_payment_takes_back_what_an_upgrade_carried_over(
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    assert_audit_clean: AuditCheck,
) -> None:
    """The upgrade emptied the period's lot into a carry-over lot: the refund of that
    period's payment follows its credits there (the pro plan's own 300 stay)."""
    account, intent, _ = _upgraded_subscriber(apply_events, sources, ledger, "sub-refund-up")
    [refund] = apply_events(charge_refunded(intent, amount=1000, amount_refunded=1000))
    assert payments_db.event(refund)["credits_micros"] == -60 * CREDIT  # type: ignore[index]
    assert ledger.balance(account).balance_micros == 300 * CREDIT
    [clawback] = _clawbacks(ledger, account)
    carried = [p for p in clawback.postings if p.lot_id]
    assert [(p.source, p.amount_micros) for p in carried] == [
        (types_pb2.CREDIT_SOURCE_SUBSCRIPTION_CARRY_OVER, -60 * CREDIT)
    ]
    # Delivered again: nothing more.
    apply_events(charge_refunded(intent, amount=1000, amount_refunded=1000))
    assert ledger.balance(account).balance_micros == 300 * CREDIT
    assert_audit_clean()


def test_partial_refunds_after_an_upgrade_take_back_no_more_than_was_carried(
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    assert_audit_clean: AuditCheck,
) -> None:
    """Two upgrades carry basic's 60 unspent credits (40 were spent) into a carry-over lot
    and then, with pro's 300, into a second one of 360. Half the basic payment refunded,
    then all of it: the share asks for 50 and then 100, but only 60 were carried: 50 from
    the second carry-over lot (followed there), then 10 more."""
    account, intent, upgrade = _upgraded_subscriber(
        apply_events, sources, ledger, "sub-refund-part"
    )
    ultra = sources.create_plan(1000 * CREDIT, rank=3)
    apply_events(upgrade(ultra.provider_price_id))
    assert ledger.balance(account).balance_micros == 1360 * CREDIT  # 360 carried + 1000
    [half] = apply_events(charge_refunded(intent, amount=1000, amount_refunded=500))
    assert payments_db.event(half)["credits_micros"] == -50 * CREDIT  # type: ignore[index]
    [rest] = apply_events(charge_refunded(intent, amount=1000, amount_refunded=1000))
    assert payments_db.event(rest)["credits_micros"] == -10 * CREDIT  # type: ignore[index]
    assert ledger.balance(account).balance_micros == 1300 * CREDIT  # pro's and ultra's stay
    assert_audit_clean()


def test_credits_refunded_into_a_carry_over_lot_settle_what_a_refunded_period_owes(
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    assert_audit_clean: AuditCheck,
) -> None:
    """Basic's 60 unspent credits were carried over by the upgrade, then spent from the
    carry-over lot: the refund of basic's payment finds nothing and owes 100. A Refund of
    that charge puts 60 back into the carry-over lot: they are basic's, and taken as the
    claw-back would have taken them (helper-96: only the period's own lot was settled, and
    the balance was 360)."""
    account, intent, _ = _upgraded_subscriber(apply_events, sources, ledger, "carry-settle")
    spent = ledger.consume(account, 60 * CREDIT).reservation.reservation_id
    [refund] = apply_events(charge_refunded(intent, amount=1000, amount_refunded=1000))
    assert payments_db.event(refund)["credits_micros"] == 0  # type: ignore[index]
    assert ledger.balance(account).balance_micros == 300 * CREDIT
    ledger.refund(account, spent)
    assert ledger.balance(account).balance_micros == 300 * CREDIT
    [owed] = payments_db.rows(
        "SELECT clawed_back_micros, claw_back_owed_micros FROM purchases"
        " WHERE account_id = %s ORDER BY purchase_id LIMIT 1",
        (account,),
    )
    assert owed == (60 * CREDIT, 40 * CREDIT)  # the 40 spent before the upgrade stay owed
    [settled] = _clawbacks(ledger, account)
    assert [(p.source, p.amount_micros, p.memo) for p in settled.postings if p.lot_id] == [
        (
            types_pb2.CREDIT_SOURCE_SUBSCRIPTION_CARRY_OVER,
            -60 * CREDIT,
            "refund: carried-over credits clawed back",
        )
    ]
    assert_audit_clean()


def test_what_a_carry_over_lot_gets_back_settles_no_more_than_the_period_carried(
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    assert_audit_clean: AuditCheck,
) -> None:
    """A second upgrade carries basic's 60 and pro's 300 into one carry-over lot of 360, all
    spent; basic's payment refunded in full owes 100. A Refund returns the 360: basic
    carried over only 60, so 60 are taken, and pro's 300 stay."""
    account, intent, upgrade = _upgraded_subscriber(apply_events, sources, ledger, "carry-cap")
    ultra = sources.create_plan(1000 * CREDIT, rank=3)
    apply_events(upgrade(ultra.provider_price_id))
    assert ledger.balance(account).balance_micros == 1360 * CREDIT  # 360 carried + 1000
    carried = [lot for lot in ledger.lots(account) if lot.remaining_micros == 360 * CREDIT]
    assert len(carried) == 1
    spent = ledger.consume(account, 360 * CREDIT).reservation.reservation_id
    left = [lot.remaining_micros for lot in ledger.lots(account) if lot.lot_id == carried[0].lot_id]
    assert sum(left) == 0  # spent from the carry-over lot
    [refund] = apply_events(charge_refunded(intent, amount=1000, amount_refunded=1000))
    assert payments_db.event(refund)["credits_micros"] == 0  # type: ignore[index]
    ledger.refund(account, spent)
    assert ledger.balance(account).balance_micros == 1300 * CREDIT
    assert_audit_clean()


def test_two_refunds_of_one_payment_pending_together_are_both_applied(
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    configure: Any,
) -> None:
    account, intent = bought_pack(apply_events, sources, configure, "two-refunds", 2000)
    first, second = apply_events(
        charge_refunded(intent, amount=2000, amount_refunded=500),
        charge_refunded(intent, amount=2000, amount_refunded=1000),
    )
    assert [payments_db.event(e)["credits_micros"] for e in (first, second)] == [  # type: ignore[index]
        -25 * CREDIT,
        -25 * CREDIT,
    ]
    assert ledger.balance(account).balance_micros == 50 * CREDIT


def test_a_refund_of_an_unknown_payment_is_recorded_and_ignored(
    apply_events: Callable[..., list[str]], payments_db: PaymentsDb
) -> None:
    [refund] = apply_events(charge_refunded(f"pi_{uuid.uuid4().hex}", 1000, 1000))
    event = payments_db.event(refund)
    assert event is not None
    assert (event["status"], event["credits_micros"]) == ("ignored", 0)
    assert "no purchase" in event["last_error"]


@pytest.fixture
def sweep_and_apply(
    ledger_db_url: str, payments_redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> Callable[[], int]:
    """Runs the payment sweeper (as the scheduler would), then a burst worker: what a
    wake put back to 'received' is applied. Returns how many events were re-queued."""
    monkeypatch.setenv("DATABASE_URL", ledger_db_url)
    monkeypatch.setenv("REDIS_URL", payments_redis_url)

    def sweep() -> int:
        requeued = payments.requeue_stalled_payment_events(older_than_seconds=0)
        run_burst_workers(ledger_db_url, payments_redis_url)
        return requeued

    return sweep


def test_a_refund_delivered_before_its_payment_is_applied_once_the_purchase_is(
    apply_events: Callable[..., list[str]],
    sweep_and_apply: Callable[[], int],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    configure: Any,
    assert_audit_clean: AuditCheck,
) -> None:
    """Stripe delivers in any order: a refund handled before its payment's event found no
    purchase and was ignored, and the credits granted later stayed (helper-57). Recording
    the purchase now wakes it."""
    configure("purchase.allow_free_users", True)
    pack = sources.create_pack(100 * CREDIT, price_minor=2000)
    account, intent = new_account("refund-first"), f"pi_{uuid.uuid4().hex}"
    [refund] = apply_events(charge_refunded(intent, amount=2000, amount_refunded=2000))
    assert payments_db.event(refund)["status"] == "ignored"  # type: ignore[index]
    [bought] = apply_events(checkout_pack(account, pack.pack_id, payment_intent=intent))
    assert payments_db.event(bought)["credits_micros"] == 100 * CREDIT  # type: ignore[index]
    assert sweep_and_apply() >= 1
    event = payments_db.event(refund)
    assert event is not None
    assert (event["status"], event["credits_micros"]) == ("processed", -100 * CREDIT)
    assert ledger.balance(account).balance_micros == 0
    assert sweep_and_apply() == 0  # applied once: nothing is woken again
    assert ledger.balance(account).balance_micros == 0
    assert_audit_clean()


def _lock_waits(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone()
    return int(row[0]) if row else 0


def _await_lock_waits(url: str, count: int) -> None:
    deadline = time.monotonic() + 30
    while _lock_waits(url) < count:
        assert time.monotonic() < deadline, f"never {count} sessions waiting on a lock"
        time.sleep(0.02)


def test_a_refund_running_as_its_payment_is_recorded_is_woken_when_it_ends(
    webhook_url: str,
    ledger_db_url: str,
    sweep_and_apply: Callable[[], int],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    configure: Any,
    assert_audit_clean: AuditCheck,
) -> None:
    """The refund's job checked that no event of its payment was waiting, then waited for
    the busy account; meanwhile the payment's checkout arrived and woke only refunds already
    ignored, not this one, which then found no purchase and was ignored for good: the
    customer kept the refunded pack (helper-75). The wake now waits for the refund's run to
    end and wakes it if it ended ignored."""
    configure("purchase.allow_free_users", True)
    pack = sources.create_pack(100 * CREDIT, price_minor=2500)
    account, intent = new_account("refund-racing"), f"pi_{uuid.uuid4().hex}"
    ledger.grant(account, 1)
    refund_body = charge_refunded(intent, amount=2500, amount_refunded=2500, account_id=account)
    checkout_body = checkout_pack(account, pack.pack_id, payment_intent=intent)
    outcomes: dict[str, str] = {}

    def run(name: str, body: bytes) -> None:
        outcomes[name] = payments.process_event(str(json.loads(body)["id"]))

    busy = psycopg.connect(ledger_db_url)  # another transaction holds the account
    try:
        busy.execute("SELECT FROM accounts WHERE account_id = %s FOR UPDATE", (account,))
        assert deliver(webhook_url, refund_body) == 200  # stored; its job is run here
        refund = threading.Thread(target=run, args=("refund", refund_body))
        refund.start()
        _await_lock_waits(ledger_db_url, 1)  # the refund waits for the account
        assert deliver(webhook_url, checkout_body) == 200
        checkout = threading.Thread(target=run, args=("checkout", checkout_body))
        checkout.start()
        _await_lock_waits(ledger_db_url, 2)  # the checkout waits too
        busy.rollback()
        refund.join(30)
        checkout.join(30)
    finally:
        busy.close()
    assert outcomes == {"refund": "ignored", "checkout": "processed"}
    sweep_and_apply()  # the woken refund runs again, after its purchase
    event = payments_db.event(str(json.loads(refund_body)["id"]))
    assert event is not None
    assert (event["status"], event["credits_micros"]) == ("processed", -100 * CREDIT)
    assert ledger.balance(account).balance_micros == CREDIT
    assert_audit_clean()


def test_a_subscription_refund_delivered_before_its_invoice_payment_is_applied_after_it(
    apply_events: Callable[..., list[str]],
    sweep_and_apply: Callable[[], int],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    assert_audit_clean: AuditCheck,
) -> None:
    """Since API version 2025-03-31 only invoice_payment.paid joins a refund's payment
    intent to the invoice: a refund handled before it is woken by it (helper-57)."""
    plan = sources.create_plan(100 * CREDIT, rank=1)
    account, sub = new_account("sub-refund-first"), f"sub_{uuid.uuid4().hex}"
    invoice, intent = f"in_{uuid.uuid4().hex}", f"pi_{uuid.uuid4().hex}"
    start = int(time.time()) - 60
    apply_events(
        invoice_paid(account, sub, plan.provider_price_id, start, start + 30 * 86400, invoice)
    )
    [refund] = apply_events(charge_refunded(intent, amount=1000, amount_refunded=1000))
    assert payments_db.event(refund)["status"] == "ignored"  # type: ignore[index]
    apply_events(invoice_payment_paid(invoice, intent))
    sweep_and_apply()
    assert payments_db.event(refund)["credits_micros"] == -100 * CREDIT  # type: ignore[index]
    assert ledger.balance(account).balance_micros == 0
    assert_audit_clean()


def _proration_invoice(
    account: str, sub: str, old_price: str, new_price: str, changed: int, end: int
) -> tuple[bytes, str]:
    """The invoice of an upgrade's prorations, as Stripe makes it: the old plan's unused
    time (negative), the new plan's remaining time (positive). Returns it and its id."""
    invoice = f"in_{uuid.uuid4().hex}"
    body = invoice_paid(
        account, sub, new_price, changed, end, invoice, billing_reason="subscription_update",
        lines=[invoice_line(old_price, changed, end, proration=True, amount=-300),
               invoice_line(new_price, changed, end, proration=True, amount=1000)],
    )  # fmt: skip
    return body, invoice


def test_a_refunded_upgrade_payment_takes_the_upgrades_credits_back(
    apply_events: Callable[..., list[str]],
    sweep_and_apply: Callable[[], int],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    assert_audit_clean: AuditCheck,
) -> None:
    """An upgrade within the period is granted by customer.subscription.updated under a
    reference of its own; the invoice of its prorations paid for it. Before, that invoice
    was passed over and a refund of its payment found no purchase: the customer kept the
    pro plan's credits (helper-57). Stripe sends the invoice and the update at once, in
    any order: here the invoice and its refund come first (helper-61: linked then to the
    plan of the old line), and the refund is woken once the payment is joined."""
    account, sub, basic, pro, start, end = _subscriber(apply_events, sources, ledger)
    changed = int(time.time()) - 10
    proration, invoice = _proration_invoice(
        account, sub, basic.provider_price_id, pro.provider_price_id, changed, end
    )
    intent = f"pi_{uuid.uuid4().hex}"
    [refund] = apply_events(charge_refunded(intent, amount=700, amount_refunded=700))
    assert payments_db.event(refund)["status"] == "ignored"  # type: ignore[index]
    [prorated, _] = apply_events(proration, invoice_payment_paid(invoice, intent, 700))
    assert payments_db.event(prorated)["status"] == "processed"  # type: ignore[index]
    apply_events(
        subscription_updated(
            account, sub, pro.provider_price_id, start, end,
            previous_price_id=basic.provider_price_id,
        )
    )  # fmt: skip
    assert ledger.balance(account).balance_micros == 360 * CREDIT  # 60 carried + 300
    sweep_and_apply()
    assert payments_db.event(refund)["credits_micros"] == -300 * CREDIT  # type: ignore[index]
    assert ledger.balance(account).balance_micros == 60 * CREDIT  # what basic carried over
    assert_audit_clean()


def test_the_refund_of_an_upgrade_undone_since_takes_that_upgrades_credits_back(
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    assert_audit_clean: AuditCheck,
) -> None:
    """Basic to pro, then back to basic, the pro invoice handled last: it paid for pro,
    whatever the plan is now (helper-61: linked to basic, its refund took nothing)."""
    account, sub, basic, pro, start, end = _subscriber(apply_events, sources, ledger)
    now = int(time.time())
    apply_events(
        subscription_updated(account, sub, pro.provider_price_id, start, end,
                             previous_price_id=basic.provider_price_id, created=now - 5),
    )  # fmt: skip
    apply_events(
        subscription_updated(account, sub, basic.provider_price_id, start, end,
                             previous_price_id=pro.provider_price_id, created=now - 2),
    )  # fmt: skip
    assert ledger.balance(account).balance_micros == 360 * CREDIT
    proration, invoice = _proration_invoice(
        account, sub, basic.provider_price_id, pro.provider_price_id, now - 5, end
    )
    intent = f"pi_{uuid.uuid4().hex}"
    apply_events(proration, invoice_payment_paid(invoice, intent, 700))
    [refund] = apply_events(charge_refunded(intent, amount=700, amount_refunded=700))
    assert payments_db.event(refund)["credits_micros"] == -300 * CREDIT  # type: ignore[index]
    assert ledger.balance(account).balance_micros == 60 * CREDIT
    assert_audit_clean()


@pytest.mark.parametrize("claw_back", ["refund", "lost-dispute"])
def test_a_claw_back_handled_between_the_invoice_payment_and_the_paid_invoice_is_applied(
    claw_back: str,
    apply_events: Callable[..., list[str]],
    sweep_and_apply: Callable[[], int],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    assert_audit_clean: AuditCheck,
) -> None:
    """Since API version 2025-03-31 the invoice names no payment intent and the refund (or
    dispute) no invoice: only invoice_payment.paid joins them. One handled after it and
    before the period's invoice.paid found no purchase and was ignored; the paid invoice
    woke the claw-backs of its id and of the payment intent it no longer names, so nothing,
    and the period's credits stayed (helper-96). It wakes those of its payments too."""
    plan = sources.create_plan(100 * CREDIT, rank=1)
    account, sub = new_account("claw-before-period"), f"sub_{uuid.uuid4().hex}"
    invoice, intent = f"in_{uuid.uuid4().hex}", f"pi_{uuid.uuid4().hex}"
    start = int(time.time()) - 60
    apply_events(invoice_payment_paid(invoice, intent))
    returned = (
        charge_refunded(intent, amount=1000, amount_refunded=1000)
        if claw_back == "refund"
        else charge_dispute_closed(intent, 1000, "lost")
    )
    [claw] = apply_events(returned)
    assert payments_db.event(claw)["status"] == "ignored"  # type: ignore[index]
    [paid] = apply_events(
        invoice_paid(account, sub, plan.provider_price_id, start, start + 30 * 86400, invoice)
    )
    assert payments_db.event(paid)["credits_micros"] == 100 * CREDIT  # type: ignore[index]
    sweep_and_apply()
    assert payments_db.event(claw)["credits_micros"] == -100 * CREDIT  # type: ignore[index]
    assert ledger.balance(account).balance_micros == 0
    assert_audit_clean()


def test_a_refund_of_an_upgrade_handled_before_the_update_is_applied_once_it_is(
    apply_events: Callable[..., list[str]],
    sweep_and_apply: Callable[[], int],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    assert_audit_clean: AuditCheck,
) -> None:
    """The proration invoice and its payment are joined, then the refund of that payment
    comes before customer.subscription.updated granted the upgrade: no purchase yet, so it
    is ignored. Recording the upgrade's purchase woke nothing, and the customer kept the
    pro plan's credits (helper-96); it wakes the refunds of the payments that paid it."""
    account, sub, basic, pro, start, end = _subscriber(apply_events, sources, ledger)
    changed = int(time.time()) - 10
    proration, invoice = _proration_invoice(
        account, sub, basic.provider_price_id, pro.provider_price_id, changed, end
    )
    intent = f"pi_{uuid.uuid4().hex}"
    [prorated, _] = apply_events(proration, invoice_payment_paid(invoice, intent, 700))
    assert payments_db.event(prorated)["status"] == "processed"  # type: ignore[index]
    [refund] = apply_events(charge_refunded(intent, amount=700, amount_refunded=700))
    assert payments_db.event(refund)["status"] == "ignored"  # type: ignore[index]
    apply_events(
        subscription_updated(
            account, sub, pro.provider_price_id, start, end,
            previous_price_id=basic.provider_price_id,
        )
    )  # fmt: skip
    assert ledger.balance(account).balance_micros == 360 * CREDIT  # 60 carried + 300
    sweep_and_apply()
    assert payments_db.event(refund)["credits_micros"] == -300 * CREDIT  # type: ignore[index]
    assert ledger.balance(account).balance_micros == 60 * CREDIT  # what basic carried over
    assert_audit_clean()


def test_a_refund_of_an_upgrade_waits_for_its_stored_update(
    apply_events: Callable[..., list[str]],
    rerun: Callable[[str], str],
    webhook_url: str,
    ledger_db_url: str,
    payments_redis_url: str,
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    assert_audit_clean: AuditCheck,
) -> None:
    """customer.subscription.updated is stored, not applied yet, when the refund of the
    proration invoice's payment runs: the refund waits for it, as for any payment's own
    event, instead of finding no purchase (helper-96)."""
    account, sub, basic, pro, start, end = _subscriber(apply_events, sources, ledger)
    changed = int(time.time()) - 10
    proration, invoice = _proration_invoice(
        account, sub, basic.provider_price_id, pro.provider_price_id, changed, end
    )
    intent = f"pi_{uuid.uuid4().hex}"
    apply_events(proration, invoice_payment_paid(invoice, intent, 700))
    update = subscription_updated(
        account, sub, pro.provider_price_id, start, end, previous_price_id=basic.provider_price_id
    )
    refund_body = charge_refunded(intent, amount=700, amount_refunded=700)
    for body in (update, refund_body):
        assert deliver(webhook_url, body) == 200  # stored and queued, not run
    refund = str(json.loads(refund_body)["id"])
    with pytest.raises(payments.EventNotReady):
        rerun(refund)
    waiting = payments_db.event(refund)
    assert waiting is not None and waiting["status"] == "failed"
    assert str(json.loads(update)["id"]) in waiting["last_error"]
    run_burst_workers(ledger_db_url, payments_redis_url)  # the update, then the refund
    assert payments_db.event(refund)["credits_micros"] == -300 * CREDIT  # type: ignore[index]
    assert ledger.balance(account).balance_micros == 60 * CREDIT
    assert_audit_clean()


def test_a_partly_lost_dispute_takes_back_its_share(
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    configure: Any,
    assert_audit_clean: AuditCheck,
) -> None:
    """A dispute may be for part of a charge (helper-57): its share of the purchase, not
    the whole. After a partial refund, a dispute of the rest takes what is left."""
    account, intent = bought_pack(apply_events, sources, configure, "part-disputed", 2000)
    [lost] = apply_events(charge_dispute_closed(intent, 500, "lost"))
    assert payments_db.event(lost)["credits_micros"] == -25 * CREDIT  # type: ignore[index]
    assert ledger.balance(account).balance_micros == 75 * CREDIT
    assert_audit_clean()


@pytest.mark.parametrize("dispute_first", [False, True], ids=["refund-first", "dispute-first"])
def test_a_dispute_and_a_refund_of_one_charge_take_the_whole_in_either_order(
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    configure: Any,
    assert_audit_clean: AuditCheck,
    dispute_first: bool,
) -> None:
    """A refund of a quarter and the lost dispute of the rest: each takes its part, in
    either order (helper-61: a dispute handled first left the refund nothing to take)."""
    account, intent = bought_pack(apply_events, sources, configure, "refund-dispute", 2000)
    refund = charge_refunded(intent, amount=2000, amount_refunded=500)
    dispute = charge_dispute_closed(intent, 1500, "lost")
    if dispute_first:
        [disputed, refunded] = apply_events(dispute, refund)
    else:
        [refunded, disputed] = apply_events(refund, dispute)
    assert payments_db.event(refunded)["credits_micros"] == -25 * CREDIT  # type: ignore[index]
    assert payments_db.event(disputed)["credits_micros"] == -75 * CREDIT  # type: ignore[index]
    assert ledger.balance(account).balance_micros == 0
    assert_audit_clean()


def test_a_whole_dispute_of_a_discounted_payment_takes_the_whole_purchase(
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    configure: Any,
    assert_audit_clean: AuditCheck,
) -> None:
    """The share is of what was paid (the checkout's amount_total), not of the pack's list
    price (helper-61: a coupon halved what a lost dispute took back)."""
    configure("purchase.allow_free_users", True)
    pack = sources.create_pack(100 * CREDIT, price_minor=2000)
    account, intent = new_account("discounted"), f"pi_{uuid.uuid4().hex}"
    apply_events(checkout_pack(account, pack.pack_id, payment_intent=intent, amount_total=1000))
    [lost] = apply_events(charge_dispute_closed(intent, 1000, "lost"))
    assert payments_db.event(lost)["credits_micros"] == -100 * CREDIT  # type: ignore[index]
    assert ledger.balance(account).balance_micros == 0
    assert_audit_clean()


def test_a_lost_dispute_of_an_invoice_paid_before_api_2025_03_31_finds_its_period(
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    assert_audit_clean: AuditCheck,
) -> None:
    """Such an invoice names its payment intent and no invoice_payment.paid comes; a
    dispute names only the payment intent and the charge (helper-61: found nothing)."""
    plan = sources.create_plan(100 * CREDIT, rank=1)
    account, sub = new_account("old-api"), f"sub_{uuid.uuid4().hex}"
    intent, start = f"pi_{uuid.uuid4().hex}", int(time.time()) - 60
    old_invoice = event(
        "invoice.paid",
        {
            "id": f"in_{uuid.uuid4().hex}",
            "object": "invoice",
            "billing_reason": "subscription_create",
            "subscription": sub,
            "subscription_details": {"metadata": {"account_id": account}},
            "payment_intent": intent,
            "amount_paid": 1000,
            "currency": "usd",
            "lines": {"data": [{"price": {"id": plan.provider_price_id}, "proration": False,
                                "period": {"start": start, "end": start + 30 * 86400}}]},
        },
    )  # fmt: skip
    [paid] = apply_events(old_invoice)
    assert payments_db.event(paid)["credits_micros"] == 100 * CREDIT  # type: ignore[index]
    [lost] = apply_events(charge_dispute_closed(intent, 1000, "lost"))
    assert payments_db.event(lost)["credits_micros"] == -100 * CREDIT  # type: ignore[index]
    assert ledger.balance(account).balance_micros == 0
    assert_audit_clean()


def test_a_refund_naming_an_account_the_ledger_lacks_is_ignored(
    apply_events: Callable[..., list[str]], payments_db: PaymentsDb
) -> None:
    """Not failed and retried for ever (helper-57): nothing of the ledger was paid by it."""
    body = charge_refunded(
        f"pi_{uuid.uuid4().hex}", 1000, 1000, account_id=new_account("never-opened")
    )
    [refund] = apply_events(body)
    event = payments_db.event(refund)
    assert event is not None
    assert (event["status"], event["credits_micros"]) == ("ignored", 0)
    assert "does not exist" in event["last_error"]


# --- subscriptions -------------------------------------------------------------------------


def _subscriber(
    apply_events: Callable[..., list[str]], sources: Sources, ledger: Ledger
) -> tuple[str, str, Any, Any, int, int]:
    """An account on a basic plan (100 credits, 40 spent) for a period that began a minute
    ago; also a pro plan of a higher rank. Returns account, subscription, basic, pro, start
    and end of the period."""
    basic = sources.create_plan(100 * CREDIT, rank=1)
    pro = sources.create_plan(300 * CREDIT, rank=2)
    account, sub = new_account("subscriber"), f"sub_{uuid.uuid4().hex}"
    start = int(time.time()) - 60
    end = start + 30 * 86400
    apply_events(invoice_paid(account, sub, basic.provider_price_id, start, end))
    ledger.consume(account, 40 * CREDIT)
    return account, sub, basic, pro, start, end


def test_a_paid_invoice_grants_the_plan_period_once_and_an_upgrade_carries_over(
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    assert_audit_clean: AuditCheck,
) -> None:
    basic = sources.create_plan(100 * CREDIT, rank=1)
    pro = sources.create_plan(300 * CREDIT, rank=2)
    account, sub = new_account("subscriber"), f"sub_{uuid.uuid4().hex}"
    start = int(time.time()) - 60
    end = start + 30 * 86400
    invoice = invoice_paid(account, sub, basic.provider_price_id, start, end)
    paid, _ = apply_events(invoice, invoice)
    assert payments_db.event(paid)["credits_micros"] == 100 * CREDIT  # type: ignore[index]
    assert ledger.balance(account).balance_micros == 100 * CREDIT
    ledger.consume(account, 40 * CREDIT)

    # Mid-period, the billing cycle kept: the prorations are invoiced (paid) at once.
    upgraded = subscription_updated(
        account, sub, pro.provider_price_id, start, end, previous_price_id=basic.provider_price_id
    )
    now = int(time.time())
    proration = invoice_paid(
        account,
        sub,
        pro.provider_price_id,
        start,
        end,
        billing_reason="subscription_update",
        lines=[
            invoice_line(basic.provider_price_id, now, end, proration=True, amount=-600),
            invoice_line(pro.provider_price_id, now, end, proration=True, amount=1800),
        ],
    )
    [change, prorated] = apply_events(upgraded, proration)
    # 60 unused basic credits carried over, plus the pro plan's 300.
    assert ledger.balance(account).balance_micros == 360 * CREDIT
    assert payments_db.event(change)["credits_micros"] == 300 * CREDIT  # type: ignore[index]
    # The prorations grant nothing more: they are recorded as paying for the change.
    assert (
        payments_db.event(prorated)["status"],
        payments_db.event(prorated)["credits_micros"],
    ) == (  # type: ignore[index]
        "processed",
        0,
    )
    assert ledger.balance(account).balance_micros == 360 * CREDIT
    assert_audit_clean()


def test_a_downgrade_within_the_period_grants_nothing_and_a_return_grants_no_more(
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    assert_audit_clean: AuditCheck,
) -> None:
    """Basic, upgraded to pro (its credits granted), down to basic, then pro again, all in
    one paid period: only the upgrade grants; each change is recorded as the plan."""
    account, sub, basic, pro, start, end = _subscriber(apply_events, sources, ledger)
    now = int(time.time())

    def change(price: str, previous: str, at: int) -> bytes:
        return subscription_updated(
            account, sub, price, start, end, previous_price_id=previous, created=at
        )

    def plan() -> str:
        return str(
            ledger.stub.GetAccount(
                pb.GetAccountRequest(account_id=account)
            ).account.subscription.plan_id
        )

    [up] = apply_events(change(pro.provider_price_id, basic.provider_price_id, now + 1))
    assert ledger.balance(account).balance_micros == 360 * CREDIT  # 60 carried + 300
    [down] = apply_events(change(basic.provider_price_id, pro.provider_price_id, now + 2))
    assert payments_db.event(down)["credits_micros"] == 0  # type: ignore[index]
    assert ledger.balance(account).balance_micros == 360 * CREDIT
    assert plan() == basic.plan_id
    [again] = apply_events(change(pro.provider_price_id, basic.provider_price_id, now + 3))
    assert payments_db.event(again)["status"] == "ignored"  # type: ignore[index]
    assert ledger.balance(account).balance_micros == 360 * CREDIT
    assert plan() == pro.plan_id
    assert payments_db.event(up)["credits_micros"] == 300 * CREDIT  # type: ignore[index]
    assert_audit_clean()


@pytest.mark.parametrize("invoice_first", [False, True], ids=["update-first", "invoice-first"])
def test_a_plan_change_at_renewal_is_granted_once_by_the_paid_invoice(
    invoice_first: bool,
    apply_events: Callable[..., list[str]],
    rerun: Callable[[str], str],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    assert_audit_clean: AuditCheck,
) -> None:
    account, sub, basic, pro, start, end = _subscriber(apply_events, sources, ledger)
    renewed = subscription_updated(
        account, sub, pro.provider_price_id, end, end + 30 * 86400,
        previous_price_id=basic.provider_price_id,
    )  # fmt: skip
    # The renewal's invoice: a proration line of the old plan (its period over) comes first.
    invoice = invoice_paid(
        account,
        sub,
        pro.provider_price_id,
        end,
        end + 30 * 86400,
        billing_reason="subscription_cycle",
        lines=[
            invoice_line(basic.provider_price_id, start - 86400, start - 60, proration=True),
            invoice_line(pro.provider_price_id, end, end + 30 * 86400),
        ],
    )
    if invoice_first:
        paid, update = apply_events(invoice, renewed)
    else:
        update, paid = apply_events(renewed, invoice)
        # It waited for the new period's invoice (EventNotReady), which put it back for the
        # sweeper however many retries it had spent; run again, it finds its plan on.
        assert payments_db.event(update)["status"] == "received"  # type: ignore[index]
        assert rerun(update) == "ignored"
    # The basic period's 60 left stay until it ends (no carry-over at a renewal); pro's 300.
    assert ledger.balance(account).balance_micros == 360 * CREDIT
    assert payments_db.event(paid)["credits_micros"] == 300 * CREDIT  # type: ignore[index]
    assert payments_db.event(update)["status"] == "ignored"  # type: ignore[index]
    assert_audit_clean()


def test_a_reset_billing_cycle_upgrades_from_the_paid_invoice_with_carry_over(
    apply_events: Callable[..., list[str]],
    rerun: Callable[[str], str],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    assert_audit_clean: AuditCheck,
) -> None:
    account, sub, basic, pro, _start, end = _subscriber(apply_events, sources, ledger)
    now = int(time.time())
    upgraded = subscription_updated(account, sub, pro.provider_price_id, now, now + 30 * 86400)
    invoice = invoice_paid(
        account,
        sub,
        pro.provider_price_id,
        now,
        now + 30 * 86400,
        billing_reason="subscription_update",
        lines=[
            invoice_line(basic.provider_price_id, now, end, proration=True),
            invoice_line(pro.provider_price_id, now, now + 30 * 86400),
        ],
    )
    update, paid = apply_events(upgraded, invoice)
    assert payments_db.event(update)["status"] == "received"  # woken by the invoice  # type: ignore[index]
    assert payments_db.event(paid)["credits_micros"] == 300 * CREDIT  # type: ignore[index]
    assert rerun(update) == "ignored"  # the plan it names is on
    assert ledger.balance(account).balance_micros == 360 * CREDIT
    carried = [lot for lot in ledger.lots(account) if lot.amount_micros == 60 * CREDIT]
    assert [lot.expires_at.seconds for lot in carried] == [now + 30 * 86400]
    # Another event about the same paid invoice changes nothing more.
    [again] = apply_events(
        invoice_paid(
            account,
            sub,
            pro.provider_price_id,
            now,
            now + 30 * 86400,
            invoice_id=json.loads(invoice)["data"]["object"]["id"],
            billing_reason="subscription_update",
            lines=[invoice_line(pro.provider_price_id, now, now + 30 * 86400)],
        )
    )
    assert payments_db.event(again)["status"] == "ignored"  # type: ignore[index]
    assert ledger.balance(account).balance_micros == 360 * CREDIT
    # Its refund finds the purchase under the invoice.
    intent = f"pi_{uuid.uuid4().hex}"
    [refund] = apply_events(
        invoice_payment_paid(json.loads(invoice)["data"]["object"]["id"], intent),
        charge_refunded(intent, amount=1000, amount_refunded=1000),
    )[1:]
    assert payments_db.event(refund)["credits_micros"] == -300 * CREDIT  # type: ignore[index]
    assert_audit_clean()


def test_an_upgrade_to_a_price_no_plan_has_yet_is_applied_once_the_plan_is_created(
    apply_events: Callable[..., list[str]],
    rerun: Callable[[str], str],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    assert_audit_clean: AuditCheck,
) -> None:
    """The customer upgraded (and paid the prorations) to a price the admin had not given
    any plan yet: both events fail and are retried, not ignored for good, and once the plan
    is created they apply the upgrade with its carry-over and link its payment."""
    account, sub, basic, _pro, start, end = _subscriber(apply_events, sources, ledger)
    late = f"plan-late-{uuid.uuid4().hex[:12]}"
    price = f"price_{late}"
    proration, invoice = _proration_invoice(
        account, sub, basic.provider_price_id, price, int(time.time()) - 10, end
    )
    upgraded = subscription_updated(
        account, sub, price, start, end, previous_price_id=basic.provider_price_id
    )
    update, prorated = apply_events(upgraded, proration)
    for event_id in (update, prorated):
        row = payments_db.event(event_id)
        assert row is not None and row["status"] == "failed", row
        assert price in row["last_error"]
    assert ledger.balance(account).balance_micros == 60 * CREDIT

    assert sources.create_plan(300 * CREDIT, rank=3, plan_id=late).provider_price_id == price
    assert rerun(update) == "processed"
    assert rerun(prorated) == "processed"
    assert sources.get_account(account).subscription.plan_id == late
    assert ledger.balance(account).balance_micros == 360 * CREDIT  # 60 carried + 300
    assert payments_db.event(update)["credits_micros"] == 300 * CREDIT  # type: ignore[index]
    # The prorations were linked to the upgrade: their refund takes its credits back.
    intent = f"pi_{uuid.uuid4().hex}"
    [refund] = apply_events(
        invoice_payment_paid(invoice, intent, 700),
        charge_refunded(intent, amount=700, amount_refunded=700),
    )[1:]
    assert payments_db.event(refund)["credits_micros"] == -300 * CREDIT  # type: ignore[index]
    assert_audit_clean()


def test_an_update_changing_no_item_of_a_subscription_at_a_price_no_plan_has_is_ignored(
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
) -> None:
    """The admin moved the plan to another Stripe price; its subscribers stay on the old
    one. A routine update of theirs (cancel_at_period_end, say: no item changed) waits for
    no plan: ignored, not failed and retried for ever (helper-81)."""
    account, sub, _basic, _pro, start, end = _subscriber(apply_events, sources, ledger)
    routine = subscription_updated(account, sub, f"price_moved_{uuid.uuid4().hex}", start, end)
    [update] = apply_events(routine)
    row = payments_db.event(update)
    assert row is not None and row["status"] == "ignored", row
    assert ledger.balance(account).balance_micros == 60 * CREDIT


def test_a_reset_billing_cycle_to_a_price_no_plan_has_yet_waits_for_the_plan(
    apply_events: Callable[..., list[str]],
    rerun: Callable[[str], str],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    assert_audit_clean: AuditCheck,
) -> None:
    """The invoice of a reset cycle to an unknown price is not taken for one of prorations
    only (linked to the old plan's credit line, or ignored): it fails until the plan is
    created, then grants the new period with the carry-over."""
    account, sub, basic, _pro, _start, end = _subscriber(apply_events, sources, ledger)
    late = f"plan-late-{uuid.uuid4().hex[:12]}"
    price, now = f"price_{late}", int(time.time())
    invoice = invoice_paid(
        account, sub, price, now, now + 30 * 86400, billing_reason="subscription_update",
        lines=[invoice_line(basic.provider_price_id, now, end, proration=True),
               invoice_line(price, now, now + 30 * 86400)],
    )  # fmt: skip
    [paid] = apply_events(invoice)
    row = payments_db.event(paid)
    assert row is not None and row["status"] == "failed" and price in row["last_error"], row
    sources.create_plan(300 * CREDIT, rank=3, plan_id=late)
    assert rerun(paid) == "processed"
    assert payments_db.event(paid)["credits_micros"] == 300 * CREDIT  # type: ignore[index]
    assert sources.get_account(account).subscription.plan_id == late
    assert ledger.balance(account).balance_micros == 360 * CREDIT
    assert_audit_clean()


def test_an_update_finds_the_plan_among_all_the_subscriptions_items(
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    assert_audit_clean: AuditCheck,
) -> None:
    """An add-on item listed before the plan's (or the new plan's item appended after the
    old one was deleted) is no plan: the upgrade is applied. Two plan items (the new one
    added before the old one is removed): the higher ranked is the plan."""
    account, sub, basic, pro, start, end = _subscriber(apply_events, sources, ledger)
    [with_add_on] = apply_events(
        subscription_updated(account, sub, pro.provider_price_id, start, end,
                             prices_before=("price_add_on_seats",))
    )  # fmt: skip
    assert payments_db.event(with_add_on)["credits_micros"] == 300 * CREDIT  # type: ignore[index]
    assert sources.get_account(account).subscription.plan_id == pro.plan_id
    assert ledger.balance(account).balance_micros == 360 * CREDIT

    other, other_sub, basic, pro, start, end = _subscriber(apply_events, sources, ledger)
    [both] = apply_events(
        subscription_updated(other, other_sub, basic.provider_price_id, start, end,
                             prices_before=(pro.provider_price_id,))
    )  # fmt: skip
    assert payments_db.event(both)["credits_micros"] == 300 * CREDIT  # type: ignore[index]
    assert sources.get_account(other).subscription.plan_id == pro.plan_id
    assert_audit_clean()


def test_a_plan_change_delivered_after_a_newer_one_is_not_applied(
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    assert_audit_clean: AuditCheck,
) -> None:
    account, sub, _basic, pro, start, end = _subscriber(apply_events, sources, ledger)
    top = sources.create_plan(500 * CREDIT, rank=3)
    now = int(time.time())
    to_pro = subscription_updated(account, sub, pro.provider_price_id, start, end, created=now - 10)
    to_top = subscription_updated(account, sub, top.provider_price_id, start, end, created=now)
    newest, stale = apply_events(to_top, to_pro)  # Stripe delivered them out of order
    assert payments_db.event(newest)["credits_micros"] == 500 * CREDIT  # type: ignore[index]
    stale_row = payments_db.event(stale)
    assert stale_row is not None and stale_row["status"] == "ignored"
    assert "superseded" in stale_row["last_error"]
    # The basic plan's 60 left carried over, plus the top plan's 500; the account stays on it.
    assert ledger.balance(account).balance_micros == 560 * CREDIT
    assert sources.get_account(account).subscription.plan_id == top.plan_id
    assert_audit_clean()


def test_a_change_within_a_period_is_applied_though_a_renewal_event_came_after_it(
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
) -> None:
    account, sub, _basic, pro, start, end = _subscriber(apply_events, sources, ledger)
    now = int(time.time())
    in_period = subscription_updated(
        account, sub, pro.provider_price_id, start, end, created=now - 10
    )
    renewal = subscription_updated(
        account, sub, pro.provider_price_id, end, end + 30 * 86400, created=now
    )
    renewed, upgraded = apply_events(renewal, in_period)
    assert payments_db.event(upgraded)["credits_micros"] == 300 * CREDIT  # type: ignore[index]
    assert ledger.balance(account).balance_micros == 360 * CREDIT
    assert payments_db.event(renewed)["status"] in ("failed", "ignored")  # type: ignore[index]


def test_a_plan_change_of_an_unpaid_subscription_grants_nothing(
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
) -> None:
    account, sub, _basic, pro, start, end = _subscriber(apply_events, sources, ledger)
    [update] = apply_events(
        subscription_updated(account, sub, pro.provider_price_id, start, end, status="past_due")
    )
    event_row = payments_db.event(update)
    assert event_row is not None and event_row["status"] == "ignored"
    assert "past_due" in event_row["last_error"]
    assert ledger.balance(account).balance_micros == 60 * CREDIT


def test_a_subscription_that_ends_early_ends_the_subscriber_and_keeps_its_credits(
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    configure: Any,
    assert_audit_clean: AuditCheck,
) -> None:
    """Cancelled at once (customer.subscription.deleted) 29 days before its paid period
    ends: the account is no longer a subscriber (no subscription shown, no pack for a free
    user), and the 60 credits left of the period it paid for stay."""
    configure("purchase.allow_free_users", False)
    account, sub, basic, _pro, _start, _end = _subscriber(apply_events, sources, ledger)
    pack = sources.create_pack(50 * CREDIT)
    assert sources.get_account(account).subscription.plan_id == basic.plan_id
    [ended] = apply_events(subscription_deleted(account, sub, int(time.time()) - 1))
    event_row = payments_db.event(ended)
    assert event_row is not None and event_row["status"] == "processed"
    assert not sources.get_account(account).HasField("subscription")
    assert ledger.balance(account).balance_micros == 60 * CREDIT
    expect_error(
        lambda: sources.purchase(account, pack.pack_id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PURCHASE_REQUIRES_SUBSCRIPTION",
    )
    assert_audit_clean()


def test_a_paid_invoice_applied_after_its_subscription_ended_grants_and_keeps_the_end(
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
) -> None:
    """Stripe delivered the end before the invoice paid a minute earlier: the end finds no
    period yet (ignored), the invoice grants its period's credits, and the account stays
    a former subscriber."""
    plan = sources.create_plan(100 * CREDIT, rank=1)
    account, sub = new_account("ended-first"), f"sub_{uuid.uuid4().hex}"
    start = int(time.time()) - 60
    ended, paid = apply_events(
        subscription_deleted(account, sub, start + 30),
        invoice_paid(account, sub, plan.provider_price_id, start, start + 30 * 86400),
    )
    assert payments_db.event(ended)["status"] == "ignored"  # type: ignore[index]
    assert payments_db.event(paid)["credits_micros"] == 100 * CREDIT  # type: ignore[index]
    assert ledger.balance(account).balance_micros == 100 * CREDIT
    assert not sources.get_account(account).HasField("subscription")


def test_a_plan_change_applied_after_its_subscription_ended_is_not_applied(
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
) -> None:
    account, sub, _basic, pro, start, end = _subscriber(apply_events, sources, ledger)
    now = int(time.time())
    upgrade = subscription_updated(account, sub, pro.provider_price_id, start, end, created=now - 5)
    ended, changed = apply_events(subscription_deleted(account, sub, now - 1), upgrade)
    assert payments_db.event(ended)["status"] == "processed"  # type: ignore[index]
    change_row = payments_db.event(changed)
    assert change_row is not None and change_row["status"] == "ignored"
    assert "ended" in change_row["last_error"]
    assert ledger.balance(account).balance_micros == 60 * CREDIT
    assert not sources.get_account(account).HasField("subscription")


def test_a_late_paid_invoice_of_an_ended_subscription_leaves_the_new_one(
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    assert_audit_clean: AuditCheck,
) -> None:
    """An invoice of the old subscription paid before it ended, delivered after the new
    one's: its credits are granted, and the account stays on its new subscription
    (helper-57: the old period replaced it, and the account had no subscription)."""
    basic = sources.create_plan(100 * CREDIT, rank=1)
    pro = sources.create_plan(300 * CREDIT, rank=2)
    account = new_account("resubscribed")
    old_sub, new_sub = f"sub_{uuid.uuid4().hex}", f"sub_{uuid.uuid4().hex}"
    now = int(time.time())
    late = invoice_paid(account, old_sub, basic.provider_price_id, now - 3600, now + 86400)
    apply_events(
        invoice_paid(account, old_sub, basic.provider_price_id, now - 7200, now - 3600),
        subscription_deleted(account, old_sub, now - 600),
        invoice_paid(account, new_sub, pro.provider_price_id, now - 60, now + 30 * 86400),
    )
    [granted] = apply_events(late)
    assert payments_db.event(granted)["status"] == "processed"  # type: ignore[index]
    subscription = sources.get_account(account).subscription
    assert (subscription.plan_id, subscription.external_ref) == (pro.plan_id, new_sub)
    assert_audit_clean()


def test_the_late_end_of_an_old_subscription_leaves_the_new_one(
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
) -> None:
    """The account subscribed again (another subscription) before the end of its first one
    was delivered: that end changes nothing."""
    account, old_sub, basic, _pro, _start, _end = _subscriber(apply_events, sources, ledger)
    new_sub, start = f"sub_{uuid.uuid4().hex}", int(time.time()) - 30
    apply_events(invoice_paid(account, new_sub, basic.provider_price_id, start, start + 86400))
    [ended] = apply_events(subscription_deleted(account, old_sub, start - 1))
    assert payments_db.event(ended)["status"] == "ignored"  # type: ignore[index]
    assert sources.get_account(account).subscription.plan_id == basic.plan_id


# --- the payment log -----------------------------------------------------------------------


def _wait_for_a_lock_waiter(ledger_db_url: str, running: threading.Thread) -> None:
    """Until some transaction waits for another's lock (or the thread has finished)."""
    with psycopg.connect(ledger_db_url, autocommit=True) as watcher:
        for _ in range(400):
            waiting = watcher.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'transactionid' AND NOT granted"
            ).fetchone()
            if (waiting and waiting[0]) or not running.is_alive():
                return
            time.sleep(0.025)
    pytest.fail("no transaction waited for a lock")


def test_an_end_processed_while_the_first_period_is_granted_waits_for_it_and_ends_it(
    ledger_db_url: str, sources: Sources, ledger: Ledger
) -> None:
    """The end looked for the subscription before it locked the account (helper-49): an end
    processed while an invoice's job was granting the subscription's period, not committed
    yet, found no subscription and was ignored, and the period lasted."""
    plan = sources.create_plan(100 * CREDIT, rank=1)
    account, subscription = new_account("end-races-grant"), f"sub_{uuid.uuid4().hex}"
    ledger.grant(account, 1)
    ended: list[bool] = []
    with psycopg.connect(ledger_db_url) as granting:  # the invoice's job, not committed
        granting.execute(
            "SELECT ledger_start_subscription_period(%s, %s, '\\x00', %s, now(),"
            " now() + interval '30 days', %s, %s, now())",
            (account, new_key(), plan.plan_id, f"in_{uuid.uuid4().hex}", subscription),
        )

        def end() -> None:
            with psycopg.connect(ledger_db_url, autocommit=True) as ending:
                row = ending.execute(
                    "SELECT ledger_end_subscription(%s, %s, now(), now())",
                    (account, subscription),
                ).fetchone()
                ended.append(bool(row and row[0]))

        ender = threading.Thread(target=end)
        ender.start()
        _wait_for_a_lock_waiter(ledger_db_url, ender)
        granting.commit()
        ender.join(30)
    assert ended == [True]
    with psycopg.connect(ledger_db_url) as conn:
        lasts = conn.execute(
            "SELECT current_period_end > now() FROM subscriptions WHERE account_id = %s",
            (account,),
        ).fetchone()
    assert lasts == (False,)
    assert not sources.get_account(account).HasField("subscription")


def test_an_invoice_wakes_a_waiting_plan_change_before_it_locks_the_account(
    apply_events: Callable[..., list[str]],
    webhook_url: str,
    rerun: Callable[[str], str],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    ledger_db_url: str,
) -> None:
    """A renewal's plan change waits (failed) for its period's invoice, which puts it back
    to 'received'. The invoice's job did so holding the account, so a run of the plan
    change's job, holding its event and asking for the account, deadlocked with it
    (helper-49). Now the job wakes the event before its ledger call locks the account."""
    account, sub, _basic, pro, _start, end = _subscriber(apply_events, sources, ledger)
    renewal = (end, end + 30 * 86400)
    [waiting] = apply_events(subscription_updated(account, sub, pro.provider_price_id, *renewal))
    assert payments_db.event(waiting)["status"] == "failed"  # type: ignore[index]
    body = invoice_paid(
        account, sub, pro.provider_price_id, *renewal, billing_reason="subscription_cycle"
    )
    assert deliver(webhook_url, body) == 200  # stored and queued; run here instead
    invoice = str(json.loads(body)["id"])
    statuses: list[str] = []
    with psycopg.connect(ledger_db_url) as plan_change_job:  # holds its event, as a run does
        plan_change_job.execute(
            "SELECT FROM payment_events WHERE event_id = %s FOR UPDATE", (waiting,)
        )
        invoice_job = threading.Thread(target=lambda: statuses.append(rerun(invoice)))
        invoice_job.start()
        _wait_for_a_lock_waiter(ledger_db_url, invoice_job)
        # What the plan change's ledger call takes next; a deadlock fails one of the two.
        plan_change_job.execute("SELECT FROM accounts WHERE account_id = %s FOR UPDATE", (account,))
        plan_change_job.commit()
        invoice_job.join(30)
    assert statuses == ["processed"]
    assert payments_db.event(waiting)["status"] == "received"  # type: ignore[index]
    assert ledger.balance(account).balance_micros == 360 * CREDIT


def test_the_payment_log_lists_every_event_with_status_error_and_credits(
    apply_events: Callable[..., list[str]],
    billing: billing_service_pb2_grpc.BillingServiceStub,
    sources: Sources,
    configure: Any,
) -> None:
    configure("purchase.allow_free_users", True)
    pack = sources.create_pack(12 * CREDIT)
    account = new_account("logged")
    ids = apply_events(
        checkout_pack(account, pack.pack_id),
        event(
            "customer.created",
            {"id": "cus_1", "object": "customer", "metadata": {"account_id": account}},
        ),
        checkout_pack(account, "pack-that-does-not-exist"),
    )
    listed = billing.ListPaymentEvents(billing_pb.ListPaymentEventsRequest(account_id=account))
    by_id = {e.event_id: e for e in listed.events}
    assert set(by_id) == set(ids)
    granted, other, broken = (by_id[i] for i in ids)
    assert (granted.status, granted.credits_micros, granted.attempts) == (
        billing_pb.PAYMENT_EVENT_STATUS_PROCESSED,
        12 * CREDIT,
        1,
    )
    assert granted.type == "checkout.session.completed" and granted.HasField("process_time")
    assert other.status == billing_pb.PAYMENT_EVENT_STATUS_IGNORED
    assert broken.status == billing_pb.PAYMENT_EVENT_STATUS_FAILED
    assert broken.last_error.startswith("PACK_NOT_FOUND") and not broken.HasField("process_time")
    times = [(e.receive_time.ToMicroseconds(), e.event_id) for e in listed.events]
    assert times == sorted(times, reverse=True)  # newest first

    failed = billing.ListPaymentEvents(
        billing_pb.ListPaymentEventsRequest(
            account_id=account, status=billing_pb.PAYMENT_EVENT_STATUS_FAILED
        )
    )
    assert [e.event_id for e in failed.events] == [broken.event_id]

    seen, token = [], ""
    while True:
        page = billing.ListPaymentEvents(
            billing_pb.ListPaymentEventsRequest(account_id=account, page_size=1, page_token=token)
        )
        seen += [e.event_id for e in page.events]
        token = page.next_page_token
        if not token:
            break
    assert seen == [e.event_id for e in listed.events]
    stranger = new_account()
    # Well-formed tokens for this account whose event id PostgreSQL cannot take as text.
    forged = [
        page_tokens.encode([1, event_id], ["payment_events", stranger, None])
        for event_id in ("evt\x00", "evt\ud800")
    ]
    for bad in ("garbage", *forged):
        expect_error(
            lambda bad=bad: billing.ListPaymentEvents(
                billing_pb.ListPaymentEventsRequest(account_id=stranger, page_token=bad)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_FIELD",
            "page_token",
        )


# --- Checkout Sessions against the Stripe double ----------------------------------------------


@pytest.fixture(scope="module")
def stripe_double() -> Iterator[StripeDouble]:
    double = StripeDouble().start()
    yield double
    double.stop()


@pytest.fixture(scope="module")
def checkout_address(
    stripe_double: StripeDouble, ledger_db_url: str, server_address: str, clock: OffsetClock
) -> Iterator[str]:
    """A second gRPC server whose BillingService talks to the Stripe double, on the
    session's clock: with a clock of its own (real time) its checkouts were dated days
    before the session server's "now" once earlier tests had moved that on, and the
    session server's UpdateSubscriptionPlan found no checkout of the last 24 hours."""
    stripe_settings = StripeSettings(api_key="sk_test_double", api_base=stripe_double.url)
    with pytest.MonkeyPatch.context() as env:
        # Read by BillingService when the app does not pass settings.stripe along.
        env.setenv("STRIPE_API_KEY", stripe_settings.api_key)
        env.setenv("STRIPE_API_BASE", stripe_settings.api_base)
        settings = Settings(database_url=ledger_db_url, stripe=stripe_settings)
        server = ServerThread(settings, clock).start()
    try:
        yield server.address
    finally:
        server.stop()


@pytest.fixture(scope="module")
def checkout(checkout_address: str) -> Iterator[billing_service_pb2_grpc.BillingServiceStub]:
    with grpc.insecure_channel(checkout_address) as channel:
        yield billing_service_pb2_grpc.BillingServiceStub(channel)


def test_checkout_for_a_pack_creates_one_stripe_session_per_idempotency_key(
    checkout: billing_service_pb2_grpc.BillingServiceStub,
    stripe_double: StripeDouble,
    sources: Sources,
    configure: Any,
) -> None:
    configure("purchase.allow_free_users", True)
    pack = sources.create_pack(50 * CREDIT, price_minor=990, currency="USD")
    account, key = new_account("shopper"), new_key("checkout")
    request = billing_pb.CreateCheckoutSessionRequest(
        account_id=account,
        idempotency_key=key,
        pack_id=pack.pack_id,
        success_url="https://app.example/ok",
        cancel_url="https://app.example/cancel",
    )
    before = len(stripe_double.checkout_requests())
    response, call = checkout.CreateCheckoutSession.with_call(request)
    session = response.session
    assert session.session_id.startswith("cs_test_")
    assert session.url.endswith(session.session_id)
    assert (session.kind, session.pack_id, session.amount_minor, session.currency) == (
        billing_pb.CHECKOUT_KIND_PACK,
        pack.pack_id,
        990,
        "USD",
    )
    [sent] = stripe_double.checkout_requests()[before:]
    assert sent.form["mode"] == "payment"
    assert sent.form["line_items[0][price]"] == pack.provider_price_id
    assert sent.form["client_reference_id"] == account
    assert sent.form["metadata[account_id]"] == account
    assert sent.form["metadata[pack_id]"] == pack.pack_id
    assert sent.form["payment_intent_data[metadata][account_id]"] == account
    assert sent.form["success_url"] == "https://app.example/ok"
    assert sent.headers["Idempotency-Key"].startswith("ledger-checkout-")
    assert sent.headers["Authorization"] == "Bearer sk_test_double"

    # A retry returns the stored session without calling Stripe again.
    again, call = checkout.CreateCheckoutSession.with_call(request)
    assert again.session == session
    assert ("ledger-idempotent-replay", "true") in call.trailing_metadata()
    assert len(stripe_double.checkout_requests()) == before + 1
    other = billing_pb.CreateCheckoutSessionRequest()
    other.CopyFrom(request)
    other.success_url = "https://app.example/elsewhere"
    expect_error(
        lambda: checkout.CreateCheckoutSession(other),
        grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_KEY_REUSED",
    )


def test_a_recharge_checkout_retried_with_the_currency_in_another_case_is_a_replay(
    checkout: billing_service_pb2_grpc.BillingServiceStub, stripe_double: StripeDouble
) -> None:
    """The ledger compares currencies upper-cased, so the request it answered is the same
    (helper-56); another amount under the key is another request."""
    account, key = new_account("payer"), new_key("checkout")

    def request(amount_minor: int, currency: str) -> billing_pb.CreateCheckoutSessionRequest:
        return billing_pb.CreateCheckoutSessionRequest(
            account_id=account,
            idempotency_key=key,
            recharge=billing_pb.RechargeAmount(amount_minor=amount_minor, currency=currency),
        )

    before = len(stripe_double.checkout_requests())
    session = checkout.CreateCheckoutSession(request(5000, "cny")).session
    again, call = checkout.CreateCheckoutSession.with_call(request(5000, "CNY"))
    assert again.session == session
    assert ("ledger-idempotent-replay", "true") in call.trailing_metadata()
    expect_error(
        lambda: checkout.CreateCheckoutSession(request(5001, "CNY")),
        grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_KEY_REUSED",
    )
    assert len(stripe_double.checkout_requests()) == before + 1


def test_an_accounts_checkouts_and_ledger_calls_share_one_idempotency_key_namespace(
    checkout: billing_service_pb2_grpc.BillingServiceStub,
    stripe_double: StripeDouble,
    sources: Sources,
    ledger: Ledger,
    configure: Any,
) -> None:
    """A key a Consume took is refused to a checkout before Stripe is called; a checkout's
    key is refused to a Consume, Reserve or Grant, which change nothing."""
    configure("purchase.allow_free_users", True)
    pack = sources.create_pack(50 * CREDIT, price_minor=990, currency="USD")
    account = new_account("one-namespace")
    ledger.grant(account, 10)
    spent = new_key("spent")
    ledger.consume(account, CREDIT, key=spent)

    def checkout_with(key: str) -> billing_pb.CreateCheckoutSessionRequest:
        return billing_pb.CreateCheckoutSessionRequest(
            account_id=account, idempotency_key=key, pack_id=pack.pack_id
        )

    before = len(stripe_double.checkout_requests())
    info = expect_error(
        lambda: checkout.CreateCheckoutSession(checkout_with(spent)),
        grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_KEY_REUSED",
    )
    assert info.metadata["original_operation"] == "consume"
    assert len(stripe_double.checkout_requests()) == before

    key = new_key("checkout")
    session = checkout.CreateCheckoutSession(checkout_with(key)).session
    balance = ledger.balance(account)
    for call in (
        lambda: ledger.consume(account, CREDIT, key=key),
        lambda: ledger.reserve(account, CREDIT, key=key),
        lambda: ledger.grant(account, 5, key=key),
    ):
        info = expect_error(call, grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")
        assert info.metadata["original_operation"] == "create_checkout_session"
    after = ledger.balance(account)
    assert (after.balance_micros, after.held_micros) == (
        balance.balance_micros,
        balance.held_micros,
    )
    # The checkout's own retry still returns its session, without calling Stripe again.
    assert checkout.CreateCheckoutSession(checkout_with(key)).session == session
    assert len(stripe_double.checkout_requests()) == before + 1


def test_a_ledger_call_that_takes_the_key_while_stripe_answers_leaves_the_session_unrecorded(
    ledger_db_url: str,
) -> None:
    """Between ledger_checkout_prepare and ledger_record_checkout_session (Stripe's round
    trip) a Consume took the key: the session is not recorded and the checkout is refused."""
    account, key, session_id = new_account("raced"), new_key(), f"cs_test_{uuid.uuid4().hex}"
    with psycopg.connect(ledger_db_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO idempotency_keys (account_id, idempotency_key, operation, request_hash,"
            " response, created_at) VALUES (%s, %s, 'consume', '\\x00', '{}', now())",
            (account, key),
        )
        with pytest.raises(psycopg.Error) as raised:
            conn.execute(
                "SELECT ledger_record_checkout_session(%s, %s, %s, '\\x01', 'recharge', '', '',"
                " 5000, 'CNY', 50000000, 0, 'https://checkout.example/x', now())",
                (session_id, account, key),
            )
        assert raised.value.sqlstate == "LE002"
        assert raised.value.diag.message_detail is not None
        assert json.loads(raised.value.diag.message_detail)["original_operation"] == "consume"
        stored = conn.execute(
            "SELECT count(*) FROM checkout_sessions WHERE session_id = %s", (session_id,)
        ).fetchone()
        assert stored == (0,)


def test_two_checkouts_of_one_key_prepared_at_once_record_only_the_same_request(
    ledger_db_url: str,
) -> None:
    """Both passed ledger_checkout_prepare; the second to record finds the first's session
    under the key: the same request gets it, a different one is refused."""
    account, key = new_account("twice"), new_key()
    record = (
        "SELECT ledger_record_checkout_session(%s, %s, %s, %s, 'recharge', '', '', 5000, 'CNY',"
        " 50000000, 0, 'https://checkout.example/x', now())"
    )
    first = f"cs_test_{uuid.uuid4().hex}"
    with psycopg.connect(ledger_db_url, autocommit=True) as conn:
        row = conn.execute(record, (first, account, key, b"\x01")).fetchone()
        assert row is not None and row[0]["session_id"] == first
        again = conn.execute(record, (f"cs_test_{uuid.uuid4().hex}", account, key, b"\x01"))
        assert again.fetchone()[0]["session_id"] == first  # type: ignore[index]
        with pytest.raises(psycopg.Error) as raised:
            conn.execute(record, (f"cs_test_{uuid.uuid4().hex}", account, key, b"\x02"))
        assert raised.value.sqlstate == "LE002"


def test_a_ledger_call_racing_a_checkout_for_its_key_is_told_to_retry_and_then_refused(
    ledger_db_url: str, ledger: Ledger
) -> None:
    """The checkout locks no account, so a Consume that looked the key up before the
    checkout's row committed meets it at its insert: ABORTED (retry), and the retry finds
    the checkout's key. Nothing is charged."""
    account, key = new_account("race-key"), new_key()
    ledger.grant(account, 10)
    outcome: list[grpc.RpcError | pb.ConsumeResponse] = []
    with psycopg.connect(ledger_db_url) as checkout_tx:
        checkout_tx.execute(
            "SELECT ledger_record_checkout_session(%s, %s, %s, '\\x01', 'recharge', '', '',"
            " 5000, 'CNY', 50000000, 0, 'https://checkout.example/x', now())",
            (f"cs_test_{uuid.uuid4().hex}", account, key),
        )

        def consume() -> None:
            try:
                outcome.append(ledger.consume(account, CREDIT, key=key))
            except grpc.RpcError as error:
                outcome.append(error)

        racer = threading.Thread(target=consume)
        racer.start()
        with psycopg.connect(ledger_db_url, autocommit=True) as watcher:
            for _ in range(200):  # the Consume waits on the checkout's uncommitted key
                waiting = watcher.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'transactionid' AND NOT granted"
                ).fetchone()
                if waiting and waiting[0]:
                    break
                time.sleep(0.05)
            else:
                pytest.fail("the Consume never waited on the checkout's key")
        checkout_tx.commit()
        racer.join(30)
    [raced] = outcome
    assert isinstance(raced, grpc.RpcError)
    assert raced.code() == grpc.StatusCode.ABORTED, raced.details()
    info = expect_error(
        lambda: ledger.consume(account, CREDIT, key=key),
        grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_KEY_REUSED",
    )
    assert info.metadata["original_operation"] == "create_checkout_session"
    assert ledger.balance(account).balance_micros == 10 * CREDIT


def test_the_checkouts_made_before_the_namespace_was_shared_join_it_when_migrated(
    ledger_db_url: str,
) -> None:
    """Migration 0021: every stored checkout's key becomes a ledger key of its account,
    except one a ledger operation took too (each succeeded before), which stays the
    operation's."""
    [migration] = [m for m in migrate.migrations() if m.version == 21]
    account = new_account("old-checkouts")
    alone, shared = new_key("alone"), new_key("shared")
    with psycopg.connect(ledger_db_url) as conn:  # rolled back: leaves nothing behind
        for n, key in enumerate((alone, shared)):
            conn.execute(
                "INSERT INTO checkout_sessions (session_id, account_id, idempotency_key,"
                " request_hash, kind, amount_minor, currency, url, created_at)"
                " VALUES (%s, %s, %s, %s, 'recharge', 5000, 'CNY', 'https://x.example/', now())",
                (f"cs_old_{uuid.uuid4().hex}", account, key, bytes([n])),
            )
        conn.execute(
            "DELETE FROM idempotency_keys WHERE account_id = %s", (account,)
        )  # as before this release
        conn.execute(
            "INSERT INTO idempotency_keys (account_id, idempotency_key, operation, request_hash,"
            " response, created_at) VALUES (%s, %s, 'consume', '\\x07', '{}', now())",
            (account, shared),
        )
        conn.execute(migration.sql.encode())
        rows = conn.execute(
            "SELECT idempotency_key, operation, request_hash FROM idempotency_keys"
            " WHERE account_id = %s ORDER BY operation",
            (account,),
        ).fetchall()
        conn.rollback()
    assert rows == [(shared, "consume", b"\x07"), (alone, "create_checkout_session", b"\x00")]


def test_the_python_client_creates_checkout_sessions_once_per_key(
    checkout_address: str, stripe_double: StripeDouble, sources: Sources, configure: Any
) -> None:
    configure("purchase.allow_free_users", True)
    pack = sources.create_pack(50 * CREDIT, price_minor=990, currency="USD")
    account, key = new_account("client-checkout"), new_key("checkout")
    before = len(stripe_double.checkout_requests())
    with LedgerClient(checkout_address, retry=FAST_RETRY) as client:
        first = client.create_checkout_session(account, pack_id=pack.pack_id, idempotency_key=key)
        again = client.create_checkout_session(account, pack_id=pack.pack_id, idempotency_key=key)
        recharge = client.create_checkout_session(account, recharge=(5000, "cny")).session
    assert again.session == first.session and first.session.pack_id == pack.pack_id
    assert (recharge.kind, recharge.amount_minor, recharge.currency) == (
        billing_pb.CHECKOUT_KIND_RECHARGE,
        5000,
        "CNY",
    )
    assert len(stripe_double.checkout_requests()) == before + 2


def test_checkout_checks_the_ledger_rules_before_calling_stripe(
    checkout: billing_service_pb2_grpc.BillingServiceStub,
    stripe_double: StripeDouble,
    sources: Sources,
    configure: Any,
) -> None:
    configure("purchase.allow_free_users", False)
    pack = sources.create_pack(50 * CREDIT)
    hidden = sources.create_pack(50 * CREDIT, active=False)
    before = len(stripe_double.checkout_requests())

    def attempt(**purchase: Any) -> Callable[[], Any]:
        return lambda: checkout.CreateCheckoutSession(
            billing_pb.CreateCheckoutSessionRequest(
                account_id=new_account("rules"), idempotency_key=new_key(), **purchase
            )
        )

    expect_error(
        attempt(pack_id=pack.pack_id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PURCHASE_REQUIRES_SUBSCRIPTION",
    )
    configure("purchase.allow_free_users", True)
    expect_error(
        attempt(pack_id=hidden.pack_id), grpc.StatusCode.FAILED_PRECONDITION, "PACK_INACTIVE"
    )
    expect_error(attempt(pack_id="no-such-pack"), grpc.StatusCode.NOT_FOUND, "PACK_NOT_FOUND")
    expect_error(
        attempt(recharge=billing_pb.RechargeAmount(amount_minor=2999, currency="CNY")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FIELD",
        "recharge.amount_minor",
    )
    expect_error(
        attempt(recharge=billing_pb.RechargeAmount(amount_minor=5000, currency="USD")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FIELD",
        "recharge.currency",
    )
    expect_error(  # malformed, not only unsupported: the same field
        attempt(recharge=billing_pb.RechargeAmount(amount_minor=5000, currency="a\n")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FIELD",
        "recharge.currency",
    )
    expect_error(
        attempt(recharge=billing_pb.RechargeAmount(amount_minor=10**15, currency="CNY")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FIELD",
        "recharge.amount_minor",
    )
    expect_error(attempt(), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD", "purchase")
    expect_error(
        attempt(pack_id=pack.pack_id, success_url="javascript:alert(1)"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FIELD",
        "success_url",
    )
    # URLs urlsplit itself refuses (helper-84: they answered INTERNAL).
    for field, url in [
        ("success_url", "http://["),
        ("success_url", "https://a\uff03b/"),  # a full-width '#' NFKC-normalises to one
        ("success_url", "http://app.example:99999/ok"),
        ("cancel_url", "https://x]/cancel"),
    ]:
        expect_error(
            attempt(pack_id=pack.pack_id, **{field: url}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_FIELD",
            field,
        )
    assert len(stripe_double.checkout_requests()) == before


def test_checkout_for_a_recharge_and_a_subscription(
    checkout: billing_service_pb2_grpc.BillingServiceStub,
    stripe_double: StripeDouble,
    sources: Sources,
) -> None:
    account = new_account("payer")
    recharge = checkout.CreateCheckoutSession(
        billing_pb.CreateCheckoutSessionRequest(
            account_id=account,
            idempotency_key=new_key(),
            recharge=billing_pb.RechargeAmount(amount_minor=5000, currency="cny"),
        )
    ).session
    assert (recharge.kind, recharge.amount_minor, recharge.currency) == (
        billing_pb.CHECKOUT_KIND_RECHARGE,
        5000,
        "CNY",
    )
    sent = stripe_double.checkout_requests()[-1].form
    assert sent["line_items[0][price_data][unit_amount]"] == "5000"
    assert sent["line_items[0][price_data][currency]"] == "cny"
    assert sent["metadata[kind]"] == "recharge"
    assert sent["success_url"].startswith("http://localhost:3000/")  # the configured default

    plan = sources.create_plan(100 * CREDIT, rank=1)
    subscription = checkout.CreateCheckoutSession(
        billing_pb.CreateCheckoutSessionRequest(
            account_id=account, idempotency_key=new_key(), plan_id=plan.plan_id
        )
    ).session
    assert (subscription.kind, subscription.plan_id) == (
        billing_pb.CHECKOUT_KIND_SUBSCRIPTION,
        plan.plan_id,
    )
    sent = stripe_double.checkout_requests()[-1].form
    assert sent["mode"] == "subscription"
    assert sent["line_items[0][price]"] == plan.provider_price_id
    assert sent["subscription_data[metadata][account_id]"] == account


def test_a_subscriber_cannot_check_out_a_second_subscription_until_the_first_ends(
    checkout: billing_service_pb2_grpc.BillingServiceStub,
    stripe_double: StripeDouble,
    apply_events: Callable[..., list[str]],
    sources: Sources,
    ledger: Ledger,
) -> None:
    """A second subscription would be charged beside the first, which the ledger follows
    alone (no carry-over, the wrong one renewing): its plan changes with Stripe instead."""
    account, sub, basic, pro, _, _ = _subscriber(apply_events, sources, ledger)

    def subscribe() -> billing_pb.CheckoutSession:
        return checkout.CreateCheckoutSession(
            billing_pb.CreateCheckoutSessionRequest(
                account_id=account, idempotency_key=new_key(), plan_id=pro.plan_id
            )
        ).session

    sent = len(stripe_double.checkout_requests())
    info = expect_error(subscribe, grpc.StatusCode.FAILED_PRECONDITION, "ALREADY_SUBSCRIBED")
    assert info.metadata["plan_id"] == basic.plan_id
    # A plan that does not exist is not found, for a subscriber too (helper-153's review:
    # ALREADY_SUBSCRIBED, the subscription checked before the plan).
    expect_error(
        lambda: checkout.CreateCheckoutSession(
            billing_pb.CreateCheckoutSessionRequest(
                account_id=account, idempotency_key=new_key(), plan_id="no-such-plan"
            )
        ),
        grpc.StatusCode.NOT_FOUND,
        "PLAN_NOT_FOUND",
    )
    assert len(stripe_double.checkout_requests()) == sent  # nothing asked of Stripe
    apply_events(subscription_deleted(account, sub, int(time.time()) - 1))
    assert subscribe().plan_id == pro.plan_id


def test_a_paid_checkout_grants_what_it_sold_whatever_changed_before_the_payment(
    checkout: billing_service_pb2_grpc.BillingServiceStub,
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
    admin: Any,
    ledger: Ledger,
    configure: Any,
    assert_audit_clean: AuditCheck,
) -> None:
    configure("purchase.allow_free_users", True)
    pack = sources.create_pack(50 * CREDIT, price_minor=990, currency="USD")
    account = new_account("paid-late")
    bought = checkout.CreateCheckoutSession(
        billing_pb.CreateCheckoutSessionRequest(
            account_id=account, idempotency_key=new_key(), pack_id=pack.pack_id
        )
    ).session
    topped_up = checkout.CreateCheckoutSession(
        billing_pb.CreateCheckoutSessionRequest(
            account_id=account,
            idempotency_key=new_key(),
            recharge=billing_pb.RechargeAmount(amount_minor=30000, currency="CNY"),
        )
    ).session
    # While the customer pays: the pack changes and goes off sale, only subscribers may buy
    # packs, and recharges get a higher minimum and no bonus.
    changed = billing_pb.CreditPack()
    changed.CopyFrom(pack)
    changed.credits_micros, changed.active = 10 * CREDIT, False
    admin.UpdateCreditPack(
        admin_pb.UpdateCreditPackRequest(pack=changed, idempotency_key=new_key())
    )
    configure("purchase.allow_free_users", False)
    configure("recharge.minimum_minor", 100000)
    configure("recharge.bonus_tiers", [])

    pack_paid, recharge_paid = apply_events(
        checkout_pack(account, pack.pack_id, session_id=bought.session_id),
        checkout_recharge(account, 30000, session_id=topped_up.session_id),
    )
    assert payments_db.event(pack_paid)["credits_micros"] == 50 * CREDIT  # type: ignore[index]
    assert payments_db.event(recharge_paid)["credits_micros"] == 330 * CREDIT  # type: ignore[index]
    assert ledger.balance(account).balance_micros == 380 * CREDIT
    # A session this ledger did not prepare is still held to the rules of the day.
    [elsewhere] = apply_events(checkout_pack(account, pack.pack_id))
    assert payments_db.event(elsewhere)["status"] == "failed"  # type: ignore[index]
    assert ledger.balance(account).balance_micros == 380 * CREDIT
    assert_audit_clean()


def _purchases(payments_db: PaymentsDb, *accounts: str) -> list[tuple[Any, ...]]:
    return payments_db.rows(
        "SELECT account_id, external_ref FROM purchases WHERE account_id = ANY(%s)",
        (list(accounts),),
    )


def test_a_paid_session_naming_another_account_than_its_own_grants_nobody(
    checkout: billing_service_pb2_grpc.BillingServiceStub,
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
    configure: Any,
) -> None:
    """The session this ledger prepared for one account, completed by an event whose
    metadata names another: the event fails, saying why, and neither is credited (the
    metadata was trusted: the other account got the pack)."""
    configure("purchase.allow_free_users", True)
    pack = sources.create_pack(10 * CREDIT, price_minor=1000)
    owner, other = new_account("session-owner"), new_account("session-other")
    session = checkout.CreateCheckoutSession(
        billing_pb.CreateCheckoutSessionRequest(
            account_id=owner, idempotency_key=new_key(), pack_id=pack.pack_id
        )
    ).session
    [paid] = apply_events(
        checkout_pack(other, pack.pack_id, session_id=session.session_id, amount_total=1000)
    )
    event = payments_db.event(paid)
    assert event is not None
    assert (event["status"], event["credits_micros"]) == ("failed", 0)
    assert f"{session.session_id} was created for another account" in event["last_error"]
    assert _purchases(payments_db, owner, other) == []


def test_one_payment_is_granted_to_one_account_only(
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    configure: Any,
    assert_audit_clean: AuditCheck,
) -> None:
    """Two checkout events of one payment intent naming two accounts: the first is granted,
    the second refused (it was granted too: purchases are unique per account and payment),
    and the payment's refund takes back from the account that has it."""
    configure("purchase.allow_free_users", True)
    pack = sources.create_pack(10 * CREDIT)
    first, second = new_account("paid-once"), new_account("paid-once-too")
    intent = f"pi_{uuid.uuid4().hex}"
    _, refused = apply_events(
        checkout_pack(first, pack.pack_id, payment_intent=intent),
        checkout_pack(second, pack.pack_id, payment_intent=intent),
    )
    event = payments_db.event(refused)
    assert event is not None
    assert (event["status"], event["credits_micros"], event["account_id"]) == (
        "ignored",
        0,
        second,
    )
    assert "fulfilled for another account" in event["last_error"]
    assert _purchases(payments_db, first, second) == [(first, intent)]
    apply_events(charge_refunded(intent, 2500, 2500))
    assert ledger.balance(first).balance_micros == 0
    assert_audit_clean()


def test_stripe_refusals_and_outages_map_to_grpc_errors(
    checkout: billing_service_pb2_grpc.BillingServiceStub,
    stripe_double: StripeDouble,
) -> None:
    """Stripe replays a key's first answer, a 500 included, to every request under it (the
    double does too): once Stripe has answered with an error, the retry of the same request
    asks under a fresh Stripe key, and succeeds (helper-stripeio)."""

    def request() -> billing_pb.CreateCheckoutSessionRequest:
        return billing_pb.CreateCheckoutSessionRequest(
            account_id=new_account("outage"),
            idempotency_key=new_key(),
            recharge=billing_pb.RechargeAmount(amount_minor=5000, currency="CNY"),
        )

    for answer, code, reason in (
        ((400, "invalid_request_error"), "FAILED_PRECONDITION", "PAYMENT_PROVIDER_REJECTED"),
        ((500, "api_error"), "UNAVAILABLE", "PAYMENT_PROVIDER_UNAVAILABLE"),
        # A body that is no session (STRIPE_API_BASE naming another service): not INTERNAL.
        ((200, "not_a_session"), "UNAVAILABLE", "PAYMENT_PROVIDER_UNAVAILABLE"),
        # Another request under the Stripe key (parameters changed since a time-out).
        ((400, "idempotency_error"), "ABORTED", "CONFLICT"),
    ):
        sent = request()
        stripe_double.failures.append(answer)
        expect_error(
            functools.partial(checkout.CreateCheckoutSession, sent), grpc.StatusCode[code], reason
        )
        refused = stripe_double.checkout_requests()[-1]
        assert checkout.CreateCheckoutSession(sent).session.session_id.startswith("cs_test_")
        retried = stripe_double.checkout_requests()[-1]
        assert retried.headers["Idempotency-Key"] != refused.headers["Idempotency-Key"], answer


def test_checkout_attempt_rows_are_deleted_once_no_retry_needs_them(
    checkout: billing_service_pb2_grpc.BillingServiceStub,
    stripe_double: StripeDouble,
    payments_db: PaymentsDb,
    ledger_db_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """checkout_stripe_attempts got a row for every checkout Stripe answered with an error,
    and kept it for ever. The hourly sweep now deletes, in bounded batches, those of settled
    checkouts a day after Stripe's last answer (a retry replays the session without reading
    the row) and the others after 30 days; a checkout still retried within them asks under
    its next Stripe key, not a spent one."""

    def request() -> billing_pb.CreateCheckoutSessionRequest:
        return billing_pb.CreateCheckoutSessionRequest(
            account_id=new_account("attempts"),
            idempotency_key=new_key(),
            recharge=billing_pb.RechargeAmount(amount_minor=5000, currency="CNY"),
        )

    settled, retried, abandoned = [request(), request()], request(), request()
    for sent in [*settled, retried, abandoned]:
        stripe_double.failures.append((500, "api_error"))
        expect_error(
            functools.partial(checkout.CreateCheckoutSession, sent),
            grpc.StatusCode.UNAVAILABLE,
            "PAYMENT_PROVIDER_UNAVAILABLE",
        )
    sessions = [checkout.CreateCheckoutSession(sent).session for sent in settled]
    accounts = [sent.account_id for sent in [*settled, retried, abandoned]]

    def kept() -> list[str]:
        return [
            str(row[0])
            for row in payments_db.rows(
                "SELECT account_id FROM checkout_stripe_attempts"
                " WHERE account_id = ANY(%s) ORDER BY answered_at",
                (accounts,),
            )
        ]

    assert kept() == accounts
    [(answered,)] = payments_db.rows(
        "SELECT max(answered_at) FROM checkout_stripe_attempts WHERE account_id = ANY(%s)",
        (accounts,),
    )
    monkeypatch.setenv("DATABASE_URL", ledger_db_url)
    try:

        def prune(after: timedelta) -> int:
            return sweepers.prune_checkout_stripe_attempts((answered + after).isoformat(), 1)

        prune(timedelta(hours=23))
        assert kept() == accounts
        assert prune(timedelta(hours=25)) >= 2  # one row a statement
        assert kept() == [retried.account_id, abandoned.account_id]
        # The settled checkouts' retries replay their sessions; an unsettled one's asks
        # Stripe under its next key, the first one's answer (an error) being spent.
        assert [checkout.CreateCheckoutSession(sent).session for sent in settled] == sessions
        assert checkout.CreateCheckoutSession(retried).session.session_id.startswith("cs_test_")
        asked = stripe_double.checkout_requests()[-1].headers["Idempotency-Key"]
        assert asked == stripe_idempotency_key(retried.account_id, retried.idempotency_key, 1)
        # Settled now: gone with the day; the abandoned one is kept 30 days.
        prune(timedelta(days=29))
        assert kept() == [abandoned.account_id]
        prune(timedelta(days=31))
        assert kept() == []
    finally:
        worker_db.close()


def test_a_checkout_stripe_refused_succeeds_once_the_pack_price_is_fixed(
    checkout: billing_service_pb2_grpc.BillingServiceStub,
    stripe_double: StripeDouble,
    sources: Sources,
    admin: Any,
    configure: Any,
) -> None:
    """The same request after the cause of a refusal is fixed: Stripe saved the refusal and
    the old price under its key, so asking again under it would be refused again, or as a
    different request (helper-stripeio)."""
    configure("purchase.allow_free_users", True)
    pack = sources.create_pack(10 * CREDIT)
    sent = billing_pb.CreateCheckoutSessionRequest(
        account_id=new_account("fixed"), idempotency_key=new_key(), pack_id=pack.pack_id
    )
    stripe_double.failures.append((400, "invalid_request_error"))  # No such price
    expect_error(
        lambda: checkout.CreateCheckoutSession(sent),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PAYMENT_PROVIDER_REJECTED",
    )
    changed = billing_pb.CreditPack()
    changed.CopyFrom(pack)
    changed.provider_price_id = f"price_fixed_{uuid.uuid4().hex[:8]}"
    admin.UpdateCreditPack(
        admin_pb.UpdateCreditPackRequest(pack=changed, idempotency_key=new_key())
    )
    assert checkout.CreateCheckoutSession(sent).session.session_id.startswith("cs_test_")
    assert stripe_double.checkout_requests()[-1].form["line_items[0][price]"] == (
        changed.provider_price_id
    )


def test_a_stripe_that_never_answers_is_given_up_on_before_the_calls_deadline(
    checkout: billing_service_pb2_grpc.BillingServiceStub, stripe_double: StripeDouble
) -> None:
    """UNAVAILABLE, as README promises of Stripe down, within the caller's deadline: the
    requests to Stripe waited out the library's 80 s time-out, three times (helper-stripeio)."""
    sent = billing_pb.CreateCheckoutSessionRequest(
        account_id=new_account("hung"),
        idempotency_key=new_key(),
        recharge=billing_pb.RechargeAmount(amount_minor=5000, currency="CNY"),
    )
    stripe_double.stall = 3.0
    try:
        started = time.monotonic()
        expect_error(
            lambda: checkout.CreateCheckoutSession(sent, timeout=1.0),
            grpc.StatusCode.UNAVAILABLE,
            "PAYMENT_PROVIDER_UNAVAILABLE",
        )
        assert time.monotonic() - started < 1.0
    finally:
        stripe_double.stall = 0.0
    # Stripe may have created the session before the time-out: the retry asks under the
    # same Stripe key, and gets it.
    hung = stripe_double.checkout_requests()[-1]
    assert checkout.CreateCheckoutSession(sent).session.session_id.startswith("cs_test_")
    assert (
        stripe_double.checkout_requests()[-1].headers["Idempotency-Key"]
        == (hung.headers["Idempotency-Key"])
    )


def test_checkouts_waiting_on_stripe_hold_up_no_spend_call(
    stripe_double: StripeDouble,
    ledger_db_url: str,
    payments_redis_url: str,
    ledger: Ledger,
    admin: Any,
    configure: Any,
) -> None:
    """While Stripe does not answer, the checkouts get UNAVAILABLE after
    LEDGER_STRIPE_TIMEOUT_SECONDS (one retry), and they wait on threads of their own: a
    Consume crossing a low-balance threshold queues its alert email on the event loop's
    default executor, which a checkout per thread had filled (helper-stripeio)."""
    stripe_settings = StripeSettings(
        api_key="sk_test_double", api_base=stripe_double.url, timeout_seconds=1.0
    )
    settings = Settings(
        database_url=ledger_db_url, redis_url=payments_redis_url, stripe=stripe_settings
    )
    configure("alerts.email_to", "ops@example.com")
    account = new_account("spender")
    ledger.grant(account, 30)
    admin.SetLowBalanceAlert(
        admin_pb.SetLowBalanceAlertRequest(
            account_id=account, threshold_micros=20 * CREDIT, idempotency_key=new_key()
        )
    )
    # More checkouts than the default executor has threads (min(32, CPUs + 4)).
    default_threads = min(32, (os.cpu_count() or 1) + 4)
    server = ServerThread(settings, OffsetClock()).start()
    stripe_double.stall = 5.0
    try:
        with grpc.insecure_channel(server.address) as channel:
            billing = billing_service_pb2_grpc.BillingServiceStub(channel)
            before = len(stripe_double.checkout_requests())
            started = time.monotonic()
            calls = [
                billing.CreateCheckoutSession.future(
                    billing_pb.CreateCheckoutSessionRequest(
                        account_id=new_account("waiting"),
                        idempotency_key=new_key(),
                        recharge=billing_pb.RechargeAmount(amount_minor=5000, currency="CNY"),
                    ),
                    timeout=20,
                )
                for _ in range(default_threads + 2)
            ]
            in_flight = min(default_threads, STRIPE_THREADS)
            while len(stripe_double.checkout_requests()) < before + in_flight:
                time.sleep(0.01)
            spend = Ledger(ledger_service_pb2_grpc.LedgerServiceStub(channel))
            consumed = time.monotonic()
            assert spend.consume(account, 15 * CREDIT).balance.balance_micros == 15 * CREDIT
            assert time.monotonic() - consumed < 1.0
            # The first checkouts: two requests of a second each, half a second between.
            expect_error(
                calls[0].result, grpc.StatusCode.UNAVAILABLE, "PAYMENT_PROVIDER_UNAVAILABLE"
            )
            assert time.monotonic() - started < 4.0
            for call in calls:
                expect_error(
                    call.result, grpc.StatusCode.UNAVAILABLE, "PAYMENT_PROVIDER_UNAVAILABLE"
                )
    finally:
        stripe_double.stall = 0.0
        server.stop()


# --- plans sharing a provider price (helper-99) --------------------------------------------


def _retire_for(sources: Sources, plan: billing_pb.SubscriptionPlan) -> None:
    """The plan stops being sold (its price may then go to another plan)."""
    retired = billing_pb.SubscriptionPlan()
    retired.CopyFrom(plan)
    retired.active = False
    sources.admin.UpdateSubscriptionPlan(
        admin_pb.UpdateSubscriptionPlanRequest(plan=retired, idempotency_key=new_key())
    )


def test_a_renewal_at_a_price_another_plan_now_has_stays_on_the_subscribers_plan(
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    assert_audit_clean: AuditCheck,
) -> None:
    """A retired plan's price given to a new plan: its subscribers' renewals (and their
    subscription updates) still name that price, and they stay on their plan, with its
    credits; the invoice and the update agree."""
    price = f"price_{uuid.uuid4().hex}"
    pro = sources.create_plan(1000 * CREDIT, rank=2, provider_price_id=price)
    account, sub = new_account("renewing"), f"sub_{uuid.uuid4().hex}"
    start = int(time.time()) - 60
    end = start + 30 * 86400
    apply_events(invoice_paid(account, sub, price, start, end))
    _retire_for(sources, pro)
    sources.create_plan(100 * CREDIT, rank=3, provider_price_id=price)

    [renewal] = apply_events(
        invoice_paid(
            account, sub, price, end - 3600, end + 30 * 86400, billing_reason="subscription_cycle"
        )
    )
    assert payments_db.event(renewal)["credits_micros"] == 1000 * CREDIT  # type: ignore[index]
    assert sources.get_account(account).subscription.plan_id == pro.plan_id
    [update] = apply_events(
        subscription_updated(account, sub, price, end - 3600, end + 30 * 86400, created=now_s())
    )
    assert payments_db.event(update)["status"] == "ignored"  # type: ignore[index]
    assert sources.get_account(account).subscription.plan_id == pro.plan_id
    assert_audit_clean()


def test_a_new_subscriber_at_a_shared_price_starts_the_active_plan(
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
) -> None:
    """An invoice of a subscription the ledger does not know yet (its checkout's event not
    applied, or made without a checkout) at a price a retired plan shares with the active
    one starts the active plan, whatever the ranks (helper-102: the retired pro-v1 of rank 3
    was granted over the active pro-v2)."""
    price = f"price_{uuid.uuid4().hex}"
    retired = sources.create_plan(1000 * CREDIT, rank=3, provider_price_id=price)
    _retire_for(sources, retired)
    current = sources.create_plan(10 * CREDIT, rank=2, provider_price_id=price)
    account, sub = new_account("new"), f"sub_{uuid.uuid4().hex}"
    start = int(time.time()) - 60
    [paid] = apply_events(invoice_paid(account, sub, price, start, start + 30 * 86400))
    assert payments_db.event(paid)["credits_micros"] == 10 * CREDIT  # type: ignore[index]
    assert sources.get_account(account).subscription.plan_id == current.plan_id


def now_s() -> int:
    return int(time.time())


def test_a_first_invoice_at_a_shared_price_starts_the_plan_its_checkout_was_for(
    checkout: billing_service_pb2_grpc.BillingServiceStub,
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
) -> None:
    price = f"price_{uuid.uuid4().hex}"
    basic = sources.create_plan(100 * CREDIT, rank=1, provider_price_id=price)
    account, sub = new_account("checking-out"), f"sub_{uuid.uuid4().hex}"
    session = checkout.CreateCheckoutSession(
        billing_pb.CreateCheckoutSessionRequest(
            account_id=account, idempotency_key=new_key(), plan_id=basic.plan_id
        )
    ).session
    # Retired and its price given to another plan while the customer was paying.
    _retire_for(sources, basic)
    sources.create_plan(1000 * CREDIT, rank=2, provider_price_id=price)
    completed = event(
        "checkout.session.completed",
        {
            "id": session.session_id,
            "object": "checkout.session",
            "mode": "subscription",
            "payment_status": "paid",
            "status": "complete",
            "client_reference_id": account,
            "metadata": {"account_id": account, "kind": "subscription"},
            "subscription": sub,
        },
    )
    start = now_s() - 60
    [_, paid] = apply_events(completed, invoice_paid(account, sub, price, start, start + 86400))
    assert payments_db.event(paid)["credits_micros"] == 100 * CREDIT  # type: ignore[index]
    assert sources.get_account(account).subscription.plan_id == basic.plan_id


def test_a_plan_keeps_its_provider_price_while_a_checkout_for_it_may_be_paid(
    checkout: billing_service_pb2_grpc.BillingServiceStub, sources: Sources
) -> None:
    """The session's first invoice names the price it was made with (helper-99)."""
    plan = sources.create_plan(100 * CREDIT, rank=1)
    checkout.CreateCheckoutSession(
        billing_pb.CreateCheckoutSessionRequest(
            account_id=new_account("paying"), idempotency_key=new_key(), plan_id=plan.plan_id
        )
    )
    repriced = billing_pb.SubscriptionPlan()
    repriced.CopyFrom(plan)
    repriced.provider_price_id = f"price_{uuid.uuid4().hex}"
    info = expect_error(
        lambda: sources.admin.UpdateSubscriptionPlan(
            admin_pb.UpdateSubscriptionPlanRequest(plan=repriced, idempotency_key=new_key())
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PLAN_IN_USE",
    )
    assert info.metadata["plan_id"] == plan.plan_id
