"""The server's connection pool (ledger_server/db/pool.py) lends the connection returned
last, and still closes the one idle longest when it shrinks."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from psycopg_pool import PoolTimeout

from ledger_server.db.pool import open_pool
from workers import db as worker_db


async def _backend(pool: Any) -> int:
    async with pool.connection() as conn:
        return int(conn.info.backend_pid)


async def _hold_three(pool: Any) -> list[int]:
    """Borrows three connections at once and returns them in borrowing order."""
    borrowed = [await pool.getconn() for _ in range(3)]
    pids = [int(conn.info.backend_pid) for conn in borrowed]
    for conn in borrowed:
        await pool.putconn(conn)
    return pids


def test_calls_one_after_another_reuse_the_connection_returned_last(ledger_db_url: str) -> None:
    async def scenario() -> tuple[list[int], list[int]]:
        pool = await open_pool(ledger_db_url, 3, 3)
        try:
            returned = await _hold_three(pool)
            return returned, [await _backend(pool) for _ in range(6)]
        finally:
            await pool.close()

    returned, used = asyncio.run(scenario())
    assert len(set(returned)) == 3
    # FIFO (psycopg_pool's own order) would go round all three, the first returned first.
    assert used == [returned[-1]] * 6


def test_shrinking_closes_the_connection_idle_longest(ledger_db_url: str) -> None:
    async def scenario() -> tuple[list[int], list[int]]:
        pool = await open_pool(ledger_db_url, 1, 3)
        try:
            returned = await _hold_three(pool)
            for _ in range(3):
                await _backend(pool)
            # What the pool's scheduled shrinking runs after max_idle: the first call resets
            # its low-water mark, the second closes one connection unused since then.
            await pool._shrink_pool()
            await pool._shrink_pool()
            # The closed backend leaves pg_stat_activity once it has seen the close.
            alive: list[int] = []
            for _ in range(100):
                async with pool.connection() as conn:
                    cursor = await conn.execute(
                        "SELECT pid FROM pg_stat_activity WHERE pid = ANY (%s)", (returned,)
                    )
                    alive = sorted(int(row[0]) for row in await cursor.fetchall())
                if len(alive) < len(returned):
                    break
                await asyncio.sleep(0.05)
            return returned, alive
        finally:
            await pool.close()

    returned, alive = asyncio.run(scenario())
    assert alive == sorted(returned[1:])  # the first returned, never lent since, is gone


def test_a_loan_refused_for_lack_of_time_leaves_the_order_alone(ledger_db_url: str) -> None:
    async def scenario() -> tuple[list[int], int]:
        pool = await open_pool(ledger_db_url, 3, 3)
        try:
            returned = await _hold_three(pool)
            with pytest.raises(PoolTimeout):
                await pool._get_ready_connection(0.0)  # what a caller out of time meets
            return returned, await _backend(pool)
        finally:
            await pool.close()

    returned, used = asyncio.run(scenario())
    assert used == returned[-1]


def test_the_server_and_worker_sessions_end_a_transaction_left_idle_for_a_minute(
    ledger_db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transaction whose client vanished keeps its locks (an account, an event row) until
    TCP keepalive gives up, two hours by default; every pooled session ends one idle for a
    minute (ledger_server/db/session_limits.py)."""

    async def server_setting() -> str:
        pool = await open_pool(ledger_db_url, 1, 1)
        try:
            async with pool.connection() as conn:
                row = await (
                    await conn.execute("SHOW idle_in_transaction_session_timeout")
                ).fetchone()
                return str(row[0]) if row else ""
        finally:
            await pool.close()

    assert asyncio.run(server_setting()) == "1min"
    monkeypatch.setenv("DATABASE_URL", ledger_db_url)
    worker_db.close()
    try:
        with worker_db.connection() as conn:
            row = conn.execute("SHOW idle_in_transaction_session_timeout").fetchone()
    finally:
        worker_db.close()
    assert row == ("1min",)
