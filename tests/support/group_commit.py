"""Watching and steering the server's group commit from a test: its histogram of calls per
transaction, and accounts held locked so that every lane is busy and later calls queue."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import psycopg
from prometheus_client import REGISTRY

from ledger.v1 import ledger_service_pb2_grpc
from support.ledger import CREDIT, consume_or_error, new_key


def transactions_with_more_calls_than(calls: int) -> float:
    """Group-commit transactions so far (in this process's server) with more than ``calls``
    calls (a bucket bound of the histogram)."""
    name = "ledger_group_commit_calls_per_transaction"
    every = REGISTRY.get_sample_value(f"{name}_count") or 0.0
    return every - (REGISTRY.get_sample_value(f"{name}_bucket", {"le": f"{calls}.0"}) or 0.0)


Conn = psycopg.Connection[Any]


@contextlib.contextmanager
def held(database_url: str, accounts: list[str]) -> Iterator[tuple[Conn, Conn]]:
    """A transaction holding the accounts' row locks, and a connection to watch it from
    (not the holder: a transaction sees one snapshot of pg_stat_activity)."""
    with (
        psycopg.connect(database_url) as holder,
        psycopg.connect(database_url, autocommit=True) as prober,
    ):
        holder.execute("SELECT 1 FROM accounts WHERE account_id = ANY(%s) FOR UPDATE", (accounts,))
        yield holder, prober


async def fill_every_slot(
    stub: ledger_service_pb2_grpc.LedgerServiceStub, holder: Conn, prober: Conn, blocked: list[str]
) -> list[asyncio.Future[object]]:
    """One Consume per held account (as many as the server's group-commit slots), returned
    once each waits for the holder's lock: every later charging call then has to queue."""
    first: list[asyncio.Future[object]] = [
        asyncio.ensure_future(consume_or_error(stub, account, new_key(), CREDIT))
        for account in blocked
    ]
    for _ in range(1000):
        row = prober.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE %s = ANY (pg_blocking_pids(pid))",
            (holder.info.backend_pid,),
        ).fetchone()
        if row and row[0] >= len(blocked):
            return first
        await asyncio.sleep(0.01)
    raise AssertionError("the first calls never waited for the held accounts")
