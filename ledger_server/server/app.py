"""Builds and runs the gRPC server: ledger services behind the error boundary,
the standard health service and server reflection (so buf curl and grpcurl work
with no proto files at hand)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from psycopg_pool import AsyncConnectionPool

from ledger.v1 import ledger_service_pb2, ledger_service_pb2_grpc
from ledger_server.clock import Clock, SystemClock
from ledger_server.config import Settings
from ledger_server.db.migrate import migrate
from ledger_server.db.pool import open_pool
from ledger_server.server.error_boundary import ErrorBoundary
from ledger_server.server.ledger_service import LedgerService

log = logging.getLogger(__name__)

LEDGER_SERVICE = ledger_service_pb2.DESCRIPTOR.services_by_name["LedgerService"].full_name
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    pool: AsyncConnectionPool
    health: health.aio.HealthServicer


@asynccontextmanager
async def running_server(
    settings: Settings, clock: Clock | None = None, address: str | None = None
) -> AsyncIterator[RunningServer]:
    """Migrates (when configured), opens the pool, serves; stops cleanly on exit."""
    if settings.migrate_on_start:
        applied = await asyncio.to_thread(migrate, settings.database_url)
        for name in applied:
            log.info("migrated: %s", name)
    pool = await open_pool(
        settings.database_url, settings.db_pool_min_size, settings.db_pool_max_size
    )
    server = grpc.aio.server(
        interceptors=[ErrorBoundary()],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    ledger_service_pb2_grpc.add_LedgerServiceServicer_to_server(
        LedgerService(pool, clock or SystemClock(), settings), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (LEDGER_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(address or settings.grpc_addr)
    if port == 0:
        await pool.close()
        raise RuntimeError(f"could not listen on {address or settings.grpc_addr}")
    await server.start()
    for service in ("", LEDGER_SERVICE):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    try:
        yield RunningServer(server, port, pool, health_servicer)
    finally:
        await health_servicer.enter_graceful_shutdown()
        await server.stop(settings.shutdown_grace.total_seconds())
        await pool.close()
