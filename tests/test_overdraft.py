"""Overdraft (DESIGN.md section 3): a balance goes below zero only by an account's explicit
limit, and no further; a debt never stands beside spendable credits (grants, releases,
commits and refunds repay it at once); lowering the limit, low-balance alerts and reports
all see the balance the API shows."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf.duration_pb2 import Duration

from ledger.v1 import admin_service_pb2 as admin_pb
from ledger.v1 import (
    admin_service_pb2_grpc,
    ledger_service_pb2_grpc,
    report_service_pb2_grpc,
    types_pb2,
)
from ledger.v1 import ledger_service_pb2 as pb
from ledger.v1 import report_service_pb2 as report_pb
from ledger_server.clock import OffsetClock
from support.ledger import CREDIT, Ledger, consume_or_error, expect_error, new_account, new_key

FAILED = grpc.StatusCode.FAILED_PRECONDITION
INVALID = grpc.StatusCode.INVALID_ARGUMENT
OVERDRAFT = types_pb2.CREDIT_SOURCE_OVERDRAFT


def _set_limit(
    admin: admin_service_pb2_grpc.AdminServiceStub, account: str, credits: float, key: str = ""
) -> admin_pb.SetOverdraftLimitResponse:
    return admin.SetOverdraftLimit(
        admin_pb.SetOverdraftLimitRequest(
            account_id=account,
            idempotency_key=key or f"limit-{uuid.uuid4()}",
            overdraft_limit_micros=round(credits * CREDIT),
            reason="trusted customer",
        )
    )


def _account_with_limit(
    ledger: Ledger, admin: admin_service_pb2_grpc.AdminServiceStub, credits: float, limit: float
) -> str:
    """A new account holding `credits` of a purchase, then given an overdraft `limit`."""
    account = new_account()
    ledger.grant(account, credits)
    _set_limit(admin, account, limit)
    return account


def _shown(ledger: Ledger, account: str) -> tuple[float, float, float, float]:
    """Balance, available, limit and debt, in credits."""
    b = ledger.balance(account)
    return tuple(  # type: ignore[return-value]
        v / CREDIT
        for v in (b.balance_micros, b.available_micros, b.overdraft_limit_micros, b.debt_micros)
    )


def _lot_by_source(ledger: Ledger, account: str, source: int) -> types_pb2.Lot:
    [lot] = [x for x in ledger.lots(account, include_inactive=True) if x.source == source]
    return lot


def test_a_limit_lets_the_balance_go_below_zero_and_no_further(
    ledger: Ledger, admin: admin_service_pb2_grpc.AdminServiceStub, assert_audit_clean: Any
) -> None:
    account = new_account()
    ledger.grant(account, 10)
    assert _shown(ledger, account) == (10, 10, 0, 0)

    answer = _set_limit(admin, account, 5)
    assert answer.transaction_id
    assert (answer.balance.balance_micros, answer.balance.available_micros) == (
        10 * CREDIT,
        15 * CREDIT,
    )
    assert answer.balance.overdraft_limit_micros == 5 * CREDIT

    charged = ledger.consume(account, 13 * CREDIT)
    assert charged.balance.balance_micros == -3 * CREDIT
    assert charged.balance.debt_micros == 3 * CREDIT
    assert _shown(ledger, account) == (-3, 2, 5, 3)

    info = expect_error(lambda: ledger.consume(account, 3 * CREDIT), FAILED, "INSUFFICIENT_CREDITS")
    assert info.metadata["available_micros"] == str(2 * CREDIT)
    assert _shown(ledger, account) == (-3, 2, 5, 3)
    ledger.consume(account, 2 * CREDIT)
    assert _shown(ledger, account) == (-5, 0, 5, 5)

    overdraft_lot = _lot_by_source(ledger, account, OVERDRAFT)
    assert (overdraft_lot.amount_micros, overdraft_lot.remaining_micros) == (5 * CREDIT, 0)
    [change] = ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_OVERDRAFT])
    assert change.amount_micros == 5 * CREDIT
    assert change.transaction_id == answer.transaction_id
    assert_audit_clean()


def test_without_a_limit_the_balance_stops_at_zero(ledger: Ledger) -> None:
    account = new_account()
    ledger.grant(account, 4)
    expect_error(lambda: ledger.consume(account, 5 * CREDIT), FAILED, "INSUFFICIENT_CREDITS")
    assert _shown(ledger, account) == (4, 4, 0, 0)


def test_the_next_grants_repay_the_debt_first(
    ledger: Ledger, admin: admin_service_pb2_grpc.AdminServiceStub, assert_audit_clean: Any
) -> None:
    account = _account_with_limit(ledger, admin, 2, 10)
    ledger.consume(account, 8 * CREDIT)
    assert _shown(ledger, account) == (-6, 4, 10, 6)

    first = ledger.grant(account, 4, source=types_pb2.CREDIT_SOURCE_DAILY)
    assert (first.lot.amount_micros, first.lot.remaining_micros) == (4 * CREDIT, 0)
    assert (first.balance.balance_micros, first.balance.debt_micros) == (-2 * CREDIT, 2 * CREDIT)
    second = ledger.grant(account, 5)
    assert second.lot.remaining_micros == 3 * CREDIT
    assert _shown(ledger, account) == (3, 13, 10, 0)

    repayments = ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_TRANSFER])
    assert sorted(t.amount_micros for t in repayments) == [2 * CREDIT, 4 * CREDIT]
    assert _lot_by_source(ledger, account, OVERDRAFT).remaining_micros == 10 * CREDIT
    assert_audit_clean()


def test_credits_a_release_frees_pay_the_debt_back(
    ledger: Ledger, admin: admin_service_pb2_grpc.AdminServiceStub, assert_audit_clean: Any
) -> None:
    account = new_account()
    daily = ledger.grant(account, 5, source=types_pb2.CREDIT_SOURCE_DAILY).lot.lot_id
    _set_limit(admin, account, 10)
    hold = ledger.reserve(account, 5 * CREDIT).reservation  # the daily credits, held
    ledger.consume(account, 5 * CREDIT)  # from the overdraft
    assert _shown(ledger, account) == (0, 5, 10, 5)

    released = ledger.release(account, hold.reservation_id)
    assert (released.balance.balance_micros, released.balance.debt_micros) == (0, 0)
    assert _shown(ledger, account) == (0, 10, 10, 0)
    lots = {lot.lot_id: lot for lot in ledger.lots(account, include_inactive=True)}
    assert lots[daily].remaining_micros == 0
    [repayment] = ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_TRANSFER])
    assert repayment.amount_micros == 5 * CREDIT
    assert_audit_clean()


def test_a_commit_drawn_on_the_overdraft_is_paid_from_credits_granted_since(
    ledger: Ledger, admin: admin_service_pb2_grpc.AdminServiceStub, assert_audit_clean: Any
) -> None:
    account = new_account()
    ledger.grant(account, 1)
    ledger.consume(account, CREDIT)
    _set_limit(admin, account, 10)
    hold = ledger.reserve(account, 10 * CREDIT).reservation  # all of it on the overdraft lot
    ledger.grant(account, 4)  # no debt yet: nothing to repay
    assert _shown(ledger, account) == (4, 4, 10, 0)

    committed = ledger.commit(account, hold.reservation_id, 10 * CREDIT)
    assert committed.balance.balance_micros == -6 * CREDIT
    assert committed.balance.debt_micros == 6 * CREDIT
    assert _shown(ledger, account) == (-6, 4, 10, 6)
    assert_audit_clean()


def test_a_refund_pays_the_debt_back_and_what_has_no_room_goes_to_what_repaid_it(
    ledger: Ledger, admin: admin_service_pb2_grpc.AdminServiceStub, assert_audit_clean: Any
) -> None:
    account = _account_with_limit(ledger, admin, 2, 10)
    first = ledger.consume(account, 8 * CREDIT).reservation  # 2 from the purchase, 6 overdraft
    ledger.refund(account, first.reservation_id, 5 * CREDIT)  # the overdraft lot first
    assert _shown(ledger, account) == (-1, 9, 10, 1)

    second = ledger.consume(account, 3 * CREDIT).reservation  # all from the overdraft
    repaying = ledger.grant(account, 10).lot.lot_id  # repays the 4 owed
    assert _shown(ledger, account) == (6, 16, 10, 0)
    refund = ledger.refund(account, second.reservation_id)
    assert refund.refunded_micros == 3 * CREDIT
    assert refund.balance.balance_micros == 9 * CREDIT
    assert refund.balance.available_micros == 19 * CREDIT
    # The debt the charge ran up was repaid by the grant: the 3 go back to it, not to a new
    # (free, permanent) refund lot (helper-51).
    lots = {lot.lot_id: lot for lot in ledger.lots(account, include_inactive=True)}
    assert lots[repaying].remaining_micros == (10 - 4 + 3) * CREDIT
    assert types_pb2.CREDIT_SOURCE_REFUND not in {lot.source for lot in lots.values()}
    overdraft_lot = _lot_by_source(ledger, account, OVERDRAFT)
    assert overdraft_lot.remaining_micros == overdraft_lot.amount_micros == 10 * CREDIT
    assert _shown(ledger, account) == (9, 19, 10, 0)
    assert_audit_clean()


def test_a_refund_into_other_lots_pays_the_debt_back(
    ledger: Ledger, admin: admin_service_pb2_grpc.AdminServiceStub, assert_audit_clean: Any
) -> None:
    account = new_account()
    purchase = ledger.grant(account, 5).lot.lot_id
    _set_limit(admin, account, 10)
    first = ledger.consume(account, 5 * CREDIT).reservation  # the purchase
    ledger.consume(account, 3 * CREDIT)  # the overdraft
    refund = ledger.refund(account, first.reservation_id)
    assert (refund.balance.balance_micros, refund.balance.debt_micros) == (2 * CREDIT, 0)
    lots = {lot.lot_id: lot for lot in ledger.lots(account, include_inactive=True)}
    assert lots[purchase].remaining_micros == 2 * CREDIT
    assert_audit_clean()


def test_lowering_the_limit_takes_back_only_the_unused_part(
    ledger: Ledger, admin: admin_service_pb2_grpc.AdminServiceStub, assert_audit_clean: Any
) -> None:
    account = _account_with_limit(ledger, admin, 1, 10)
    ledger.consume(account, 5 * CREDIT)  # debt 4
    hold = ledger.reserve(account, 2 * CREDIT).reservation  # 2 more of the overdraft held
    assert _shown(ledger, account) == (-4, 4, 10, 4)

    info = expect_error(lambda: _set_limit(admin, account, 5.5), FAILED, "OVERDRAFT_IN_USE")
    assert info.metadata["field"] == "overdraft_limit_micros"
    assert info.metadata["in_use_micros"] == str(6 * CREDIT)
    assert _shown(ledger, account) == (-4, 4, 10, 4)

    lowered = _set_limit(admin, account, 6)
    assert lowered.balance.balance_micros == -4 * CREDIT
    assert lowered.balance.available_micros == 0
    again = _set_limit(admin, account, 6)
    assert again.transaction_id == ""
    assert len(ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_OVERDRAFT])) == 2

    ledger.release(account, hold.reservation_id)
    _set_limit(admin, account, 4)
    assert _shown(ledger, account) == (-4, 0, 4, 4)
    expect_error(lambda: _set_limit(admin, account, 0), FAILED, "OVERDRAFT_IN_USE")
    ledger.grant(account, 4)
    assert _set_limit(admin, account, 0).balance.balance_micros == 0
    assert _shown(ledger, account) == (0, 0, 0, 0)
    assert _lot_by_source(ledger, account, OVERDRAFT).amount_micros == 0
    assert_audit_clean()


def test_bad_input_is_refused_by_field_and_changes_nothing(
    ledger: Ledger, admin: admin_service_pb2_grpc.AdminServiceStub
) -> None:
    account = new_account()
    ledger.grant(account, 3)
    good = {"account_id": account, "idempotency_key": "k", "overdraft_limit_micros": 1}
    for change, field in (
        ({"overdraft_limit_micros": -1}, "overdraft_limit_micros"),
        ({"overdraft_limit_micros": 10**16}, "overdraft_limit_micros"),
        ({"reason": ""}, "reason"),
        ({"account_id": ""}, "account_id"),
        ({"idempotency_key": ""}, "idempotency_key"),
    ):
        request = admin_pb.SetOverdraftLimitRequest(**{**good, "reason": "r", **change})
        info = expect_error(lambda r=request: admin.SetOverdraftLimit(r), INVALID, "INVALID_FIELD")
        assert info.metadata["field"] == field
    expect_error(
        lambda: _set_limit(admin, new_account(), 5), grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND"
    )
    info = expect_error(
        lambda: ledger.grant(account, 5, source=OVERDRAFT), INVALID, "INVALID_FIELD"
    )
    assert info.metadata["field"] == "source"
    assert _shown(ledger, account) == (3, 3, 0, 0)
    assert not ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_OVERDRAFT])


def test_a_retried_change_answers_the_first_response_and_never_undoes_a_later_one(
    ledger: Ledger, admin: admin_service_pb2_grpc.AdminServiceStub, assert_audit_clean: Any
) -> None:
    account = new_account()
    ledger.grant(account, 1)
    first = _set_limit(admin, account, 10, key="raise")
    _set_limit(admin, account, 20, key="raise-more")
    retried, call = admin.SetOverdraftLimit.with_call(
        admin_pb.SetOverdraftLimitRequest(
            account_id=account,
            idempotency_key="raise",
            overdraft_limit_micros=10 * CREDIT,
            reason="trusted customer",
        )
    )
    assert ("ledger-idempotent-replay", "true") in (call.trailing_metadata() or ())
    assert retried == first
    assert _shown(ledger, account) == (1, 21, 20, 0)
    assert len(ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_OVERDRAFT])) == 2

    unchanged = _set_limit(admin, account, 20, key="same")
    assert unchanged.transaction_id == ""
    assert _set_limit(admin, account, 20, key="same") == unchanged
    info = expect_error(
        lambda: _set_limit(admin, account, 5, key="raise"),
        grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_KEY_REUSED",
    )
    assert info.metadata["original_operation"] == "set_overdraft_limit"
    assert _shown(ledger, account) == (1, 21, 20, 0)
    assert_audit_clean()


def test_a_low_balance_alert_compares_the_balance_shown(
    ledger: Ledger, admin: admin_service_pb2_grpc.AdminServiceStub
) -> None:
    account = _account_with_limit(ledger, admin, 10, 100)
    admin.SetLowBalanceAlert(
        admin_pb.SetLowBalanceAlertRequest(
            account_id=account, threshold_micros=5 * CREDIT, idempotency_key=new_key()
        )
    )
    ledger.consume(account, 6 * CREDIT)
    ledger.consume(account, CREDIT)  # already below: no second alert
    alerts = admin.ListLowBalanceAlerts(
        admin_pb.ListLowBalanceAlertsRequest(account_id=account)
    ).alerts
    assert [a.balance_micros for a in alerts] == [4 * CREDIT]


def test_concurrent_charges_stay_within_the_limit_and_answer_the_balance_shown(
    ledger: Ledger,
    admin: admin_service_pb2_grpc.AdminServiceStub,
    server_address: str,
    assert_audit_clean: Any,
) -> None:
    account = _account_with_limit(ledger, admin, 10, 20)

    async def consume_all() -> list[pb.ConsumeResponse | grpc.aio.AioRpcError]:
        async with grpc.aio.insecure_channel(server_address) as channel:
            stub = ledger_service_pb2_grpc.LedgerServiceStub(channel)
            return await asyncio.gather(
                *(consume_or_error(stub, account, f"od-{i}", CREDIT) for i in range(40))
            )

    results = asyncio.run(consume_all())
    done = [r for r in results if isinstance(r, pb.ConsumeResponse)]
    assert len(done) == 30
    for answer in done:  # every answer shows the overdraft, however the server grouped it
        b = answer.balance
        assert b.overdraft_limit_micros == 20 * CREDIT
        assert b.balance_micros == b.available_micros + b.held_micros - 20 * CREDIT
    assert sorted(r.balance.balance_micros for r in done)[0] == -20 * CREDIT
    assert _shown(ledger, account) == (-20, 0, 20, 20)
    assert_audit_clean()


def test_concurrent_reserves_and_commits_answer_the_balance_shown(
    ledger: Ledger,
    admin: admin_service_pb2_grpc.AdminServiceStub,
    server_address: str,
    assert_audit_clean: Any,
) -> None:
    account = _account_with_limit(ledger, admin, 5, 20)

    async def reserve_then_commit() -> list[Any]:
        async with grpc.aio.insecure_channel(server_address) as channel:
            stub = ledger_service_pb2_grpc.LedgerServiceStub(channel)
            held = await asyncio.gather(
                *(
                    stub.Reserve(
                        pb.ReserveRequest(
                            account_id=account, idempotency_key=f"r-{i}", amount_micros=CREDIT
                        )
                    )
                    for i in range(20)
                )
            )
            return list(
                await asyncio.gather(
                    *(
                        stub.Commit(
                            pb.CommitRequest(
                                account_id=account,
                                reservation_id=r.reservation.reservation_id,
                                idempotency_key=f"c-{i}",
                                amount_micros=CREDIT,
                            )
                        )
                        for i, r in enumerate(held)
                    )
                )
            )

    for answer in asyncio.run(reserve_then_commit()):
        b = answer.balance
        assert b.overdraft_limit_micros == 20 * CREDIT
        assert b.balance_micros == b.available_micros + b.held_micros - 20 * CREDIT
    assert _shown(ledger, account) == (-15, 5, 20, 15)
    assert_audit_clean()


@pytest.fixture(scope="module")
def reports(server_address: str) -> Iterator[report_service_pb2_grpc.ReportServiceStub]:
    with grpc.insecure_channel(server_address) as channel:
        yield report_service_pb2_grpc.ReportServiceStub(channel)


def test_the_report_shows_the_overdraft_as_minus_the_debt(
    ledger: Ledger,
    admin: admin_service_pb2_grpc.AdminServiceStub,
    reports: report_service_pb2_grpc.ReportServiceStub,
    clock: OffsetClock,
) -> None:
    period = report_pb.TimeRange()
    period.start_time.FromDatetime(clock.now() - timedelta(minutes=1))
    period.end_time.FromDatetime(clock.now() + timedelta(days=1))
    account = _account_with_limit(ledger, admin, 2, 10)
    ledger.consume(account, 8 * CREDIT)
    ledger.grant(account, 1)
    _set_limit(admin, account, 7)
    summary = reports.GetSummary(report_pb.GetSummaryRequest(account_id=account, range=period))
    by_source = {s.source: s.amounts for s in summary.sources}
    overdraft = by_source[OVERDRAFT]
    assert overdraft.consumed_micros == 6 * CREDIT
    assert overdraft.transferred_micros == 1 * CREDIT
    assert overdraft.remaining_micros == -5 * CREDIT
    # The purchased credit that repaid 1 of the debt moved into free's overdraft (README).
    assert (summary.purchased.transferred_micros, summary.free.transferred_micros) == (
        -1 * CREDIT,
        1 * CREDIT,
    )
    assert summary.total.remaining_micros == ledger.balance(account).balance_micros == -5 * CREDIT
    for amounts in [*by_source.values(), summary.total]:
        assert (
            amounts.opening_micros
            + amounts.allocated_micros
            - amounts.consumed_micros
            - amounts.adjusted_micros
            + amounts.refunded_micros
            - amounts.expired_micros
            + amounts.transferred_micros
            == amounts.remaining_micros
        )


def test_the_report_counts_an_overdraft_used_to_its_limit(
    ledger: Ledger,
    admin: admin_service_pb2_grpc.AdminServiceStub,
    reports: report_service_pb2_grpc.ReportServiceStub,
    clock: OffsetClock,
) -> None:
    """The whole limit drawn leaves the overdraft lot with no credits: the report still
    counts its debt, in a later period with no movement at all."""
    account = _account_with_limit(ledger, admin, 2, 10)
    ledger.consume(account, 12 * CREDIT)
    assert _shown(ledger, account) == (-10, 0, 10, 10)
    period = report_pb.TimeRange()
    period.start_time.FromDatetime(clock.now() + timedelta(minutes=1))
    period.end_time.FromDatetime(clock.now() + timedelta(minutes=2))
    summary = reports.GetSummary(report_pb.GetSummaryRequest(account_id=account, range=period))
    by_source = {s.source: s.amounts for s in summary.sources}
    assert by_source[OVERDRAFT].opening_micros == by_source[OVERDRAFT].remaining_micros
    assert by_source[OVERDRAFT].remaining_micros == -10 * CREDIT
    assert summary.total.remaining_micros == ledger.balance(account).balance_micros


def test_the_database_grants_no_overdraft_credits_by_itself(
    ledger: Ledger, ledger_db_url: str
) -> None:
    """The server refuses source OVERDRAFT before the database sees it; the database's own
    guard holds for any other caller of its functions."""
    account = new_account()
    ledger.grant(account, 1)
    with psycopg.connect(ledger_db_url) as conn, pytest.raises(psycopg.Error) as refused:
        conn.execute(
            "SELECT ledger_grant_lot(%s, 5000000, 'overdraft', 'main', NULL, NULL, 'x', NULL,"
            " now())",
            (account,),
        )
    assert refused.value.sqlstate == "LE010"
    assert _shown(ledger, account) == (1, 1, 0, 0)


def test_a_refund_of_what_the_overdraft_paid_gives_the_repaying_credits_back_in_their_class(
    ledger: Ledger,
    admin: admin_service_pb2_grpc.AdminServiceStub,
    reports: report_service_pb2_grpc.ReportServiceStub,
    clock: OffsetClock,
    assert_audit_clean: Any,
) -> None:
    """helper-51: 100 free credits and a limit of 50; a charge of 120 (20 on the overdraft);
    200 purchased repay the 20; the charge refunded. The 20 the overdraft could not take
    back became a free, permanent refund lot: purchased remaining read 180 and free 120.
    They now go back to the purchase that repaid the debt, in two partial refunds as in one,
    never more than the repayment took; a lot that repaid and has expired since expires
    them at once."""
    period = report_pb.TimeRange()
    period.start_time.FromDatetime(clock.now() - timedelta(minutes=1))
    period.end_time.FromDatetime(clock.now() + timedelta(days=1))
    account = new_account("overdraft-refund")
    ledger.grant(account, 100, source=types_pb2.CREDIT_SOURCE_ADMIN)
    _set_limit(admin, account, 50)
    charge = ledger.consume(account, 120 * CREDIT).reservation
    purchase = ledger.grant(account, 200).lot.lot_id  # repays the 20
    ledger.refund(account, charge.reservation_id, 10 * CREDIT)  # from the overdraft's part
    ledger.refund(account, charge.reservation_id, 15 * CREDIT)  # 10 more from it, 5 admin
    ledger.refund(account, charge.reservation_id)  # the admin lot's other 95
    lots = {lot.lot_id: lot for lot in ledger.lots(account, include_inactive=True)}
    assert lots[purchase].remaining_micros == 200 * CREDIT
    assert types_pb2.CREDIT_SOURCE_REFUND not in {lot.source for lot in lots.values()}
    summary = reports.GetSummary(report_pb.GetSummaryRequest(account_id=account, range=period))
    assert (summary.free.remaining_micros, summary.purchased.remaining_micros) == (
        100 * CREDIT,
        200 * CREDIT,
    )
    assert ledger.balance(account).balance_micros == 300 * CREDIT
    assert_audit_clean()

    # A repaying lot that has expired since takes its credits back and expires them.
    other = new_account("overdraft-refund-expired")
    ledger.stub.CreateAccount(pb.CreateAccountRequest(account_id=other, idempotency_key=new_key()))
    _set_limit(admin, other, 50)
    drawn = ledger.consume(other, 20 * CREDIT).reservation  # all on the overdraft
    promotion = ledger.grant(
        other, 30, source=types_pb2.CREDIT_SOURCE_PROMOTION, expires_in=Duration(seconds=60)
    ).lot.lot_id  # repays the 20
    clock.advance(timedelta(minutes=2))
    refund = ledger.refund(other, drawn.reservation_id)
    assert (refund.refunded_micros, refund.expired_micros) == (20 * CREDIT, 20 * CREDIT)
    lots = {lot.lot_id: lot for lot in ledger.lots(other, include_inactive=True)}
    assert lots[promotion].expired_micros == 30 * CREDIT  # its 10 left, then the 20
    assert ledger.balance(other).balance_micros == 0

    # Two debts repaid by two grants: each gets back what it repaid, the latest first, and
    # no more (a lot given back twice the same repayment would hold more than it was granted).
    third = new_account("overdraft-refund-twice")
    ledger.stub.CreateAccount(pb.CreateAccountRequest(account_id=third, idempotency_key=new_key()))
    _set_limit(admin, third, 50)
    charges = []
    repayers = []
    for _ in range(2):
        charges.append(ledger.consume(third, 20 * CREDIT).reservation.reservation_id)
        repayers.append(ledger.grant(third, 20).lot.lot_id)  # repays those 20
    for reservation_id in charges:
        ledger.refund(third, reservation_id)
    lots = {lot.lot_id: lot for lot in ledger.lots(third, include_inactive=True)}
    assert [lots[lot_id].remaining_micros for lot_id in repayers] == [20 * CREDIT] * 2
    assert ledger.balance(third).balance_micros == 40 * CREDIT
    assert_audit_clean()


def test_a_balance_read_beside_charges_shows_the_debt_of_its_own_balance(
    ledger: Ledger,
    admin: admin_service_pb2_grpc.AdminServiceStub,
    ledger_db_url: str,
    clock: OffsetClock,
) -> None:
    """Balance reads the account row without its lock: the debt (from the overdraft lot)
    must come from the same snapshot as the balance, or a charge committed between the two
    reads shows a balance of 0 beside a debt of 1 credit (helper-87). The account has
    nothing but its limit and holds nothing, so the balance shown is always minus the debt."""
    account = _account_with_limit(ledger, admin, 1, 100)
    ledger.consume(account, CREDIT)
    stop = threading.Event()

    def charge_and_grant() -> None:
        while not stop.is_set():
            ledger.consume(account, CREDIT)
            ledger.grant(account, 1)

    writer = threading.Thread(target=charge_and_grant)
    writer.start()
    mismatched = []
    try:
        with psycopg.connect(ledger_db_url, autocommit=True) as reader:
            for _ in range(4000):
                row = reader.execute(
                    "SELECT ledger_balance(%s, %s)", (account, clock.now())
                ).fetchone()
                assert row is not None
                shown = row[0]
                if shown["balance_micros"] != -shown["debt_micros"]:
                    mismatched.append(shown)
    finally:
        stop.set()
        writer.join()
    assert mismatched == []
