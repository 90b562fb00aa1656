"""A pool whose connections never come back: a stuck PostgreSQL, for the server's call
queues (group commit, batched Balance reads) tested without a database."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
import pytest

from ledger_server.errors import LedgerError


class StuckPool:
    """Every borrower waits for a connection forever (until cancelled)."""

    def __init__(self) -> None:
        self.borrowers = 0

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        self.borrowers += 1
        await asyncio.Event().wait()
        yield None  # pragma: no cover (never reached)


async def until(condition: Any) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition never held")


async def stop_a_batch_midway(
    pool: StuckPool,
    call: Callable[[str], Awaitable[Any]],
    batch_tasks: Callable[[], Iterable[asyncio.Task[Any]]],
) -> None:
    """Server shutdown in the middle of a batch: one call (account "a") runs alone, two
    ("b", "c") queue behind it; the lone one ends, so the queued ones go as one batch, whose
    task is then cancelled. Its callers must get UNAVAILABLE (retry) instead of waiting
    forever; what the queue gives back is for the caller to check."""
    alone = asyncio.create_task(call("a"))
    await until(lambda: pool.borrowers == 1)
    queued = [asyncio.create_task(call(account)) for account in "bc"]
    await asyncio.sleep(0.01)
    alone.cancel()
    await until(lambda: pool.borrowers == 2)
    for task in list(batch_tasks()):
        task.cancel()
    for task in queued:
        with pytest.raises(LedgerError) as raised:
            await asyncio.wait_for(task, timeout=5)
        assert raised.value.code == grpc.StatusCode.UNAVAILABLE
