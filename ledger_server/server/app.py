"""Builds and runs the gRPC server: the ledger services, the standard health service and
server reflection (so buf curl and grpcurl work with no proto files at hand), each method
registered through the pipeline (server/pipeline.py: observability, authentication, rate
limit and deadline, error boundary), composed once at start-up."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from psycopg_pool import AsyncConnectionPool

from ledger.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    billing_service_pb2,
    billing_service_pb2_grpc,
    ledger_service_pb2,
    ledger_service_pb2_grpc,
    report_service_pb2,
    report_service_pb2_grpc,
)
from ledger_server import runtime_settings
from ledger_server.clock import Clock, SystemClock
from ledger_server.config import Settings
from ledger_server.db import waits
from ledger_server.db.connect import connect
from ledger_server.db.migrate import migrate
from ledger_server.db.pool import open_pool
from ledger_server.db.queries import query
from ledger_server.db.session_limits import SET_SESSION_LIMITS
from ledger_server.observability.runtime import start_observability
from ledger_server.server import hardening
from ledger_server.server.admin_service import AdminService
from ledger_server.server.alert_emails import AlertEmails
from ledger_server.server.billing_service import BillingService
from ledger_server.server.ledger_service import LedgerService
from ledger_server.server.limits import RateLimiter
from ledger_server.server.pipeline import ComposingServer, Pipeline
from ledger_server.server.report_service import ReportService

log = logging.getLogger(__name__)

SERVICES = (
    ledger_service_pb2.DESCRIPTOR.services_by_name["LedgerService"].full_name,
    billing_service_pb2.DESCRIPTOR.services_by_name["BillingService"].full_name,
    admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
    report_service_pb2.DESCRIPTOR.services_by_name["ReportService"].full_name,
)


def _write_settings(database_url: str, defaults: Mapping[str, Any], clock: Clock) -> None:
    explicit = runtime_settings.set_in_environment()
    with connect(database_url, autocommit=True) as conn:
        conn.execute(SET_SESSION_LIMITS)
        runtime_settings.check_with_database(conn, defaults, explicit)
        row = conn.execute(query("hold_grace")).fetchone()
        assert row is not None
        waits.check_hold_grace(row[0])
        runtime_settings.write_environment_defaults(conn, defaults, explicit, clock.now())


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    pool: AsyncConnectionPool
    health: health.aio.HealthServicer
    metrics_port: int | None = None


@asynccontextmanager
async def running_server(
    settings: Settings, clock: Clock | None = None, address: str | None = None
) -> AsyncIterator[RunningServer]:
    """Migrates (when configured), opens the pool, serves; stops cleanly on exit."""
    clock = clock or SystemClock()
    listen_address = address or settings.grpc_addr
    credentials = hardening.startup_checks(settings, listen_address)  # security, before anything
    setting_defaults = runtime_settings.environment_defaults()
    if settings.migrate_on_start:
        applied = await asyncio.to_thread(migrate, settings.database_url)
        for name in applied:
            log.info("migrated: %s", name)
    await asyncio.to_thread(_write_settings, settings.database_url, setting_defaults, clock)
    pool = await open_pool(
        settings.database_url,
        settings.db_pool_min_size,
        settings.db_pool_max_size,
        settings.statement_timeout_ms,
    )
    # Every service registers with the ComposingServer, which serves each method through the
    # pipeline, composed here once per method (no interceptors: they would run on every call).
    server = ComposingServer(
        grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
            ],
        ),
        Pipeline(
            settings.callers,
            RateLimiter(settings.rate_limit_per_second, settings.rate_limit_burst),
        ),
    )
    alert_emails = AlertEmails(settings.redis_url)
    ledger_service_pb2_grpc.add_LedgerServiceServicer_to_server(
        LedgerService(pool, clock, settings, alert_emails), server
    )
    billing = BillingService(pool, clock, settings.stripe)
    billing_service_pb2_grpc.add_BillingServiceServicer_to_server(billing, server)
    admin_service_pb2_grpc.add_AdminServiceServicer_to_server(
        AdminService(pool, clock, setting_defaults, alert_emails), server
    )
    report_service_pb2_grpc.add_ReportServiceServicer_to_server(
        ReportService(pool, clock, settings.max_message_bytes), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    if credentials is None:
        port = server.add_insecure_port(listen_address)
    else:
        port = server.add_secure_port(listen_address, credentials)
    if port == 0:
        await pool.close()
        raise RuntimeError(f"could not listen on {listen_address}")
    await server.start()
    for service in ("", *SERVICES):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    observability = start_observability(settings, pool, health_servicer, ("", *SERVICES))
    try:
        yield RunningServer(server, port, pool, health_servicer, observability.metrics_port)
    finally:
        await health_servicer.enter_graceful_shutdown()
        await server.stop(settings.shutdown_grace.total_seconds())
        billing.close()
        alert_emails.close()
        await observability.close()
        await pool.close()
