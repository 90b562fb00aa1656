"""Balance calls that queue up in the server are read together, many accounts in one
statement.

A Balance's database work is one primary-key read; its fixed costs (a pooled connection, a
round trip, the driver's work on both ends) are most of what it costs. So the server runs
at most ``max_in_flight`` Balance statements at once: a call that finds a slot free runs
alone at once (no added latency when the server is not busy), the others wait, and whenever
a statement ends the waiting calls go together as one `balances` query. The accounts that
query leaves out (maintenance due, which takes the account's lock, or not found) are read
one by one through `balance`, exactly as a lone call, after every other call of the batch
has its answer. Reads take no part in group commit, and only an account due maintenance
takes its lock: no other Balance waits behind a charge."""

from __future__ import annotations

import asyncio
import contextvars
import functools
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from psycopg_pool import AsyncConnectionPool

from ledger_server.db import deadlines
from ledger_server.errors import LedgerError, unavailable
from ledger_server.ledger import store
from ledger_server.observability.metrics import BALANCE_READ_CALLS
from ledger_server.server.calls import call_json
from ledger_server.server.group_commit import latest_deadline

# One statement's accounts: an index probe each, and the answers travel back as one result.
MAX_BATCH = 256


@dataclass
class _Read:
    account_id: str
    now: datetime
    deadline: float | None  # the call's deadline (time.monotonic), None: none
    future: asyncio.Future[dict[str, Any]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class BalanceReads:
    def __init__(
        self, pool: AsyncConnectionPool, max_in_flight: int, max_batch: int = MAX_BATCH
    ) -> None:
        self._pool = pool
        self._max_in_flight = max_in_flight
        self._max_batch = max_batch
        self._in_flight = 0
        self._waiting: list[_Read] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def read(self, account_id: str, now: datetime) -> dict[str, Any]:
        """The account's balance as ledger_balance gives it, alone or in a batch."""
        if self._in_flight < self._max_in_flight:
            self._in_flight += 1
            BALANCE_READ_CALLS.observe(1)
            params: dict[str, object] = {"account_id": account_id, "now": now}
            try:
                return await call_json(self._pool, "balance", params)
            finally:
                self._finish()
        read = _Read(account_id, now, deadlines.current_deadline())
        self._waiting.append(read)
        return await read.future

    def _finish(self) -> None:
        self._in_flight -= 1
        self._dispatch()

    def _dispatch(self) -> None:
        while self._waiting and self._in_flight < self._max_in_flight:
            taken = self._waiting[: self._max_batch]
            del self._waiting[: self._max_batch]
            batch = [read for read in taken if not read.future.done()]  # done: caller left
            if not batch:
                continue
            self._in_flight += 1
            BALANCE_READ_CALLS.observe(len(batch))
            # A context of its own: not the request id or deadline of the call whose
            # ending happened to start it.
            task = asyncio.create_task(self._run(batch), context=contextvars.Context())
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._ended, batch))

    def _ended(self, batch: list[_Read], task: asyncio.Task[None]) -> None:
        """Runs however the batch's task ended, even cancelled before it started."""
        self._tasks.discard(task)
        for read in batch:
            if not read.future.done():
                read.future.set_exception(unavailable("the server stopped this call; retry it"))
        self._finish()

    async def _run(self, batch: list[_Read]) -> None:
        deadlines.set_deadline(latest_deadline([read.deadline for read in batch]))
        now = max(read.now for read in batch)
        try:
            async with self._pool.connection() as conn:
                accounts = sorted({read.account_id for read in batch})
                rows = await store.fetch_all(conn, "balances", {"accounts": accounts, "now": now})
                found: dict[str, dict[str, Any]] = {account: data for account, data in rows}
                left_out = []
                for read in batch:  # answered first: a left-out account may wait for its lock
                    data = found.get(read.account_id)
                    if data is None:
                        left_out.append(read)
                    elif not read.future.done():
                        read.future.set_result(data)
                for read in left_out:  # due maintenance or not found: as a lone call
                    params = {"account_id": read.account_id, "now": now}
                    try:
                        data = found.get(read.account_id) or await store.call_json(
                            conn, "balance", params
                        )
                    except LedgerError as exc:  # this call's alone (e.g. NOT_FOUND)
                        if not read.future.done():
                            read.future.set_exception(exc)
                        continue
                    found[read.account_id] = data
                    if not read.future.done():
                        read.future.set_result(data)
        except Exception as exc:  # the batch as a whole: every call gets the error
            for read in batch:
                if not read.future.done():
                    read.future.set_exception(exc)
