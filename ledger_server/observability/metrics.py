"""Prometheus metrics of the ledger, served at ``/metrics`` on ``LEDGER_METRICS_ADDR``.

- ``ledger_rpc_requests_total`` / ``ledger_rpc_duration_seconds``: every unary RPC by
  service, method and final status code (observability/rpc.py sees the code an abort set);
- ``ledger_db_pool_*``: the psycopg pool's size, idle connections and waiting requests;
- ``ledger_queue_jobs`` / ``ledger_queue_failed_jobs``: RQ jobs waiting and jobs in the
  failed registry, per queue (read from Redis at scrape time, cached a few seconds);
- ``ledger_job_failures_total``: failed job runs counted by the workers' failure path
  (a Redis hash, so work horses that die after counting still count);
- ``ledger_credits_granted_micros_total`` / ``ledger_credits_consumed_micros_total``: by
  credit source, from the responses of the ledger functions this server ran (replays are
  not counted);
- ``ledger_worker_credits_granted_micros_total``: by credit source, what the payment workers
  granted (purchases, recharges, subscription periods), counted by them in a Redis hash once
  each event's transaction committed; every server reports the same figure, so aggregate it
  with max, not sum;
- ``ledger_group_commit_calls_per_transaction`` / ``ledger_group_commit_extra_lanes_total``:
  how many charging calls each group-commit transaction carried (1: a call run alone) and how
  many transactions started beside one still in flight (server/group_commit.py);
- ``ledger_balance_calls_per_read``: how many Balance calls each read answered together (1:
  a call read alone; server/balance_reads.py);
- ``ledger_database_up``: the last health check of PostgreSQL (1 reachable, 0 not).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from psycopg_pool import AsyncConnectionPool
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.registry import FailedJobRegistry

from workers.queues import QUEUES as RQ_QUEUES

log = logging.getLogger(__name__)

# Redis hash the workers count failed job runs in: field "<queue>|<function>".
JOB_FAILURES_KEY = "ledger:metrics:job_failures"
# Redis hash the payment workers count the credits they granted in: field = credit source.
WORKER_CREDITS_KEY = "ledger:metrics:worker_credits_granted"

RPC_REQUESTS = Counter(
    "ledger_rpc_requests",
    "gRPC calls handled, by service, method and final status code",
    ["service", "method", "code"],
)
RPC_DURATION = Histogram(
    "ledger_rpc_duration_seconds",
    "gRPC call latency in the server, by service, method and final status code",
    ["service", "method", "code"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
CREDITS_GRANTED = Counter(
    "ledger_credits_granted_micros",
    "Credits granted (new lots), in micro-credits, by credit source",
    ["source"],
)
CREDITS_CONSUMED = Counter(
    "ledger_credits_consumed_micros",
    "Credits charged (commits and consumes), in micro-credits, by the source of the lots",
    ["source"],
)
GROUP_COMMIT_CALLS = Histogram(
    "ledger_group_commit_calls_per_transaction",
    "Consume, Reserve, Commit, Release and Refund calls per group-commit transaction; "
    "1: a call alone",
    buckets=(1, 2, 4, 8, 16, 32),
)
GROUP_COMMIT_EXTRA_LANES = Counter(
    "ledger_group_commit_extra_lanes",
    "Group-commit transactions started while another was in flight: a lane opened because the "
    "one before had run LEDGER_GROUP_COMMIT_OPEN_LANE_AFTER_MS",
)
BALANCE_READ_CALLS = Histogram(
    "ledger_balance_calls_per_read",
    "Balance calls answered by one read of the balances; 1: a call read alone",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
DATABASE_UP = Gauge("ledger_database_up", "1 when the last health check reached PostgreSQL, else 0")

# Ledger functions whose response's "lot" is a transfer between lots, not new credits.
_NOT_GRANTS = frozenset({"transfer_reward"})
# The response fields that hold a new lot (a recharge's bonus is a lot of its own).
_GRANTED_LOTS = ("lot", "signup_lot", "bonus_lot")
_CHARGES = frozenset({"commit", "consume"})


def split_method(full_method: str) -> tuple[str, str]:
    """ "/ledger.v1.LedgerService/Consume" -> ("ledger.v1.LedgerService", "Consume")."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service or "unknown", method or "unknown"


# (method, code) -> its counter and histogram: labels() hashes and locks on every lookup.
_RPC_CHILDREN: dict[tuple[str, str], tuple[Any, Any]] = {}


def observe_rpc(full_method: str, code: str, seconds: float) -> None:
    children = _RPC_CHILDREN.get((full_method, code))
    if children is None:
        service, method = split_method(full_method)
        children = (
            RPC_REQUESTS.labels(service, method, code),
            RPC_DURATION.labels(service, method, code),
        )
        _RPC_CHILDREN[(full_method, code)] = children
    children[0].inc()
    children[1].observe(seconds)


Credits = dict[str, int]  # credit source -> micro-credits


def _add_lot(lot: Any, granted: Credits) -> None:
    if isinstance(lot, Mapping) and lot.get("source") and int(lot.get("amount_micros") or 0) > 0:
        source = str(lot["source"])
        granted[source] = granted.get(source, 0) + int(lot["amount_micros"])


def credits_in_result(name: str, data: Mapping[str, Any]) -> tuple[Credits, Credits]:
    """The credits a ledger function's (non-replayed) response granted and charged, by
    source. A shape we do not know counts nothing: metrics are not the ledger's business."""
    granted: Credits = {}
    consumed: Credits = {}
    if data.get("replayed"):
        return granted, consumed
    try:
        if name not in _NOT_GRANTS:
            for field in _GRANTED_LOTS:
                _add_lot(data.get(field), granted)
        if name in _CHARGES:
            reservation = data.get("reservation")
            lots = reservation.get("lots", ()) if isinstance(reservation, Mapping) else ()
            for item in lots:
                committed = int(item.get("committed_micros") or 0)
                if committed > 0:
                    source = str(item.get("source") or "unknown")
                    consumed[source] = consumed.get(source, 0) + committed
    except (TypeError, ValueError, AttributeError):
        log.debug("could not count credits of %s", name, exc_info=True)
        return {}, {}
    return granted, consumed


def observe_ledger_result(name: str, data: Mapping[str, Any]) -> None:
    """Counts the credits a ledger function run by this server granted or charged."""
    granted, consumed = credits_in_result(name, data)
    for source, micros in granted.items():
        CREDITS_GRANTED.labels(source).inc(micros)
    for source, micros in consumed.items():
        CREDITS_CONSUMED.labels(source).inc(micros)


# --- the connection pool -------------------------------------------------------------------


class PoolCollector(Collector):
    """Reports the pools attached to it (the server's one; tests may run several)."""

    def __init__(self) -> None:
        self._pools: weakref.WeakSet[AsyncConnectionPool] = weakref.WeakSet()

    def attach(self, pool: AsyncConnectionPool) -> None:
        self._pools.add(pool)

    def detach(self, pool: AsyncConnectionPool) -> None:
        self._pools.discard(pool)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        totals = {"size": 0, "available": 0, "max": 0, "waiting": 0}
        for pool in list(self._pools):
            stats = pool.get_stats()
            totals["size"] += stats.get("pool_size", 0)
            totals["available"] += stats.get("pool_available", 0)
            totals["max"] += stats.get("pool_max", 0)
            totals["waiting"] += stats.get("requests_waiting", 0)
        connections = GaugeMetricFamily(
            "ledger_db_pool_connections",
            "Connections of the PostgreSQL pool: open (size), idle (available), allowed (max)",
            labels=["state"],
        )
        for state in ("size", "available", "max"):
            connections.add_metric([state], totals[state])
        yield connections
        yield GaugeMetricFamily(
            "ledger_db_pool_requests_waiting",
            "Calls waiting for a connection from the pool",
            value=totals["waiting"],
        )


POOL = PoolCollector()
REGISTRY.register(POOL)


# --- RQ queues in Redis ---------------------------------------------------------------------


class QueueCollector(Collector):
    """Jobs waiting and failed per RQ queue, and the workers' failure counts. Reads Redis
    with a short time-out at most every ``cache_seconds``; an unreachable Redis gives
    ``ledger_redis_up 0`` and no queue figures, never a slow or failed scrape."""

    def __init__(self, queues: Iterable[str], cache_seconds: float = 5.0) -> None:
        self._queues = tuple(queues)
        self._cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._redis: Redis | None = None
        self._read_at = float("-inf")
        self._cached: list[GaugeMetricFamily | CounterMetricFamily] = []

    def attach(self, redis_url: str) -> None:
        """Reads the queues of the Redis at ``redis_url`` from now on."""
        client = Redis.from_url(redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
        with self._lock:
            old, self._redis = self._redis, client
            self._read_at = float("-inf")
        if old is not None:
            old.close()

    def detach(self) -> None:
        with self._lock:
            old, self._redis = self._redis, None
            self._cached = []
        if old is not None:
            old.close()

    def _read(self, redis: Redis) -> list[GaugeMetricFamily | CounterMetricFamily]:
        up = GaugeMetricFamily("ledger_redis_up", "1 when Redis answered the last scrape")
        try:
            pipe = redis.pipeline(transaction=False)
            for name in self._queues:
                pipe.llen(Queue(name, connection=redis).key)
                pipe.zcard(FailedJobRegistry(name, connection=redis).key)
            pipe.hgetall(JOB_FAILURES_KEY)
            pipe.hgetall(WORKER_CREDITS_KEY)
            results = pipe.execute()
        except (RedisError, OSError) as error:
            log.debug("queue metrics: Redis unreachable: %s", error)
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        waiting = GaugeMetricFamily(
            "ledger_queue_jobs", "RQ jobs waiting in the queue", labels=["queue"]
        )
        failed = GaugeMetricFamily(
            "ledger_queue_failed_jobs", "RQ jobs in the queue's failed registry", labels=["queue"]
        )
        for index, name in enumerate(self._queues):
            waiting.add_metric([name], int(results[2 * index]))
            failed.add_metric([name], int(results[2 * index + 1]))
        failures = CounterMetricFamily(
            "ledger_job_failures",
            "Failed job runs (each failed attempt, retried or not), by queue and job",
            labels=["queue", "job"],
        )
        for field, count in sorted(results[-2].items()):
            queue, _, job = field.decode(errors="replace").partition("|")
            failures.add_metric([queue, job], int(count))
        worker_credits = CounterMetricFamily(
            "ledger_worker_credits_granted_micros",
            "Credits the payment workers granted, in micro-credits, by credit source (the same"
            " figure on every server: aggregate with max)",
            labels=["source"],
        )
        for field, micros in sorted(results[-1].items()):
            worker_credits.add_metric([field.decode(errors="replace")], int(micros))
        return [up, waiting, failed, failures, worker_credits]

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        with self._lock:
            now = time.monotonic()
            if self._redis is None:
                return
            if now - self._read_at >= self._cache_seconds:
                self._cached = self._read(self._redis)
                self._read_at = now
            cached = list(self._cached)
        yield from cached


# --- the HTTP endpoint ----------------------------------------------------------------------


class MetricsEndpoint:
    """``/metrics`` over HTTP in a background thread; ``port`` is the one bound."""

    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self._server, self._thread = start_http_server(int(port), addr=host.strip("[]") or "")
        self.host = host
        self.port: int = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(address: str) -> MetricsEndpoint | None:
    """Serves /metrics on ``address`` (host:port; port 0 picks one). Empty: not served.
    A port that cannot be bound is logged, not fatal: the ledger runs without metrics."""
    if not address:
        return None
    try:
        endpoint = MetricsEndpoint(address)
    except (OSError, ValueError) as error:
        log.error("metrics not served on %s: %s", address, error)
        return None
    log.info(
        "metrics on http://%s:%d/metrics", endpoint.host, endpoint.port,
        extra={"metrics_port": endpoint.port},
    )  # fmt: skip
    return endpoint


QUEUES = QueueCollector(RQ_QUEUES)
REGISTRY.register(QUEUES)
