"""Coalesces concurrent Consume calls on one account into one transaction.

Every write to an account holds its row lock until it commits, so calls on one busy
account queue up in PostgreSQL and each pays a commit of its own. Here they queue in
the server instead: while a Consume for the account is in flight, the next calls wait
and then go together as one batch (sql/functions/0007_coalesced.sql): one round trip,
one transaction, one commit, each call in a savepoint so a refused one changes nothing.
An account with nothing in flight takes the ordinary one-call path, so the common case
gains no latency. Each call keeps its own idempotency key, so a batch that fails as a
whole (the database went away) is retried by the clients like any call."""

from __future__ import annotations

import asyncio
from typing import Any

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from ledger_server.db.errors import DatabaseFailure, translate_failure
from ledger_server.ledger import store
from ledger_server.observability.metrics import observe_ledger_result
from ledger_server.server.calls import call_json

# Each call in a batch runs in a savepoint (a subtransaction). PostgreSQL caches 64
# subtransaction ids per backend; past that every other session checking visibility has
# to read pg_subtrans. 32 stays well inside the cache.
MAX_BATCH = 32

Waiter = tuple[dict[str, object], "asyncio.Future[dict[str, Any]]"]


class BatchElementError(RuntimeError):
    """A call in a batch failed in a way the ledger does not name (a bug: INTERNAL)."""


def _request(params: dict[str, object]) -> dict[str, object]:
    usage = params["usage"]
    hash_ = params["hash"]
    assert isinstance(hash_, bytes)
    return {
        "key": params["key"],
        "hash": hash_.hex(),
        "amount": params["amount"],
        "usage": usage.obj if isinstance(usage, Jsonb) else None,
        "feature": params["feature"],
        "comment": params["comment"],
    }


class ConsumeCoalescer:
    def __init__(self, pool: AsyncConnectionPool, max_batch: int = MAX_BATCH) -> None:
        self._pool = pool
        self._max_batch = max_batch
        self._busy: set[str] = set()
        self._waiting: dict[str, list[Waiter]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def consume(self, account_id: str, params: dict[str, object]) -> dict[str, Any]:
        if account_id in self._busy:
            future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            self._waiting.setdefault(account_id, []).append((params, future))
            return await future
        self._busy.add(account_id)
        try:
            return await call_json(self._pool, "consume", params)
        finally:
            self._next(account_id)

    def _next(self, account_id: str) -> None:
        waiting = self._waiting.pop(account_id, [])
        waiting = [(params, future) for params, future in waiting if not future.done()]
        if not waiting:
            self._busy.discard(account_id)
            return
        batch, rest = waiting[: self._max_batch], waiting[self._max_batch :]
        if rest:
            self._waiting[account_id] = rest
        task = asyncio.create_task(self._run(account_id, batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, account_id: str, batch: list[Waiter]) -> None:
        try:
            if len(batch) == 1:
                params, future = batch[0]
                result = await call_json(self._pool, "consume", params)
                if not future.done():
                    future.set_result(result)
                return
            async with self._pool.connection() as conn:
                results = await store.call_json_array(
                    conn,
                    "consume_batch",
                    {
                        "account_id": account_id,
                        "requests": Jsonb([_request(params) for params, _ in batch]),
                        "now": max(params["now"] for params, _ in batch),  # type: ignore[type-var]
                    },
                )
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if "ok" in result:
                    observe_ledger_result("consume", result["ok"])
                    future.set_result(result["ok"])
                else:
                    error = result["error"]
                    failure = DatabaseFailure(
                        error["sqlstate"], error["message"], error["detail"], error["constraint"]
                    )
                    future.set_exception(
                        translate_failure(failure) or BatchElementError(error["message"])
                    )
        except Exception as exc:  # the batch as a whole: every call gets the error
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        finally:
            self._next(account_id)
