"""Release and Refund, the calls that give credits back, go through the group commit like
the charges: queued calls of many accounts share one transaction, each call in its own
savepoint with its own idempotency key (server/group_commit.py, 0007_coalesced.sql)."""

from __future__ import annotations

import asyncio

import grpc
import psycopg
from psycopg.types.json import Jsonb

from ledger.v1 import ledger_service_pb2 as pb
from ledger.v1 import ledger_service_pb2_grpc
from ledger_server.config import Settings
from support.group_commit import Conn, fill_every_slot, held, transactions_with_more_calls_than
from support.ledger import CREDIT, Ledger, new_account, new_key


def test_a_batch_runs_releases_and_refunds_each_alone_in_its_outcome(
    ledger: Ledger, ledger_db_url: str, assert_audit_clean: object
) -> None:
    """Each call's answer is the one it gets alone; an unknown reservation fails alone, and
    a Release for a failed job records the status FAILED."""
    account, other = new_account("returns-batch"), new_account("returns-batch")
    ledger.grant(account, 10)
    ledger.grant(other, 10)
    failed_job = ledger.reserve(account, 3 * CREDIT).reservation.reservation_id
    charged = ledger.reserve(account, 4 * CREDIT).reservation.reservation_id
    ledger.commit(account, charged, 4 * CREDIT)
    requests = [
        {"op": "release", "account": account, "key": new_key(), "hash": "00",
         "reservation_id": failed_job, "reason": "", "job_failed": True},
        {"op": "refund", "account": account, "key": new_key(), "hash": "00",
         "reservation_id": charged, "amount": CREDIT, "reason": "bad output"},
        {"op": "refund", "account": account, "key": new_key(), "hash": "00",
         "reservation_id": charged, "amount": None, "reason": ""},
        {"op": "release", "account": other, "key": new_key(), "hash": "00",
         "reservation_id": charged, "reason": "", "job_failed": False},
    ]  # fmt: skip
    with psycopg.connect(ledger_db_url, autocommit=True) as conn:
        row = conn.execute("SELECT ledger_consume_batch(%s, now())", (Jsonb(requests),)).fetchone()
    assert row is not None
    released, part, rest, unknown = row[0]
    assert released["ok"]["reservation"]["status"] == "failed"
    assert part["ok"]["refunded_micros"] == CREDIT
    assert rest["ok"]["refunded_micros"] == 3 * CREDIT  # no amount: what is left of it
    assert rest["ok"]["reservation"]["refunded_micros"] == 4 * CREDIT
    assert unknown["error"]["sqlstate"] == "LE004"  # not the other account's: NOT_FOUND
    balance = ledger.balance(account)
    assert (balance.balance_micros, balance.held_micros) == (10 * CREDIT, 0)
    assert ledger.balance(other).balance_micros == 10 * CREDIT
    assert_audit_clean()  # type: ignore[operator]


def test_releases_and_refunds_on_many_accounts_share_transactions(
    ledger: Ledger, server_address: str, ledger_db_url: str, assert_audit_clean: object
) -> None:
    """While every lane is taken, Releases (of failed jobs) and Refunds of many accounts
    wait and are then committed together (the server counts transactions of several
    calls), each answered as if alone."""
    lanes = Settings(database_url="").group_commit_max_in_flight
    blocked = [new_account("returns-blocked") for _ in range(lanes)]
    accounts = [new_account("returns") for _ in range(16)]
    holds: dict[str, str] = {}
    charges: dict[str, str] = {}
    for account in blocked + accounts:
        ledger.grant(account, 10)
    for account in accounts:
        holds[account] = ledger.reserve(account, 3 * CREDIT).reservation.reservation_id
        charges[account] = ledger.reserve(account, 2 * CREDIT).reservation.reservation_id
        ledger.commit(account, charges[account], 2 * CREDIT)
    batched = transactions_with_more_calls_than(1)

    async def give_back(holder: Conn, prober: Conn) -> list[object]:
        async with grpc.aio.insecure_channel(server_address) as channel:
            stub = ledger_service_pb2_grpc.LedgerServiceStub(channel)

            async def release(account: str) -> pb.ReleaseResponse:
                return await stub.Release(
                    pb.ReleaseRequest(
                        account_id=account,
                        reservation_id=holds[account],
                        idempotency_key=new_key(),
                        job_failed=True,
                    )
                )

            async def refund(account: str) -> pb.RefundResponse:
                return await stub.Refund(
                    pb.RefundRequest(
                        account_id=account,
                        reservation_id=charges[account],
                        idempotency_key=new_key(),
                        amount_micros=CREDIT,
                    )
                )

            first = await fill_every_slot(stub, holder, prober, blocked)
            half = len(accounts) // 2
            rest = [asyncio.ensure_future(release(a)) for a in accounts[:half]]
            rest += [asyncio.ensure_future(refund(a)) for a in accounts[half:]]
            await asyncio.sleep(0.3)  # the calls reach the server and queue
            holder.rollback()
            return await asyncio.gather(*first, *rest)

    with held(ledger_db_url, blocked) as (holder, prober):
        answers = asyncio.run(give_back(holder, prober))[lanes:]
    half = len(accounts) // 2
    for account, answer in zip(accounts[:half], answers[:half], strict=True):
        assert isinstance(answer, pb.ReleaseResponse)
        assert answer.reservation.status == pb.RESERVATION_STATUS_FAILED
        assert (answer.balance.balance_micros, answer.balance.held_micros) == (8 * CREDIT, 0)
        assert ledger.balance(account).held_micros == 0
    for account, answer in zip(accounts[half:], answers[half:], strict=True):
        assert isinstance(answer, pb.RefundResponse)
        assert answer.refunded_micros == CREDIT
        assert answer.balance.balance_micros == 9 * CREDIT
        assert ledger.balance(account).balance_micros == 9 * CREDIT
    # Each account has one call at a time: a transaction of two calls or more spans accounts.
    assert transactions_with_more_calls_than(1) > batched
    assert_audit_clean()  # type: ignore[operator]
