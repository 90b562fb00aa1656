"""Stopping the Stripe webhook receiver drains it: a SIGTERM (a rolling deploy, make run's
Ctrl-C) cut off the delivery being stored, with no answer, and Stripe had to deliver it
again. Now new connections are refused at once, idle keep-alive connections are closed, and
the deliveries in progress are stored and answered, within LEDGER_SHUTDOWN_GRACE_SECONDS,
before the process exits.

A delivery is held in progress the way a real one is: its INSERT waits on a lock, the
uncommitted row of the same event id that the test's own transaction inserted."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from redis import Redis

from support import payments as payment_fixtures
from support.ledger import new_account
from support.payments import TOLERANCE_SECONDS, PaymentsDb
from support.webhooks import SECRET, WEBHOOK_PATH, checkout_pack, sign
from workers.settings import WebhookLimits
from workers.webhook import WebhookReceiver, WebhookServer

payments_db = payment_fixtures.payments_db
payments_redis_url = payment_fixtures.payments_redis_url

Answer = tuple[int, dict[str, Any], str | None]


def _wait_for(condition: Callable[[], Any], what: str, limit: float = 30.0) -> None:
    """Polls until condition() is truthy (a readiness wait, not a timing assertion)."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def _post(host: str, port: int, body: bytes) -> Answer:
    """A signed delivery: (status, JSON body, the answer's Connection header)."""
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        conn.request(
            "POST",
            WEBHOOK_PATH,
            body=body,
            headers={"Content-Type": "application/json", "Stripe-Signature": sign(body)},
        )
        response = conn.getresponse()
        return response.status, json.loads(response.read()), response.getheader("Connection")
    finally:
        conn.close()


def _refused(host: str, port: int) -> bool:
    try:
        # A connection made before the refusal begins is closed by the drain, unanswered.
        with socket.create_connection((host, port), timeout=2):
            return False
    except ConnectionResetError:  # made as the listening socket closed
        return False
    except ConnectionRefusedError:
        return True


@contextmanager
def _delivery_held(
    ledger_db_url: str, payments_db: PaymentsDb, host: str, port: int
) -> Iterator[tuple[str, Future[Answer], Callable[[], None]]]:
    """A delivery in progress: posted, its INSERT waiting on the row of its event id that
    this transaction inserted and has not committed. Yields its event id, its answer to
    come and what lets it through (a rollback: the delivery then stores the event)."""
    body = checkout_pack(new_account("drain"), "pack-any")
    event_id = str(json.loads(body)["id"])
    with (
        psycopg.connect(ledger_db_url) as holder,
        ThreadPoolExecutor(1) as delivering,
    ):
        holder.execute(
            b"INSERT INTO payment_events (event_id, type, payload, received_at)"
            b" VALUES (%s, 'held', '{}', now())",
            (event_id,),
        )
        answer = delivering.submit(_post, host, port, body)
        blocked = "SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))"
        _wait_for(
            lambda: payments_db.rows(blocked, (holder.info.backend_pid,))[0][0] == 1,
            "the delivery's INSERT to wait on the held row",
        )
        try:
            yield event_id, answer, holder.rollback
        finally:
            holder.rollback()


def test_a_stopped_receiver_answers_the_delivery_in_progress_then_exits(
    ledger_db_url: str, payments_redis_url: str, payments_db: PaymentsDb
) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": ledger_db_url,
        "REDIS_URL": payments_redis_url,
        "STRIPE_WEBHOOK_SECRET": SECRET,
        "LEDGER_WEBHOOK_ADDR": "127.0.0.1:0",
        "LEDGER_LOG_FORMAT": "json",
        # Both far longer than the test waits: neither may be what ends the stop.
        "LEDGER_SHUTDOWN_GRACE_SECONDS": "120",
        "LEDGER_WEBHOOK_TIMEOUT_SECONDS": "120",
    }
    receiver = subprocess.Popen(
        [sys.executable, "-m", "workers.webhook"],
        env=env,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert receiver.stderr is not None
        for line in receiver.stderr:
            message = json.loads(line)["message"]
            if "Stripe webhooks" in message:
                break
        host, port_text = message.split("http://")[1].split("/")[0].rsplit(":", 1)
        port = int(port_text)
        # A keep-alive connection, idle after its request was answered.
        idle = http.client.HTTPConnection(host, port, timeout=60)
        idle.request("GET", "/healthz")
        health = idle.getresponse()
        health.read()
        assert health.status == 200 and not health.will_close
        assert idle.sock is not None

        with _delivery_held(ledger_db_url, payments_db, host, port) as (event_id, answer, let_go):
            receiver.send_signal(signal.SIGTERM)
            _wait_for(lambda: _refused(host, port), "new connections to be refused", 10)
            idle.sock.settimeout(10)  # far below its time-out and the grace
            assert idle.sock.recv(1) == b"", "the idle connection was answered"  # closed
            time.sleep(0.5)  # the receiver has had time to exit if it does not wait
            assert receiver.poll() is None and not answer.done(), (
                f"the receiver exited with a delivery in progress ({receiver.poll()=}, "
                f"{answer.done()=})"
            )
            let_go()
            assert answer.result(timeout=30) == (
                200,
                {"received": True, "duplicate": False},
                "close",  # the connection's last answer
            )
        assert receiver.wait(timeout=10) == 0  # at once: not after the grace or a time-out
        idle.close()
    finally:
        if receiver.poll() is None:
            receiver.kill()
        _, rest = receiver.communicate(timeout=30)
    assert payments_db.rows(
        "SELECT type, status FROM payment_events WHERE event_id = %s", (event_id,)
    ) == [("checkout.session.completed", "received")]
    messages = [json.loads(line)["message"] for line in rest.splitlines()]
    assert [m for m in messages if m.startswith("webhook receiver stopped")], messages
    assert not [m for m in messages if "unanswered" in m], messages


def test_a_delivery_still_running_after_the_grace_is_cut_off(
    ledger_db_url: str, payments_redis_url: str, payments_db: PaymentsDb
) -> None:
    """The drain is bounded: stop() returns once the grace is over, the delivery still
    waiting cut off unanswered (Stripe delivers it again)."""
    redis = Redis.from_url(payments_redis_url)
    receiver = WebhookReceiver(
        SECRET,
        TOLERANCE_SECONDS,
        connect=lambda: psycopg.connect(ledger_db_url, autocommit=True),
        redis=lambda: redis,
    )
    grace = 1.0
    server = WebhookServer(
        receiver, "127.0.0.1:0", WebhookLimits(shutdown_grace_seconds=grace)
    ).start()
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    stopped = False
    try:
        with _delivery_held(ledger_db_url, payments_db, host, int(port)) as (
            event_id,
            answer,
            let_go,
        ):
            started = time.monotonic()
            stopped = True
            server.stop()
            took = time.monotonic() - started
            assert grace <= took < grace + 10, f"stop() took {took:.2f} s"
            with pytest.raises(ConnectionError):  # RemoteDisconnected: no answer
                answer.result(timeout=10)
            let_go()
        # The cut-off delivery's thread goes on: its event is stored (a retry finds it).
        _wait_for(lambda: payments_db.count_events([event_id]) == 1, "the event stored")
    finally:
        if not stopped:
            server.stop()
        redis.close()
