"""Limits (issue 8): message size, page size, string lengths on every RPC, deadlines turned into
PostgreSQL statement and lock time-outs (with Consume still one round trip), and the per-caller
rate limit."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf import message_factory, timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ledger.v1 import (
    admin_service_pb2,
    billing_service_pb2,
    ledger_service_pb2_grpc,
    report_service_pb2,
    report_service_pb2_grpc,
    types_pb2,
)
from ledger.v1 import ledger_service_pb2 as pb
from ledger_server.clock import OffsetClock
from ledger_server.config import MIN_MESSAGE_BYTES, ConfigError, Settings
from ledger_server.db import deadlines
from ledger_server.errors import LedgerError
from ledger_server.ledger import validation
from ledger_server.server.limits import RateLimiter
from support.ledger import CREDIT, Ledger, error_details, expect_error, new_account, new_key
from support.secured import base_settings, make_callers, serving, status_code


@pytest.fixture(scope="module")
def settings(ledger_db_url: str, redis_url: str) -> Settings:
    return base_settings(ledger_db_url, redis_url)


# --- message size -----------------------------------------------------------------------------


def test_an_oversized_message_is_resource_exhausted(settings: Settings, clock: OffsetClock) -> None:
    with (
        serving(settings, clock, max_message_bytes=64 * 1024) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = ledger_service_pb2_grpc.LedgerServiceStub(channel)

        def grant(comment: str) -> Any:
            return stub.Grant(
                pb.GrantRequest(
                    account_id=new_account(),
                    idempotency_key=new_key(),
                    amount_micros=CREDIT,
                    source=types_pb2.CREDIT_SOURCE_PURCHASE,
                    comment=comment,
                )
            )

        assert status_code(lambda: grant("x" * 100_000)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Below the limit the request reaches validation (a comment is 1024 characters at most).
        expect_error(
            lambda: grant("x" * 10_000),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_FIELD",
            "comment",
        )


def test_a_journal_page_fits_a_smaller_message_limit_of_the_server(
    settings: Settings, clock: OffsetClock
) -> None:
    """A page stopped past a fixed 3 MiB: with LEDGER_MAX_MESSAGE_BYTES below it, a page of
    long entries could not be sent (RESOURCE_EXHAUSTED, the history unreadable at that page
    size). It stops within three quarters of the server's own limit, in both journals."""
    limit = 64 * 1024
    with (
        serving(settings, clock, max_message_bytes=limit) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        ledger = Ledger(ledger_service_pb2_grpc.LedgerServiceStub(channel))
        reports = report_service_pb2_grpc.ReportServiceStub(channel)
        account = new_account("small-limit")
        for n in range(120):
            ledger.grant(account, 1, comment=f"{n} " + "x" * 1000)
        first = ledger.stub.ListTransactions(
            pb.ListTransactionsRequest(account_id=account, page_size=120)
        )
        assert 1 <= len(first.transactions) < 120 and first.next_page_token
        assert first.ByteSize() <= limit  # three quarters of it, with the framing
        journal = reports.ListJournal(
            report_service_pb2.ListJournalRequest(account_id=account, page_size=120)
        )
        assert 1 <= len(journal.transactions) < 120 and journal.next_page_token
        assert journal.ByteSize() <= limit
        walked = ledger.transactions(account)
        assert len({t.transaction_id for t in walked}) == len(walked)
        assert sum(t.comment.endswith("x" * 1000) for t in walked) == 120


@pytest.mark.parametrize("field", ["kinds", "statuses"])
def test_a_long_list_of_journal_filters_is_refused_before_it_is_read(
    ledger: Ledger, field: str
) -> None:
    """4 million kinds in one 4 MiB request were read one by one on the event loop and held
    every other tenant's calls for 10 s and more; a filter names each value once, so a list
    longer than the enum is refused at once, naming the field, as is a value named twice."""
    value = pb.TRANSACTION_KIND_CHARGE if field == "kinds" else pb.TRANSACTION_STATUS_SUCCEEDED
    account = new_account("filters")
    ledger.grant(account, CREDIT)
    for values in ([value] * 1_000_000, [value, value]):
        request = pb.ListTransactionsRequest(account_id=account, **{field: values})
        expect_error(
            lambda request=request: ledger.stub.ListTransactions(request, timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_FIELD",
            field,
        )
    assert ledger.stub.ListTransactions(
        pb.ListTransactionsRequest(account_id=account, **{field: [value]})
    )


def _largest_lot() -> types_pb2.Lot:
    """A lot as large as a TransferReward's lots get: every number at its largest (lot ids
    are bigints), the longest account id (a transfer's lots have no external_ref or parent)."""
    far = timestamp_pb2.Timestamp(seconds=253_402_300_799, nanos=999_999_999)  # year 9999
    return types_pb2.Lot(
        lot_id=str(2**63 - 1),
        account_id="a" * 128,
        source=max(types_pb2.CreditSource.values()),
        balance_kind=max(types_pb2.BalanceKind.values()),
        amount_micros=validation.MAX_AMOUNT_MICROS,
        remaining_micros=validation.MAX_AMOUNT_MICROS,
        held_micros=validation.MAX_AMOUNT_MICROS,
        expired_micros=validation.MAX_AMOUNT_MICROS,
        expires_at=far,
        priority=2**31 - 1,
        created_at=far,
    )


def _largest_balance() -> types_pb2.AccountBalance:
    most = 2**63 - 1
    return types_pb2.AccountBalance(
        account_id="a" * 128,
        balance_micros=-most,  # a negative int64 is ten bytes on the wire
        available_micros=-most,
        held_micros=most,
        reward_balance_micros=most,
        overdraft_limit_micros=most,
        debt_micros=most,
        as_of=timestamp_pb2.Timestamp(seconds=253_402_300_799, nanos=999_999_999),
    )


def test_the_largest_answer_of_a_mutating_call_fits_the_smallest_message_limit() -> None:
    """With LEDGER_MAX_MESSAGE_BYTES=1024 (its old minimum) a Consume over 80 lots was
    committed, then gRPC refused to send its 1.5 KB answer (RESOURCE_EXHAUSTED), and every
    retry under its key replayed it: charged, and never told. The smallest limit now holds
    the largest answer of any mutating call, and a smaller one stops the server (exit 2)."""
    # TransferReward: a lot made per expiry, its entry numbering one made and one taken at
    # least per expiry within 32,768 postings.
    transfer = pb.TransferRewardResponse(
        transferred_micros=validation.MAX_AMOUNT_MICROS,
        lot=_largest_lot(),
        lots=[_largest_lot() for _ in range(16_384)],
        transaction_id=str(2**63 - 1),
        balance=_largest_balance(),
    )
    # A reservation's answer (Reserve, Consume, Commit, Release, Refund): up to 32,767 lots.
    lot = pb.ReservationLot(
        lot_id=str(2**63 - 1),
        source=max(types_pb2.CreditSource.values()),
        held_micros=validation.MAX_AMOUNT_MICROS,
        committed_micros=validation.MAX_AMOUNT_MICROS,
        refunded_micros=validation.MAX_AMOUNT_MICROS,
        refund_expired_micros=validation.MAX_AMOUNT_MICROS,
    )
    long_text = "\U0001f600" * 1024  # 1024 characters of four bytes
    reservation = pb.Reservation(
        reservation_id=str(uuid.uuid4()),
        account_id="a" * 128,
        feature=long_text,
        comment=long_text,
        model=long_text,
        lots=[lot] * 32_767,
    )
    refund = pb.RefundResponse(
        reservation=reservation, transaction_id=str(2**63 - 1), balance=_largest_balance()
    )
    grpc_frame = 5
    for answer in (transfer, refund):
        assert answer.ByteSize() + grpc_frame <= MIN_MESSAGE_BYTES, type(answer).__name__
    assert transfer.ByteSize() > 3.5 * 1024 * 1024  # why the minimum is not 3 MiB

    base = {"DATABASE_URL": "postgresql://localhost/x"}
    assert Settings.from_env(base).max_message_bytes == MIN_MESSAGE_BYTES == 4 * 1024 * 1024
    larger = Settings.from_env({**base, "LEDGER_MAX_MESSAGE_BYTES": str(8 * 1024 * 1024)})
    assert larger.max_message_bytes == 8 * 1024 * 1024
    for smaller in (1024, MIN_MESSAGE_BYTES - 1):
        with pytest.raises(
            ConfigError, match=f"LEDGER_MAX_MESSAGE_BYTES must be at least {MIN_MESSAGE_BYTES}"
        ):
            Settings.from_env({**base, "LEDGER_MAX_MESSAGE_BYTES": str(smaller)})


# --- page size --------------------------------------------------------------------------------


def test_a_page_size_above_the_maximum_is_clamped(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert validation.page_size(10**9) == validation.MAX_PAGE_SIZE == 1000
    # The session server runs in this process: a maximum of 3 shows the clamping with 5 lots.
    monkeypatch.setattr(validation, "MAX_PAGE_SIZE", 3)
    account = new_account()
    for _ in range(5):
        ledger.grant(account, 1)
    page = ledger.stub.ListLots(pb.ListLotsRequest(account_id=account, page_size=2**31 - 1))
    assert len(page.lots) == 3
    assert page.next_page_token
    rest = ledger.stub.ListLots(
        pb.ListLotsRequest(account_id=account, page_size=1000, page_token=page.next_page_token)
    )
    assert len(rest.lots) == 2


# --- string lengths ---------------------------------------------------------------------------

HUGE = "x" * 100_000


def _string_paths(descriptor: Any, prefix: str = "") -> Iterator[str]:
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_STRING and not field.is_repeated:
            yield prefix + field.name
        elif (
            field.type == FieldDescriptor.TYPE_MESSAGE
            and not field.is_repeated
            and not field.message_type.full_name.startswith("google.protobuf")
        ):
            yield from _string_paths(field.message_type, f"{prefix}{field.name}.")


def _with(request: Message, path: str, value: str) -> Message:
    target: Any = request
    *parents, name = path.split(".")
    for parent in parents:
        target = getattr(target, parent)
    setattr(target, name, value)
    return request


def _rpcs() -> Iterator[tuple[str, str, Any, str]]:
    for module in (pb, billing_service_pb2, admin_service_pb2, report_service_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                for path in _string_paths(method.input_type):
                    yield service.full_name, method.name, method.input_type, path


@pytest.mark.parametrize(
    ("service", "method", "request_type", "path"),
    list(_rpcs()),
    ids=[f"{m}.{p}" for _, m, _, p in _rpcs()],
)
def test_every_string_field_has_a_length_limit(
    admin_channel: grpc.Channel, service: str, method: str, request_type: Any, path: str
) -> None:
    """Each string field of each RPC set to 100,000 characters (alone, the rest empty): refused
    as INVALID_ARGUMENT, and the error does not echo the input back."""
    request = _with(message_factory.GetMessageClass(request_type)(), path, HUGE)
    call = admin_channel.unary_unary(
        f"/{service}/{method}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=lambda b: b,
    )
    with pytest.raises(grpc.RpcError) as refused:
        call(request)
    error: Any = refused.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    info, _ = error_details(error)
    assert info.reason == "INVALID_FIELD"
    echoed = len(error.details()) + sum(len(v) for _, v in error.trailing_metadata())
    assert echoed < 4096


# --- deadlines become statement and lock time-outs ---------------------------------------------


def test_time_left_becomes_a_statement_timeout() -> None:
    cap = 5000
    assert deadlines.statement_timeout_ms(None, cap) == cap  # no deadline: the cap
    assert deadlines.statement_timeout_ms(None, 0) == 0  # no cap: no time-out
    assert deadlines.statement_timeout_ms(60.0, cap) == cap  # the cap bounds long deadlines
    # A 2 s deadline arrives as a little less or more than 2 s: one bucket, one setting.
    assert deadlines.statement_timeout_ms(1.992, cap) == 1850
    assert deadlines.statement_timeout_ms(2.008, cap) == 1850
    assert deadlines.statement_timeout_ms(0.5, cap) == 446
    with pytest.raises(LedgerError) as late:
        deadlines.statement_timeout_ms(0.003, cap)
    assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


class LockHolder:
    """Holds an account row's lock from a connection of the test's own."""

    def __init__(self, database_url: str, account_id: str) -> None:
        self.conn = psycopg.connect(database_url)
        self.conn.execute("SELECT 1 FROM accounts WHERE account_id = %s FOR UPDATE", (account_id,))

    def other_sessions_on_accounts(self) -> int:
        """Locks that other sessions hold or wait for on the accounts table."""
        with psycopg.connect(self.conn.info.dsn, autocommit=True) as observer:
            row = observer.execute(
                "SELECT count(*) FROM pg_locks WHERE relation = 'accounts'::regclass"
                " AND pid NOT IN (pg_backend_pid(), %s)",
                (self.conn.info.backend_pid,),
            ).fetchone()
        assert row is not None
        return int(row[0])

    def wait_until_alone(self) -> None:
        """Until no other session holds or waits for a lock on accounts (bounded, generous)."""
        for _ in range(200):
            if self.other_sessions_on_accounts() == 0:
                return
            threading.Event().wait(0.05)
        raise AssertionError("another session still holds or waits for an accounts lock")

    def release(self) -> None:
        self.conn.rollback()
        self.conn.close()


def _consume(account: str, key: str) -> pb.ConsumeRequest:
    return pb.ConsumeRequest(
        account_id=account, idempotency_key=key, amount_micros=CREDIT, feature="chat"
    )


def test_a_deadline_shorter_than_a_lock_wait_is_deadline_exceeded_and_changes_nothing(
    settings: Settings, clock: OffsetClock, ledger_db_url: str
) -> None:
    with (
        serving(settings, clock) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        ledger = Ledger(ledger_service_pb2_grpc.LedgerServiceStub(channel))
        account = new_account()
        before = ledger.grant(account, 10).balance.balance_micros
        key = new_key()
        holder = LockHolder(ledger_db_url, account)
        try:
            # The call returns while the lock is still held: the server gave up waiting.
            with pytest.raises(grpc.RpcError) as late:
                ledger.stub.Consume(_consume(account, key), timeout=2.0)
            error: Any = late.value
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # Answered by the server (the statement time-out, with an ErrorInfo), not only
            # by the client's own deadline.
            info, _ = error_details(error)
            assert info.reason == "DEADLINE_EXCEEDED"
            # The server's session neither holds nor still waits for the lock.
            holder.wait_until_alone()
        finally:
            holder.release()
        assert ledger.balance(account).balance_micros == before
        # Nothing was stored under the key: the retry is applied now, not replayed.
        response, call = ledger.stub.Consume.with_call(_consume(account, key), timeout=10)
        assert response.balance.balance_micros == before - CREDIT
        assert ("ledger-idempotent-replay", "true") not in call.trailing_metadata()


def test_a_call_without_a_deadline_is_capped(
    settings: Settings, clock: OffsetClock, ledger_db_url: str
) -> None:
    with (
        serving(settings, clock, statement_timeout_ms=300) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        ledger = Ledger(ledger_service_pb2_grpc.LedgerServiceStub(channel))
        account = new_account()
        before = ledger.grant(account, 10).balance.balance_micros
        holder = LockHolder(ledger_db_url, account)
        try:
            pending = ledger.stub.Consume.future(_consume(account, new_key()))  # no deadline
            try:
                pending.result(timeout=60)  # a safety net for this test, not a gRPC deadline
            except grpc.FutureTimeoutError:
                pending.cancel()
                raise AssertionError("the call without a deadline waited for the lock") from None
            except grpc.RpcError:
                pass
            else:
                raise AssertionError("the call succeeded while the row was locked")
            error: Any = pending.exception()
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            info, _ = error_details(error)
            assert info.reason == "DEADLINE_EXCEEDED"
            holder.wait_until_alone()
        finally:
            holder.release()
        assert ledger.balance(account).balance_micros == before


def test_consume_stays_one_round_trip(
    settings: Settings, clock: OffsetClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counts the statements the server sends (every psycopg execute on the server's thread;
    each is one round trip): a Consume is its ledger function alone once the connection's
    time-outs are set, which happens when a call's time-outs differ from the last call's."""
    counts: list[int] = []
    original = psycopg.AsyncCursor.execute

    async def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        # The health task's probe (its own connection, same thread) may fall inside a call.
        is_probe = bool(args) and args[0] == "SELECT 1"
        if threading.current_thread().name == "ledger-server" and not is_probe:
            counts[-1] += 1
        return await original(self, *args, **kwargs)

    with (
        serving(settings, clock, db_pool_min_size=1, db_pool_max_size=1) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        ledger = Ledger(ledger_service_pb2_grpc.LedgerServiceStub(channel))
        account = new_account()
        ledger.grant(account, 100)
        monkeypatch.setattr(psycopg.AsyncCursor, "execute", counting)

        def statements(timeout: float | None) -> int:
            counts.append(0)
            ledger.stub.Consume(_consume(account, new_key()), timeout=timeout)
            return counts[-1]

        # No deadline, or one longer than the cap: the cap, already set by the grant.
        assert [statements(None), statements(None), statements(30), statements(None)] == [
            1,
            1,
            1,
            1,
        ]
        # A short deadline sets the time-outs once (2), then finds them set (1, as long as the
        # time left stays within its 100 ms bucket); back to no deadline: set again, once.
        short = [statements(2.0), statements(2.0), statements(None), statements(None)]
        assert short[0] == 2
        assert short[1] in (1, 2)
        assert short[2:] == [2, 1]


# --- rate limit -------------------------------------------------------------------------------


def test_the_rate_limit_answers_resource_exhausted_past_the_burst(
    settings: Settings, clock: OffsetClock
) -> None:
    callers = make_callers(
        {"name": "busy-service", "role": "service"}, {"name": "calm-service", "role": "service"}
    )
    with (
        # 3 calls at once, then one per 1000 s: no refill while the test runs.
        serving(
            settings,
            clock,
            callers=callers.callers,
            rate_limit_per_second=0.001,
            rate_limit_burst=3,
        ) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = ledger_service_pb2_grpc.LedgerServiceStub(channel)
        request = pb.BalanceRequest(account_id=new_account())
        busy = callers.metadata("busy-service")
        for _ in range(3):  # NOT_FOUND: served (counted), just no such account
            assert status_code(lambda: stub.Balance(request, metadata=busy)) == (
                grpc.StatusCode.NOT_FOUND
            )
        info = expect_error(
            lambda: stub.Balance(request, metadata=busy),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "RATE_LIMITED",
        )
        assert int(info.metadata["retry_after_ms"]) > 0
        # Per caller: another caller has its own bucket; health is never limited.
        calm = callers.metadata("calm-service")
        assert status_code(lambda: stub.Balance(request, metadata=calm)) == (
            grpc.StatusCode.NOT_FOUND
        )
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(5):
            health.Check(health_pb2.HealthCheckRequest())


def test_the_token_bucket_refills() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=2, clock=lambda: now[0])
    assert [limiter.take("a"), limiter.take("a")] == [0.0, 0.0]
    assert limiter.take("a") == pytest.approx(0.5)
    assert limiter.take("b") == 0.0  # per caller
    now[0] += 0.5
    assert limiter.take("a") == 0.0
    assert limiter.take("a") == pytest.approx(0.5)
    now[0] += 100  # refills up to the burst, not beyond
    assert [limiter.take("a"), limiter.take("a")] == [0.0, 0.0]
    assert limiter.take("a") > 0
    assert not RateLimiter(rate=0, burst=0).enabled
    assert RateLimiter(rate=2.5, burst=0).burst == 3  # burst defaults to one second's worth
