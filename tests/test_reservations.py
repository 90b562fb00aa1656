"""The life of a reservation: hold, commit (partial), release, time-to-live."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import grpc
import psycopg
from google.protobuf.duration_pb2 import Duration

from ledger.v1 import ledger_service_pb2 as pb
from ledger_server.clock import OffsetClock
from support.ledger import CREDIT, HOLD_GRACE, Ledger, expect_error, new_account, new_key

FAILED = grpc.StatusCode.FAILED_PRECONDITION


def test_reserve_holds_and_commit_settles_the_actual_amount(
    ledger: Ledger, assert_audit_clean: Any
) -> None:
    account = new_account()
    ledger.grant(account, 20)
    reserved = ledger.reserve(account, 8 * CREDIT, feature="image.generate")
    assert reserved.reservation.status == pb.RESERVATION_STATUS_PENDING
    assert reserved.balance.held_micros == 8 * CREDIT
    assert reserved.balance.available_micros == 12 * CREDIT
    assert reserved.balance.balance_micros == 20 * CREDIT

    committed = ledger.commit(account, reserved.reservation.reservation_id, 5 * CREDIT)
    assert committed.reservation.status == pb.RESERVATION_STATUS_COMMITTED
    assert committed.reservation.committed_micros == 5 * CREDIT
    assert committed.balance.balance_micros == 15 * CREDIT
    assert committed.balance.held_micros == 0
    assert committed.balance.available_micros == 15 * CREDIT
    fetched = ledger.stub.GetReservation(
        pb.GetReservationRequest(
            account_id=account, reservation_id=reserved.reservation.reservation_id
        )
    ).reservation
    assert fetched == committed.reservation
    assert_audit_clean()


def test_a_commit_credits_the_revenue_of_its_feature(ledger: Ledger) -> None:
    """DESIGN.md section 4: revenue is a system account per feature ('revenue' without one)."""
    account = new_account()
    ledger.grant(account, 10)
    for feature, expected in (("image.upscale", "revenue:image.upscale"), ("", "revenue")):
        held = ledger.reserve(account, 2 * CREDIT, feature=feature)
        committed = ledger.commit(account, held.reservation.reservation_id, CREDIT)
        [charge] = [
            t
            for t in ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_CHARGE])
            if t.transaction_id == committed.transaction_id
        ]
        assert [(p.ledger_account, p.amount_micros) for p in charge.postings if not p.lot_id] == [
            (expected, CREDIT)
        ]


def test_commit_of_zero_charges_nothing(ledger: Ledger) -> None:
    account = new_account()
    ledger.grant(account, 5)
    reservation_id = ledger.reserve(account, 2 * CREDIT).reservation.reservation_id
    committed = ledger.commit(account, reservation_id, 0)
    assert committed.reservation.status == pb.RESERVATION_STATUS_COMMITTED
    assert committed.balance.balance_micros == 5 * CREDIT


def test_commit_more_than_held_is_refused(ledger: Ledger) -> None:
    account = new_account()
    ledger.grant(account, 20)
    reservation_id = ledger.reserve(account, 5 * CREDIT).reservation.reservation_id
    info = expect_error(
        lambda: ledger.commit(account, reservation_id, 5 * CREDIT + 1),
        FAILED,
        "AMOUNT_EXCEEDS_HOLD",
    )
    assert info.metadata["held_micros"] == str(5 * CREDIT)
    assert ledger.balance(account).held_micros == 5 * CREDIT


def test_commit_twice_replays_with_the_same_key_and_is_refused_with_another(
    ledger: Ledger,
) -> None:
    account = new_account()
    ledger.grant(account, 20)
    reservation_id = ledger.reserve(account, 5 * CREDIT).reservation.reservation_id
    key = new_key()
    first = ledger.commit(account, reservation_id, 3 * CREDIT, key=key)
    assert ledger.commit(account, reservation_id, 3 * CREDIT, key=key) == first
    info = expect_error(
        lambda: ledger.commit(account, reservation_id, 3 * CREDIT),
        FAILED,
        "RESERVATION_NOT_PENDING",
    )
    assert info.metadata["status"] == "committed"
    assert ledger.balance(account).balance_micros == 17 * CREDIT


def test_commit_after_release_and_release_after_commit_are_refused(ledger: Ledger) -> None:
    account = new_account()
    ledger.grant(account, 20)
    released_id = ledger.reserve(account, 5 * CREDIT).reservation.reservation_id
    release = ledger.release(account, released_id)
    assert release.reservation.status == pb.RESERVATION_STATUS_RELEASED
    assert release.balance.available_micros == 20 * CREDIT
    expect_error(
        lambda: ledger.commit(account, released_id, CREDIT), FAILED, "RESERVATION_NOT_PENDING"
    )
    expect_error(lambda: ledger.release(account, released_id), FAILED, "RESERVATION_NOT_PENDING")

    committed_id = ledger.reserve(account, 5 * CREDIT).reservation.reservation_id
    ledger.commit(account, committed_id, 2 * CREDIT)
    expect_error(lambda: ledger.release(account, committed_id), FAILED, "RESERVATION_NOT_PENDING")
    assert ledger.balance(account).balance_micros == 18 * CREDIT


def test_a_release_for_a_failed_job_ends_failed_and_the_log_says_so(
    ledger: Ledger, assert_audit_clean: Any
) -> None:
    """DESIGN.md section 7: the transaction log tells a failed activity from a cancelled
    one. Both give the whole hold back; only the status differs."""
    account = new_account()
    ledger.grant(account, 20)
    failed_id = ledger.reserve(account, 5 * CREDIT, feature="video").reservation.reservation_id
    cancelled_id = ledger.reserve(account, 3 * CREDIT, feature="video").reservation.reservation_id

    failed_request = pb.ReleaseRequest(
        account_id=account,
        reservation_id=failed_id,
        idempotency_key=new_key("release"),
        job_failed=True,
    )
    failed = ledger.stub.Release(failed_request)
    assert failed.reservation.status == pb.RESERVATION_STATUS_FAILED
    assert failed.balance.available_micros == 17 * CREDIT
    ledger.release(account, cancelled_id)
    assert ledger.balance(account).available_micros == 20 * CREDIT

    holds = {
        t.reservation_id: t for t in ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_HOLD])
    }
    assert holds[failed_id].status == pb.TRANSACTION_STATUS_FAILED
    assert holds[cancelled_id].status == pb.TRANSACTION_STATUS_RELEASED
    only_failed = ledger.transactions(account, statuses=[pb.TRANSACTION_STATUS_FAILED])
    assert [t.reservation_id for t in only_failed] == [failed_id]
    (release,) = [
        t
        for t in ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_RELEASE])
        if t.reservation_id == failed_id
    ]
    assert release.comment == "job failed"

    # A retry replays the first answer; the same key saying the job did not fail is another
    # request, and a failed reservation is settled like a released one.
    assert ledger.stub.Release(failed_request).reservation.status == pb.RESERVATION_STATUS_FAILED
    cancelled_instead = pb.ReleaseRequest()
    cancelled_instead.CopyFrom(failed_request)
    cancelled_instead.job_failed = False
    expect_error(
        lambda: ledger.stub.Release(cancelled_instead),
        grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_KEY_REUSED",
    )
    info = expect_error(
        lambda: ledger.commit(account, failed_id, CREDIT), FAILED, "RESERVATION_NOT_PENDING"
    )
    assert info.metadata["status"] == "failed"
    assert ledger.balance(account).balance_micros == 20 * CREDIT


def test_insufficient_credits_for_a_reservation(ledger: Ledger) -> None:
    account = new_account()
    ledger.grant(account, 10)
    ledger.reserve(account, 8 * CREDIT)
    info = expect_error(lambda: ledger.reserve(account, 3 * CREDIT), FAILED, "INSUFFICIENT_CREDITS")
    assert info.metadata["available_micros"] == str(2 * CREDIT)
    assert info.metadata["requested_micros"] == str(3 * CREDIT)


def test_a_reservation_past_its_time_to_live_returns_its_hold(
    ledger: Ledger, clock: OffsetClock, assert_audit_clean: Any
) -> None:
    account = new_account()
    ledger.grant(account, 20)
    reservation_id = ledger.reserve(
        account, 6 * CREDIT, ttl=Duration(seconds=60)
    ).reservation.reservation_id
    assert ledger.balance(account).available_micros == 14 * CREDIT

    clock.advance(timedelta(seconds=61) + HOLD_GRACE)
    # No sweeper has run: the balance is still right.
    balance = ledger.balance(account)
    assert balance.available_micros == 20 * CREDIT
    assert balance.held_micros == 0
    info = expect_error(
        lambda: ledger.commit(account, reservation_id, CREDIT), FAILED, "RESERVATION_EXPIRED"
    )
    assert info.metadata["reservation_id"] == reservation_id
    fetched = ledger.stub.GetReservation(
        pb.GetReservationRequest(account_id=account, reservation_id=reservation_id)
    ).reservation
    assert fetched.status == pb.RESERVATION_STATUS_EXPIRED
    # Releasing a timed-out hold asks for what already happened: it succeeds as is.
    released = ledger.release(account, reservation_id)
    assert released.reservation.status == pb.RESERVATION_STATUS_EXPIRED
    assert released.balance.available_micros == 20 * CREDIT
    kinds = [t.kind for t in ledger.transactions(account)]
    assert kinds[:2] == [pb.TRANSACTION_KIND_RELEASE, pb.TRANSACTION_KIND_HOLD]
    assert_audit_clean()


def test_time_to_live_above_the_maximum_is_refused(ledger: Ledger) -> None:
    account = new_account()
    ledger.grant(account, 20)
    expect_error(
        lambda: ledger.reserve(account, CREDIT, ttl=Duration(seconds=8 * 86400)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FIELD",
        field="ttl",
    )


def test_transaction_log_shows_hold_status(ledger: Ledger) -> None:
    account = new_account()
    ledger.grant(account, 20)
    pending = ledger.reserve(account, CREDIT).reservation.reservation_id
    released = ledger.reserve(account, CREDIT).reservation.reservation_id
    ledger.release(account, released)
    committed = ledger.reserve(account, CREDIT).reservation.reservation_id
    ledger.commit(account, committed, CREDIT)
    holds = {
        t.reservation_id: t.status
        for t in ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_HOLD])
    }
    assert holds == {
        pending: pb.TRANSACTION_STATUS_PENDING,
        released: pb.TRANSACTION_STATUS_RELEASED,
        committed: pb.TRANSACTION_STATUS_COMMITTED,
    }


def test_transactions_filter_by_status(ledger: Ledger) -> None:
    account = new_account()
    ledger.grant(account, 20)
    pending = ledger.reserve(account, CREDIT).reservation.reservation_id
    released = ledger.reserve(account, CREDIT).reservation.reservation_id
    ledger.release(account, released)
    refunded = ledger.consume(account, CREDIT).reservation.reservation_id
    ledger.refund(account, refunded)
    kept = ledger.consume(account, CREDIT).reservation.reservation_id

    def with_status(*statuses: int) -> list[tuple[int, str]]:
        return [
            (t.kind, t.reservation_id)
            for t in ledger.transactions(account, statuses=list(statuses))
        ]

    assert with_status(pb.TRANSACTION_STATUS_PENDING) == [(pb.TRANSACTION_KIND_HOLD, pending)]
    assert with_status(pb.TRANSACTION_STATUS_RELEASED) == [(pb.TRANSACTION_KIND_HOLD, released)]
    assert with_status(pb.TRANSACTION_STATUS_REFUNDED) == [(pb.TRANSACTION_KIND_CHARGE, refunded)]
    succeeded = with_status(pb.TRANSACTION_STATUS_SUCCEEDED)
    assert (pb.TRANSACTION_KIND_CHARGE, kept) in succeeded
    assert (pb.TRANSACTION_KIND_CHARGE, refunded) not in succeeded


def test_a_backlog_of_timed_out_holds_is_released_at_once_in_expiry_order(
    ledger: Ledger, clock: OffsetClock, assert_audit_clean: Any
) -> None:
    """A client that reserves and never commits leaves holds to time out. The next call on
    the account releases all that are due, each with its own release entry, in expiry order,
    and leaves the rest."""
    account = new_account("backlog")
    ledger.grant(account, 2)
    ledger.grant(account, 5)
    held = [
        ledger.reserve(account, CREDIT // 20, ttl=Duration(seconds=120 - i % 2 * 60))
        for i in range(120)
    ]
    live = ledger.reserve(account, CREDIT, ttl=Duration(seconds=600))
    assert ledger.balance(account).held_micros == 7 * CREDIT

    clock.advance(timedelta(seconds=121) + HOLD_GRACE)
    balance = ledger.balance(account)

    assert balance.held_micros == CREDIT
    assert balance.available_micros == 6 * CREDIT
    assert sum(lot.held_micros for lot in ledger.lots(account)) == CREDIT
    releases = [t for t in ledger.transactions(account) if t.kind == pb.TRANSACTION_KIND_RELEASE]
    # Newest first: the 120 s holds were released after the 60 s ones.
    released_ids = [t.reservation_id for t in reversed(releases)]
    by_expiry = sorted(
        held, key=lambda r: (r.reservation.expires_at.ToNanoseconds(), r.reservation.reservation_id)
    )
    assert released_ids == [r.reservation.reservation_id for r in by_expiry]
    assert all(t.amount_micros == CREDIT // 20 for t in releases)
    statuses = {
        ledger.stub.GetReservation(
            pb.GetReservationRequest(
                account_id=account, reservation_id=r.reservation.reservation_id
            )
        ).reservation.status
        for r in held
    }
    assert statuses == {pb.RESERVATION_STATUS_EXPIRED}
    still = ledger.stub.GetReservation(
        pb.GetReservationRequest(account_id=account, reservation_id=live.reservation.reservation_id)
    ).reservation
    assert still.status == pb.RESERVATION_STATUS_PENDING
    assert_audit_clean()


def test_a_backlog_of_timed_out_holds_is_released_set_based(
    ledger: Ledger, clock: OffsetClock, ledger_db_url: str, assert_audit_clean: Any
) -> None:
    """Releasing a backlog writes the account row and each lot a fixed number of times, not
    once per hold: a transaction that updates one row again and again makes PostgreSQL walk
    every version it made of that row, so a per-hold loop grew quadratically and a large
    enough backlog outlasted every call's statement time-out (the account was unusable until
    the sweeper cleared it)."""
    holds = 300
    account = new_account("backlog-set")
    ledger.grant(account, 20)
    for _ in range(holds):
        ledger.reserve(account, CREDIT // 100, ttl=Duration(seconds=60))
    clock.advance(timedelta(seconds=61) + HOLD_GRACE)

    with psycopg.connect(ledger_db_url) as conn:  # one transaction: its counters below
        conn.execute("SELECT ledger_balance(%s, %s)", (account, clock.now()))
        writes = dict(
            conn.execute(
                "SELECT relname, n_tup_upd + n_tup_ins FROM pg_stat_xact_user_tables"
                " WHERE relname IN ('accounts', 'lots', 'journal_transactions', 'reservations')"
            ).fetchall()
        )
    assert writes["journal_transactions"] == holds  # one RELEASE entry per hold
    assert writes["reservations"] == holds
    assert writes["lots"] <= 2
    assert writes["accounts"] <= 3  # the release, next maintenance time, at most an expiry

    balance = ledger.balance(account)
    assert (balance.held_micros, balance.available_micros) == (0, 20 * CREDIT)
    assert_audit_clean()
