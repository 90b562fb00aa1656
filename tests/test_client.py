"""The typed Python client (clients/python/src/ledger_client): typed calls and errors against
the real server, retries that never double-charge (a proxy loses responses the server did
send; the server process is killed mid-call), the reservation context manager, credentials,
and the package installing into an empty virtualenv."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

from ledger.v1 import admin_service_pb2 as admin_pb
from ledger.v1 import billing_service_pb2 as billing_pb
from ledger.v1 import ledger_service_pb2 as pb
from ledger.v1 import types_pb2
from ledger_client import (
    TLS,
    AccountNotFound,
    AlreadyExists,
    AmountExceedsHold,
    AmountExceedsRefundable,
    AsyncLedgerClient,
    Conflict,
    Credentials,
    DeadlineExceeded,
    FailedPrecondition,
    IdempotencyKeyReused,
    InsufficientCredits,
    InvalidArgument,
    LedgerClient,
    LedgerError,
    NotFound,
    RateLimited,
    ReservationExpired,
    ReservationNotCommitted,
    ReservationNotFound,
    ReservationNotPending,
    RetryPolicy,
    Unavailable,
    errors,
)
from ledger_server.db.migrate import migrate
from support.certs import make_certs
from support.client import FAST_RETRY
from support.fake_ledger import Failure, FakeLedger, failure, serve_fake
from support.ledger import CREDIT, Ledger, new_account
from support.proxy import DropProxy
from support.server_process import REPO, ServerProcess
from support.sources import Sources

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
NOT_FOUND = grpc.StatusCode.NOT_FOUND
FAILED = grpc.StatusCode.FAILED_PRECONDITION


def charges(ledger: Ledger, account: str) -> list[pb.Transaction]:
    return list(ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_CHARGE]))


def retries_logged(caplog: pytest.LogCaptureFixture) -> int:
    return sum(1 for r in caplog.records if r.name == "ledger_client" and "retry" in r.getMessage())


# --- 1. typed calls and typed errors against the real server -------------------------------


def test_typed_calls_round_trip(client: LedgerClient, ledger: Ledger) -> None:
    account = new_account("client")
    granted = client.grant(account, 10 * CREDIT, "purchase", external_ref="order-7")
    assert granted.lot.source == types_pb2.CREDIT_SOURCE_PURCHASE
    assert granted.lot.external_ref == "order-7"
    expiring = client.grant(
        account, 2 * CREDIT, types_pb2.CREDIT_SOURCE_PROMOTION, expires_in=timedelta(days=3)
    )
    assert expiring.lot.HasField("expires_at")
    assert client.balance(account).balance_micros == 12 * CREDIT

    consumed = client.consume(account, CREDIT, feature="chat.gpt", comment="one answer")
    assert consumed.reservation.status == pb.RESERVATION_STATUS_COMMITTED
    assert consumed.balance.balance_micros == 11 * CREDIT

    reserved = client.reserve(account, 3 * CREDIT, ttl=timedelta(minutes=5), feature="img")
    reservation_id = reserved.reservation.reservation_id
    assert client.balance(account).available_micros == 8 * CREDIT
    committed = client.commit(account, reservation_id, 2 * CREDIT)
    assert committed.reservation.committed_micros == 2 * CREDIT
    refunded = client.refund(account, reservation_id, CREDIT, reason="bad output")
    assert refunded.refunded_micros == CREDIT
    fetched = client.get_reservation(account, reservation_id).reservation
    assert fetched.refunded_micros == CREDIT

    released = client.release(account, client.reserve(account, CREDIT).reservation.reservation_id)
    assert released.reservation.status == pb.RESERVATION_STATUS_RELEASED
    assert client.balance(account).balance_micros == 10 * CREDIT

    # The expiring promotion lot was consumed first and is used up: only listed as inactive.
    assert [lot.source for lot in client.list_lots(account).lots] == [
        types_pb2.CREDIT_SOURCE_PURCHASE
    ]
    lots = client.list_lots(account, include_inactive=True).lots
    assert {lot.source for lot in lots} == {
        types_pb2.CREDIT_SOURCE_PROMOTION,
        types_pb2.CREDIT_SOURCE_PURCHASE,
    }
    assert list(client.iter_lots(account, include_inactive=True, page_size=1)) == list(lots)

    everything = ledger.transactions(account)
    walked = list(client.iter_transactions(account, page_size=2))
    assert [t.transaction_id for t in walked] == [t.transaction_id for t in everything]
    assert len(walked) > 2
    only_charges = list(client.iter_transactions(account, kinds=["charge"], page_size=1))
    assert [t.kind for t in only_charges] == [pb.TRANSACTION_KIND_CHARGE] * 2
    recent = client.list_transactions(
        account, start_time=datetime.now(UTC) - timedelta(days=3650), feature="chat.gpt"
    )
    assert {t.feature for t in recent.transactions} == {"chat.gpt"}


def test_reward_grant_by_name(client: LedgerClient) -> None:
    account = new_account("client")
    client.grant(account, CREDIT, "purchase")
    client.grant(account, 3 * CREDIT, "referral", balance_kind="reward")
    balance = client.balance(account)
    assert (balance.balance_micros, balance.reward_balance_micros) == (CREDIT, 3 * CREDIT)


def test_insufficient_credits_carries_the_available_balance(
    client: LedgerClient, ledger: Ledger
) -> None:
    account = new_account("client")
    client.grant(account, 5 * CREDIT, "purchase")
    client.reserve(account, CREDIT)
    with pytest.raises(InsufficientCredits) as caught:
        client.consume(account, 7 * CREDIT)
    error = caught.value
    assert isinstance(error, FailedPrecondition) and isinstance(error, LedgerError)
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "INSUFFICIENT_CREDITS"
    assert error.available_micros == 4 * CREDIT
    assert error.requested_micros == 7 * CREDIT
    assert isinstance(error.__cause__, grpc.RpcError)
    assert ledger.balance(account).balance_micros == 5 * CREDIT


def test_invalid_argument_names_the_field(client: LedgerClient) -> None:
    account = new_account("client")
    client.grant(account, 5 * CREDIT, "purchase")
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: client.consume(account, 0), "amount_micros"),
        (lambda: client.reserve(account, CREDIT, feature="not a code!"), "feature"),
        (lambda: client.commit(account, "not-a-uuid", CREDIT), "reservation_id"),
        (lambda: client.grant("bad account id", CREDIT, "admin"), "account_id"),
        (lambda: client.reserve(account, CREDIT, ttl=timedelta(seconds=-1)), "ttl"),
        (lambda: client.list_lots(account, page_size=-1), "page_size"),
    ]
    for call, field in cases:
        with pytest.raises(InvalidArgument) as caught:
            call()
        assert caught.value.field == field, (field, str(caught.value))
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert field in caught.value.message
    assert client.balance(account).balance_micros == 5 * CREDIT


def test_every_failed_precondition_has_its_type(client: LedgerClient) -> None:
    account = new_account("client")
    client.grant(account, 10 * CREDIT, "purchase")
    reservation_id = client.reserve(account, 2 * CREDIT).reservation.reservation_id

    with pytest.raises(AmountExceedsHold) as over:
        client.commit(account, reservation_id, 3 * CREDIT)
    assert (over.value.held_micros, over.value.requested_micros) == (2 * CREDIT, 3 * CREDIT)
    with pytest.raises(ReservationNotCommitted):
        client.refund(account, reservation_id)
    client.commit(account, reservation_id, CREDIT)
    with pytest.raises(ReservationNotPending) as again:
        client.release(account, reservation_id)
    assert again.value.reservation_id == reservation_id
    with pytest.raises(AmountExceedsRefundable) as too_much:
        client.refund(account, reservation_id, 2 * CREDIT)
    assert too_much.value.refundable_micros == CREDIT

    with pytest.raises(ReservationNotFound) as missing:
        client.get_reservation(account, str(uuid.uuid4()))
    assert isinstance(missing.value, NotFound)
    with pytest.raises(AccountNotFound) as nobody:
        client.consume(new_account("nobody"), CREDIT)
    assert isinstance(nobody.value, NotFound)

    key = str(uuid.uuid4())
    client.consume(account, CREDIT, idempotency_key=key)
    with pytest.raises(IdempotencyKeyReused) as reused:
        client.consume(account, 2 * CREDIT, idempotency_key=key)
    assert reused.value.code == grpc.StatusCode.ALREADY_EXISTS


def test_caller_supplied_idempotency_key_replays(client: LedgerClient, ledger: Ledger) -> None:
    account = new_account("client")
    client.grant(account, 10 * CREDIT, "purchase")
    first = client.consume(account, CREDIT, idempotency_key="order-42-charge")
    second = client.consume(account, CREDIT, idempotency_key="order-42-charge")
    assert first.transaction_id == second.transaction_id
    assert len(charges(ledger, account)) == 1
    assert ledger.balance(account).balance_micros == 9 * CREDIT


def test_arguments_are_checked_before_any_call(client: LedgerClient) -> None:
    with pytest.raises(ValueError, match="unknown credit source"):
        client.grant(new_account(), CREDIT, "stolen")
    with pytest.raises(ValueError, match="timezone-aware"):
        client.grant(new_account(), CREDIT, "purchase", expires_at=datetime(2100, 1, 1))
    with pytest.raises(ValueError, match="not both"):
        client.grant(
            new_account(),
            CREDIT,
            "purchase",
            expires_at=datetime(2100, 1, 1, tzinfo=UTC),
            expires_in=timedelta(days=1),
        )


def test_async_client_typed_calls(server_address: str, ledger: Ledger) -> None:
    account = new_account("aclient")

    async def scenario() -> None:
        async with AsyncLedgerClient(server_address, retry=FAST_RETRY) as aclient:
            await aclient.grant(account, 4 * CREDIT, "purchase")
            await aclient.consume(account, CREDIT, feature="chat")
            with pytest.raises(InsufficientCredits) as caught:
                await aclient.consume(account, 5 * CREDIT)
            assert caught.value.available_micros == 3 * CREDIT
            with pytest.raises(InvalidArgument) as bad:
                await aclient.reserve(account, -1)
            assert bad.value.field == "amount_micros"
            assert (await aclient.balance(account)).balance_micros == 3 * CREDIT
            walked = [t async for t in aclient.iter_transactions(account, page_size=1)]
            assert len(walked) == len(ledger.transactions(account)) == 2
            lots = [lot async for lot in aclient.iter_lots(account)]
            assert [lot.remaining_micros for lot in lots] == [3 * CREDIT]

    asyncio.run(scenario())


# --- 2. retries after a lost response never double-charge -----------------------------------


def test_retry_after_dropped_connection_does_not_double_charge(
    server_address: str, proxy: DropProxy, ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ledger_client")
    account = new_account("drop")
    ledger.grant(account, 10)
    outcome: dict[str, object] = {}

    with LedgerClient(proxy.address, retry=FAST_RETRY, timeout=30) as client:
        proxy.hold_next_response()

        def call() -> None:
            try:
                outcome["response"] = client.consume(account, 3 * CREDIT, feature="img")
            except BaseException as error:  # surfaced below
                outcome["error"] = error

        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        proxy.wait_until_held()
        # The server has charged and answered; the answer is stuck in the proxy.
        assert ledger.balance(account).balance_micros == 7 * CREDIT
        [charge] = charges(ledger, account)
        proxy.drop_held()  # the client's connection dies before it sees the answer
        thread.join(timeout=30)
        assert not thread.is_alive()

    assert "error" not in outcome, outcome.get("error")
    response = outcome["response"]
    assert isinstance(response, pb.ConsumeResponse)
    assert proxy.responses_dropped == 1
    assert proxy.connections >= 2  # the retry came in on a new connection
    assert retries_logged(caplog) >= 1
    retried = [r.getMessage() for r in caplog.records if r.name == "ledger_client"]
    assert "UNAVAILABLE" in retried[0], retried
    assert response.transaction_id == charge.transaction_id  # the original, replayed
    assert response.balance.balance_micros == 7 * CREDIT
    assert ledger.balance(account).balance_micros == 7 * CREDIT
    assert len(charges(ledger, account)) == 1


def test_async_retry_after_dropped_connection_does_not_double_charge(
    proxy: DropProxy, ledger: Ledger
) -> None:
    account = new_account("adrop")
    ledger.grant(account, 10)

    async def scenario() -> tuple[pb.ReserveResponse, pb.CommitResponse]:
        async with AsyncLedgerClient(proxy.address, retry=FAST_RETRY, timeout=30) as aclient:
            proxy.drop_next_response()
            reserved = await aclient.reserve(account, 4 * CREDIT, feature="video")
            proxy.drop_next_response()
            committed = await aclient.commit(
                account, reserved.reservation.reservation_id, 3 * CREDIT
            )
            return reserved, committed

    reserved, committed = asyncio.run(scenario())
    assert proxy.responses_dropped == 2
    assert committed.reservation.status == pb.RESERVATION_STATUS_COMMITTED
    assert len(ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_HOLD])) == 1
    assert len(charges(ledger, account)) == 1
    assert ledger.balance(account).balance_micros == 7 * CREDIT
    assert ledger.balance(account).held_micros == 0
    assert reserved.reservation.held_micros == 4 * CREDIT


def test_reads_are_retried(proxy: DropProxy, ledger: Ledger) -> None:
    account = new_account("read")
    ledger.grant(account, 2)
    with LedgerClient(proxy.address, retry=FAST_RETRY) as client:
        proxy.drop_next_response()
        assert client.balance(account).balance_micros == 2 * CREDIT
    assert proxy.responses_dropped == 1


def test_retry_after_server_restart_mid_call_does_not_double_charge(
    fresh_database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A database of its own: a server process writes its environment's setting defaults at
    # start and runs on the system clock, which the session's database must not see.
    caplog.set_level(logging.INFO, logger="ledger_client")
    migrate(fresh_database_url)
    first = ServerProcess(fresh_database_url).start()
    restarted: ServerProcess | None = None
    account = new_account("restart")
    outcome: dict[str, object] = {}
    try:
        with (
            DropProxy(first.address) as proxy,
            LedgerClient(proxy.address, retry=FAST_RETRY, timeout=60) as client,
        ):
            # (a fresh database may give a sign-up bonus too: compare with this balance)
            before = client.grant(account, 10 * CREDIT, "purchase").balance.balance_micros
            proxy.hold_next_response()

            def call() -> None:
                try:
                    outcome["response"] = client.consume(account, 3 * CREDIT)
                except BaseException as error:  # surfaced below
                    outcome["error"] = error

            thread = threading.Thread(target=call, daemon=True)
            thread.start()
            proxy.wait_until_held()
            first.kill()  # the server dies after charging, before the client hears back
            restarted = ServerProcess(fresh_database_url, port=first.port).start()
            proxy.drop_held()
            thread.join(timeout=60)
            assert not thread.is_alive()
            balance = client.balance(account)
            journal = list(client.iter_transactions(account, kinds=["charge"]))
    finally:
        first.kill()
        if restarted is not None:
            restarted.stop()

    assert "error" not in outcome, outcome.get("error")
    response = outcome["response"]
    assert isinstance(response, pb.ConsumeResponse)
    assert retries_logged(caplog) >= 1
    assert balance.balance_micros == before - 3 * CREDIT
    assert [t.transaction_id for t in journal] == [response.transaction_id]


def test_conflict_is_retried_with_the_same_key() -> None:
    fake = FakeLedger(failures=[failure(grpc.StatusCode.ABORTED, "CONFLICT"), failure(UNAVAILABLE)])
    with serve_fake(fake) as address, LedgerClient(address, retry=FAST_RETRY) as client:
        response = client.consume("acct-1", CREDIT)
    requests = [r.request for r in fake.received]
    keys = [r.idempotency_key for r in requests if isinstance(r, pb.ConsumeRequest)]
    assert len(keys) == 3 and len(set(keys)) == 1 and keys[0]
    assert response.transaction_id == "tx-" + keys[0]


def test_a_call_the_server_side_cancelled_is_retried_with_the_same_key() -> None:
    """grpc cancels the calls that arrive as a server shuts down (helper-109 saw 5 to 19 of
    them answered CANCELLED on SIGTERM): the next server answers the retry, same key."""
    fake = FakeLedger(failures=[failure(grpc.StatusCode.CANCELLED)])
    with serve_fake(fake) as address, LedgerClient(address, retry=FAST_RETRY) as client:
        response = client.consume("acct-1", CREDIT)
    keys = [r.request.idempotency_key for r in fake.received]
    assert len(keys) == 2 and keys[0] == keys[1]
    assert response.transaction_id == "tx-" + keys[0]


def test_conflict_surfaces_once_attempts_are_spent() -> None:
    fake = FakeLedger(failures=[failure(grpc.StatusCode.ABORTED, "CONFLICT")] * 3)
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.01)
    with (
        serve_fake(fake) as address,
        LedgerClient(address, retry=policy) as client,
        pytest.raises(Conflict),
    ):
        client.consume("acct-1", CREDIT)
    assert len(fake.received) == 3


def test_the_backoff_stays_at_its_cap_however_many_attempts() -> None:
    """multiplier ** (attempt - 1) passes a float's range from the 1025th attempt: the
    delay must stay capped, not raise OverflowError (which is no LedgerError)."""
    policy = RetryPolicy(max_attempts=10**6)
    error = Unavailable("down")
    for attempt in (1025, 10**6 - 1):
        delay = policy.delay_before_retry(error, attempt, None)
        assert delay is not None and 0 <= delay <= policy.max_backoff
    assert RetryPolicy(initial_backoff=0.0).backoff(10**6) == 0.0


def test_the_servers_own_time_out_is_retried_with_the_same_key() -> None:
    """DEADLINE_EXCEEDED with the server's ErrorInfo: its database time-out rolled the call
    back, so the retry (same key) is safe. One without it (the deadline passed on the way,
    outcome unknown) is raised at once, and so is a server time-out when retries of them are
    turned off."""
    server_timeout = failure(grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED")
    fake = FakeLedger(failures=[server_timeout])
    with serve_fake(fake) as address, LedgerClient(address, retry=FAST_RETRY) as client:
        response = client.consume("acct-1", CREDIT)
    keys = [r.request.idempotency_key for r in fake.received]
    assert len(keys) == 2 and keys[0] == keys[1]
    assert response.transaction_id == "tx-" + keys[0]

    unknown = failure(grpc.StatusCode.DEADLINE_EXCEEDED)
    no_server_timeouts = RetryPolicy(initial_backoff=0.01, retry_server_timeouts=False)
    for first, policy in ((unknown, FAST_RETRY), (server_timeout, no_server_timeouts)):
        fake = FakeLedger(failures=[first])
        with (
            serve_fake(fake) as address,
            LedgerClient(address, retry=policy) as client,
            pytest.raises(DeadlineExceeded),
        ):
            client.consume("acct-1", CREDIT)
        assert len(fake.received) == 1


def test_other_errors_are_not_retried() -> None:
    fake = FakeLedger(
        failures=[
            failure(
                grpc.StatusCode.FAILED_PRECONDITION,
                "INSUFFICIENT_CREDITS",
                metadata={"available_micros": "5", "requested_micros": "9"},
            )
        ]
    )
    with (
        serve_fake(fake) as address,
        LedgerClient(address, retry=FAST_RETRY) as client,
        pytest.raises(InsufficientCredits) as caught,
    ):
        client.consume("acct-1", CREDIT)
    assert (caught.value.available_micros, caught.value.requested_micros) == (5, 9)
    assert len(fake.received) == 1


def test_unreachable_server_is_unavailable_after_the_attempts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="ledger_client")
    with socket.socket() as bound:  # a port of ours that nobody listens on: refused
        bound.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{bound.getsockname()[1]}"
        policy = RetryPolicy(max_attempts=3, initial_backoff=0.01)
        with LedgerClient(address, retry=policy) as client, pytest.raises(Unavailable):
            client.balance("acct-1")
    assert retries_logged(caplog) == 2


def test_the_deadline_covers_the_call() -> None:
    fake = FakeLedger(block=threading.Event())
    with (
        serve_fake(fake) as address,
        LedgerClient(address, retry=FAST_RETRY, timeout=0.3) as client,
        pytest.raises(DeadlineExceeded),
    ):
        client.consume("acct-1", CREDIT)
    assert len(fake.received) == 1  # a spent deadline is not retried


def test_an_unknown_outcome_names_the_key_to_retry_with(proxy: DropProxy, ledger: Ledger) -> None:
    """The deadline passed while the charge was applied: the error carries the key the
    client made, and a retry with it answers the original charge instead of a second."""
    account = new_account("unknown")
    ledger.grant(account, 10)
    with LedgerClient(proxy.address, retry=FAST_RETRY, timeout=1.0) as client:
        proxy.hold_next_response()
        with pytest.raises(DeadlineExceeded) as raised:
            client.consume(account, 3 * CREDIT, feature="img")
        proxy.drop_held()
        [charge] = charges(ledger, account)
        assert raised.value.idempotency_key
        again = client.consume(
            account, 3 * CREDIT, feature="img", idempotency_key=raised.value.idempotency_key
        )
    assert again.transaction_id == charge.transaction_id
    assert ledger.balance(account).balance_micros == 7 * CREDIT


def test_closing_the_client_during_a_call_raises_its_key_not_a_bare_value_error(
    proxy: DropProxy, ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    """close() while another thread's charge waited for its answer (committed, held by the
    proxy): the client retried its own CANCELLED on the closed channel and the caller got
    ValueError('Cannot invoke RPC on closed channel!'), no key, charged. Now a CANCELLED
    LedgerError with the key, outcome unknown; the key replays the charge. A call made on
    a closed client says so too, nothing sent."""
    caplog.set_level(logging.INFO, logger="ledger_client")
    account = new_account("closed")
    ledger.grant(account, 10)
    outcome: dict[str, BaseException] = {}
    client = LedgerClient(proxy.address, retry=FAST_RETRY, timeout=10)
    client.balance(account)  # connected
    proxy.hold_next_response()

    def call() -> None:
        try:
            client.consume(account, 3 * CREDIT, feature="img")
        except BaseException as error:  # examined below
            outcome["error"] = error

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    proxy.wait_until_held()
    client.close()
    thread.join(timeout=5)
    proxy.drop_held()
    assert not thread.is_alive()
    error = outcome["error"]
    assert isinstance(error, LedgerError), repr(error)
    assert error.code == grpc.StatusCode.CANCELLED
    assert error.outcome_unknown and error.idempotency_key
    assert retries_logged(caplog) == 0  # the client's own cancellation is not retried
    [charge] = charges(ledger, account)
    with LedgerClient(proxy.address, retry=FAST_RETRY) as again:
        replayed = again.consume(
            account, 3 * CREDIT, feature="img", idempotency_key=error.idempotency_key
        )
    assert replayed.transaction_id == charge.transaction_id
    assert ledger.balance(account).balance_micros == 7 * CREDIT

    with pytest.raises(LedgerError) as after:
        client.consume(account, CREDIT, idempotency_key="after-close")
    assert after.value.code == grpc.StatusCode.CANCELLED
    assert (after.value.idempotency_key, after.value.outcome_unknown) == ("after-close", False)
    assert len(charges(ledger, account)) == 1


def test_async_close_during_a_call_raises_its_key_and_a_cancelled_task_still_cancels(
    proxy: DropProxy, ledger: Ledger
) -> None:
    """await aclient.close() while a committed charge waited for its answer: the call's task
    got a bare CancelledError (no key, as if the caller had cancelled it). Now a CANCELLED
    LedgerError with the key, outcome unknown. The caller's own cancellation still raises
    CancelledError, a close() right after it included."""
    account = new_account("aclosed")
    ledger.grant(account, 10)

    async def held_call(client: AsyncLedgerClient) -> asyncio.Task[pb.ConsumeResponse]:
        await client.balance(account)  # connected
        proxy.hold_next_response()
        task = asyncio.create_task(client.consume(account, CREDIT, feature="img"))
        await asyncio.to_thread(proxy.wait_until_held)
        return task

    async def scenario() -> tuple[BaseException, bool]:
        client = AsyncLedgerClient(proxy.address, retry=FAST_RETRY, timeout=10)
        task = await held_call(client)
        await client.close()
        try:
            await task
        except BaseException as error:  # examined below
            closed_error = error
        await asyncio.to_thread(proxy.drop_held)
        with pytest.raises(LedgerError) as after:  # a call on the closed client: not sent
            await client.consume(account, CREDIT, idempotency_key="after-aclose")
        assert after.value.code == grpc.StatusCode.CANCELLED
        assert (after.value.idempotency_key, after.value.outcome_unknown) == ("after-aclose", False)

        mine = AsyncLedgerClient(proxy.address, retry=FAST_RETRY, timeout=10)
        task = await held_call(mine)
        task.cancel()
        await mine.close()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.to_thread(proxy.drop_held)
        return closed_error, task.cancelled()

    error, cancelled = asyncio.run(scenario())
    assert isinstance(error, LedgerError), repr(error)
    assert error.code == grpc.StatusCode.CANCELLED
    assert error.outcome_unknown and error.idempotency_key
    assert cancelled
    # Both held answers were charges the server committed; the first's key replays its own.
    both = charges(ledger, account)
    assert len(both) == 2
    first = min(both, key=lambda t: t.create_time.ToDatetime())
    with LedgerClient(proxy.address, retry=FAST_RETRY) as client:
        replayed = client.consume(
            account, CREDIT, feature="img", idempotency_key=error.idempotency_key
        )
    assert replayed.transaction_id == first.transaction_id
    assert ledger.balance(account).balance_micros == 8 * CREDIT


def test_the_async_client_names_the_key_too() -> None:
    fake = FakeLedger(failures=[failure(grpc.StatusCode.UNAVAILABLE, "down")] * 2)

    async def run(address: str) -> None:
        policy = RetryPolicy(max_attempts=2, initial_backoff=0.01)
        async with AsyncLedgerClient(address, retry=policy) as client:
            with pytest.raises(Unavailable) as raised:
                await client.consume("acct-1", CREDIT)
        sent = {r.request.idempotency_key for r in fake.received}  # type: ignore[attr-defined]
        assert sent == {raised.value.idempotency_key}

    with serve_fake(fake) as address:
        asyncio.run(run(address))


def test_error_decoding_picks_our_error_info_or_falls_back_to_the_code() -> None:
    garbage = Failure(NOT_FOUND, "from the transport", (("grpc-status-details-bin", b"\xff"),))
    theirs = failure(FAILED, "INSUFFICIENT_CREDITS", domain="other.example", message="theirs")
    bad_request = error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(field="x")]
    )
    ours = failure(
        FAILED, "RESERVATION_EXPIRED", metadata={"reservation_id": "r-1"}, also=(bad_request,)
    )
    newer = failure(grpc.StatusCode.ALREADY_EXISTS, "ACCOUNT_EXISTS")
    fake = FakeLedger(failures=[garbage, theirs, ours, newer, failure(grpc.StatusCode.INTERNAL)])
    errors: list[LedgerError] = []
    with serve_fake(fake) as address, LedgerClient(address, retry=FAST_RETRY) as client:
        for _ in range(5):
            with pytest.raises(LedgerError) as caught:
                client.balance("acct-1")
            errors.append(caught.value)
    assert [type(e) for e in errors] == [
        NotFound,
        FailedPrecondition,
        ReservationExpired,
        AlreadyExists,  # a reason this client does not know yet: typed by its code
        LedgerError,
    ]
    assert (errors[0].reason, errors[0].message) == ("", "from the transport")
    assert (errors[1].reason, errors[1].message) == ("", "theirs")
    assert errors[2].reason == "RESERVATION_EXPIRED"
    assert errors[2].metadata == {"reservation_id": "r-1"}
    assert errors[3].reason == "ACCOUNT_EXISTS"
    assert not isinstance(errors[3], IdempotencyKeyReused)
    assert errors[4].code == grpc.StatusCode.INTERNAL
    assert str(errors[2]) == "FAILED_PRECONDITION RESERVATION_EXPIRED: reservation_expired"


# --- 3. the reservation context manager ----------------------------------------------------


def test_reservation_commits_the_actual_cost_on_success(
    client: LedgerClient, ledger: Ledger
) -> None:
    account = new_account("hold")
    ledger.grant(account, 10)
    with client.reservation(account, 4 * CREDIT, feature="image.generate") as hold:
        assert client.balance(account).available_micros == 6 * CREDIT
        assert hold.held_micros == 4 * CREDIT
        hold.set_actual(1_500_000)
    reservation = client.get_reservation(account, hold.reservation_id).reservation
    assert reservation.status == pb.RESERVATION_STATUS_COMMITTED
    assert reservation.committed_micros == 1_500_000
    assert hold.reservation.committed_micros == 1_500_000
    balance = ledger.balance(account)
    assert (balance.balance_micros, balance.held_micros) == (8_500_000, 0)


def test_reservation_without_an_actual_commits_the_held_amount(
    client: LedgerClient, ledger: Ledger
) -> None:
    account = new_account("hold")
    ledger.grant(account, 10)
    with client.reservation(account, 2 * CREDIT) as hold:
        pass
    assert hold.reservation.status == pb.RESERVATION_STATUS_COMMITTED
    assert ledger.balance(account).balance_micros == 8 * CREDIT


def test_reservation_releases_on_an_exception(
    client: LedgerClient, ledger: Ledger, assert_audit_clean: Callable[[], None]
) -> None:
    account = new_account("hold")
    ledger.grant(account, 10)
    failure = RuntimeError("the model timed out")
    with pytest.raises(RuntimeError) as caught, client.reservation(account, 3 * CREDIT) as hold:
        hold.set_actual(CREDIT)
        raise failure
    assert caught.value is failure
    reservation = client.get_reservation(account, hold.reservation_id).reservation
    assert reservation.status == pb.RESERVATION_STATUS_FAILED
    assert reservation.committed_micros == 0
    balance = ledger.balance(account)
    assert (balance.balance_micros, balance.held_micros) == (10 * CREDIT, 0)
    assert charges(ledger, account) == []
    assert_audit_clean()


def test_reservation_explicit_commit_and_failed_reserve(
    client: LedgerClient, ledger: Ledger
) -> None:
    account = new_account("hold")
    ledger.grant(account, 5)
    with client.reservation(account, 2 * CREDIT) as hold:
        hold.commit(CREDIT)
        with pytest.raises(RuntimeError, match="committed already"):
            hold.release()
    assert ledger.balance(account).balance_micros == 4 * CREDIT
    assert len(charges(ledger, account)) == 1

    with (
        pytest.raises(InsufficientCredits),
        client.reservation(account, 50 * CREDIT),
    ):
        pytest.fail("the block must not run when nothing could be reserved")
    assert ledger.balance(account).balance_micros == 4 * CREDIT


def test_async_reservation_commits_and_releases(server_address: str, ledger: Ledger) -> None:
    account = new_account("ahold")
    ledger.grant(account, 10)

    async def scenario() -> tuple[str, str, str]:
        async with AsyncLedgerClient(server_address, retry=FAST_RETRY) as aclient:
            async with aclient.reservation(account, 3 * CREDIT, feature="chat") as ok:
                ok.set_actual(2 * CREDIT)
            with pytest.raises(ZeroDivisionError):
                async with aclient.reservation(account, 3 * CREDIT) as failed:
                    _ = 1 / 0

            # A cancelled generation is not charged either.
            entered = asyncio.Event()
            holds: list[str] = []

            async def generation() -> None:
                async with aclient.reservation(account, 3 * CREDIT) as hold:
                    holds.append(hold.reservation_id)
                    entered.set()
                    await asyncio.Event().wait()  # until cancelled

            task = asyncio.create_task(generation())
            await entered.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return ok.reservation_id, failed.reservation_id, holds[0]

    ok_id, failed_id, cancelled_id = asyncio.run(scenario())

    def status(reservation_id: str) -> int:
        request = pb.GetReservationRequest(account_id=account, reservation_id=reservation_id)
        return ledger.stub.GetReservation(request).reservation.status

    assert status(ok_id) == pb.RESERVATION_STATUS_COMMITTED
    assert status(failed_id) == pb.RESERVATION_STATUS_FAILED  # the block raised: the job failed
    assert status(cancelled_id) == pb.RESERVATION_STATUS_RELEASED
    balance = ledger.balance(account)
    assert (balance.balance_micros, balance.held_micros) == (8 * CREDIT, 0)


# --- credentials ---------------------------------------------------------------------------


def test_token_is_sent_as_bearer_metadata() -> None:
    fake = FakeLedger()
    credentials = Credentials(token="s3cret")
    assert "s3cret" not in repr(credentials)
    with (
        serve_fake(fake) as address,
        LedgerClient(address, credentials=credentials) as client,
    ):
        client.balance("acct-1")
    assert fake.received[0].metadata["authorization"] == "Bearer s3cret"
    assert "credit-ledger-client" in fake.received[0].metadata["user-agent"]


def test_mutual_tls_with_token(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    server_credentials = grpc.ssl_server_credentials(
        [(certs.server_key, certs.server_cert)],
        root_certificates=certs.ca,
        require_client_auth=True,
    )
    fake = FakeLedger()
    tls = TLS(
        root_certificates=certs.ca,
        client_certificate=certs.client_cert,
        client_private_key=certs.client_key,
    )
    with serve_fake(fake, server_credentials) as address:
        with LedgerClient(address, credentials=Credentials(token="t0k", tls=tls)) as client:
            assert client.balance("acct-1").balance_micros == 42

        async def over_aio() -> int:
            creds = Credentials(tls=tls)
            async with AsyncLedgerClient(address, credentials=creds) as aclient:
                return (await aclient.balance("acct-2")).balance_micros

        assert asyncio.run(over_aio()) == 42

        no_client_cert = Credentials(tls=TLS(root_certificates=certs.ca))
        policy = RetryPolicy(max_attempts=1)
        with (
            LedgerClient(address, credentials=no_client_cert, retry=policy) as client,
            pytest.raises(Unavailable),
        ):
            client.balance("acct-3")

    assert [r.peer_common_names for r in fake.received] == [["image-studio"], ["image-studio"]]
    assert fake.received[0].metadata["authorization"] == "Bearer t0k"
    assert "authorization" not in fake.received[1].metadata
    with pytest.raises(ValueError, match="both"):
        TLS(client_certificate=certs.client_cert)


# --- 4. the package installs into an empty virtualenv and its example runs -------------------


@pytest.mark.slow
def test_package_installs_into_an_empty_virtualenv_and_quickstart_runs(
    tmp_path: Path, server_address: str, ledger: Ledger
) -> None:
    source = tmp_path / "src"
    shutil.copytree(
        REPO / "clients" / "python",
        source,
        ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "build", "dist"),
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    def run(*args: str) -> str:
        done = subprocess.run(
            [python, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"
        return done.stdout

    run("-m", "pip", "install", "--quiet", str(source))
    installed = {line.split()[0].lower() for line in run("-m", "pip", "list").splitlines()[2:]}
    assert {"credit-ledger-client", "grpcio", "protobuf"} <= installed
    assert not installed & {"googleapis-common-protos", "grpcio-status"}, installed
    location = run("-c", "import ledger_client, ledger.v1; print(ledger_client.__file__)")
    assert location.startswith(str(venv)), location
    assert (
        run(
            "-c",
            "import pathlib, ledger_client; print(pathlib.Path(ledger_client.__file__)"
            ".with_name('py.typed').exists())",
        ).strip()
        == "True"
    )

    output = run(str(source / "examples" / "quickstart.py"), server_address).splitlines()
    account = output[0].removeprefix("account ")
    balance = ledger.balance(account)
    granted = sum(lot.amount_micros for lot in ledger.lots(account, include_inactive=True))
    assert balance.balance_micros == granted - 1_500_000  # 10 credits (+ any sign-up bonus)
    shown = f"{balance.balance_micros / CREDIT:.2f}"
    assert output[1:] == [
        "charged 1.50",
        "generation failed: hold released, nothing charged",
        f"insufficient credits: {shown} available",
        f"balance {shown}",
    ]
    assert [t.amount_micros for t in charges(ledger, account)] == [-1_500_000]
    assert len(ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_RELEASE])) == 1


# --- what a caller is told when it gives up (helper-52's review) ----------------------------


RATE_LIMITED = failure(
    grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED", metadata={"retry_after_ms": "250"}
)


def test_an_error_that_ends_retries_after_a_dropped_attempt_says_the_outcome_is_unknown() -> None:
    """The raised error is the last attempt's; an earlier one that lost its connection may
    have charged. The error says so, whatever the last one was (here a rate limit)."""
    fake = FakeLedger(failures=[failure(UNAVAILABLE), RATE_LIMITED])
    with (
        serve_fake(fake) as address,
        LedgerClient(address, retry=FAST_RETRY) as client,
        pytest.raises(RateLimited) as caught,
    ):
        client.consume("acct-1", CREDIT)
    keys = {r.request.idempotency_key for r in fake.received}
    assert caught.value.outcome_unknown and caught.value.retry_after_ms == 250
    assert keys == {caught.value.idempotency_key}
    for first, unknown in (([RATE_LIMITED], False), ([failure(grpc.StatusCode.INTERNAL)], True)):
        fake = FakeLedger(failures=list(first))
        with (
            serve_fake(fake) as address,
            LedgerClient(address, retry=FAST_RETRY) as client,
            pytest.raises(LedgerError) as caught_alone,
        ):
            client.consume("acct-1", CREDIT)
        assert caught_alone.value.outcome_unknown is unknown


def test_resource_exhausted_without_the_rate_limits_reason_is_no_rate_limit() -> None:
    """gRPC answers RESOURCE_EXHAUSTED for a message too large too, where waiting
    retry_after_ms helps nothing (helper-65): only the reason RATE_LIMITED is RateLimited."""
    fake = FakeLedger(
        failures=[failure(grpc.StatusCode.RESOURCE_EXHAUSTED, message="larger than max")]
    )
    with (
        serve_fake(fake) as address,
        LedgerClient(address, retry=FAST_RETRY) as client,
        pytest.raises(LedgerError) as caught,
    ):
        client.consume("acct-1", CREDIT)
    assert not isinstance(caught.value, RateLimited)
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.outcome_unknown  # an answer too large comes after the commit
    assert len(fake.received) == 1  # the same key gets the same answer: not retried


def test_an_answer_too_large_to_receive_says_the_charge_may_have_been_applied(
    server_address: str, ledger: Ledger
) -> None:
    """The server charged, then the answer was larger than the client's receive limit
    (gRPC's RESOURCE_EXHAUSTED, no reason): the error said outcome_unknown False, an
    uncharged call to the caller. It is unknown, and the key replays the charge."""
    account = new_account("too-large")
    ledger.grant(account, 10)
    small = [("grpc.max_receive_message_length", 64)]
    with (
        LedgerClient(server_address, retry=FAST_RETRY, options=small) as client,
        pytest.raises(LedgerError) as raised,
    ):
        client.consume(account, 3 * CREDIT, feature="img")
    error = raised.value
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and not isinstance(error, RateLimited)
    assert error.outcome_unknown and error.idempotency_key
    [charge] = charges(ledger, account)
    with LedgerClient(server_address, retry=FAST_RETRY) as client:
        again = client.consume(
            account, 3 * CREDIT, feature="img", idempotency_key=error.idempotency_key
        )
    assert again.transaction_id == charge.transaction_id
    assert ledger.balance(account).balance_micros == 7 * CREDIT


def test_the_async_client_says_the_outcome_is_unknown_too() -> None:
    fake = FakeLedger(failures=[failure(UNAVAILABLE), RATE_LIMITED])

    async def call(address: str) -> LedgerError:
        async with AsyncLedgerClient(address, retry=FAST_RETRY) as client:
            try:
                await client.consume("acct-1", CREDIT)
            except LedgerError as error:
                return error
        raise AssertionError("the call succeeded")

    with serve_fake(fake) as address:
        error = asyncio.run(call(address))
    assert isinstance(error, RateLimited) and error.outcome_unknown


@pytest.mark.parametrize(
    ("commit_failure", "released"),
    [
        (RATE_LIMITED, False),
        (failure(grpc.StatusCode.INTERNAL), False),
        (failure(grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_EXPIRED"), True),
    ],
)
def test_the_block_releases_its_hold_only_when_the_commit_was_refused_for_good(
    commit_failure: Failure, released: bool
) -> None:
    """A rate-limited or failed commit at the end of the block may succeed later (or may
    have been applied): releasing the hold gave the finished work away unbilled. Only a
    refusal (an expired reservation, say) releases it."""
    fake = FakeLedger(method_failures={"Commit": [commit_failure]})
    with (
        serve_fake(fake) as address,
        LedgerClient(address, retry=RetryPolicy(max_attempts=1)) as client,
        pytest.raises(LedgerError),
        client.reservation("acct-1", 5 * CREDIT) as hold,
    ):
        hold.set_actual(2 * CREDIT)
    methods = [r.method for r in fake.received]
    assert methods == ["Reserve", "Commit"] + (["Release"] if released else [])


@pytest.mark.parametrize(
    ("commit_failure", "calls_at_the_end"),
    [
        (RATE_LIMITED, ["Commit"]),
        # Refused for good: nothing was charged and never will be, the credits go back.
        (failure(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD"), ["Release"]),
    ],
)
def test_a_block_whose_own_commit_may_still_succeed_does_not_release_its_hold(
    commit_failure: Failure, calls_at_the_end: list[str]
) -> None:
    """The block's hold.commit() failed and the error left the block: a failure that may
    pass is retried with the same key, not released as a failed job (the finished work
    would go unbilled); a refusal for good releases the hold, as before the commit existed
    (helper-81: left pending, its credits stayed held for the whole time-to-live)."""
    fake = FakeLedger(method_failures={"Commit": [commit_failure]})
    with (
        serve_fake(fake) as address,
        LedgerClient(address, retry=RetryPolicy(max_attempts=1)) as client,
        pytest.raises(LedgerError),
        client.reservation("acct-1", 5 * CREDIT) as hold,
    ):
        hold.commit(2 * CREDIT)
    commits = [r.request for r in fake.received if r.method == "Commit"]
    assert [r.method for r in fake.received] == ["Reserve", "Commit", *calls_at_the_end]
    assert {c.idempotency_key for c in commits} == {hold.commit_idempotency_key}


def test_printing_the_credentials_shows_no_secret() -> None:
    key = b"-----BEGIN PRIVATE KEY-----KEYMATERIAL-----END PRIVATE KEY-----"
    credentials = Credentials(
        token="bearer-value", tls=TLS(client_certificate=b"C", client_private_key=key)
    )
    shown = repr(credentials)
    assert "KEYMATERIAL" not in shown and "bearer-value" not in shown
    assert "client_private_key='***'" in shown and "client_certificate=<1 bytes>" in shown


# --- the catalogue, checkout and rate card a product shows and sells (helper-52) -------------


def test_the_catalogue_and_the_rate_card_through_the_client(
    client: LedgerClient,
    stub: Any,
    admin: Any,
    billing: Any,
    server_address: str,
) -> None:
    """The calls a product service may make to show and sell credits, each the server's
    own answer (the raw stubs as the reference)."""
    sources = Sources(stub, admin, billing)
    pack = sources.create_pack(5 * CREDIT)
    plan = sources.create_plan(100 * CREDIT, rank=1)
    assert pack.pack_id in {p.pack_id for p in client.list_credit_packs().packs}
    assert plan.plan_id in {p.plan_id for p in client.list_subscription_plans().plans}
    assert client.quote_recharge(5000, "CNY") == billing.QuoteRecharge(
        billing_pb.QuoteRechargeRequest(amount_minor=5000, currency="CNY")
    )
    assert client.list_prices() == admin.ListPrices(admin_pb.ListPricesRequest())
    assert client.list_model_multipliers() == admin.ListModelMultipliers(
        admin_pb.ListModelMultipliersRequest()
    )
    with pytest.raises(InvalidArgument) as caught:
        client.quote_recharge(5000, "a\n")
    assert caught.value.field == "currency"
    with pytest.raises(ValueError, match="exactly one"):
        client.create_checkout_session("acct-1", pack_id=pack.pack_id, plan_id=plan.plan_id)

    async def asynchronously() -> list[str]:
        async with AsyncLedgerClient(server_address, retry=FAST_RETRY) as aio:
            return [p.pack_id for p in (await aio.list_credit_packs()).packs]

    assert pack.pack_id in asyncio.run(asynchronously())


def test_the_whole_rate_card_is_walked_page_by_page(
    client: LedgerClient, admin: Any, server_address: str
) -> None:
    """list_prices and list_model_multipliers answer one page; iter_prices and
    iter_model_multipliers walk every page (sync and async)."""
    feature = f"walk-{uuid.uuid4().hex[:10]}"
    for model in ("m1", "m2", "m3"):
        admin.SetPrice(
            admin_pb.SetPriceRequest(
                price=admin_pb.Price(
                    feature=feature,
                    model=model,
                    unit=types_pb2.USAGE_UNIT_IMAGES,
                    unit_size=1,
                    unit_price_micros=CREDIT,
                ),
                idempotency_key=uuid.uuid4().hex,
            )
        )
        admin.SetModelMultiplier(
            admin_pb.SetModelMultiplierRequest(
                multiplier=admin_pb.ModelMultiplier(model=f"{feature}-{model}", multiplier_ppm=2),
                idempotency_key=uuid.uuid4().hex,
            )
        )
    assert len(client.list_prices(feature, page_size=1).prices) == 1
    walked = [p.model for p in client.iter_prices(feature, page_size=1)]
    assert walked == ["m1", "m2", "m3"]
    every = client.list_model_multipliers(page_size=1000).multipliers
    assert [m.model for m in client.iter_model_multipliers(page_size=1)] == [m.model for m in every]
    assert {f"{feature}-m1", f"{feature}-m3"} <= {m.model for m in every}

    async def asynchronously() -> tuple[list[str], int]:
        async with AsyncLedgerClient(server_address, retry=FAST_RETRY) as aio:
            prices = [p.model async for p in aio.iter_prices(feature, page_size=2)]
            multipliers = [m async for m in aio.iter_model_multipliers(page_size=2)]
            return prices, len(multipliers)

    assert asyncio.run(asynchronously()) == (["m1", "m2", "m3"], len(every))


def test_an_empty_idempotency_key_is_refused_before_any_call() -> None:
    """An empty key (an unset variable, say) was replaced by a new key on each call, so every
    retry of the caller's became a new request (helper-52). None still means "make one"."""
    fake = FakeLedger()
    with serve_fake(fake) as address, LedgerClient(address, retry=FAST_RETRY) as client:
        with pytest.raises(ValueError, match="idempotency_key is empty"):
            client.consume("acct-1", CREDIT, idempotency_key="")
        with pytest.raises(ValueError, match="idempotency_key is empty"):
            client.create_checkout_session("acct-1", pack_id="p", idempotency_key="")
        assert fake.received == []
        with client.reservation("acct-1", 5 * CREDIT) as hold:
            with pytest.raises(ValueError, match="idempotency_key is empty"):
                hold.commit(idempotency_key="")
            hold.commit(2 * CREDIT)
    assert [r.method for r in fake.received] == ["Reserve", "Commit"]
    assert all(r.request.idempotency_key for r in fake.received)


def test_every_error_class_is_exported() -> None:
    classes = {
        name
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, errors.LedgerError)
    }
    assert classes <= set(errors.__all__)
