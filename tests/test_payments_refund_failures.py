"""Refunds that fail after charge.refunded took their share (charge.refund.updated,
refund.failed): through the webhook receiver and a burst RQ worker, as Stripe sends them."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psycopg

from ledger.v1 import types_pb2
from support import payments as payment_fixtures
from support.ledger import CREDIT, Ledger, new_account, new_key
from support.payments import PaymentsDb, bought_pack
from support.sources import Sources
from support.webhooks import (
    charge_refunded,
    invoice_paid,
    invoice_payment_paid,
    refund_updated,
)

AuditCheck = Callable[[], None]

payments_db = payment_fixtures.payments_db
payments_redis_url = payment_fixtures.payments_redis_url
webhook_url = payment_fixtures.webhook_url
sources = payment_fixtures.sources
apply_events = payment_fixtures.apply_events


def test_a_failed_refund_gives_back_what_it_took_once_and_a_new_refund_takes_it_again(
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    configure: Any,
    assert_audit_clean: AuditCheck,
) -> None:
    account, intent = bought_pack(apply_events, sources, configure, "refund-failed", 1000)
    ledger.consume(account, 30 * CREDIT)
    charge, refund, t = f"ch_{uuid.uuid4().hex}", f"re_{uuid.uuid4().hex}", int(time.time()) - 900
    apply_events(charge_refunded(intent, 1000, 1000, charge_id=charge, created=t))
    assert ledger.balance(account).balance_micros == 0

    # Stripe sends charge.refund.updated, and refund.failed since API version 2024-10-28;
    # an update of another status (refund.updated: succeeded) changes nothing.
    failures = apply_events(
        refund_updated(
            refund,
            charge,
            intent,
            1000,
            refund_created=t,
            created=t + 1,
            status="succeeded",
            event_type="refund.updated",
        ),
        refund_updated(refund, charge, intent, 1000, refund_created=t, created=t + 100),
        refund_updated(
            refund,
            charge,
            intent,
            1000,
            refund_created=t,
            created=t + 100,
            event_type="refund.failed",
        ),
    )
    rows = [payments_db.event(e) for e in failures]
    assert sorted((r["status"], r["credits_micros"], r["account_id"]) for r in rows) == [  # type: ignore[index]
        ("ignored", 0, account),
        ("ignored", 0, account),
        ("processed", 70 * CREDIT, account),
    ]
    assert ledger.balance(account).balance_micros == 70 * CREDIT
    [lot] = [lot for lot in ledger.lots(account) if lot.remaining_micros]
    assert (lot.source, lot.HasField("expires_at")) == (types_pb2.CREDIT_SOURCE_PURCHASE, False)

    # Refunded again, successfully: its share is taken again.
    [again] = apply_events(charge_refunded(intent, 1000, 1000, charge_id=charge, created=t + 200))
    assert payments_db.event(again)["credits_micros"] == -70 * CREDIT  # type: ignore[index]
    assert ledger.balance(account).balance_micros == 0
    assert_audit_clean()


def test_a_failed_refund_the_ledger_never_applied_changes_nothing_in_either_order(
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    configure: Any,
    assert_audit_clean: AuditCheck,
) -> None:
    """A refund of 500 stands; one of 300 made later fails before its charge.refunded (800
    refunded then) is delivered: the failure gives nothing back, the late event takes
    nothing, and the first refund's share stays taken."""
    account, intent = bought_pack(apply_events, sources, configure, "refund-failed-first", 1000)
    charge, t = f"ch_{uuid.uuid4().hex}", int(time.time()) - 900
    apply_events(charge_refunded(intent, 1000, 500, charge_id=charge, created=t))
    assert ledger.balance(account).balance_micros == 50 * CREDIT
    failed, late = apply_events(
        refund_updated(
            f"re_{uuid.uuid4().hex}", charge, intent, 300, refund_created=t + 10, created=t + 50
        ),
        charge_refunded(intent, 1000, 800, charge_id=charge, created=t + 10),
    )
    assert payments_db.event(failed)["credits_micros"] == 0  # type: ignore[index]
    assert payments_db.event(late)["credits_micros"] == 0  # type: ignore[index]
    assert ledger.balance(account).balance_micros == 50 * CREDIT
    assert_audit_clean()


def test_a_failed_refund_of_a_period_gives_back_only_into_its_live_lot(
    apply_events: Callable[..., list[str]],
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    ledger_db_url: str,
    assert_audit_clean: AuditCheck,
) -> None:
    """A subscription period's credits come back to the period's lot, which ends with the
    period; a period that has ended gets nothing back (its credits would have expired)."""
    plan = sources.create_plan(100 * CREDIT, rank=1)
    now = int(time.time())
    periods, paid = [], []
    # A long period that is live at the server's time too, however far the suite moved it.
    for end in (now + 3650 * 86400, now + 5):
        account, sub = new_account("sub-refund-failed"), f"sub_{uuid.uuid4().hex}"
        invoice, intent, charge = (f"{p}_{uuid.uuid4().hex}" for p in ("in", "pi", "ch"))
        periods.append((account, intent, charge, end))
        paid += [
            invoice_paid(account, sub, plan.provider_price_id, now - 60, end, invoice),
            invoice_payment_paid(invoice, intent),
        ]
    apply_events(*paid)
    # Spent at the worker's time (real time), in SQL: the suite's server clock may be hours
    # ahead by now (tests move it), and past the short period's end there.
    with psycopg.connect(ledger_db_url, autocommit=True) as conn:
        for account, *_ in periods:
            conn.execute(
                "SELECT ledger_consume(%s, %s, '\\x01', %s, NULL, '', '', %s)",
                (account, new_key(), 25 * CREDIT, datetime.now(UTC)),
            )
    apply_events(
        *(charge_refunded(i, 1000, 1000, charge_id=c, created=now) for _, i, c, _ in periods)
    )
    time.sleep(max(0.0, periods[1][3] + 0.5 - time.time()))  # the short period ends
    failures = apply_events(
        *(
            refund_updated(
                f"re_{uuid.uuid4().hex}", c, i, 1000, refund_created=now, created=now + 5
            )
            for _, i, c, _ in periods
        )
    )
    assert [payments_db.event(e)["credits_micros"] for e in failures] == [75 * CREDIT, 0]  # type: ignore[index]
    live = periods[0][0]
    assert ledger.balance(live).balance_micros == 75 * CREDIT
    [lot] = [lot for lot in ledger.lots(live) if lot.remaining_micros]
    assert (lot.source, lot.expires_at.seconds) == (
        types_pb2.CREDIT_SOURCE_SUBSCRIPTION,
        periods[0][3],
    )
    assert ledger.balance(periods[1][0]).balance_micros == 0
    assert_audit_clean()
