"""Group commit for the calls that move an account's credits on a job's path (Consume,
Reserve, Commit, and Release and Refund, which give credits back): calls that queue up in
the server share one transaction.

Such a call's fixed costs (a round trip, a statement start, a commit and its WAL flush, the
server's database client work) are about as large as its ledger work, and every write to
one account holds the account's row lock until it commits. So the server lets at most
``max_in_flight`` of these transactions ("lanes") run at once, at most one per account, and
opens a lane beside one in flight only once every transaction in flight has run
``open_lane_after`` seconds. A call that finds nothing in flight (or that long in flight),
nobody waiting and its account idle runs alone at once (no added latency when the server
is not busy); the others wait in arrival order, and when a transaction ends or a lane may
open, the waiting calls whose accounts are idle go together as one batch
(sql/functions/0007_coalesced.sql): one round trip, one transaction, one commit, each call
in a savepoint so a refused one changes nothing. Calls for one account keep their order;
several of them in one batch is the hot-account case. Each call keeps its own idempotency
key, so a batch that fails as a whole (the database went away) is retried by the clients
like any call.

Each call is judged at the time the server received it, which holds only while it has
waited less than db/waits.py's MAX_WAIT (inside the hold's grace): a call that waited that
long in the queue is refused WAITED_TOO_LONG, changing nothing, and a call or batch runs its
connection wait and statement only for what its oldest call has left of it.

Why lanes open late: while batches are quick, one lane makes them larger (fewer
transactions, commits and WAL flushes for the same calls, less database CPU per call); a
batch that waits on an account lock or a slow disk still lets the calls behind it go in
another lane after that short wait."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import itertools
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import grpc
from psycopg import errors as pg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from ledger_server.clock import Clock
from ledger_server.db import deadlines, waits
from ledger_server.db.errors import DatabaseFailure, translate_failure
from ledger_server.errors import LedgerError, unavailable
from ledger_server.ledger import store
from ledger_server.observability.metrics import (
    GROUP_COMMIT_CALLS,
    GROUP_COMMIT_EXTRA_LANES,
    observe_ledger_result,
)
from ledger_server.server.calls import call_json

# Each call in a batch runs in a savepoint (a subtransaction). PostgreSQL caches 64
# subtransaction ids per backend; past that every other session checking visibility has
# to read pg_subtrans. 32 stays well inside the cache.
MAX_BATCH = 32


class BatchElementError(RuntimeError):
    """A call in a batch failed in a way the ledger does not name (a bug: INTERNAL)."""


# What a batch can run (ledger_batch_call), and each one's fields besides the common ones
# (key, hash, now).
BATCHED = {
    "consume": ("amount", "usage", "feature", "comment"),
    "reserve": ("amount", "usage", "feature", "expires_at", "comment"),
    "commit": ("reservation_id", "amount", "usage", "comment"),
    "release": ("reservation_id", "reason", "job_failed"),
    "refund": ("reservation_id", "amount", "reason"),
}


@dataclass
class _Waiter:
    operation: str
    account_id: str
    params: dict[str, object]
    deadline: float | None  # the call's deadline (time.monotonic), None: none
    received: datetime  # when the server received it (params["now"], the ledger's clock)
    future: asyncio.Future[dict[str, Any]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


def _request(waiter: _Waiter) -> dict[str, object]:
    params = waiter.params
    hash_ = params["hash"]
    assert isinstance(hash_, bytes)
    request: dict[str, object] = {
        "op": waiter.operation,
        "account": waiter.account_id,
        "key": params["key"],
        "hash": hash_.hex(),
        # The call-by-call path runs each call at its own time (ledger_batch_call).
        "now": _json(params["now"]),
    }
    for name in BATCHED[waiter.operation]:
        request[name] = _json(params[name])
    return request


def _json(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Jsonb):
        return value.obj
    if isinstance(value, uuid.UUID):
        return str(value)
    return value  # str, int, bool or None


def latest_deadline(deadlines_: list[float | None]) -> float | None:
    """A batch runs until its most patient caller gives up (None: one has no deadline); a
    caller whose deadline passes first gets DEADLINE_EXCEEDED from its client and, on retry
    with its key, the answer the batch stored."""
    return None if None in deadlines_ else max(d for d in deadlines_ if d is not None)


class GroupCommit:
    def __init__(
        self,
        pool: AsyncConnectionPool,
        clock: Clock,
        max_in_flight: int,
        open_lane_after: float = 0.0,
        max_batch: int = MAX_BATCH,
    ) -> None:
        """``clock``: the ledger's, the one the calls' ``now`` was read from."""
        self._pool = pool
        self._clock = clock
        self._max_in_flight = max_in_flight
        self._open_lane_after = open_lane_after
        self._max_batch = max_batch
        self._lane_starts: dict[int, float] = {}  # lane token -> when its transaction began
        self._lane_tokens = itertools.count()
        self._wake: asyncio.TimerHandle | None = None  # a dispatch when a lane may open
        self._busy: set[str] = set()  # accounts with a transaction in flight
        # Each account's waiting calls in arrival order; the accounts in the order their
        # oldest waiting call arrived (a dict keeps insertion order).
        self._waiting: dict[str, deque[_Waiter]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def call(
        self, operation: str, account_id: str, params: dict[str, object]
    ) -> dict[str, Any]:
        """Runs one of BATCHED's operations for the account, alone or in a batch."""
        received = params["now"]
        assert isinstance(received, datetime)
        if (
            self._in_flight < self._max_in_flight
            and not self._waiting  # else a call that waits for a lane to open loses its turn
            and account_id not in self._busy
            and self._lane_opens_in() <= 0
        ):
            lane = self._start([account_id])
            token = waits.set_received(self._clock, received)
            try:
                return await call_json(self._pool, operation, params)
            finally:
                waits.reset_received(token)
                self._finish(lane, [account_id])
        waiter = _Waiter(operation, account_id, params, deadlines.current_deadline(), received)
        self._waiting.setdefault(account_id, deque()).append(waiter)
        self._dispatch()
        return await waiter.future

    @property
    def _in_flight(self) -> int:
        return len(self._lane_starts)

    def _lane_opens_in(self) -> float:
        """Seconds until another lane may open (<= 0: now): when the youngest transaction
        in flight has run open_lane_after."""
        if not self._lane_starts:
            return 0.0
        youngest = max(self._lane_starts.values())
        remaining = youngest + self._open_lane_after - asyncio.get_running_loop().time()
        # Within a millisecond counts as now: uvloop's timers fire to the millisecond, and
        # a timer a fraction early would otherwise set itself again and again until then.
        return remaining if remaining > 0.001 else 0.0

    def _start(self, accounts: list[str]) -> int:
        """``accounts``: one per call (an account with several calls in the batch repeats)."""
        GROUP_COMMIT_CALLS.observe(len(accounts))
        if self._in_flight:
            GROUP_COMMIT_EXTRA_LANES.inc()
        self._busy.update(accounts)
        lane = next(self._lane_tokens)
        # The loop's clock, the one its timers run on (uvloop's counts whole milliseconds).
        self._lane_starts[lane] = asyncio.get_running_loop().time()
        return lane

    def _finish(self, lane: int, accounts: list[str]) -> None:
        self._busy.difference_update(accounts)
        del self._lane_starts[lane]
        self._dispatch()

    def _release(self, lane: int, batch: list[_Waiter]) -> None:
        """Gives a batch's lane and accounts back, once. Called as soon as its transaction
        has ended, before its callers are answered: answering them (their handlers, the
        replies) takes the event loop for a while, and the calls that queued meanwhile
        should be on their way to the database by then, not waiting behind it."""
        if lane in self._lane_starts:
            self._finish(lane, [waiter.account_id for waiter in batch])

    def _dispatch(self) -> None:
        while self._in_flight < self._max_in_flight and self._waiting:
            opens_in = self._lane_opens_in()
            if opens_in > 0:
                self._wake_in(opens_in)
                return
            batch = self._take_batch()
            if not batch:
                return
            lane = self._start([waiter.account_id for waiter in batch])
            # A context of its own: not the request id or deadline of the call whose
            # ending happened to start it.
            task = asyncio.create_task(self._run(lane, batch), context=contextvars.Context())
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._ended, lane, batch))

    def _wake_in(self, delay: float) -> None:
        """One pending timer is enough: lanes open only once the youngest has run
        open_lane_after, so when the youngest ends, the next one has run that long too and a
        lane opens at once (from _finish), never earlier than the pending timer."""
        if self._wake is None:
            self._wake = asyncio.get_running_loop().call_later(delay, self._woken)

    def _woken(self) -> None:
        self._wake = None
        self._dispatch()

    def _take_batch(self) -> list[_Waiter]:
        """Up to max_batch waiting calls of accounts with nothing in flight: the accounts
        whose calls have waited longest first, each account's calls in arrival order. The
        calls that have waited too long (db/waits.py) are refused on the way."""
        batch: list[_Waiter] = []
        # Received at or before this, a call has too little of MAX_WAIT left to run.
        stale_at = self._clock.now() - (waits.MAX_WAIT - waits.MIN_LEFT_TO_RUN)
        for account_id in list(self._waiting):
            if len(batch) == self._max_batch:
                break
            queue = self._waiting[account_id]
            self._refuse_stale(queue, stale_at)
            if account_id not in self._busy:
                while queue and len(batch) < self._max_batch:
                    waiter = queue.popleft()
                    if not waiter.future.done():  # done: its caller went away
                        batch.append(waiter)
            if not queue:
                del self._waiting[account_id]
        return batch

    def _refuse_stale(self, queue: deque[_Waiter], stale_at: datetime) -> None:
        """Refuses the account's calls received at or before ``stale_at``, which have waited
        MAX_WAIT or all but too little of it to run (the oldest are first): judged at their
        received time, they could find a hold already timed out by the others' maintenance.
        Nothing of theirs ran; their callers retry with their keys."""
        while queue and (queue[0].future.done() or queue[0].received <= stale_at):
            waiter = queue.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(waits.waited_too_long())

    def _ended(self, lane: int, batch: list[_Waiter], task: asyncio.Task[None]) -> None:
        """Runs however the batch's task ended, even cancelled before it started: no
        caller is left waiting, and the accounts and the slot are given back if the batch
        has not already done so."""
        self._tasks.discard(task)
        for waiter in batch:
            if not waiter.future.done():
                waiter.future.set_exception(
                    unavailable("the server stopped this call; retry with the same idempotency key")
                )
        self._release(lane, batch)

    async def _run(self, lane: int, batch: list[_Waiter]) -> None:
        deadlines.set_deadline(latest_deadline([waiter.deadline for waiter in batch]))
        # The batch's connection wait and statement end before its oldest call has waited
        # too long (db/deadlines.py): all its calls are refused then, retryably.
        waits.set_received(self._clock, min(waiter.received for waiter in batch))
        try:
            outcome = await self._execute(batch)
        except Exception as exc:  # the batch as a whole: every call gets the error
            self._release(lane, batch)
            _fail(batch, exc)
            return
        # The transaction has ended (the connection is back): the next batch goes first.
        # Outside the try: an error starting it is not this batch's (_ended answers then).
        self._release(lane, batch)
        try:
            _answer(batch, outcome)
        except Exception as exc:  # an answer of the wrong shape: the calls not yet answered
            _fail(batch, exc)

    async def _execute(self, batch: list[_Waiter]) -> dict[str, Any] | list[dict[str, Any]]:
        """One call runs alone (its ledger function); several run as one batch statement."""
        if len(batch) == 1:
            waiter = batch[0]
            return await call_json(self._pool, waiter.operation, waiter.params)
        async with self._pool.connection() as conn:
            return await store.call_json_array(
                conn,
                "consume_batch",
                {
                    "requests": Jsonb([_request(waiter) for waiter in batch]),
                    "now": max(w.params["now"] for w in batch),  # type: ignore[type-var]
                },
            )


def _account_busy() -> LedgerError:
    """One per caller: an exception object shared by futures is raised in each caller's
    task, which chains whatever that task was handling onto it (``__context__``)."""
    return LedgerError(
        grpc.StatusCode.ABORTED,
        "CONFLICT",
        "the account was busy with another transaction; retry with the same idempotency key",
    )


def _answer(batch: list[_Waiter], outcome: dict[str, Any] | list[dict[str, Any]]) -> None:
    if isinstance(outcome, dict):  # a call run alone (call_json counted its credits)
        if not batch[0].future.done():
            batch[0].future.set_result(outcome)
        return
    for waiter, result in zip(batch, outcome, strict=True):
        if "ok" in result:
            # Counted even when the caller went away: the credits were consumed.
            observe_ledger_result(waiter.operation, result["ok"])
        if waiter.future.done():
            continue
        if "ok" in result:
            waiter.future.set_result(result["ok"])
        else:
            error = result["error"]
            if error["sqlstate"] == pg.LockNotAvailable.sqlstate:
                # The batch's own lock wait (at most a quarter of its time), not the
                # caller's deadline: the call was rolled back and the caller has time to
                # retry it.
                waiter.future.set_exception(_account_busy())
                continue
            failure = DatabaseFailure(
                error["sqlstate"], error["message"], error["detail"], error["constraint"]
            )
            waiter.future.set_exception(
                translate_failure(failure) or BatchElementError(error["message"])
            )


def _fail(batch: list[_Waiter], exc: Exception) -> None:
    for waiter in batch:
        if not waiter.future.done():
            waiter.future.set_exception(exc)
