"""Fixtures of the payment tests: the webhook receiver on the test database, a Redis
database of their own, and reading the payment_events table."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool
from redis import Redis

from support.ledger import CREDIT, new_account
from support.rq_workers import redis_db_url, run_burst_workers
from support.sources import Sources
from support.webhooks import SECRET, checkout_pack, deliver
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


@pytest.fixture
def sources(stub: Any, admin: Any, billing: Any) -> Sources:
    return Sources(stub, admin, billing)


@pytest.fixture
def apply_events(
    webhook_url: str, ledger_db_url: str, payments_redis_url: str
) -> Callable[..., list[str]]:
    """Delivers signed events and runs a burst worker; returns their event ids."""

    def apply(*bodies: bytes) -> list[str]:
        for body in bodies:
            assert deliver(webhook_url, body) == 200
        run_burst_workers(ledger_db_url, payments_redis_url)
        return [str(json.loads(body)["id"]) for body in bodies]

    return apply


def bought_pack(
    apply_events: Callable[..., list[str]],
    sources: Sources,
    configure: Any,
    name: str,
    price_minor: int,
) -> tuple[str, str]:
    """A new account that bought a pack of 100 credits at price_minor through a checkout:
    the account and the payment intent that paid it."""
    configure("purchase.allow_free_users", True)
    pack = sources.create_pack(100 * CREDIT, price_minor=price_minor)
    account, intent = new_account(name), f"pi_{uuid.uuid4().hex}"
    apply_events(
        checkout_pack(account, pack.pack_id, payment_intent=intent, amount_total=price_minor)
    )
    return account, intent


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
