"""A hold's grace past its expiry (ledger_hold_grace, sql/functions/0001_ledger.sql).

A Commit is judged at the time the server received it, but it takes the account lock only
later (queued in group commit, or behind another transaction). Maintenance run meanwhile on
behalf of a later call (a Balance read, which does not queue) or of the sweeper (at the
worker's clock) timed the hold out at that later time: the Commit, received before the
expiry, was refused RESERVATION_EXPIRED and the finished job went unbilled. Such
maintenance now leaves a hold pending until a grace past its expiry; each call still judges
its own reservation at its own time."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf.duration_pb2 import Duration

from ledger.v1 import ledger_service_pb2 as pb
from ledger.v1 import ledger_service_pb2_grpc
from ledger_server.clock import OffsetClock
from ledger_server.config import Settings
from ledger_server.db import deadlines, waits
from support.ledger import (
    CREDIT,
    HOLD_GRACE,
    Ledger,
    error_details,
    expect_error,
    new_account,
    new_key,
)
from support.server import ServerThread
from workers import db as worker_db
from workers import sweepers

# Short: a Commit queued before the expiry and run just past it has waited well under
# MAX_WAIT (db/waits.py), so it is judged at its received time.
TTL = timedelta(seconds=10)
FAILED = grpc.StatusCode.FAILED_PRECONDITION


@pytest.fixture
def one_lane(
    ledger_db_url: str, server_address: str
) -> Iterator[tuple[Ledger, OffsetClock, Callable[[], Any]]]:
    """A server of its own on the suite's database (server_address: the suite's baseline,
    no sign-up bonus) with one group-commit lane that opens no other, and a clock of its
    own. Yields the ledger, the clock and `hold_the_lane`, a context manager that keeps the
    lane busy (a Consume waiting for a locked account) so that the calls sent meanwhile
    queue with the times they were received, until the block ends."""
    yield from _one_lane(ledger_db_url)


@pytest.fixture
def one_uncapped_lane(
    ledger_db_url: str, server_address: str
) -> Iterator[tuple[Ledger, OffsetClock, Callable[[], Any]]]:
    """one_lane's, on a server without a statement time-out cap (LEDGER_STATEMENT_TIMEOUT_MS=0)."""
    yield from _one_lane(ledger_db_url, statement_timeout_ms=0)


def _one_lane(
    ledger_db_url: str, **more: Any
) -> Iterator[tuple[Ledger, OffsetClock, Callable[[], Any]]]:
    clock = OffsetClock()
    settings = Settings(
        database_url=ledger_db_url,
        group_commit_max_in_flight=1,
        group_commit_open_lane_after=timedelta(seconds=30),
        **more,
    )
    server = ServerThread(settings, clock).start()
    channel = grpc.insecure_channel(server.address)
    ledger = Ledger(ledger_service_pb2_grpc.LedgerServiceStub(channel))
    blocker = new_account("grace-lane")
    ledger.grant(blocker, 10)

    @contextmanager
    def hold_the_lane() -> Iterator[None]:
        with psycopg.connect(ledger_db_url) as locker:
            locker.execute("SELECT 1 FROM accounts WHERE account_id = %s FOR UPDATE", (blocker,))
            lane = ledger.stub.Consume.future(
                pb.ConsumeRequest(account_id=blocker, idempotency_key=new_key(), amount_micros=1)
            )
            _until_waiting(ledger_db_url)
            try:
                yield
            finally:
                locker.rollback()
        lane.result()

    try:
        yield ledger, clock, hold_the_lane
    finally:
        channel.close()
        server.stop()


def _until_waiting(url: str, function: str = "ledger_consume") -> None:
    """Until a call of ``function`` waits for a locked account (by default the lane's
    Consume: the lane is taken)."""
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(500):
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND query LIKE %s",
                (f"%{function}%",),
            ).fetchone()
            if row and row[0]:
                return
            time.sleep(0.01)
    raise AssertionError(f"no {function} ever waited for a lock")


def _queued_commit(ledger: Ledger, account: str, reservation_id: str, micros: int) -> Any:
    future = ledger.stub.Commit.future(
        pb.CommitRequest(
            account_id=account,
            reservation_id=reservation_id,
            idempotency_key=new_key(),
            amount_micros=micros,
        )
    )
    _until_queued()
    return future


def _until_queued() -> None:
    # The call is received (and stamped) on the server's event loop at once; give it time.
    time.sleep(0.3)


@contextmanager
def _worker_on(url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("DATABASE_URL", url)
    worker_db.close()
    try:
        yield
    finally:
        worker_db.close()


def test_the_grace_covers_the_longest_wait_of_a_received_call(ledger_db_url: str) -> None:
    """The grace's reasoning (ledger_hold_grace's comment) in numbers: the client library's
    deadline, the pool's wait for a connection and the statement time-out cap."""
    with psycopg.connect(ledger_db_url) as conn:
        row = conn.execute("SELECT extract(epoch FROM ledger_hold_grace())").fetchone()
    assert row is not None and timedelta(seconds=float(row[0])) == HOLD_GRACE
    client_deadline = 10.0  # ledger_client's default timeout, retries included
    pool_wait = 30.0  # psycopg_pool's default time-out, LedgerPool's (db/pool.py)
    statement_cap = deadlines.DEFAULT_STATEMENT_TIMEOUT_MS / 1000
    assert Settings(database_url="").statement_timeout_ms == deadlines.DEFAULT_STATEMENT_TIMEOUT_MS
    assert client_deadline + pool_wait + statement_cap <= HOLD_GRACE.total_seconds()
    # The server's bound on every wait refuses none of the calls within those limits.
    assert client_deadline + pool_wait + statement_cap <= waits.MAX_WAIT.total_seconds()


def _held_five_of_ten(
    ledger: Ledger, name: str, ttl: int = int(TTL.total_seconds())
) -> tuple[str, str, datetime]:
    """A new account granted 10 credits holding 5 for ``ttl`` seconds: the account, the
    reservation and its expiry."""
    account = new_account(name)
    ledger.grant(account, 10)
    reserved = ledger.reserve(account, 5 * CREDIT, ttl=Duration(seconds=ttl)).reservation
    return account, reserved.reservation_id, reserved.expires_at.ToDatetime(tzinfo=UTC)


def test_a_commit_received_before_expiry_is_billed_though_a_read_came_later_first(
    one_lane: tuple[Ledger, OffsetClock, Callable[[], Any]], assert_audit_clean: Any
) -> None:
    ledger, clock, hold_the_lane = one_lane
    account, reservation_id, _ = _held_five_of_ten(ledger, "grace-read")
    with hold_the_lane():
        commit = _queued_commit(ledger, account, reservation_id, 4 * CREDIT)  # before expiry
        clock.advance(TTL + timedelta(seconds=1))
        # A read at the later time: the hold is within its grace, still held.
        balance = ledger.balance(account)
        assert (balance.held_micros, balance.available_micros) == (5 * CREDIT, 5 * CREDIT)
        fetched = ledger.stub.GetReservation(
            pb.GetReservationRequest(account_id=account, reservation_id=reservation_id)
        ).reservation
        assert fetched.status == pb.RESERVATION_STATUS_PENDING
    committed = commit.result()
    assert committed.reservation.status == pb.RESERVATION_STATUS_COMMITTED, committed
    assert committed.reservation.committed_micros == 4 * CREDIT
    assert (committed.balance.balance_micros, committed.balance.held_micros) == (6 * CREDIT, 0)
    assert_audit_clean()


def test_a_commit_received_before_expiry_is_billed_though_a_later_sweep_came_first(
    one_lane: tuple[Ledger, OffsetClock, Callable[[], Any]],
    ledger_db_url: str,
    monkeypatch: pytest.MonkeyPatch,
    assert_audit_clean: Any,
) -> None:
    ledger, clock, hold_the_lane = one_lane
    account, reservation_id, expires_at = _held_five_of_ten(ledger, "grace-sweep")
    with _worker_on(ledger_db_url, monkeypatch), hold_the_lane():
        commit = _queued_commit(ledger, account, reservation_id, 4 * CREDIT)  # before expiry
        clock.advance(TTL + timedelta(seconds=1))
        # The scheduled sweep, at its own later time, runs before the queued Commit.
        sweepers.sweep_due_accounts((expires_at + timedelta(seconds=1)).isoformat())
    committed = commit.result()
    assert committed.reservation.status == pb.RESERVATION_STATUS_COMMITTED, committed
    assert committed.balance.balance_micros == 6 * CREDIT
    assert_audit_clean()


def test_a_commit_received_after_expiry_is_refused_and_the_hold_returned_after_the_grace(
    one_lane: tuple[Ledger, OffsetClock, Callable[[], Any]],
    ledger_db_url: str,
    monkeypatch: pytest.MonkeyPatch,
    assert_audit_clean: Any,
) -> None:
    ledger, clock, _ = one_lane
    account, reservation_id, expires_at = _held_five_of_ten(ledger, "grace-late")
    clock.advance(TTL + timedelta(milliseconds=10))

    # Judged at its own time: received after the expiry, refused, though within the grace.
    with pytest.raises(grpc.RpcError) as refused:
        ledger.commit(account, reservation_id, CREDIT)
    info = error_details(refused.value)[0]
    assert (refused.value.code(), info.reason) == (FAILED, "RESERVATION_EXPIRED")
    assert info.metadata["reservation_id"] == reservation_id
    # What is true: the hold is not returned yet (it read "the hold was returned").
    assert info.metadata["hold_returned"] == "false"
    assert "the hold is still held until a Release returns it" in (refused.value.details() or "")
    # Still held within the grace, and so reported.
    assert ledger.balance(account).held_micros == 5 * CREDIT
    with psycopg.connect(ledger_db_url) as conn:
        row = conn.execute(
            "SELECT next_maintenance_at FROM accounts WHERE account_id = %s", (account,)
        ).fetchone()
    assert row is not None and row[0] == expires_at + HOLD_GRACE

    with _worker_on(ledger_db_url, monkeypatch):
        sweepers.sweep_due_accounts((expires_at + HOLD_GRACE - timedelta(seconds=1)).isoformat())
        assert ledger.balance(account).held_micros == 5 * CREDIT
        # The sweeper returns it once the grace has passed too.
        sweepers.sweep_due_accounts((expires_at + HOLD_GRACE).isoformat())
    balance = ledger.balance(account)
    assert (balance.held_micros, balance.available_micros) == (0, 10 * CREDIT)
    fetched = ledger.stub.GetReservation(
        pb.GetReservationRequest(account_id=account, reservation_id=reservation_id)
    ).reservation
    assert fetched.status == pb.RESERVATION_STATUS_EXPIRED
    with pytest.raises(grpc.RpcError) as refused:
        ledger.commit(account, reservation_id, CREDIT)
    assert error_details(refused.value)[0].metadata["hold_returned"] == "true"
    assert "the hold was returned" in (refused.value.details() or "")
    assert_audit_clean()


def test_a_release_received_after_expiry_times_the_hold_out_within_the_grace(
    one_lane: tuple[Ledger, OffsetClock, Callable[[], Any]], assert_audit_clean: Any
) -> None:
    """As the client library does after a refused Commit: the hold goes back at once."""
    ledger, clock, _ = one_lane
    account, reservation_id, _ = _held_five_of_ten(ledger, "grace-release")
    clock.advance(TTL + timedelta(seconds=1))
    released = ledger.release(account, reservation_id)
    assert released.reservation.status == pb.RESERVATION_STATUS_EXPIRED
    assert (released.balance.held_micros, released.balance.available_micros) == (0, 10 * CREDIT)
    assert_audit_clean()


def test_a_batch_judges_each_settled_hold_at_its_calls_own_time(
    one_lane: tuple[Ledger, OffsetClock, Callable[[], Any]], assert_audit_clean: Any
) -> None:
    """Commits and Releases that queue together go set-based (0009, 0010) when sure to
    succeed; a hold past its expiry, left pending for its grace, is not: the Commit received
    after the expiry is refused, the Release times it out, as each call alone."""
    ledger, clock, hold_the_lane = one_lane
    account = new_account("grace-set")
    ledger.grant(account, 20)
    ttl = Duration(seconds=int(TTL.total_seconds()))
    expiring = [ledger.reserve(account, CREDIT, ttl=ttl).reservation.reservation_id for _ in "ab"]
    live = [
        ledger.reserve(account, CREDIT, ttl=Duration(seconds=600)).reservation.reservation_id
        for _ in "ab"
    ]
    clock.advance(TTL + timedelta(seconds=1))
    with hold_the_lane():
        late_commit = _queued_commit(ledger, account, expiring[0], CREDIT)
        live_commit = _queued_commit(ledger, account, live[0], CREDIT)
    assert live_commit.result().reservation.status == pb.RESERVATION_STATUS_COMMITTED
    with pytest.raises(grpc.RpcError) as refused:
        late_commit.result()
    assert error_details(refused.value)[0].reason == "RESERVATION_EXPIRED"

    with hold_the_lane():
        releases = [
            ledger.stub.Release.future(
                pb.ReleaseRequest(account_id=account, reservation_id=r, idempotency_key=new_key())
            )
            for r in (expiring[1], live[1])
        ]
        _until_queued()
    statuses = [f.result().reservation.status for f in releases]
    assert statuses == [pb.RESERVATION_STATUS_EXPIRED, pb.RESERVATION_STATUS_RELEASED]
    assert_audit_clean()


def test_a_commit_held_back_past_the_grace_is_refused_to_retry_and_changes_nothing(
    one_lane: tuple[Ledger, OffsetClock, Callable[[], Any]],
    ledger_db_url: str,
    monkeypatch: pytest.MonkeyPatch,
    assert_audit_clean: Any,
) -> None:
    """A Commit received before the expiry but held back in the server (here the
    group-commit queue, which nothing bounded for a call without a deadline) until past the
    grace, while the sweeper returned the hold: judged at its received time it was refused
    RESERVATION_EXPIRED ("the hold was returned"), and the caller could not tell it had
    sent it in time. A call that has waited MAX_WAIT is now refused before it runs, ABORTED
    WAITED_TOO_LONG, having changed nothing; its retry under the same key is judged at the
    retry's time. The call queued behind it, received later, goes on."""
    ledger, clock, hold_the_lane = one_lane
    account, reservation_id, expires_at = _held_five_of_ten(ledger, "grace-waited")
    other = ledger.reserve(account, CREDIT, ttl=Duration(seconds=3600)).reservation.reservation_id
    request = pb.CommitRequest(
        account_id=account,
        reservation_id=reservation_id,
        idempotency_key=new_key(),
        amount_micros=4 * CREDIT,
    )
    with _worker_on(ledger_db_url, monkeypatch), hold_the_lane():
        commit = ledger.stub.Commit.future(request)  # received before the expiry
        _until_queued()
        clock.advance(TTL + HOLD_GRACE + timedelta(seconds=1))
        # The grace has passed for everyone else: the sweep returns the hold.
        sweepers.sweep_due_accounts((expires_at + HOLD_GRACE + timedelta(seconds=1)).isoformat())
        later = _queued_commit(ledger, account, other, CREDIT)
    with pytest.raises(grpc.RpcError) as refused:
        commit.result()
    info = error_details(refused.value)[0]
    assert (refused.value.code(), info.reason) == (grpc.StatusCode.ABORTED, "WAITED_TOO_LONG")
    assert info.metadata["max_wait_ms"] == str(int(waits.MAX_WAIT.total_seconds() * 1000))
    assert later.result().reservation.status == pb.RESERVATION_STATUS_COMMITTED
    # The hold went back once, and nothing was charged against it.
    balance = ledger.balance(account)
    assert (balance.balance_micros, balance.held_micros) == (9 * CREDIT, 0)
    # The retry (the client library's, same key) is judged at its own time.
    retried = expect_error(lambda: ledger.stub.Commit(request), FAILED, "RESERVATION_EXPIRED")
    assert retried.metadata["hold_returned"] == "true"
    assert_audit_clean()


def test_a_commits_lock_wait_ends_within_its_max_wait_without_a_statement_cap(
    one_uncapped_lane: tuple[Ledger, OffsetClock, Callable[[], Any]],
    ledger_db_url: str,
    assert_audit_clean: Any,
) -> None:
    """With LEDGER_STATEMENT_TIMEOUT_MS=0 and no deadline, a statement waited for the
    account's lock for as long as another transaction held it, and was then judged at its
    received time however late. Its statement now runs for what the call has left of
    MAX_WAIT at most (here about a second, after its wait in the queue), lock wait included,
    and is then refused WAITED_TOO_LONG, rolled back."""
    ledger, clock, hold_the_lane = one_uncapped_lane
    account, reservation_id, _ = _held_five_of_ten(ledger, "grace-lock", ttl=3600)
    with psycopg.connect(ledger_db_url) as locker:
        with hold_the_lane():
            commit = _queued_commit(ledger, account, reservation_id, 4 * CREDIT)
            # Received 0.3 s before: about 0.9 s left when it reaches the database.
            clock.advance(waits.MAX_WAIT - timedelta(seconds=1.2))
            locker.execute("SELECT 1 FROM accounts WHERE account_id = %s FOR UPDATE", (account,))
        _until_waiting(ledger_db_url, "ledger_commit")  # its statement has started
        with pytest.raises(grpc.RpcError) as refused:
            commit.result(timeout=5)
        locker.rollback()
    info = error_details(refused.value)[0]
    assert (refused.value.code(), info.reason) == (grpc.StatusCode.ABORTED, "WAITED_TOO_LONG")
    balance = ledger.balance(account)
    assert (balance.balance_micros, balance.held_micros) == (10 * CREDIT, 5 * CREDIT)
    assert_audit_clean()


def test_the_servers_bound_is_the_databases_grace(ledger_db_url: str) -> None:
    """One source: the server checks at start-up that ledger_hold_grace() is its HOLD_GRACE."""
    with psycopg.connect(ledger_db_url) as conn:
        row = conn.execute("SELECT ledger_hold_grace()").fetchone()
    assert row is not None
    waits.check_hold_grace(row[0])
    with pytest.raises(RuntimeError, match="ledger_hold_grace"):
        waits.check_hold_grace(row[0] * 2)
    assert waits.MAX_WAIT < waits.HOLD_GRACE == HOLD_GRACE
