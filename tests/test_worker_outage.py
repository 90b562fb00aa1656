"""The workers during a PostgreSQL outage (workers/pool.py): the webhook receiver answers
503 at once and stores the event once PostgreSQL is back, and jobs fail at once instead of
holding their worker for the pool's 30 s. The outage is a TCP proxy in front of the real
PostgreSQL taken down (connections cut, new ones refused) and brought back on its port."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool.base import AttemptWithBackoff
from redis import Redis

from ledger_server.audit import audit_database
from ledger_server.clock import SystemClock
from ledger_server.db import connect as connect_module
from ledger_server.db.connect import with_network_timeouts
from ledger_server.db.migrate import migrate
from ledger_server.db.pool import (
    CALL_RETRY_INTERVAL,
    UNREACHABLE_WAIT,
    DatabaseUnreachable,
)
from ledger_server.server import app as app_module
from support.ledger import new_account
from support.payments import TOLERANCE_SECONDS, PaymentsDb
from support.tcp_proxy import SwitchableProxy
from support.webhooks import SECRET, checkout_pack, post, sign
from workers import db as worker_db
from workers import payments, sweepers
from workers.pool import WorkerPool
from workers.webhook import WebhookReceiver, WebhookServer

# Time enough for an answer while PostgreSQL is down (about UNREACHABLE_WAIT, plus one
# reconnection attempt waiting for its second; a payment job fails twice: its run, then
# recording the failure), far from the pool's 30 s and the receiver's 5 s wait.
FAST = CALL_RETRY_INTERVAL + UNREACHABLE_WAIT + 2.0


@pytest.fixture
def proxy(ledger_db_url: str) -> Iterator[SwitchableProxy]:
    params = conninfo_to_dict(ledger_db_url)
    proxy = SwitchableProxy(str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432))
    try:
        yield proxy
    finally:
        proxy.down()
        worker_db.close()


def _through(url: str, proxy: SwitchableProxy) -> str:
    return make_conninfo(url, host="127.0.0.1", port=str(proxy.port))


def _timed(call: Callable[[], Any]) -> tuple[Any, float]:
    started = time.monotonic()
    return call(), time.monotonic() - started


def _event_id(body: bytes) -> str:
    return str(json.loads(body)["id"])


def _health(url: str) -> int:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=60) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def test_deliveries_during_an_outage_get_503_at_once_and_are_stored_once_it_ends(
    ledger_db_url: str, proxy: SwitchableProxy, monkeypatch: Any
) -> None:
    """The receiver's pool made each delivery wait 30 s for a connection while PostgreSQL
    was down, then answered 500: Stripe had given the delivery up long before, and the
    thread stayed taken (with every thread so taken, deliveries got 503 busy). Now each is
    answered 503 within about a second, not stored; once PostgreSQL answers again the next
    delivery is stored at once (the pool's reconnection backoff is not waited out), and
    Stripe's retries of the others are stored too: nothing lost."""
    monkeypatch.setenv("DATABASE_URL", _through(ledger_db_url, proxy.up()))
    nowhere = Redis.from_url("redis://127.0.0.1:1/0")  # stored, not queued: the sweeper queues
    server = WebhookServer(
        WebhookReceiver(SECRET, TOLERANCE_SECONDS, redis=lambda: nowhere), "127.0.0.1:0"
    ).start()
    payments_db = PaymentsDb(ledger_db_url)
    try:
        before = checkout_pack(new_account("pg-outage"), "pack-any")
        assert post(server.url, before, sign(before))[0] == 200

        proxy.down()
        during = [checkout_pack(new_account("pg-outage"), "pack-any") for _ in range(4)]
        with ThreadPoolExecutor(len(during)) as threads:
            answers = list(
                threads.map(lambda body: _timed(lambda: post(server.url, body, sign(body))), during)
            )
        for (status, answer), took in answers:
            assert (status, answer) == (503, {"error": "database unavailable; retry"})
            assert took < FAST, f"a delivery waited {took:.1f} s"
        health, took = _timed(lambda: _health(server.url))
        assert (health, took < FAST) == (503, True), took
        assert payments_db.count_events([_event_id(body) for body in during]) == 0

        proxy.up()
        (status, _), took = _timed(lambda: post(server.url, during[0], sign(during[0])))
        assert (status, took < FAST) == (200, True), took
        for body in during[1:]:  # Stripe's retries
            assert post(server.url, body, sign(body))[0] == 200
        assert _health(server.url) == 200
        assert payments_db.count_events([_event_id(body) for body in [before, *during]]) == 5
    finally:
        server.stop()
        nowhere.close()


def test_jobs_fail_at_once_while_postgresql_is_down(
    ledger_db_url: str, proxy: SwitchableProxy, monkeypatch: Any
) -> None:
    """A work horse opens a pool for its job: opening it waited 30 s for PostgreSQL, and a
    payment job's failure then waited 30 s more to be recorded, a minute of the worker per
    attempt; each sweep the scheduler queues every minute held a worker 30 s. Now each job
    fails within about a second (RQ retries it; the sweepers run again at their next tick),
    and runs as soon as PostgreSQL answers again."""
    monkeypatch.setenv("DATABASE_URL", _through(ledger_db_url, proxy))  # never up: refused
    jobs: list[Callable[[], Any]] = [
        lambda: payments.process_event("evt_pg_outage"),
        sweepers.sweep_due_accounts,
        sweepers.requeue_pending_alert_emails,
        payments.requeue_stalled_payment_events,
        sweepers.prune_checkout_stripe_attempts,
    ]
    for job in jobs:
        worker_db.close()  # each job in a horse of its own, with a new pool
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            job()
        took = time.monotonic() - started
        assert took < FAST, f"{job} took {took:.1f} s to fail"

    proxy.up()
    worker_db.close()
    assert payments.process_event("evt_pg_outage") == "done"  # not stored: nothing to do


def test_a_busy_pool_still_waits_and_an_emptied_one_fails_fast_until_postgresql_is_back(
    ledger_db_url: str, proxy: SwitchableProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a pool that holds no open connection and failed to connect fails fast: one
    whose connections are all lent (PostgreSQL answering) makes a caller wait for one, even
    while it cannot grow; when the lent one is lost too, the caller waiting fails at once.
    Once PostgreSQL answers again, a caller gets a connection at once, though psycopg_pool's
    next reconnection attempt is far off (its backoff reaches minutes in a long outage; made
    so here from the first failure)."""
    monkeypatch.setattr(AttemptWithBackoff, "INITIAL_DELAY", 60.0)
    pool = WorkerPool(
        _through(ledger_db_url, proxy.up()),
        min_size=1,
        max_size=2,
        configure=worker_db._configure,
        open=False,
    )
    pool.open(wait=True, timeout=10)
    try:
        held = pool.getconn()
        proxy.down()  # the lent connection is cut, unknown to the pool until used
        with ThreadPoolExecutor(1) as thread:
            waiting = thread.submit(pool.getconn, 30)
            time.sleep(UNREACHABLE_WAIT + 0.3)
            assert not waiting.done()  # a connection is lent: it may come back
            with pytest.raises(psycopg.OperationalError):
                held.execute("SELECT 1")
            started = time.monotonic()
            pool.putconn(held)  # broken: the pool has no open connection left
            with pytest.raises(DatabaseUnreachable):
                waiting.result(timeout=10)
            assert time.monotonic() - started < FAST
        with pytest.raises(DatabaseUnreachable):
            pool.getconn(30)

        proxy.up()
        started = time.monotonic()
        with pool.connection(30) as conn:
            conn.execute("SELECT 1")
        assert time.monotonic() - started < FAST
    finally:
        pool.close()


def test_a_postgresql_that_never_answers_fails_the_attempt_after_the_connect_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Behind a network that drops packets (here: a listener that accepts and never
    answers), a connection attempt waited for the operating system's TCP time-out, so the
    pool never saw it fail and each job waited out the pool's 30 s. An attempt now gives up
    after a connect_timeout (DEFAULT_CONNECT_TIMEOUT_SECONDS unless the URL or
    PGCONNECT_TIMEOUT names one), and the pool then fails fast."""
    monkeypatch.setattr(connect_module, "DEFAULT_CONNECT_TIMEOUT_SECONDS", 1)
    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel accepts; nothing ever answers
        port = silent.getsockname()[1]
        url = f"postgresql://postgres@127.0.0.1:{port}/ledger"
        monkeypatch.setenv("DATABASE_URL", url)
        worker_db.close()
        try:
            started = time.monotonic()
            with pytest.raises(psycopg.OperationalError), worker_db.connection():
                pass
            took = time.monotonic() - started
            assert took < 1 + FAST, f"the first connection took {took:.1f} s to fail"
        finally:
            worker_db.close()
        # The connections of their own: a server's start (migrating, writing its settings,
        # even with LEDGER_MIGRATE_ON_START=false), a worker's start and the audit waited
        # psycopg's own 130 s (helper-150's review), the server deaf to SIGTERM meanwhile.
        starts: dict[str, Callable[[], object]] = {
            "migrate": lambda: migrate(url),
            "settings": lambda: app_module._write_settings(url, {}, SystemClock()),
            "worker start": worker_db.init,
            "audit": lambda: audit_database(url),
        }
        for name, start in starts.items():
            started = time.monotonic()
            with pytest.raises(psycopg.OperationalError):
                start()
            took = time.monotonic() - started
            assert took < 3, f"{name} took {took:.1f} s to fail"
    assert "connect_timeout=1" in with_network_timeouts(url)
    given = conninfo_to_dict(with_network_timeouts(url + "?connect_timeout=3"))
    assert given["connect_timeout"] == "3"
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "3")
    assert "connect_timeout" not in conninfo_to_dict(with_network_timeouts(url))
