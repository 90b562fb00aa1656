"""The async connection pool every RPC borrows one connection from.

It lends the connection returned last (LIFO, as SQLAlchemy's ``pool_use_lifo``, node-pg and
pgcat do), where psycopg_pool lends the one idle longest (FIFO). Under the bench's Consume
load the pool holds two connections and the one group-commit lane borrows one per batch:
FIFO alternates between them, so each batch goes to a backend that has slept through the
previous one, while LIFO hands it to the backend that has just finished, its memory still
warm in the CPU caches. Measured at concurrency 16 (BENCHMARKS.md, session 11, item 30),
ten alternating pairs: 8% less PostgreSQL CPU per call and 6% more calls per second on
average, less than the spread between runs of one build on that machine, so a modest gain.

The idle rest stay at the other end, where the pool's shrinking closes one per ``max_idle``
(10 minutes) unused. They are also where psycopg_pool checks a connection's age least
often (it does so when a connection is returned), so a connection kept idle under
``min_size`` through hours of steady load can be older than ``max_lifetime`` when a burst
borrows it; the server then answers that call UNAVAILABLE if PostgreSQL or the network
dropped it meanwhile, and the client retries, as after any lost connection.

A connection lost with PostgreSQL is replaced by psycopg_pool's AddConnection task, which
retries a failed connect on an exponential backoff (1, 2, 4, 8, ... s, up to
``reconnect_timeout``) kept in that task: nothing in psycopg_pool shortens a wait already
scheduled (``check()`` only tests idle connections, and grows an empty pool only when no
AddConnection is already pending). After an outage of half a minute the next retry can be
half a minute away while PostgreSQL answers again, and every call fails meanwhile.
``reconnect_now()`` runs the retries waiting out their backoff at once; the database health
task (observability/health.py) calls it when its own connection reaches PostgreSQL, and
reports SERVING again only once this pool lends a working connection.

While PostgreSQL cannot be reached, a call fails fast instead of waiting for a connection
(``timeout``, 30 s, or its whole deadline): once the pool's last connection attempt has
failed and it holds no open connection, no connection can come but from a reconnection,
so a call waits ``UNREACHABLE_WAIT`` at most (one attempt may be under way) and is answered
STORAGE_UNAVAILABLE, having changed nothing; those already waiting are answered so as soon
as an attempt fails. Clients and load balancers can then fail over or back off at once. A
pool that is merely saturated (every connection lent, PostgreSQL answering) holds open
connections, so its calls still wait for one.

Such a call first has one of the retries waiting out their backoff run now, rather than
failing until the health task next reaches PostgreSQL (every
``LEDGER_HEALTH_CHECK_INTERVAL_SECONDS``, which operators may set to a minute) or the
backoff ends: so the first call after PostgreSQL answers again gets a connection. At most
one attempt per ``CALL_RETRY_INTERVAL`` (1 s) since the pool's last, whoever made it: a
call arriving sooner has the retry run when that second is up, if it is still waiting then
(and waits ``UNREACHABLE_WAIT`` from then at most). Calls only run early the attempts the
pool has pending, each keeping its backoff state and its give-up after
``reconnect_timeout``; they add none, so a long outage under any load costs PostgreSQL
about one connection attempt a second, never a busy loop. A connect that succeeds after a
failed one shows PostgreSQL answers again: the other retries pending run at once too, so
the pool is back to its size, not one connection, for the calls that follow."""

from __future__ import annotations

import asyncio
import math
import weakref
from time import monotonic

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import TupleRow
from psycopg_pool import PoolTimeout
from psycopg_pool.pool_async import AddConnection, MaintenanceTask

from ledger_server.db.connect import with_network_timeouts
from ledger_server.db.deadlines import DEFAULT_STATEMENT_TIMEOUT_MS, DeadlinePool
from ledger_server.db.session_limits import SET_SESSION_LIMITS

# Time enough for a reconnection attempt to a PostgreSQL that answers (a few ms), short
# enough for a client to fail over at once.
UNREACHABLE_WAIT = 1.0
# The least time between two connection attempts that calls have run early while PostgreSQL
# is unreachable: soon enough that a call just after it answers again finds it, rare enough
# that calls throughout a long outage cost it about one connection attempt a second.
CALL_RETRY_INTERVAL = 1.0


class DatabaseUnreachable(psycopg.OperationalError):
    """The pool lends no connection because PostgreSQL cannot be reached. An
    OperationalError without SQLSTATE: answered STORAGE_UNAVAILABLE (db/errors.py)."""


async def _configure(conn: AsyncConnection[TupleRow]) -> None:
    # Autocommit: an operation that is one SQL statement (one ledger function) is
    # its own transaction, one round trip; handlers that need several statements
    # open conn.transaction() explicitly.
    await conn.set_autocommit(True)
    await conn.execute(SET_SESSION_LIMITS)


class LedgerPool(DeadlinePool):
    # AddConnection tasks waiting out a reconnection backoff in the pool's scheduler.
    _backing_off: set[MaintenanceTask]
    # Whether the last attempt to connect failed (none succeeded since).
    _connect_failed = False
    # Every connection this pool has opened and not yet dropped (a broken one reads closed).
    _connections: weakref.WeakSet[AsyncConnection[TupleRow]]
    # When the last connection attempt started, or was run early for the calls (monotonic).
    _last_attempt = -math.inf
    # When a retry that calls asked for inside CALL_RETRY_INTERVAL of the last runs.
    _retry_timer: asyncio.TimerHandle | None = None

    @property
    def unreachable(self) -> bool:
        """Whether only a reconnection could lend a connection now, and the last failed."""
        if not self._connect_failed:
            return False
        conns = self.__dict__.setdefault("_connections", weakref.WeakSet())
        return all(conn.closed for conn in conns)

    async def _connect(
        self,
        timeout: float | None = None,  # noqa: ASYNC109 (the pool's own signature)
    ) -> AsyncConnection[TupleRow]:
        self._last_attempt = monotonic()
        try:
            conn = await super()._connect(timeout)
        except psycopg.OperationalError:
            self._connect_failed = True
            if self.unreachable:
                await self._fail_waiting()
            raise
        recovered, self._connect_failed = self._connect_failed, False
        self.__dict__.setdefault("_connections", weakref.WeakSet()).add(conn)
        if recovered:
            # PostgreSQL answers again: the other lost connections need not wait out
            # their backoff (a call ran this attempt early, or the backoff ended).
            self.reconnect_now()
        return conn

    async def _fail_waiting(self) -> None:
        async with self._lock:
            while self._waiting:
                await self._waiting.popleft().fail(_unreachable())

    async def getconn(
        self,
        timeout: float | None = None,  # noqa: ASYNC109 (the pool's own signature)
    ) -> AsyncConnection[TupleRow]:
        if not self.unreachable:
            return await super().getconn(timeout)
        wait = self._retry_for_calls() + UNREACHABLE_WAIT
        if timeout is not None:
            wait = min(timeout, wait)
        try:
            return await super().getconn(wait)
        except PoolTimeout:
            raise _unreachable() from None

    def _retry_for_calls(self) -> float:
        """Has one reconnection attempt waiting out its backoff run now for the calls, or
        as soon as CALL_RETRY_INTERVAL has passed since the last attempt; returns the
        seconds until it runs (0 if now, or if none is pending)."""
        backing_off = self.__dict__.setdefault("_backing_off", set())
        if self.closed or not backing_off:
            return 0.0
        now = monotonic()
        due = self._last_attempt + CALL_RETRY_INTERVAL
        if due <= now:
            self._last_attempt = now  # before the attempt starts: the next call waits
            task = backing_off.pop()
            self.run_task(task)
            return 0.0
        if self._retry_timer is None:
            self._retry_timer = asyncio.get_running_loop().call_later(due - now, self._retry_due)
        return due - now

    def _retry_due(self) -> None:
        self._retry_timer = None
        # Only for calls still waiting: one failed by another failed attempt meanwhile has
        # had its answer, and no call, no attempt.
        if self._waiting and self.unreachable:
            self._retry_for_calls()

    async def schedule_task(self, task: MaintenanceTask, delay: float) -> None:
        # psycopg_pool schedules a task in the future only to retry a failed connect (and to
        # shrink the pool). Each retry is recorded, so that reconnect_now() can run it early;
        # whichever comes first, the scheduler's tick or reconnect_now(), runs it, once.
        if not isinstance(task, AddConnection):
            await super().schedule_task(task, delay)
            return
        backing_off = self.__dict__.setdefault("_backing_off", set())
        backing_off.add(task)

        async def tick() -> None:
            if task in backing_off:
                backing_off.discard(task)
                await task.tick()

        await self._sched.enter(delay, tick)

    def reconnect_now(self) -> int:
        """Runs now every reconnection attempt waiting out its backoff (for when PostgreSQL
        is known to answer again); returns how many. Each keeps its attempt's state, so one
        that fails again waits its next, longer delay, and still gives up after
        ``reconnect_timeout``: called every few seconds while PostgreSQL is unreachable to
        the pool only, it retries at that pace, never in a busy loop. (Calls run one early
        themselves, at most one a second: ``getconn``.)"""
        backing_off = self.__dict__.setdefault("_backing_off", set())
        if self.closed or not backing_off:
            return 0
        tasks = list(backing_off)
        backing_off.clear()
        for task in tasks:
            self.run_task(task)
        return len(tasks)

    async def _get_ready_connection(
        self,
        timeout: float | None,  # noqa: ASYNC109 (the pool's own signature)
    ) -> AsyncConnection[TupleRow] | None:
        # psycopg_pool appends returned connections on the right of its deque and lends
        # (and shrinks) from the left, under its lock. Turning the deque by one brings the
        # last returned to the left for this loan and leaves the others in their order, so
        # the one idle longest is still the first the pool closes.
        if timeout is None or timeout > 0:  # else the parent raises PoolTimeout, lends nothing
            self._pool.rotate(1)
        return await super()._get_ready_connection(timeout)


def _unreachable() -> DatabaseUnreachable:
    return DatabaseUnreachable("PostgreSQL cannot be reached: the pool has no connection")


async def open_pool(
    database_url: str,
    min_size: int,
    max_size: int,
    statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS,
) -> LedgerPool:
    # Each connection runs with the borrowing call's time-outs (db/deadlines.py).
    pool = LedgerPool(
        with_network_timeouts(database_url),
        min_size=min_size,
        max_size=max_size,
        configure=_configure,
        open=False,
        name="ledger",
    )
    pool.statement_timeout_cap_ms = statement_timeout_ms
    await pool.open(wait=True, timeout=30)
    return pool
