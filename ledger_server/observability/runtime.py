"""What the server starts for observability once it serves, and stops on the way out:
the database health task, the pool and queue collectors, the /metrics endpoint."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from grpc_health.v1 import health

from ledger_server.config import Settings
from ledger_server.db.pool import LedgerPool
from ledger_server.observability import metrics
from ledger_server.observability.health import DatabaseHealth


@dataclass
class Observability:
    health: DatabaseHealth
    pool: LedgerPool
    endpoint: metrics.MetricsEndpoint | None
    redis_attached: bool

    @property
    def metrics_port(self) -> int | None:
        return self.endpoint.port if self.endpoint is not None else None

    async def close(self) -> None:
        await self.health.stop()
        if self.endpoint is not None:
            self.endpoint.close()
        metrics.POOL.detach(self.pool)
        if self.redis_attached:
            metrics.QUEUES.detach()


def start_observability(
    settings: Settings,
    pool: LedgerPool,
    servicer: health.aio.HealthServicer,
    services: Sequence[str],
) -> Observability:
    """Call from the running event loop, after the health statuses are first set."""
    database_health = DatabaseHealth(
        settings.database_url,
        servicer,
        services,
        settings.health_check_interval.total_seconds(),
        pool=pool,
    )
    database_health.start()
    metrics.POOL.attach(pool)
    if settings.redis_url:
        metrics.QUEUES.attach(settings.redis_url)
    endpoint = metrics.serve_metrics(settings.metrics_addr)
    return Observability(database_health, pool, endpoint, bool(settings.redis_url))
