"""Call deadlines become PostgreSQL time-outs.

Each call's limits step (server/limits.py) records its deadline (a contextvar); every
connection the call borrows from the pool then runs with ``statement_timeout`` and
``lock_timeout`` set to the time the call has left, minus a margin so the server can still
answer before the client gives up. A call without a deadline gets the cap,
LEDGER_STATEMENT_TIMEOUT_MS (which also bounds calls with longer deadlines; 0 = no cap). A
time-out cancels the statement, rolls its transaction back (no lock is kept) and is answered
DEADLINE_EXCEEDED (db/errors.py). A call judged at its received time (db/waits.py) also
waits for a connection and runs its statement only for what is left of its MAX_WAIT, cap or
not; past it, it is answered WAITED_TOO_LONG.

One round trip: the settings are session settings, sent (one ``SELECT set_config(...)``) only
when the connection's current values differ from the call's. The time left is rounded down
into 100 ms buckets (10 ms under one second) first, so the calls of a client with a fixed
deadline, and all calls without one, find the connection already set and run their single
statement alone."""

from __future__ import annotations

import time
import weakref
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from contextvars import ContextVar
from typing import Any

import grpc
from psycopg import AsyncConnection
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from ledger_server.db import waits
from ledger_server.errors import LedgerError

DEFAULT_STATEMENT_TIMEOUT_MS = 5000
MAX_MARGIN_MS = 100
MAX_TIMEOUT_MS = 2_000_000_000  # PostgreSQL's limit is 2^31 - 1 ms

_deadline: ContextVar[float | None] = ContextVar("ledger_call_deadline", default=None)


def set_call_deadline(remaining_seconds: float | None) -> Any:
    """Records the current call's deadline (None: none); returns a token for reset."""
    return set_deadline(None if remaining_seconds is None else time.monotonic() + remaining_seconds)


def reset_call_deadline(token: Any) -> None:
    _deadline.reset(token)


def set_deadline(deadline: float | None) -> Any:
    """Records a deadline on the time.monotonic() clock (None: none); returns a token."""
    return _deadline.set(deadline)


def current_deadline() -> float | None:
    """The current call's deadline on the time.monotonic() clock (None: none)."""
    return _deadline.get()


def remaining_seconds() -> float | None:
    deadline = current_deadline()
    return None if deadline is None else deadline - time.monotonic()


def deadline_exceeded() -> LedgerError:
    return LedgerError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "DEADLINE_EXCEEDED",
        "the call's deadline left no time for the database",
    )


def statement_timeout_ms(remaining: float | None, cap_ms: int) -> int:
    """The time-out for a call with ``remaining`` seconds left (None: no deadline); 0 means
    none. Raises DEADLINE_EXCEEDED when nothing is left."""
    if remaining is None:
        return cap_ms
    remaining_ms = min(int(remaining * 1000), MAX_TIMEOUT_MS)
    # Buckets centred on round numbers (a 2 s deadline arrives as 1.99 or 2.01 s left):
    # [1950, 2050) ms -> 1950 ms, [495, 505) ms -> 495 ms.
    step = 100 if remaining_ms >= 1000 else 10
    rounded = (remaining_ms + step // 2) // step * step - step // 2
    budget = rounded - min(MAX_MARGIN_MS, rounded // 10)
    if budget < 1:
        raise deadline_exceeded()
    return min(budget, cap_ms) if cap_ms else budget


def _bound_ms(left: float | None) -> int | None:
    """The statement time-out for a call with ``left`` seconds before it has waited too
    long (None: not bounded); raises WAITED_TOO_LONG when nothing is left."""
    if left is None:
        return None
    try:
        return statement_timeout_ms(left, 0)
    except LedgerError:
        raise waits.waited_too_long() from None


_SET_TIMEOUTS = (
    "SELECT set_config('statement_timeout', %(ms)s, false),"
    " set_config('lock_timeout', %(ms)s, false)"
)


class DeadlinePool(AsyncConnectionPool[AsyncConnection[TupleRow]]):
    """A pool whose connections run with the current call's time-outs."""

    statement_timeout_cap_ms = DEFAULT_STATEMENT_TIMEOUT_MS

    # What each open connection is set to (a session setting survives its return to the pool).
    _applied: weakref.WeakKeyDictionary[AsyncConnection[TupleRow], int]

    @asynccontextmanager
    async def connection(
        self,
        timeout: float | None = None,  # noqa: ASYNC109 (the pool's own signature)
    ) -> AsyncIterator[AsyncConnection[TupleRow]]:
        remaining = remaining_seconds()
        timeout_ms = statement_timeout_ms(remaining, self.statement_timeout_cap_ms)
        wait = timeout if timeout is not None else self.timeout
        limited = remaining is not None and remaining < wait
        if remaining is not None:
            wait = min(wait, remaining)
        left = waits.seconds_left()  # a call judged at its received time (db/waits.py)
        if left is not None and left <= 0:
            raise waits.waited_too_long()
        bounded = left is not None and left < wait
        if left is not None:
            wait = min(wait, left)
        async with AsyncExitStack() as stack:
            try:
                conn = await stack.enter_async_context(super().connection(wait))
            except PoolTimeout:
                if bounded:
                    raise waits.waited_too_long() from None
                if limited:
                    raise deadline_exceeded() from None
                raise
            # What the wait left (the statement and its lock waits included), however long
            # the call's deadline or the cap (0: none).
            bound_ms = _bound_ms(waits.seconds_left())
            binding = bound_ms is not None and (timeout_ms == 0 or bound_ms < timeout_ms)
            if binding:
                assert bound_ms is not None
                timeout_ms = bound_ms
            await self._apply(conn, timeout_ms)
            try:
                yield conn
            except LedgerError as error:
                if binding and error.reason == "DEADLINE_EXCEEDED":
                    raise waits.waited_too_long() from error
                raise

    async def _apply(self, conn: AsyncConnection[TupleRow], timeout_ms: int) -> None:
        applied = self.__dict__.setdefault("_applied", weakref.WeakKeyDictionary())
        if applied.get(conn) == timeout_ms:
            return
        applied.pop(conn, None)
        await conn.execute(_SET_TIMEOUTS, {"ms": f"{timeout_ms}ms"})
        applied[conn] = timeout_ms
