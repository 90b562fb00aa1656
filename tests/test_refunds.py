"""Refunds return committed credits to the lots they came from; a refund into a
lot that expired meanwhile expires at once, and the journal says so."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration

from ledger.v1 import ledger_service_pb2 as pb
from ledger.v1 import types_pb2
from ledger_server.clock import OffsetClock
from support.ledger import CREDIT, Ledger, expect_error, new_account

FAILED = grpc.StatusCode.FAILED_PRECONDITION


def test_refund_goes_back_to_the_lots_it_came_from(ledger: Ledger, assert_audit_clean: Any) -> None:
    account = new_account()
    daily = ledger.grant(account, 10, source=types_pb2.CREDIT_SOURCE_DAILY).lot.lot_id
    purchase = ledger.grant(account, 50).lot.lot_id
    charge = ledger.consume(account, 25 * CREDIT).reservation
    assert [(p.lot_id, p.committed_micros) for p in charge.lots] == [
        (daily, 10 * CREDIT),
        (purchase, 15 * CREDIT),
    ]

    # Part refund: the last-charged lot takes it back first.
    part = ledger.refund(account, charge.reservation_id, 20 * CREDIT)
    assert part.refunded_micros == 20 * CREDIT
    assert part.expired_micros == 0
    assert [(p.lot_id, p.refunded_micros) for p in part.reservation.lots] == [
        (daily, 5 * CREDIT),
        (purchase, 15 * CREDIT),
    ]
    remaining = {lot.lot_id: lot.remaining_micros for lot in ledger.lots(account)}
    assert remaining == {daily: 5 * CREDIT, purchase: 50 * CREDIT}

    rest = ledger.refund(account, charge.reservation_id)  # no amount: everything left
    assert rest.refunded_micros == 5 * CREDIT
    assert rest.balance.balance_micros == 60 * CREDIT
    assert rest.reservation.refunded_micros == 25 * CREDIT
    statuses = {
        t.reservation_id: t.status
        for t in ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_CHARGE])
    }
    assert statuses[charge.reservation_id] == pb.TRANSACTION_STATUS_REFUNDED
    assert_audit_clean()


def test_refund_of_a_partly_refunded_charge_shows_partial_status(ledger: Ledger) -> None:
    account = new_account()
    ledger.grant(account, 10)
    charge = ledger.consume(account, 4 * CREDIT).reservation
    ledger.refund(account, charge.reservation_id, CREDIT)
    [entry] = ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_CHARGE])
    assert entry.status == pb.TRANSACTION_STATUS_PARTIALLY_REFUNDED


def test_refund_above_the_charge_is_refused(ledger: Ledger) -> None:
    account = new_account()
    ledger.grant(account, 30)
    charge = ledger.consume(account, 10 * CREDIT).reservation
    info = expect_error(
        lambda: ledger.refund(account, charge.reservation_id, 10 * CREDIT + 1),
        FAILED,
        "AMOUNT_EXCEEDS_REFUNDABLE",
    )
    assert info.metadata["refundable_micros"] == str(10 * CREDIT)
    ledger.refund(account, charge.reservation_id, 6 * CREDIT)
    expect_error(
        lambda: ledger.refund(account, charge.reservation_id, 5 * CREDIT),
        FAILED,
        "AMOUNT_EXCEEDS_REFUNDABLE",
    )
    assert ledger.balance(account).balance_micros == 26 * CREDIT


def test_refund_of_a_partial_commit_is_bounded_by_what_was_committed(ledger: Ledger) -> None:
    account = new_account()
    ledger.grant(account, 30)
    reservation_id = ledger.reserve(account, 10 * CREDIT).reservation.reservation_id
    ledger.commit(account, reservation_id, 4 * CREDIT)
    expect_error(
        lambda: ledger.refund(account, reservation_id, 5 * CREDIT),
        FAILED,
        "AMOUNT_EXCEEDS_REFUNDABLE",
    )
    assert ledger.refund(account, reservation_id).refunded_micros == 4 * CREDIT


def test_only_committed_reservations_can_be_refunded(ledger: Ledger) -> None:
    account = new_account()
    ledger.grant(account, 30)
    pending = ledger.reserve(account, 5 * CREDIT).reservation.reservation_id
    expect_error(lambda: ledger.refund(account, pending), FAILED, "RESERVATION_NOT_COMMITTED")


def test_refund_into_an_expired_lot_expires_at_once(
    ledger: Ledger, clock: OffsetClock, assert_audit_clean: Any
) -> None:
    account = new_account()
    expiring = ledger.grant(
        account, 10, source=types_pb2.CREDIT_SOURCE_SIGNUP, expires_in=Duration(seconds=3600)
    ).lot.lot_id
    permanent = ledger.grant(account, 10).lot.lot_id
    charge = ledger.consume(account, 14 * CREDIT).reservation
    assert [(p.lot_id, p.committed_micros) for p in charge.lots] == [
        (expiring, 10 * CREDIT),
        (permanent, 4 * CREDIT),
    ]

    clock.advance(timedelta(hours=2))
    refund = ledger.refund(account, charge.reservation_id)
    assert refund.refunded_micros == 14 * CREDIT
    assert refund.expired_micros == 10 * CREDIT
    assert refund.balance.balance_micros == 10 * CREDIT  # only the permanent part is spendable
    assert refund.balance.available_micros == 10 * CREDIT
    by_lot = {p.lot_id: p for p in refund.reservation.lots}
    assert by_lot[expiring].refund_expired_micros == 10 * CREDIT
    assert by_lot[permanent].refund_expired_micros == 0

    lots = {lot.lot_id: lot for lot in ledger.lots(account, include_inactive=True)}
    assert lots[expiring].remaining_micros == 0
    assert lots[expiring].expired_micros == 10 * CREDIT
    assert lots[permanent].remaining_micros == 10 * CREDIT

    [journal_entry] = ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_REFUND])
    assert journal_entry.amount_micros == 4 * CREDIT
    breakage = [p for p in journal_entry.postings if p.ledger_account == "breakage"]
    assert [(p.lot_id, p.amount_micros) for p in breakage] == [("", 10 * CREDIT)]
    assert "expired" in breakage[0].memo
    with_memo = [p for p in journal_entry.postings if p.lot_id == expiring and p.amount_micros < 0]
    assert with_memo and "expired" in with_memo[0].memo
    assert_audit_clean()


def test_expired_lots_leave_the_balance_without_a_sweeper(
    ledger: Ledger, clock: OffsetClock, assert_audit_clean: Any
) -> None:
    account = new_account()
    ledger.grant(
        account, 10, source=types_pb2.CREDIT_SOURCE_SIGNUP, expires_in=Duration(seconds=60)
    )
    ledger.grant(account, 5)
    clock.advance(timedelta(seconds=61))
    assert ledger.balance(account).balance_micros == 5 * CREDIT
    expect_error(lambda: ledger.consume(account, 6 * CREDIT), FAILED, "INSUFFICIENT_CREDITS")
    [expiry] = ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_EXPIRY])
    assert expiry.amount_micros == -10 * CREDIT
    assert_audit_clean()
