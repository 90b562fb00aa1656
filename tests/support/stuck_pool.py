"""A pool whose connections never come back: a stuck PostgreSQL, for the server's call
queues (group commit, batched Balance reads) tested without a database."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any


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
