"""Health that follows PostgreSQL: a background task runs ``SELECT 1`` (with a short
time-out) every few seconds on a connection of its own, and sets the standard health
service, the overall status ("") and each service, to NOT_SERVING while PostgreSQL cannot
be reached, back to SERVING when it answers again. Its own connection, not one of the
pool's, so a pool busy with calls is not mistaken for a database that is down."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import psycopg
from grpc_health.v1 import health, health_pb2

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
    ) -> None:
        self._url = database_url
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
            ok = await self.check()
            self.checks += 1
            metrics.DATABASE_UP.set(1 if ok else 0)
            if ok != self.serving:
                await self._set(ok)
            await asyncio.sleep(self._interval)
