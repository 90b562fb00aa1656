"""Any number of concurrent calls on one account never over-spend, never lose a
grant and never double-apply (DESIGN.md section 4)."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict

import grpc
import psycopg
from google.protobuf.duration_pb2 import Duration

from ledger.v1 import ledger_service_pb2 as pb
from ledger.v1 import ledger_service_pb2_grpc, types_pb2
from support.ledger import CREDIT, Ledger, error_details, new_account, new_key


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

            async def one(i: int) -> pb.ConsumeResponse | grpc.aio.AioRpcError:
                try:
                    return await stub.Consume(
                        pb.ConsumeRequest(
                            account_id=account,
                            idempotency_key=f"consume-{i}",
                            amount_micros=3 * CREDIT,
                        )
                    )
                except grpc.aio.AioRpcError as error:
                    return error

            return await asyncio.gather(*(one(i) for i in range(50)))

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
    response. A batch runs at one moment (its calls share created_at; separate calls
    never do), which shows the batching happened."""
    account = new_account("hot")
    ledger.grant(account, 1000)

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
            "SELECT count(*), count(DISTINCT created_at) FROM journal_transactions "
            "WHERE account_id = %s AND kind = 'charge'",
            (account,),
        ).fetchone()
    assert row is not None
    charges, moments = row
    assert charges == 60
    assert moments < charges
    assert ledger.balance(account).balance_micros == 940 * CREDIT
    assert_audit_clean()  # type: ignore[operator]
