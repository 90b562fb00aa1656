"""The bench's scenarios make the calls they are named for (bench/loadgen.py), against the
real server."""

from __future__ import annotations

import asyncio

from bench.loadgen import make_op
from ledger.v1 import ledger_service_pb2 as pb
from ledger_client import AsyncLedgerClient
from support.ledger import CREDIT, Ledger, new_account


def test_reserve_release_is_a_failed_job_that_charges_nothing(
    ledger: Ledger, server_address: str
) -> None:
    prefix = new_account("bench-failed") + "-"
    account = f"{prefix}000000"  # the scenario's first (and here only) account
    ledger.grant(account, 10)

    async def one_pair() -> int:
        async with AsyncLedgerClient(server_address) as client:
            op = make_op(
                client,
                {"scenario": "reserve_release", "seed": 1,
                 "params": {"account_prefix": prefix, "accounts": 1}},
            )  # fmt: skip
            return await op()

    assert asyncio.run(one_pair()) == 0
    balance = ledger.balance(account)
    assert (balance.balance_micros, balance.held_micros) == (10 * CREDIT, 0)
    kinds = [(t.kind, t.status) for t in ledger.transactions(account)]
    assert kinds[:2] == [
        (pb.TRANSACTION_KIND_RELEASE, pb.TRANSACTION_STATUS_SUCCEEDED),
        (pb.TRANSACTION_KIND_HOLD, pb.TRANSACTION_STATUS_FAILED),
    ]
