"""The workers' synchronous pool fails fast while PostgreSQL cannot be reached, as the
server's does (ledger_server/db/pool.py, whose reasons and constants it shares).

psycopg_pool's ConnectionPool makes a caller wait its whole time-out (30 s) for a connection
when PostgreSQL is down: a webhook delivery held a receiver thread that long, then got 500
(Stripe, which wants a quick answer, had timed it out; and a receiver whose threads all
wait answers every other delivery 503 busy), a payment job held its worker 30 s to fail and
30 s more to record the failure, and each sweep the scheduler queues every minute held a
worker 30 s too, so that one worker fell behind through an outage. A work horse, which
opens a pool of its own for each job, waited the 30 s of the pool's opening.

Here, once the pool's last connection attempt has failed and it holds no open connection, a
caller waits UNREACHABLE_WAIT at most and gets DatabaseUnreachable (an OperationalError); the
callers already waiting get it as soon as an attempt fails. A caller first has one of the
reconnection attempts waiting out psycopg_pool's backoff run now, at most one every
CALL_RETRY_INTERVAL, so that the first caller after PostgreSQL answers again gets a
connection rather than waiting out a backoff of up to minutes; a connect that succeeds after
a failed one runs the others at once. A pool that is merely busy (every connection lent,
PostgreSQL answering) still makes callers wait for one, up to their time-out."""

from __future__ import annotations

import math
import threading
import weakref
from time import monotonic
from typing import Any

import psycopg
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool, PoolTimeout
from psycopg_pool.pool import AddConnection, MaintenanceTask

from ledger_server.db.pool import CALL_RETRY_INTERVAL, UNREACHABLE_WAIT, DatabaseUnreachable

Conn = psycopg.Connection[TupleRow]


class WorkerPool(ConnectionPool[Conn]):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Set before the pool opens: its first connection attempts use them.
        self._state = threading.Lock()
        # AddConnection tasks waiting out a reconnection backoff in the pool's scheduler.
        self._backing_off: set[MaintenanceTask] = set()
        # Every connection this pool has opened and not yet dropped (a broken one reads closed).
        self._connections: weakref.WeakSet[Conn] = weakref.WeakSet()
        # Whether the last attempt to connect failed (none succeeded since).
        self._connect_failed = False
        # When the last connection attempt started, or was run early for callers (monotonic).
        self._last_attempt = -math.inf
        self._retry_scheduled = False
        super().__init__(*args, **kwargs)

    @property
    def unreachable(self) -> bool:
        """Whether only a reconnection could lend a connection now, and the last failed."""
        with self._state:
            return self._connect_failed and all(conn.closed for conn in self._connections)

    def _connect(self, timeout: float | None = None) -> Conn:
        with self._state:
            self._last_attempt = monotonic()
        try:
            conn = super()._connect(timeout)
        except psycopg.OperationalError:
            with self._state:
                self._connect_failed = True
            if self.unreachable:
                self._fail_waiting()
            raise
        with self._state:
            recovered, self._connect_failed = self._connect_failed, False
            self._connections.add(conn)
        if recovered:
            # PostgreSQL answers again: the other lost connections need not wait out their
            # backoff.
            self.reconnect_now()
        return conn

    def _fail_waiting(self) -> None:
        with self._lock:
            while self._waiting:
                self._waiting.popleft().fail(_unreachable())

    def getconn(self, timeout: float | None = None) -> Conn:
        if not self.unreachable:
            return super().getconn(timeout)
        wait = self._retry_for_callers() + UNREACHABLE_WAIT
        if timeout is not None:
            wait = min(timeout, wait)
        try:
            return super().getconn(wait)
        except PoolTimeout:
            raise _unreachable() from None

    def _retry_for_callers(self) -> float:
        """Has one reconnection attempt waiting out its backoff run now, or as soon as
        CALL_RETRY_INTERVAL has passed since the last attempt; returns the seconds until it
        runs (0 if now, or if none is pending)."""
        with self._state:
            if self.closed or not self._backing_off:
                return 0.0
            now = monotonic()
            due = self._last_attempt + CALL_RETRY_INTERVAL
            if due > now:
                if not self._retry_scheduled:
                    self._retry_scheduled = True
                    self._sched.enter(due - now, self._retry_due)
                return due - now
            self._last_attempt = now  # before the attempt starts: the next caller waits
            task = self._backing_off.pop()
        self.run_task(task)
        return 0.0

    def _retry_due(self) -> None:
        with self._state:
            self._retry_scheduled = False
        # Only for callers still waiting: one failed by another failed attempt meanwhile
        # has had its answer, and no caller, no attempt.
        if self._waiting and self.unreachable:
            self._retry_for_callers()

    def schedule_task(self, task: MaintenanceTask, delay: float) -> None:
        # psycopg_pool schedules a task in the future only to retry a failed connect (and to
        # shrink the pool). Each retry is recorded, so that a caller or reconnect_now() can
        # run it early; whichever comes first, the scheduler's tick or they, runs it, once.
        if not isinstance(task, AddConnection):
            super().schedule_task(task, delay)
            return
        with self._state:
            self._backing_off.add(task)

        def tick() -> None:
            with self._state:
                if task not in self._backing_off:
                    return
                self._backing_off.discard(task)
            task.tick()

        self._sched.enter(delay, tick)

    def reconnect_now(self) -> int:
        """Runs now every reconnection attempt waiting out its backoff; returns how many.
        Each keeps its backoff state and its give-up after ``reconnect_timeout``."""
        with self._state:
            if self.closed:
                return 0
            tasks = list(self._backing_off)
            self._backing_off.clear()
        for task in tasks:
            self.run_task(task)
        return len(tasks)


def _unreachable() -> DatabaseUnreachable:
    return DatabaseUnreachable("PostgreSQL cannot be reached: the pool has no connection")
