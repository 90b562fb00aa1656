"""Any number of concurrent calls on one account never over-spend, never lose a
grant and never double-apply (DESIGN.md section 4)."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, timedelta

import grpc
import psycopg
import pytest
from google.protobuf.duration_pb2 import Duration
from prometheus_client import REGISTRY
from psycopg.types.json import Jsonb

from ledger.v1 import ledger_service_pb2 as pb
from ledger.v1 import ledger_service_pb2_grpc, types_pb2
from ledger_server.config import Settings
from support.group_commit import Conn, fill_every_slot, held, transactions_with_more_calls_than
from support.ledger import (
    CREDIT,
    Ledger,
    consume_or_error,
    error_details,
    new_account,
    new_key,
)


def _fund_over_several_lots(ledger: Ledger, account: str) -> None:
    ledger.grant(account, 10, source=types_pb2.CREDIT_SOURCE_DAILY)
    ledger.grant(
        account, 30, source=types_pb2.CREDIT_SOURCE_SIGNUP, expires_in=Duration(seconds=3600)
    )
    ledger.grant(
        account, 25, source=types_pb2.CREDIT_SOURCE_MONTHLY_FREE, expires_in=Duration(seconds=86400)
    )
    ledger.grant(account, 35, source=types_pb2.CREDIT_SOURCE_PURCHASE)


def test_fifty_concurrent_consumes_of_three_credits_from_one_hundred(
    ledger: Ledger, server_address: str, assert_audit_clean: object
) -> None:
    account = new_account()
    _fund_over_several_lots(ledger, account)
    assert ledger.balance(account).available_micros == 100 * CREDIT

    async def consume_all() -> list[pb.ConsumeResponse | grpc.aio.AioRpcError]:
        async with grpc.aio.insecure_channel(server_address) as channel:
            stub = ledger_service_pb2_grpc.LedgerServiceStub(channel)

            return await asyncio.gather(
                *(consume_or_error(stub, account, f"consume-{i}", 3 * CREDIT) for i in range(50))
            )

    results = asyncio.run(consume_all())
    succeeded = [r for r in results if isinstance(r, pb.ConsumeResponse)]
    failed = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(succeeded) == 33
    assert len(failed) == 17
    for error in failed:
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        info, _ = error_details(error)
        assert info.reason == "INSUFFICIENT_CREDITS"
        assert int(info.metadata["available_micros"]) < 3 * CREDIT
    balance = ledger.balance(account)
    assert balance.balance_micros == 1 * CREDIT
    assert balance.available_micros == 1 * CREDIT
    assert sum(lot.remaining_micros for lot in ledger.lots(account)) == 1 * CREDIT
    charges = ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_CHARGE])
    assert len(charges) == 33
    assert_audit_clean()  # type: ignore[operator]


def test_mixed_reserve_commit_release_from_many_clients(
    ledger: Ledger, server_address: str, assert_audit_clean: object
) -> None:
    accounts = [new_account("mixed") for _ in range(6)]
    for account in accounts:
        _fund_over_several_lots(ledger, account)
    rng = random.Random(20261121)
    plans = [
        (
            rng.choice(accounts),
            rng.randint(1, 12) * CREDIT,
            rng.random() < 0.6,
            rng.randint(0, 12) * CREDIT,
        )
        for _ in range(240)
    ]
    committed: dict[str, int] = defaultdict(int)

    async def run_all() -> list[str]:
        async with grpc.aio.insecure_channel(server_address) as channel:
            stub = ledger_service_pb2_grpc.LedgerServiceStub(channel)
            semaphore = asyncio.Semaphore(24)

            async def one(plan: tuple[str, int, bool, int]) -> str:
                account, hold, commit, actual = plan
                async with semaphore:
                    try:
                        reserved = await stub.Reserve(
                            pb.ReserveRequest(
                                account_id=account, idempotency_key=new_key(), amount_micros=hold
                            )
                        )
                    except grpc.aio.AioRpcError as error:
                        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
                        return "insufficient"
                    reservation_id = reserved.reservation.reservation_id
                    if commit:
                        amount = min(actual, hold)
                        done = await stub.Commit(
                            pb.CommitRequest(
                                account_id=account,
                                reservation_id=reservation_id,
                                idempotency_key=new_key(),
                                amount_micros=amount,
                            )
                        )
                        assert done.reservation.committed_micros == amount
                        committed[account] += amount
                        return "committed"
                    await stub.Release(
                        pb.ReleaseRequest(
                            account_id=account,
                            reservation_id=reservation_id,
                            idempotency_key=new_key(),
                        )
                    )
                    return "released"

            return await asyncio.gather(*(one(plan) for plan in plans))

    outcomes = asyncio.run(run_all())
    assert outcomes.count("committed") > 50
    assert outcomes.count("released") > 30
    for account in accounts:
        balance = ledger.balance(account)
        assert balance.balance_micros == 100 * CREDIT - committed[account]
        assert balance.held_micros == 0
        assert balance.available_micros == balance.balance_micros
        assert all(lot.held_micros == 0 for lot in ledger.lots(account, include_inactive=True))
    assert_audit_clean()  # type: ignore[operator]


def test_concurrent_consumes_on_one_account_share_transactions(
    ledger: Ledger, server_address: str, ledger_db_url: str, assert_audit_clean: object
) -> None:
    """The hot-account path: calls that queue behind each other on one account are
    coalesced into shared transactions, each still applied exactly once with its own
    response. The server's count of transactions of several calls shows the batching."""
    account = new_account("hot")
    ledger.grant(account, 1000)
    batched = transactions_with_more_calls_than(1)

    async def consume_all() -> list[pb.ConsumeResponse]:
        async with grpc.aio.insecure_channel(server_address) as channel:
            stub = ledger_service_pb2_grpc.LedgerServiceStub(channel)
            return await asyncio.gather(
                *(
                    stub.Consume(
                        pb.ConsumeRequest(
                            account_id=account, idempotency_key=f"hot-{i}", amount_micros=CREDIT
                        )
                    )
                    for i in range(60)
                )
            )

    responses = asyncio.run(consume_all())
    assert len({r.transaction_id for r in responses}) == 60
    assert sorted(r.balance.balance_micros for r in responses) == [
        (1000 - n) * CREDIT for n in range(60, 0, -1)
    ]
    with psycopg.connect(ledger_db_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM journal_transactions WHERE account_id = %s AND kind = 'charge'",
            (account,),
        ).fetchone()
    assert row == (60,)
    assert transactions_with_more_calls_than(1) > batched
    assert ledger.balance(account).balance_micros == 940 * CREDIT
    assert_audit_clean()  # type: ignore[operator]


def test_a_transaction_stuck_on_a_lock_lets_other_accounts_charge_in_another_lane(
    ledger: Ledger, server_address: str, ledger_db_url: str
) -> None:
    """The server keeps one group-commit lane while batches are quick; a Consume stuck on an
    account locked elsewhere (another server's transaction) must not hold up the rest: after
    LEDGER_GROUP_COMMIT_OPEN_LANE_AFTER_MS the other accounts' calls go in another lane and
    are answered while the stuck one still waits."""
    stuck, free = new_account("lane-stuck"), new_account("lane-free")
    for account in (stuck, free):
        ledger.grant(account, 5)
    extra_lanes = REGISTRY.get_sample_value("ledger_group_commit_extra_lanes_total") or 0.0

    async def charge(holder: Conn, prober: Conn) -> tuple[object, object]:
        async with grpc.aio.insecure_channel(server_address) as channel:
            stub = ledger_service_pb2_grpc.LedgerServiceStub(channel)
            (waiting,) = await fill_every_slot(stub, holder, prober, [stuck])
            answered = await asyncio.wait_for(
                consume_or_error(stub, free, new_key(), CREDIT), timeout=30
            )
            still_waiting = not waiting.done()
            holder.rollback()
            return answered, (still_waiting, await waiting)

    with held(ledger_db_url, [stuck]) as (holder, prober):
        answered, (still_waiting, stuck_result) = asyncio.run(charge(holder, prober))
    assert isinstance(answered, pb.ConsumeResponse) and still_waiting
    assert isinstance(stuck_result, pb.ConsumeResponse)  # the lock was released in time
    assert (REGISTRY.get_sample_value("ledger_group_commit_extra_lanes_total") or 0) > extra_lanes
    assert ledger.balance(free).balance_micros == 4 * CREDIT


def test_consumes_on_many_accounts_share_transactions_and_a_refusal_stays_alone(
    ledger: Ledger, server_address: str, ledger_db_url: str, assert_audit_clean: object
) -> None:
    """Group commit: while as many Consume transactions as the server allows
    (LEDGER_GROUP_COMMIT_MAX_IN_FLIGHT) are in flight, later calls wait and are then committed
    together across accounts. Here the first calls are held on locked accounts, so the
    rest must wait. A transaction of more than two calls spans accounts (no account has
    more than two), which shows the batching; a refused call in a batch changes nothing
    and the others in it go through."""
    slots = Settings(database_url="").group_commit_max_in_flight
    blocked = [new_account("group-blocked") for _ in range(slots)]
    rich = [new_account("group") for _ in range(20)]
    poor = [new_account("group-poor") for _ in range(6)]
    for account in blocked + rich:
        ledger.grant(account, 10)
    for account in poor:
        ledger.grant(account, 1)
    later = [(account, i) for account in rich + poor for i in range(2)]
    random.Random(7).shuffle(later)
    spanning = transactions_with_more_calls_than(2)

    async def consume_all(holder: Conn, prober: Conn) -> list[object]:
        async with grpc.aio.insecure_channel(server_address) as channel:
            stub = ledger_service_pb2_grpc.LedgerServiceStub(channel)

            first = await fill_every_slot(stub, holder, prober, blocked)
            rest = [
                asyncio.ensure_future(consume_or_error(stub, account, f"g-{i}", CREDIT))
                for account, i in later
            ]
            await asyncio.sleep(0.3)  # the calls reach the server and queue
            holder.rollback()
            return await asyncio.gather(*first, *rest)

    with held(ledger_db_url, blocked) as (holder, prober):
        results = asyncio.run(consume_all(holder, prober))
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(refused) == len(poor)  # each poor account pays for one of its two calls
    for error in refused:
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_details(error)[0].reason == "INSUFFICIENT_CREDITS"
    for account in rich:
        assert ledger.balance(account).balance_micros == 8 * CREDIT
    for account in poor:
        assert ledger.balance(account).balance_micros == 0
    with psycopg.connect(ledger_db_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM journal_transactions"
            " WHERE account_id = ANY(%s) AND kind = 'charge'",
            (rich + poor,),
        ).fetchone()
    assert row == (len(later) - len(poor),)
    assert transactions_with_more_calls_than(2) > spanning  # a batch spanning accounts
    assert_audit_clean()  # type: ignore[operator]


def test_a_call_in_a_batch_that_waits_too_long_for_a_lock_fails_alone(
    ledger: Ledger, ledger_db_url: str
) -> None:
    """An account locked elsewhere (another server's transaction) makes its call in the
    batch give up on the lock (a quarter of the statement time-out) and the other calls
    commit; the statement time-out would have rolled the whole batch back."""
    free, locked = new_account("free"), new_account("locked")
    ledger.grant(free, 5)
    ledger.grant(locked, 5)
    requests = [
        {"account": account, "key": new_key(), "hash": "00", "amount": CREDIT,
         "usage": None, "feature": "", "comment": ""}
        for account in (locked, free)
    ]  # fmt: skip
    with (
        psycopg.connect(ledger_db_url) as holder,
        psycopg.connect(ledger_db_url, autocommit=True) as batcher,
    ):
        holder.execute("SELECT 1 FROM accounts WHERE account_id = %s FOR UPDATE", (locked,))
        batcher.execute("SELECT set_config('statement_timeout', '2s', false),"
                        " set_config('lock_timeout', '2s', false)")  # fmt: skip
        row = batcher.execute(
            "SELECT ledger_consume_batch(%s, now())", (Jsonb(requests),)
        ).fetchone()
        holder.rollback()
    assert row is not None
    assert row[0][0]["error"]["sqlstate"] == "55P03"  # lock_not_available: DEADLINE_EXCEEDED
    assert row[0][1]["ok"]["balance"]["balance_micros"] == 4 * CREDIT
    assert ledger.balance(free).balance_micros == 4 * CREDIT
    assert ledger.balance(locked).balance_micros == 5 * CREDIT


def test_a_batch_waits_for_a_locked_account_once_and_within_one_budget(
    ledger: Ledger, ledger_db_url: str
) -> None:
    """Several calls for one locked account wait for its lock once, not once each, and all
    the waits of a batch come out of three quarters of its time: four locked accounts, one
    with three calls, would otherwise wait 500 ms each call (2 s time-out), and the
    statement time-out would roll back the free account's Consume with the rest."""
    prefix = new_account("budget")
    locked = [f"{prefix}-{n}" for n in range(4)]
    free = f"{prefix}-z"  # last in the batch's account order: after every wait
    for account in (*locked, free):
        ledger.grant(account, 5)
    calls = [locked[0], locked[0], locked[0], *locked[1:], free]

    def consume(account: str) -> dict[str, object]:
        return {"account": account, "key": new_key(), "hash": "00", "amount": CREDIT,
                "usage": None, "feature": "", "comment": ""}  # fmt: skip

    with (
        psycopg.connect(ledger_db_url) as holder,
        psycopg.connect(ledger_db_url, autocommit=True) as batcher,
    ):
        holder.execute("SELECT 1 FROM accounts WHERE account_id = ANY(%s) FOR UPDATE", (locked,))
        batcher.execute("SET statement_timeout = '2s'")
        row = batcher.execute(
            "SELECT ledger_consume_batch(%s, now())", (Jsonb([consume(a) for a in calls]),)
        ).fetchone()
        holder.rollback()
    assert row is not None
    assert [r["error"]["sqlstate"] for r in row[0][:-1]] == ["55P03"] * 6
    assert row[0][-1]["ok"]["balance"]["balance_micros"] == 4 * CREDIT
    assert ledger.balance(free).balance_micros == 4 * CREDIT
    assert all(ledger.balance(a).balance_micros == 5 * CREDIT for a in locked)


def test_a_locked_accounts_later_calls_in_a_batch_do_not_wait_again(
    ledger: Ledger, ledger_db_url: str
) -> None:
    """Once one call of an account has waited out the lock (2 s of an 8 s time-out, after
    the set path's 2 s), the account's later calls give up at once with the same answer.
    The lock is let go at 5 s: a second wait would have got it and charged."""
    locked, free = new_account("once"), f"{new_account('once')}-z"
    ledger.grant(locked, 5)
    ledger.grant(free, 5)
    requests = [
        {"account": account, "key": new_key(), "hash": "00", "amount": CREDIT,
         "usage": None, "feature": "", "comment": ""}
        for account in (locked, locked, locked, free)
    ]  # fmt: skip
    with (
        psycopg.connect(ledger_db_url) as holder,
        psycopg.connect(ledger_db_url, autocommit=True) as batcher,
        ThreadPoolExecutor(1) as threads,
    ):
        holder.execute("SELECT 1 FROM accounts WHERE account_id = %s FOR UPDATE", (locked,))
        batcher.execute("SET statement_timeout = '8s'")
        threads.submit(lambda: (time.sleep(5), holder.rollback()))
        row = batcher.execute(
            "SELECT ledger_consume_batch(%s, now())", (Jsonb(requests),)
        ).fetchone()
    assert row is not None
    assert [r["error"]["sqlstate"] for r in row[0][:3]] == ["55P03"] * 3
    assert row[0][3]["ok"]["balance"]["balance_micros"] == 4 * CREDIT
    assert ledger.balance(locked).balance_micros == 5 * CREDIT


def test_a_commit_in_a_batch_is_judged_at_the_time_it_arrived(
    ledger: Ledger, ledger_db_url: str
) -> None:
    """A Commit received before its hold expired commits, though the batch also holds a
    call received after the expiry (the batch's latest time)."""
    account, other = new_account("arrived"), new_account("arrived-later")
    ledger.grant(account, 5)
    ledger.grant(other, 5)
    held = ledger.reserve(account, 2 * CREDIT).reservation
    expiry = held.expires_at.ToDatetime(tzinfo=UTC)
    requests = [
        {"op": "commit", "account": account, "key": new_key(), "hash": "00",
         "amount": CREDIT, "usage": None, "comment": "", "reservation_id": held.reservation_id,
         "now": (expiry - timedelta(seconds=1)).isoformat()},
        {"account": other, "key": new_key(), "hash": "00", "amount": CREDIT, "usage": None,
         "feature": "", "comment": "", "now": (expiry + timedelta(seconds=1)).isoformat()},
    ]  # fmt: skip
    with psycopg.connect(ledger_db_url, autocommit=True) as batcher:
        row = batcher.execute(
            "SELECT ledger_consume_batch(%s, %s)",
            (Jsonb(requests), expiry + timedelta(seconds=1)),
        ).fetchone()
    assert row is not None
    assert "ok" in row[0][0], row[0][0]
    assert row[0][0]["ok"]["reservation"]["status"] == "committed"
    assert ledger.balance(account).balance_micros == 4 * CREDIT


def test_the_previous_releases_batch_form_still_answers(ledger: Ledger, ledger_db_url: str) -> None:
    """Servers of the previous release call ledger_consume_batch(account, requests, now)
    until a rolling deploy replaces them."""
    account = new_account("previous")
    ledger.grant(account, 3)
    requests = [
        {"key": new_key(), "hash": "00", "amount": amount * CREDIT, "usage": None,
         "feature": "", "comment": ""}
        for amount in (1, 5, 2)
    ]  # fmt: skip
    with psycopg.connect(ledger_db_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT ledger_consume_batch(%s::text, %s::jsonb, now())", (account, Jsonb(requests))
        ).fetchone()
    assert row is not None
    assert [next(iter(result)) for result in row[0]] == ["ok", "error", "ok"]
    assert ledger.balance(account).balance_micros == 0


def test_a_batch_locks_its_accounts_in_one_order_and_answers_in_its_own(
    ledger: Ledger, ledger_db_url: str
) -> None:
    """Two server processes can batch the same accounts in different arrival orders; the
    batch function takes the accounts in account_id order, so neither can wait for the
    other in a cycle. Here the batch lists 'b' before 'a' while 'b' is locked elsewhere:
    it must already hold 'a' when it waits for 'b'. Its answers come back in the order
    of the requests, a refused one among them."""
    prefix = new_account("order")
    first, second = f"{prefix}-a", f"{prefix}-b"
    ledger.grant(first, 1)
    ledger.grant(second, 5)
    requests = [
        {"account": account, "key": new_key(), "hash": "00", "amount": amount,
         "usage": None, "feature": "", "comment": ""}
        for account, amount in ((second, CREDIT), (first, 2 * CREDIT), (first, CREDIT))
    ]  # fmt: skip
    with (
        psycopg.connect(ledger_db_url) as holder,
        psycopg.connect(ledger_db_url, autocommit=True) as prober,
        psycopg.connect(ledger_db_url, autocommit=True) as batcher,
        ThreadPoolExecutor(1) as threads,
    ):
        batcher.execute("SET statement_timeout = '20s'")
        holder.execute("SELECT 1 FROM accounts WHERE account_id = %s FOR UPDATE", (second,))
        batch = threads.submit(
            lambda: batcher.execute(
                "SELECT ledger_consume_batch(%s, now())", (Jsonb(requests),)
            ).fetchone()
        )
        try:
            deadline = time.monotonic() + 10
            while not prober.execute(
                "SELECT %s = ANY (pg_blocking_pids(%s))",
                (holder.info.backend_pid, batcher.info.backend_pid),
            ).fetchone()[0]:  # type: ignore[index]
                assert time.monotonic() < deadline, "the batch never waited for 'b'"
                time.sleep(0.01)
            with pytest.raises(psycopg.errors.LockNotAvailable):
                prober.execute(
                    "SELECT 1 FROM accounts WHERE account_id = %s FOR UPDATE NOWAIT", (first,)
                )
        finally:
            holder.rollback()
        row = batch.result(timeout=30)
    assert row is not None
    results = row[0]
    assert results[0]["ok"]["balance"]["balance_micros"] == 4 * CREDIT  # 'b': 5 - 1
    assert results[1]["error"]["sqlstate"] == "LE001"  # 'a': 2 asked of 1
    assert results[2]["ok"]["balance"]["balance_micros"] == 0  # 'a': 1 of 1
    assert ledger.balance(first).balance_micros == 0
    assert ledger.balance(second).balance_micros == 4 * CREDIT


def test_a_batch_runs_reserves_and_commits_too_each_alone_in_its_outcome(
    ledger: Ledger, ledger_db_url: str
) -> None:
    """Reserve and Commit are group-committed like Consume: one batch, each call in its
    own savepoint, answers in request order; an unknown reservation or operation fails
    alone."""
    account, other = new_account("mixed-batch"), new_account("mixed-batch")
    ledger.grant(account, 10)
    ledger.grant(other, 10)
    held = ledger.reserve(account, 3 * CREDIT).reservation.reservation_id
    common = {"hash": "00", "usage": None, "comment": ""}
    requests = [
        {"op": "reserve", "account": account, "key": new_key(), "amount": 2 * CREDIT,
         "feature": "", "expires_at": "2999-01-01T00:00:00+00:00", **common},
        {"op": "commit", "account": account, "key": new_key(), "amount": CREDIT,
         "reservation_id": held, **common},
        {"op": "commit", "account": other, "key": new_key(), "amount": CREDIT,
         "reservation_id": str(uuid.uuid4()), **common},
        {"op": "transfer", "account": other, "key": new_key(), "amount": CREDIT, **common},
    ]  # fmt: skip
    with psycopg.connect(ledger_db_url, autocommit=True) as conn:
        row = conn.execute("SELECT ledger_consume_batch(%s, now())", (Jsonb(requests),)).fetchone()
    assert row is not None
    reserved, committed, unknown, bogus = row[0]
    assert reserved["ok"]["reservation"]["status"] == "pending"
    assert committed["ok"]["reservation"]["committed_micros"] == CREDIT
    assert unknown["error"]["sqlstate"] == "LE004"  # reservation not found: NOT_FOUND
    assert bogus["error"]["sqlstate"] == "LE101"  # a server bug: INTERNAL
    balance = ledger.balance(account)
    assert (balance.balance_micros, balance.held_micros) == (9 * CREDIT, 2 * CREDIT)
    assert ledger.balance(other).balance_micros == 10 * CREDIT


def test_reserve_and_commit_pairs_on_many_accounts_share_transactions(
    ledger: Ledger, server_address: str, ledger_db_url: str, assert_audit_clean: object
) -> None:
    """While every slot is taken, Reserve and Commit calls of many accounts wait and are
    then committed together (the server counts transactions of several calls)."""
    slots = Settings(database_url="").group_commit_max_in_flight
    blocked = [new_account("pairs-blocked") for _ in range(slots)]
    accounts = [new_account("pairs") for _ in range(20)]
    for account in blocked + accounts:
        ledger.grant(account, 10)
    batched = transactions_with_more_calls_than(1)

    async def pairs(holder: Conn, prober: Conn) -> list[object]:
        async with grpc.aio.insecure_channel(server_address) as channel:
            stub = ledger_service_pb2_grpc.LedgerServiceStub(channel)

            async def pair(account: str) -> pb.CommitResponse:
                reserved = await stub.Reserve(
                    pb.ReserveRequest(
                        account_id=account, idempotency_key=new_key(), amount_micros=3 * CREDIT
                    )
                )
                return await stub.Commit(
                    pb.CommitRequest(
                        account_id=account,
                        reservation_id=reserved.reservation.reservation_id,
                        idempotency_key=new_key(),
                        amount_micros=CREDIT,
                    )
                )

            first = await fill_every_slot(stub, holder, prober, blocked)
            rest = [asyncio.ensure_future(pair(account)) for account in accounts]
            await asyncio.sleep(0.3)  # the Reserves reach the server and queue
            holder.rollback()
            return await asyncio.gather(*first, *rest)

    with held(ledger_db_url, blocked) as (holder, prober):
        asyncio.run(pairs(holder, prober))
    for account in accounts:
        balance = ledger.balance(account)
        assert (balance.balance_micros, balance.held_micros) == (9 * CREDIT, 0)
    # Each account has one call at a time: a transaction of two calls or more spans accounts.
    assert transactions_with_more_calls_than(1) > batched
    assert_audit_clean()  # type: ignore[operator]
