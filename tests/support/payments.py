"""Fixtures of the payment tests: the webhook receiver on the test database, a Redis
database of their own, and reading the payment_events table."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool
from redis import Redis

from support.rq_workers import redis_db_url
from support.webhooks import SECRET
from workers.webhook import WebhookReceiver, WebhookServer

PAYMENTS_REDIS_DB = 7
TOLERANCE_SECONDS = 300


def _autocommit(conn: psycopg.Connection[TupleRow]) -> None:
    conn.autocommit = True


@pytest.fixture(scope="session")
def payments_redis_url(redis_url: str) -> str:
    """A Redis database of the payment tests alone (they flush it)."""
    url = redis_db_url(redis_url, PAYMENTS_REDIS_DB)
    client = Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()
    return url


@pytest.fixture(scope="session")
def webhook_url(ledger_db_url: str, payments_redis_url: str) -> Iterator[str]:
    """The webhook receiver (workers.webhook) serving on an ephemeral port."""
    pool: ConnectionPool[psycopg.Connection[TupleRow]] = ConnectionPool(
        ledger_db_url, min_size=2, max_size=16, configure=_autocommit, open=True
    )
    client = Redis.from_url(payments_redis_url)
    receiver = WebhookReceiver(
        SECRET, TOLERANCE_SECONDS, connect=pool.connection, redis=lambda: client
    )
    server = WebhookServer(receiver, "127.0.0.1:0").start()
    try:
        yield server.url
    finally:
        server.stop()
        client.close()
        pool.close()


class PaymentsDb:
    def __init__(self, url: str) -> None:
        self.url = url

    def rows(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            return conn.execute(sql.encode(), params).fetchall()

    def event(self, event_id: str) -> dict[str, Any] | None:
        rows = self.rows(
            "SELECT status, attempts, credits_micros, last_error, account_id, idempotency_key "
            "FROM payment_events WHERE event_id = %s",
            (event_id,),
        )
        if not rows:
            return None
        keys = ("status", "attempts", "credits_micros", "last_error", "account_id", "key")
        return dict(zip(keys, rows[0], strict=True))

    def count_events(self, event_ids: list[str]) -> int:
        return int(
            self.rows("SELECT count(*) FROM payment_events WHERE event_id = ANY(%s)", (event_ids,))[
                0
            ][0]
        )


@pytest.fixture(scope="session")
def payments_db(ledger_db_url: str) -> PaymentsDb:
    return PaymentsDb(ledger_db_url)
