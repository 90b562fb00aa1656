"""Stripe webhooks end to end (issue 5, must-shows 1-3): signed events posted to the real
receiver, stored in PostgreSQL, queued in a real Redis and applied by real `rq worker`s."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from redis import Redis

from ledger_server.config import StripeSettings
from ledger_server.observability.metrics import WORKER_CREDITS_KEY, QueueCollector
from support import payments as payment_fixtures
from support.ledger import CREDIT, Ledger, new_account
from support.payments import TOLERANCE_SECONDS, PaymentsDb
from support.rq_workers import run_burst_workers, run_sweeper, start_worker
from support.sources import Sources
from support.webhooks import (
    SECRET,
    charge_refunded,
    checkout_pack,
    deliver,
    invoice_paid,
    post,
    sign,
)
from workers import payments
from workers.db import connection as payment_db_connection
from workers.settings import WebhookLimits
from workers.webhook import MAX_BODY_BYTES, WebhookReceiver, WebhookServer

AuditCheck = Callable[[], None]

# The shared fixtures of the payment tests (tests/support/payments.py).
payments_db = payment_fixtures.payments_db
payments_redis_url = payment_fixtures.payments_redis_url
webhook_url = payment_fixtures.webhook_url


@pytest.fixture
def sources(stub: Any, admin: Any, billing: Any) -> Sources:
    return Sources(stub, admin, billing)


def _event_id(body: bytes) -> str:
    return str(json.loads(body)["id"])


def _queued(redis_url: str) -> list[str]:
    """The job ids waiting in the payments queue."""
    return [i.decode() for i in Redis.from_url(redis_url).lrange("rq:queue:payments", 0, -1)]


def _stored_not_queued(webhook_url: str, redis_url: str, body: bytes) -> str:
    """Delivers the event (stored) and takes its job off the queue: a test runs it."""
    assert deliver(webhook_url, body) == 200
    Redis.from_url(redis_url).lrem("rq:queue:payments", 0, _event_id(body))
    return _event_id(body)


def _attempts_spent(
    payments_db: PaymentsDb, event_id: str, minutes_ago: int, status: str = "failed"
) -> None:
    """As after RQ's last attempt of the event: all spent, the last one minutes_ago."""
    payments_db.rows(
        "UPDATE payment_events SET status = %s, attempts = %s,"
        " last_attempt_at = now() - make_interval(mins => %s)"
        " WHERE event_id = %s RETURNING event_id",
        (status, payments.MAX_ATTEMPTS, minutes_ago, event_id),
    )


def _wait_for(condition: Callable[[], Any], what: str, limit: float = 60.0) -> Any:
    """Polls until condition() is truthy (a readiness wait, not a timing assertion)."""
    deadline = time.monotonic() + limit
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


# --- must-show 1 ---------------------------------------------------------------------------------


def test_a_thousand_checkout_events_delivered_one_to_three_times_grant_exactly_once(
    webhook_url: str,
    payments_redis_url: str,
    ledger_db_url: str,
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    configure: Any,
    assert_audit_clean: AuditCheck,
) -> None:
    configure("purchase.allow_free_users", True)
    packs = [sources.create_pack(credits * CREDIT) for credits in (5, 10, 25, 40)]
    accounts = [new_account("buyer") for _ in range(40)]
    rng = random.Random(20260521)
    bodies: list[bytes] = []
    expected: dict[str, int] = defaultdict(int)
    for _ in range(1000):
        account, pack = rng.choice(accounts), rng.choice(packs)
        bodies.append(checkout_pack(account, pack.pack_id))
        expected[account] += pack.credits_micros

    # Each event 1 to 3 times, shuffled; for a tenth of them two copies side by side, so
    # concurrent senders deliver them within milliseconds of each other.
    copies = {body: rng.randint(1, 3) for body in bodies}
    deliveries = [body for body, n in copies.items() for _ in range(n)]
    rng.shuffle(deliveries)
    for body in rng.sample(bodies, 100):
        if copies[body] < 3:
            deliveries.insert(deliveries.index(body), body)
            copies[body] += 1
    assert len(deliveries) == sum(copies.values())

    redis = Redis.from_url(payments_redis_url)
    counted_before = int(redis.hget(WORKER_CREDITS_KEY, "purchase") or 0)
    with ThreadPoolExecutor(max_workers=24) as senders:
        statuses = list(senders.map(lambda b: deliver(webhook_url, b), deliveries))
    assert set(statuses) == {200}
    ids = [_event_id(b) for b in bodies]
    assert payments_db.count_events(ids) == 1000
    # Queued once each, duplicates not queued again.
    assert Redis.from_url(payments_redis_url).llen("rq:queue:payments") == 1000

    run_burst_workers(ledger_db_url, payments_redis_url, count=4)

    for account in accounts:
        assert ledger.balance(account).balance_micros == expected[account], account
    rows = payments_db.rows(
        "SELECT status, count(*), sum(credits_micros) FROM payment_events "
        "WHERE event_id = ANY(%s) GROUP BY status",
        (ids,),
    )
    assert rows == [("processed", 1000, sum(expected.values()))]
    purchases = payments_db.rows(
        "SELECT count(*), count(DISTINCT external_ref) FROM purchases WHERE account_id = ANY(%s)",
        (accounts,),
    )
    assert purchases == [(1000, 1000)]
    assert_audit_clean()

    # The workers counted each event's credits once, after its commit, and a server's
    # /metrics reports that count (every server reads the same Redis hash).
    counted = int(redis.hget(WORKER_CREDITS_KEY, "purchase") or 0) - counted_before
    assert counted == sum(expected.values())
    collector = QueueCollector(["payments"], cache_seconds=0)
    collector.attach(payments_redis_url)
    try:
        exported = {
            sample.labels["source"]: sample.value
            for family in collector.collect()
            if family.name == "ledger_worker_credits_granted_micros"
            for sample in family.samples
            if sample.name.endswith("_total")
        }
    finally:
        collector.detach()
    assert exported["purchase"] == counted_before + counted


# --- must-show 2 ---------------------------------------------------------------------------------


def test_a_worker_killed_in_the_middle_of_a_payment_job_applies_it_exactly_once(
    webhook_url: str,
    payments_redis_url: str,
    ledger_db_url: str,
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    configure: Any,
    assert_audit_clean: AuditCheck,
) -> None:
    configure("purchase.allow_free_users", True)
    pack = sources.create_pack(7 * CREDIT)
    account = new_account("killed")
    ledger.grant(account, micros=1 * CREDIT)
    body = checkout_pack(account, pack.pack_id)
    event_id = _event_id(body)
    assert deliver(webhook_url, body) == 200

    # The test holds the account row, so the job blocks inside its transaction (after
    # locking the event row, inside ledger_purchase_pack); then its worker is killed.
    with psycopg.connect(ledger_db_url) as locker:
        locker.execute(b"SELECT 1 FROM accounts WHERE account_id = %s FOR UPDATE", (account,))
        locker_pid = locker.info.backend_pid
        # A worker that runs jobs in its own process: RQ's forking worker puts its work horse
        # in a session of its own (setsid), out of reach of a process-group kill.
        worker = start_worker(ledger_db_url, payments_redis_url, simple=True)
        blocked_pid = _wait_for(
            lambda: next(
                iter(
                    payments_db.rows(
                        "SELECT pid FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
                        (locker_pid,),
                    )
                ),
                None,
            ),
            "the payment job to block on the account",
        )[0]
        assert payments_db.event(event_id)["status"] == "processing"  # type: ignore[index]
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        locker.rollback()
    # The dead job's session finds its client gone and rolls back.
    _wait_for(
        lambda: (
            not payments_db.rows("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (blocked_pid,))
        ),
        "the killed job's database session to end",
    )
    assert ledger.balance(account).balance_micros == 1 * CREDIT  # nothing applied
    event = payments_db.event(event_id)
    assert event is not None and (event["status"], event["attempts"]) == ("processing", 1)

    # The sweeper finds the event unfinished and its job dead, and queues it again. (It
    # counts every unfinished event of the shared test database, other tests' too.)
    assert run_sweeper(ledger_db_url, payments_redis_url) >= 1
    assert _queued(payments_redis_url).count(event_id) == 1
    run_burst_workers(ledger_db_url, payments_redis_url)

    assert ledger.balance(account).balance_micros == 8 * CREDIT
    event = payments_db.event(event_id)
    assert event is not None
    assert (event["status"], event["attempts"], event["credits_micros"]) == (
        "processed",
        2,
        7 * CREDIT,
    )
    # Sweeping and working again changes nothing.
    run_sweeper(ledger_db_url, payments_redis_url)
    assert event_id not in _queued(payments_redis_url)
    run_burst_workers(ledger_db_url, payments_redis_url)
    assert ledger.balance(account).balance_micros == 8 * CREDIT
    assert_audit_clean()


def test_events_queued_in_a_flushed_redis_are_requeued_from_postgres_and_applied_once(
    webhook_url: str,
    payments_redis_url: str,
    ledger_db_url: str,
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    configure: Any,
    assert_audit_clean: AuditCheck,
) -> None:
    configure("purchase.allow_free_users", True)
    pack = sources.create_pack(3 * CREDIT)
    accounts = [new_account("flushed") for _ in range(5)]
    early = [checkout_pack(a, pack.pack_id) for a in accounts]  # processed before the loss
    late = [checkout_pack(a, pack.pack_id) for a in accounts for _ in range(4)]
    for body in early:
        assert deliver(webhook_url, body) == 200
    run_burst_workers(ledger_db_url, payments_redis_url)
    for body in late:
        assert deliver(webhook_url, body) == 200
    redis = Redis.from_url(payments_redis_url)
    assert redis.llen("rq:queue:payments") == len(late)

    redis.flushdb()  # Redis loses every queued job

    # The sweeper queues the unfinished events (of this test, and any other test's), once.
    assert run_sweeper(ledger_db_url, payments_redis_url) >= len(late)
    queued = _queued(payments_redis_url)
    assert all(queued.count(_event_id(b)) == 1 for b in late)
    assert not {_event_id(b) for b in early} & set(queued)  # processed: left alone
    run_sweeper(ledger_db_url, payments_redis_url)  # queued already: not queued twice
    assert _queued(payments_redis_url) == queued
    run_burst_workers(ledger_db_url, payments_redis_url, count=2)
    for account in accounts:
        assert ledger.balance(account).balance_micros == 5 * 3 * CREDIT
    ids = [_event_id(b) for b in early + late]
    rows = payments_db.rows(
        "SELECT status, count(*) FROM payment_events WHERE event_id = ANY(%s) GROUP BY status",
        (ids,),
    )
    assert rows == [("processed", len(ids))]
    run_sweeper(ledger_db_url, payments_redis_url)
    assert not set(ids) & set(_queued(payments_redis_url))
    assert_audit_clean()


# --- must-show 3 ---------------------------------------------------------------------------------


def test_bad_signatures_are_refused_with_400_and_store_nothing(
    webhook_url: str, payments_db: PaymentsDb
) -> None:
    account = new_account("forger")
    now = int(time.time())

    def refused(body: bytes, signature: str | None) -> None:
        status, _ = post(webhook_url, body, signature)
        assert status == 400
        assert payments_db.count_events([_event_id(body)]) == 0

    body = checkout_pack(account, "pack-any")
    tampered = body.replace(b'"pack-any"', b'"pack-big"')
    assert tampered != body
    refused(tampered, sign(body))  # payload changed after signing
    refused(body, sign(body, secret="whsec_someone_else"))  # wrong secret
    refused(body, sign(body, timestamp=now - TOLERANCE_SECONDS - 60))  # too old
    refused(body, sign(body, timestamp=now + TOLERANCE_SECONDS + 60))  # from the future
    future = sign(body, timestamp=now + TOLERANCE_SECONDS + 60)
    for spelled in ("t=+", "t= ", "t=0"):  # int() reads them all, as the library does
        refused(body, future.replace("t=", spelled, 1))  # (helper-86)
    refused(body, None)  # no signature
    refused(body, "t=123,v0=abc")  # no v1 scheme
    bad_json = b"{not json"
    status, _ = post(webhook_url, bad_json, sign(bad_json))
    assert status == 400

    # The same event, signed correctly a minute ago (within the tolerance), is stored once.
    assert deliver(webhook_url, body) == 200
    status, answer = post(webhook_url, body, sign(body, timestamp=now - 60))
    assert (status, answer["duplicate"]) == (200, True)
    assert payments_db.count_events([_event_id(body)]) == 1
    assert SECRET  # the receiver's secret is the tests' default one


def test_with_redis_down_the_event_is_stored_answered_200_and_swept_later(
    webhook_url: str,
    payments_redis_url: str,
    ledger_db_url: str,
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    configure: Any,
) -> None:
    configure("purchase.allow_free_users", True)
    pack = sources.create_pack(4 * CREDIT)
    account = new_account("redisdown")
    body = checkout_pack(account, pack.pack_id)
    nowhere = Redis.from_url("redis://127.0.0.1:1/0")  # nothing listens on port 1
    with psycopg.connect(ledger_db_url, autocommit=True) as conn:
        receiver = WebhookReceiver(
            SECRET, TOLERANCE_SECONDS, connect=lambda: nullcontext(conn), redis=lambda: nowhere
        )
        status, answer = receiver.receive(body, sign(body))
    assert (status, answer["duplicate"]) == (200, False)
    assert payments_db.event(_event_id(body))["status"] == "received"  # type: ignore[index]

    run_sweeper(ledger_db_url, payments_redis_url)
    run_burst_workers(ledger_db_url, payments_redis_url)
    assert ledger.balance(account).balance_micros == 4 * CREDIT


def test_with_redis_hung_the_event_is_stored_and_answered_200(
    ledger_db_url: str, payments_db: PaymentsDb, monkeypatch: Any
) -> None:
    """A Redis that accepts connections and never answers must not hold the receiver's
    handler for good (Stripe would time out, and the thread is lost): the client of
    workers.queues gives up, and the event, already stored, waits for the sweeper."""
    body = checkout_pack(new_account("redishung"), "pack-any")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{silent.getsockname()[1]}/0")
        answers: list[tuple[int, dict[str, Any]]] = []
        with psycopg.connect(ledger_db_url, autocommit=True) as conn:
            receiver = WebhookReceiver(SECRET, TOLERANCE_SECONDS, connect=lambda: nullcontext(conn))
            handler = threading.Thread(
                target=lambda: answers.append(receiver.receive(body, sign(body))), daemon=True
            )
            handler.start()
            handler.join(60)  # without a socket time-out it would wait as long as Redis
            assert not handler.is_alive(), "the receiver is still waiting on Redis"
    [(status, answer)] = answers
    assert (status, answer["duplicate"]) == (200, False)
    assert payments_db.event(_event_id(body))["status"] == "received"  # type: ignore[index]


def test_the_receiver_answers_health_checks_and_only_its_route(
    webhook_url: str, payments_db: PaymentsDb
) -> None:
    """Its routes by path, whatever the query string or a trailing slash (an endpoint
    registered at Stripe as .../stripe/webhook?env=prod got 404 for every event); another
    method on them is 405 naming the allowed ones, and a health check may be a HEAD
    (helper-165)."""
    with urllib.request.urlopen(f"{webhook_url}/healthz", timeout=10) as response:
        assert (response.status, json.load(response)) == (200, {"status": "ok"})
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"{webhook_url}/other", timeout=10)
    assert missing.value.code == 404
    head = urllib.request.Request(f"{webhook_url}/healthz/?probe=1", method="HEAD")
    with urllib.request.urlopen(head, timeout=10) as response:
        assert (response.status, response.read()) == (200, b"")
    for method, path, allowed in (
        ("PUT", "/stripe/webhook", "POST"),
        ("GET", "/stripe/webhook", "POST"),
        ("DELETE", "/healthz", "GET, HEAD"),
    ):
        request = urllib.request.Request(f"{webhook_url}{path}", method=method, data=b"")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert (refused.value.code, refused.value.headers["Allow"]) == (405, allowed)
    for path in ("/stripe/webhook?env=prod", "/stripe/webhook/"):
        body = checkout_pack(new_account("routed"), "pack-any")
        request = _raw_post(
            body, b"Content-Length: %d" % len(body), b"Connection: close", path=path.encode()
        )
        answer = _raw_exchange(webhook_url, request)
        assert answer.startswith(b"HTTP/1.1 200 OK"), (path, answer)
        assert payments_db.count_events([_event_id(body)]) == 1


def test_a_signed_payload_postgresql_cannot_store_is_refused_for_good(
    webhook_url: str, payments_db: PaymentsDb
) -> None:
    """NaN (which jsonb cannot hold) and nesting deeper than json parses were answered 500,
    so Stripe would deliver them again for days; they are refused with 400 (helper-165)."""
    event = json.loads(checkout_pack(new_account("nan"), "pack-any"))
    event["data"]["object"]["amount_total"] = float("nan")
    body = json.dumps(event).encode()
    assert b"NaN" in body
    nested = b'{"id": "evt_deep", "type": "x", "data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    # Deep enough for json, too deep for the surrogate scrub after it (helper-166).
    objects = b'{"id": "evt_objects", "type": "x", "data": ' + b'{"a": ' * 600 + b"1"
    objects += b"}" * 601
    huge = body.replace(b"NaN", b"1e999")  # a float json reads as infinity
    for payload in (body, nested, objects, huge):
        status, _ = post(webhook_url, payload, sign(payload))
        assert status == 400, payload[:80]
    assert payments_db.count_events([event["id"], "evt_deep", "evt_objects"]) == 0


def test_a_webhook_secret_read_with_a_trailing_newline_still_verifies() -> None:
    """A secret mounted from a file ends in a newline: every delivery failed its signature
    check, and nothing said so (helper-165)."""
    settings = StripeSettings.from_env({"STRIPE_WEBHOOK_SECRET": f"{SECRET}\n"})
    assert settings.webhook_secret == SECRET


def test_a_signed_event_with_a_lone_surrogate_is_stored_and_its_credits_granted(
    webhook_url: str,
    payments_redis_url: str,
    ledger_db_url: str,
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    configure: Any,
) -> None:
    """A JSON escape of half a surrogate pair (\\ud83d, a customer's name cut in the middle
    of an emoji) is valid JSON that PostgreSQL's jsonb refuses: the event used to be
    answered 500 at every delivery and its credits lost after Stripe's retries (helper-86).
    It is stored with U+FFFD in its place, a pair is kept as the character it encodes."""
    configure("purchase.allow_free_users", True)
    pack = sources.create_pack(3 * CREDIT)
    account = new_account("surrogate")
    event = json.loads(checkout_pack(account, pack.pack_id))
    event["data"]["object"]["customer_details"] = {
        "name": "A\ud83d B",
        "\udc00key": "x",
        "nickname": "A\ud83d\ude00 B",
    }
    body = json.dumps(event).encode()  # ensure_ascii: the surrogates as \uXXXX escapes
    assert b"\\ud83d B" in body

    assert deliver(webhook_url, body) == 200
    row = payments_db.rows(
        "SELECT payload #> '{data,object,customer_details}' FROM payment_events"
        " WHERE event_id = %s",
        (_event_id(body),),
    )
    assert row == [({"name": "A\ufffd B", "\ufffdkey": "x", "nickname": "A\U0001f600 B"},)]
    run_burst_workers(ledger_db_url, payments_redis_url)
    assert payments_db.event(_event_id(body))["status"] == "processed"  # type: ignore[index]
    assert ledger.balance(account).balance_micros == 3 * CREDIT


def _stalled_client(url: str) -> socket.socket:
    """A client that sends the headers and part of a body, then nothing, once the receiver
    holds it (a connection past the cap is answered at once: then it tries again)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)

    def held() -> socket.socket | None:
        client = socket.create_connection((host, int(port)))
        client.sendall(
            b"POST /stripe/webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"{" * 100
        )
        client.settimeout(0.2)
        try:
            client.recv(1)
        except TimeoutError:
            return client
        client.close()
        return None

    return _wait_for(held, "a free connection", 10)  # type: ignore[no-any-return]


def test_stalled_clients_are_dropped_after_the_time_out_and_past_the_cap_answered_503(
    ledger_db_url: str, payments_redis_url: str, payments_db: PaymentsDb
) -> None:
    """Stalled clients used to be waited for for ever, each holding a thread: 300 of them
    took 380 MB, and under a low descriptor limit deliveries were no longer served
    (helper-86). Now a client is dropped after the time-out, and connections past the cap
    are answered 503 at once (Stripe retries) rather than given a thread each."""
    limits = WebhookLimits(timeout_seconds=3, max_connections=4)
    redis = Redis.from_url(payments_redis_url)
    receiver = WebhookReceiver(
        SECRET,
        TOLERANCE_SECONDS,
        connect=lambda: psycopg.connect(ledger_db_url, autocommit=True),
        redis=lambda: redis,
    )
    server = WebhookServer(receiver, "127.0.0.1:0", limits).start()
    try:
        started = time.monotonic()
        stalled = [_stalled_client(server.url) for _ in range(3)]
        first = checkout_pack(new_account("stalled"), "pack-any")
        assert deliver(server.url, first) == 200  # served beside 3 stalled clients
        stalled.append(_stalled_client(server.url))  # every connection taken
        second = checkout_pack(new_account("stalled"), "pack-any")
        status, answer = post(server.url, second, sign(second))
        assert time.monotonic() - started < limits.timeout_seconds, "too slow to tell"
        assert (status, answer) == (503, {"error": "busy; retry shortly"})
        assert payments_db.count_events([_event_id(second)]) == 0

        for client in stalled:  # dropped after the time-out
            client.settimeout(30)
            assert client.recv(1024) == b""
            client.close()
        assert time.monotonic() - started < 30
        # Their connections free again (each is given back just after it is closed).
        status = _wait_for(lambda: deliver(server.url, second) != 503, "a free connection")
        assert payments_db.count_events([_event_id(second)]) == 1
    finally:
        server.stop()
        redis.close()


def test_a_client_trickling_its_headers_is_dropped_after_the_time_out(
    ledger_db_url: str, payments_redis_url: str, payments_db: PaymentsDb
) -> None:
    """The socket's time-out bounds each read: a client sending a header byte now and then
    held its connection for good, and with every connection so taken each delivery got 503
    (helper-92). The request line and headers must arrive within one time-out in all."""
    limits = WebhookLimits(timeout_seconds=2, max_connections=2)
    redis = Redis.from_url(payments_redis_url)
    receiver = WebhookReceiver(
        SECRET,
        TOLERANCE_SECONDS,
        connect=lambda: psycopg.connect(ledger_db_url, autocommit=True),
        redis=lambda: redis,
    )
    server = WebhookServer(receiver, "127.0.0.1:0", limits).start()
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    trickling = [socket.create_connection((host, int(port)), timeout=1) for _ in range(2)]
    try:
        request = b"POST /stripe/webhook HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"y" * 100
        dropped: set[int] = set()
        deadline = time.monotonic() + 4 * limits.timeout_seconds
        for byte in (request[i : i + 1] for i in range(len(request))):
            if len(dropped) == len(trickling) or time.monotonic() > deadline:
                break
            for index, client in enumerate(trickling):
                if index in dropped:
                    continue
                try:
                    client.sendall(byte)  # each byte well inside the socket's time-out
                except OSError:
                    dropped.add(index)
            time.sleep(0.25)
        assert len(dropped) == len(trickling), "a trickling client was kept past the time-out"
        event = checkout_pack(new_account("trickled"), "pack-any")
        _wait_for(lambda: deliver(server.url, event) == 200, "a free connection")
        assert payments_db.count_events([_event_id(event)]) == 1
    finally:
        for client in trickling:
            client.close()
        server.stop()
        redis.close()


def _raw_exchange(url: str, data: bytes) -> bytes:
    """Sends raw bytes on one connection and returns all the receiver answers until it
    closes the connection."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as client:
        client.sendall(data)
        answer = b""
        while chunk := client.recv(65536):  # a time-out: the connection was left open
            answer += chunk
    return answer


def _raw_post(body: bytes, *headers: bytes, path: bytes = b"/stripe/webhook") -> bytes:
    signature = b"Stripe-Signature: " + sign(body).encode()
    return b"\r\n".join(
        (b"POST " + path + b" HTTP/1.1", b"Host: x", signature, *headers, b"", body)
    )


def test_a_body_the_receiver_does_not_read_closes_the_connection(
    webhook_url: str, payments_db: PaymentsDb
) -> None:
    """A chunked body was refused (411) and left on the connection, to be read as the next
    request; with Content-Length beside Transfer-Encoding the receiver framed the body by
    Content-Length, as a proxy in front might not (helper-86). Any Transfer-Encoding is
    refused, and whenever a body is not read the connection is closed after the answer."""
    chunked = checkout_pack(new_account("chunked"), "pack-any")
    framed = b"%x\r\n%s\r\n0\r\n\r\n" % (len(chunked), chunked)
    after = checkout_pack(new_account("chunked"), "pack-any")
    valid = _raw_post(after, b"Content-Length: %d" % len(after))
    for first in (
        _raw_post(framed, b"Transfer-Encoding: chunked"),
        _raw_post(framed, b"Transfer-Encoding: chunked", b"Content-Length: %d" % len(framed)),
        _raw_post(chunked, b"Content-Length: %d" % len(chunked), path=b"/other"),
        _raw_post(chunked, b"Content-Length: %d" % (MAX_BODY_BYTES + 1)),
        # Two lengths, or one int() reads but a proxy may not: the rest of the body was
        # served as a request of its own (helper-165).
        _raw_post(
            chunked, b"Content-Length: %d" % len(chunked), b"Content-Length: %d" % len(framed)
        ),
        _raw_post(chunked, b"Content-Length: 0", b"Content-Length: %d" % len(chunked)),
        _raw_post(chunked, b"Content-Length: +%d" % len(chunked)),
        _raw_post(chunked, b"Content-Length: %s" % "_".join(str(len(chunked))).encode()),
    ):
        answer = _raw_exchange(webhook_url, first + valid)
        head, _, rest = answer.partition(b"\r\n\r\n")
        [length] = [int(h[16:]) for h in head.split(b"\r\n") if h.startswith(b"Content-Length: ")]
        assert len(rest) == length, answer  # one answer: nothing read after the first request
        assert answer.split(b"\r\n")[0] in (
            b"HTTP/1.1 411 Length Required",
            b"HTTP/1.1 404 Not Found",
            b"HTTP/1.1 413 Request Entity Too Large",
            b"HTTP/1.1 400 Bad Request",
        )
        assert b"\r\nConnection: close\r\n" in answer
    assert payments_db.count_events([_event_id(chunked), _event_id(after)]) == 0

    # A body read: the connection is kept for the next request (which asks to close it).
    answer = _raw_exchange(
        webhook_url, valid + valid.replace(b"Host: x", b"Host: x\r\nConnection: close")
    )
    assert answer.count(b"HTTP/1.1 200 OK") == 2, answer


def test_a_rerun_counts_the_credits_a_killed_run_applied_but_never_counted(
    webhook_url: str,
    payments_redis_url: str,
    ledger_db_url: str,
    sources: Sources,
    ledger: Ledger,
    configure: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The credits count of /metrics (ledger_worker_credits_granted_micros_total) is written
    after the event's commit. A work horse killed in between leaves the event processed and
    uncounted; the next run of the job finds it done and counts it then, and only once."""
    configure("purchase.allow_free_users", True)
    pack = sources.create_pack(7 * CREDIT)
    account = new_account("recount")
    body = checkout_pack(account, pack.pack_id)
    assert deliver(webhook_url, body) == 200
    event_id = _event_id(body)
    redis = Redis.from_url(payments_redis_url)
    redis.lrem("rq:queue:payments", 0, event_id)  # this test runs the job itself
    monkeypatch.setenv("DATABASE_URL", ledger_db_url)
    monkeypatch.setenv("REDIS_URL", payments_redis_url)

    def counted() -> int:
        return int(redis.hget(WORKER_CREDITS_KEY, "purchase") or 0)

    before = counted()
    with payment_db_connection() as conn:  # the first run: applied and committed, then killed
        outcome = payments.apply_event(conn, event_id, datetime.now(UTC))
    assert outcome is not None and outcome.status == "processed"
    assert counted() == before

    assert payments.process_event(event_id) == "done"  # RQ runs the job again
    assert counted() == before + 7 * CREDIT
    assert payments.process_event(event_id) == "done"  # and again: counted once
    assert counted() == before + 7 * CREDIT
    assert ledger.balance(account).balance_micros == 7 * CREDIT


def test_a_refund_handled_before_its_payment_waits_for_it(
    webhook_url: str,
    payments_redis_url: str,
    ledger_db_url: str,
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    configure: Any,
    monkeypatch: pytest.MonkeyPatch,
    assert_audit_clean: AuditCheck,
) -> None:
    """The checkout's job failed once (or waits for the sweeper) while the refund's runs:
    the refund finds no purchase yet. Dropped, the refunded payment's credits would stay."""
    configure("purchase.allow_free_users", True)
    pack = sources.create_pack(9 * CREDIT, price_minor=900)
    account, intent = new_account("refund-first"), f"pi_{uuid.uuid4().hex}"
    paid = checkout_pack(account, pack.pack_id, payment_intent=intent)
    refunded = charge_refunded(intent, amount=900, amount_refunded=900)
    for body in (paid, refunded):
        assert deliver(webhook_url, body) == 200
        Redis.from_url(payments_redis_url).lrem("rq:queue:payments", 0, _event_id(body))
    monkeypatch.setenv("DATABASE_URL", ledger_db_url)
    monkeypatch.setenv("REDIS_URL", payments_redis_url)

    with pytest.raises(payments.EventNotReady):
        payments.process_event(_event_id(refunded))
    assert payments_db.event(_event_id(refunded))["status"] == "failed"  # type: ignore[index]
    assert payments.process_event(_event_id(paid)) == "processed"
    assert ledger.balance(account).balance_micros == 9 * CREDIT
    assert payments.process_event(_event_id(refunded)) == "processed"  # its retry
    assert ledger.balance(account).balance_micros == 0
    assert payments_db.event(_event_id(refunded))["credits_micros"] == -9 * CREDIT  # type: ignore[index]
    assert_audit_clean()


def test_an_event_whose_attempts_are_spent_is_retried_from_postgres_until_it_applies(
    webhook_url: str,
    payments_redis_url: str,
    ledger_db_url: str,
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    monkeypatch: pytest.MonkeyPatch,
    assert_audit_clean: AuditCheck,
) -> None:
    """Six failed attempts parked an event for good: the one way to retry it was RQ's failed
    registry, in Redis (helper-50). The sweeper now retries it once its last attempt is an
    hour old, so a paid invoice whose plan was missing is applied once the plan exists."""
    plan_id = f"plan_{uuid.uuid4().hex[:12]}"
    account, subscription = new_account("parked"), f"sub_{uuid.uuid4().hex}"
    start = int(time.time()) - 60
    # Sources.create_plan gives a plan the provider price price_<plan id>.
    body = invoice_paid(account, subscription, f"price_{plan_id}", start, start + 30 * 86400)
    event_id = _stored_not_queued(webhook_url, payments_redis_url, body)
    monkeypatch.setenv("DATABASE_URL", ledger_db_url)
    monkeypatch.setenv("REDIS_URL", payments_redis_url)
    with pytest.raises(LookupError):  # no plan has the invoice's price
        payments.process_event(event_id)

    _attempts_spent(payments_db, event_id, minutes_ago=5)
    run_sweeper(ledger_db_url, payments_redis_url)
    assert event_id not in _queued(payments_redis_url)  # parked for the hour
    sources.create_plan(100 * CREDIT, rank=1, plan_id=plan_id)  # the cause, fixed
    _attempts_spent(payments_db, event_id, minutes_ago=61)
    run_sweeper(ledger_db_url, payments_redis_url)
    assert event_id in _queued(payments_redis_url)
    run_burst_workers(ledger_db_url, payments_redis_url)
    event = payments_db.event(event_id)
    assert event is not None
    assert (event["status"], event["credits_micros"]) == ("processed", 100 * CREDIT)
    assert ledger.balance(account).balance_micros == 100 * CREDIT
    assert_audit_clean()


def test_an_event_whose_job_dies_every_time_is_retried_hourly_not_every_sweep(
    webhook_url: str,
    payments_redis_url: str,
    ledger_db_url: str,
    payments_db: PaymentsDb,
    sources: Sources,
    ledger: Ledger,
    configure: Any,
) -> None:
    """An event left processing by work horses that died (out of memory, say) was re-queued
    at every sweep, however often it had killed one (helper-50). Past its attempts it now
    waits an hour between runs, as a failed one does."""
    configure("purchase.allow_free_users", True)
    pack = sources.create_pack(4 * CREDIT)
    account = new_account("dies")
    event_id = _stored_not_queued(
        webhook_url, payments_redis_url, checkout_pack(account, pack.pack_id)
    )
    _attempts_spent(payments_db, event_id, minutes_ago=5, status="processing")
    run_sweeper(ledger_db_url, payments_redis_url)
    assert event_id not in _queued(payments_redis_url)
    _attempts_spent(payments_db, event_id, minutes_ago=61, status="processing")
    run_sweeper(ledger_db_url, payments_redis_url)
    assert event_id in _queued(payments_redis_url)
    run_burst_workers(ledger_db_url, payments_redis_url)
    assert payments_db.event(event_id)["status"] == "processed"  # type: ignore[index]
    assert ledger.balance(account).balance_micros == 4 * CREDIT


def test_a_stored_event_attempt_records_its_time(
    webhook_url: str,
    payments_redis_url: str,
    ledger_db_url: str,
    payments_db: PaymentsDb,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    body = charge_refunded(f"pi_{uuid.uuid4().hex}", amount=100, amount_refunded=100)
    event_id = _stored_not_queued(webhook_url, payments_redis_url, body)
    monkeypatch.setenv("DATABASE_URL", ledger_db_url)
    monkeypatch.setenv("REDIS_URL", payments_redis_url)
    [(before,)] = payments_db.rows(
        "SELECT last_attempt_at FROM payment_events WHERE event_id = %s", (event_id,)
    )
    payments.process_event(event_id)
    [(after, recent)] = payments_db.rows(
        "SELECT last_attempt_at, last_attempt_at > now() - interval '1 minute'"
        " FROM payment_events WHERE event_id = %s",
        (event_id,),
    )
    assert before is None and after is not None and recent


def test_the_receiver_process_logs_json_lines_and_refuses_a_bad_log_format(
    ledger_db_url: str, payments_redis_url: str
) -> None:
    """`python -m workers.webhook` logs as the server and the workers do: one JSON object a
    line on stderr (LEDGER_LOG_FORMAT, LEDGER_LOG_LEVEL); an unknown format is a
    configuration error (exit 2)."""
    env = {
        **os.environ,
        "DATABASE_URL": ledger_db_url,
        "REDIS_URL": payments_redis_url,
        "STRIPE_WEBHOOK_SECRET": SECRET,
        "LEDGER_WEBHOOK_ADDR": "127.0.0.1:0",
    }
    command = [sys.executable, "-m", "workers.webhook"]
    receiver = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert receiver.stderr is not None
        lines = []
        for line in receiver.stderr:
            lines.append(json.loads(line))
            if "Stripe webhooks" in lines[-1]["message"]:
                break
        assert lines[-1]["level"] == "INFO" and {"time", "logger"} <= set(lines[-1])
    finally:
        receiver.send_signal(signal.SIGINT)
        receiver.wait(timeout=30)
    refused = subprocess.run(
        command, env={**env, "LEDGER_LOG_FORMAT": "yaml"}, capture_output=True, text=True
    )
    assert refused.returncode == 2
    assert "LEDGER_LOG_FORMAT" in refused.stderr


def test_a_client_resetting_the_connection_is_logged_as_one_json_line(
    ledger_db_url: str, payments_redis_url: str
) -> None:
    """A client that resets the connection in the middle of a request made socketserver
    print a plain-text traceback on stderr, where README promises JSON lines (helper-86)."""
    env = {
        **os.environ,
        "DATABASE_URL": ledger_db_url,
        "REDIS_URL": payments_redis_url,
        "STRIPE_WEBHOOK_SECRET": SECRET,
        "LEDGER_WEBHOOK_ADDR": "127.0.0.1:0",
        "LEDGER_LOG_FORMAT": "json",
    }
    receiver = subprocess.Popen(
        [sys.executable, "-m", "workers.webhook"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        assert receiver.stderr is not None
        for line in receiver.stderr:
            message = json.loads(line)["message"]
            if "Stripe webhooks" in message:
                break
        host, port = message.split("http://")[1].split("/")[0].rsplit(":", 1)
        for request in (
            b"POST /stripe/web",  # within the request line
            b"POST /stripe/webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{",
        ):
            with socket.create_connection((host, int(port))) as client:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.sendall(request)
                time.sleep(0.2)  # read by the receiver, which waits for more
            # closed with SO_LINGER 0: a reset
    finally:
        receiver.send_signal(signal.SIGINT)
        _, rest = receiver.communicate(timeout=30)
    lines = [json.loads(line) for line in rest.splitlines()]  # each line JSON
    ended = [line for line in lines if "ended: ConnectionResetError" in line["message"]]
    assert len(ended) == 2, lines
