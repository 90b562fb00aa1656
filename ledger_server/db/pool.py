"""The async connection pool every RPC borrows one connection from."""

from __future__ import annotations

from psycopg import AsyncConnection
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from ledger_server.db.deadlines import DEFAULT_STATEMENT_TIMEOUT_MS, DeadlinePool


async def _configure(conn: AsyncConnection[TupleRow]) -> None:
    # Autocommit: an operation that is one SQL statement (one ledger function) is
    # its own transaction, one round trip; handlers that need several statements
    # open conn.transaction() explicitly.
    await conn.set_autocommit(True)


async def open_pool(
    database_url: str,
    min_size: int,
    max_size: int,
    statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS,
) -> AsyncConnectionPool:
    # Each connection runs with the borrowing call's time-outs (db/deadlines.py).
    pool = DeadlinePool(
        database_url,
        min_size=min_size,
        max_size=max_size,
        configure=_configure,
        open=False,
        name="ledger",
    )
    pool.statement_timeout_cap_ms = statement_timeout_ms
    await pool.open(wait=True, timeout=30)
    return pool
