"""Health that follows PostgreSQL: a background task runs ``SELECT 1`` (with a short
time-out) every few seconds on a connection of its own, and sets the standard health
service, the overall status ("") and each service, to NOT_SERVING while PostgreSQL cannot
be reached, back to SERVING when it answers again. Its own connection, not one of the
pool's, so a pool busy with calls is not mistaken for a database that is down.

Back to SERVING only once the call pool lends a connection that answers ``SELECT 1`` too:
PostgreSQL answering this task's connection does not mean the pool has reconnected (its
reconnection backoff can run half a minute past an outage, db/pool.py), and a load balancer
sends traffic to a SERVING server at once. So whenever this task reaches PostgreSQL it first
has the pool run its pending reconnection attempts now (``reconnect_now``), and on the way
back from NOT_SERVING borrows one connection from the pool (a short wait) before SERVING.
(Calls that find the pool unreachable run one of those attempts themselves, at most one a
second, so they need not wait for this task's next check either.)"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import psycopg
from grpc_health.v1 import health, health_pb2
from psycopg_pool import PoolClosed, PoolTimeout, TooManyRequests

from ledger_server.db.pool import DatabaseUnreachable, LedgerPool
from ledger_server.observability import metrics

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class DatabaseHealth:
    def __init__(
        self,
        database_url: str,
        servicer: health.aio.HealthServicer,
        services: Sequence[str],
        interval_seconds: float,
        timeout_seconds: float = 2.0,
        pool: LedgerPool | None = None,
    ) -> None:
        self._url = database_url
        self._pool = pool
        self._servicer = servicer
        self._services = tuple(services)
        self._interval = interval_seconds
        self._timeout = timeout_seconds
        self._conn: psycopg.AsyncConnection[tuple[object, ...]] | None = None
        self._task: asyncio.Task[None] | None = None
        self.serving = True  # the server starts SERVING (it has just opened its pool)
        self.checks = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="database-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._close()

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def check(self) -> bool:
        """One ``SELECT 1``; reconnects first when the last check lost the connection."""
        try:
            async with asyncio.timeout(self._timeout):
                if self._conn is None or self._conn.closed:
                    self._conn = await psycopg.AsyncConnection.connect(
                        self._url, autocommit=True, connect_timeout=max(2, int(self._timeout))
                    )
                await self._conn.execute("SELECT 1")
            return True
        except (psycopg.Error, OSError, TimeoutError) as error:
            log.debug("database health check failed: %s", error)
            await self._close()
            return False

    async def pool_lends(self) -> bool:
        """Whether the call pool lends, within the time-out, a connection that answers
        ``SELECT 1``. A connection the outage broke, still idle in the pool, fails here and
        the pool replaces it (at once, no backoff); the next one is tried."""
        if self._pool is None:
            return True
        try:
            async with asyncio.timeout(self._timeout):
                while True:
                    try:
                        async with self._pool.connection(timeout=self._timeout) as conn:
                            await conn.execute("SELECT 1")
                        return True
                    except (PoolTimeout, PoolClosed, TooManyRequests, DatabaseUnreachable):
                        raise  # no connection lent: not a broken one to skip
                    except psycopg.OperationalError as error:
                        log.debug("pooled connection failed, trying the next: %s", error)
        except (psycopg.Error, OSError, TimeoutError) as error:
            log.debug("the pool lends no working connection yet: %s", error)
            return False

    async def _set(self, serving: bool) -> None:
        status = SERVING if serving else NOT_SERVING
        for service in self._services:
            await self._servicer.set(service, status)
        if serving != self.serving:
            if serving:
                log.info("PostgreSQL reachable again: health SERVING")
            else:
                log.error("PostgreSQL unreachable: health NOT_SERVING")
        self.serving = serving

    async def _run(self) -> None:
        while True:
            reached = await self.check()
            ok = reached
            if reached and self._pool is not None:
                self._pool.reconnect_now()
                if not self.serving:
                    ok = await self.pool_lends()
            self.checks += 1
            metrics.DATABASE_UP.set(1 if reached else 0)  # PostgreSQL itself, as documented
            if ok != self.serving:
                await self._set(ok)
            await asyncio.sleep(self._interval)
