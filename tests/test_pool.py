"""The server's connection pool (ledger_server/db/pool.py) lends the connection returned
last, and still closes the one idle longest when it shrinks."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf.duration_pb2 import Duration
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import PoolTimeout

from ledger.v1 import admin_service_pb2_grpc, billing_service_pb2_grpc, ledger_service_pb2_grpc
from ledger_server.clock import OffsetClock
from ledger_server.config import Settings
from ledger_server.db.connect import DEFAULT_TCP_SETTINGS, connect
from ledger_server.db.migrate import migrate
from ledger_server.db.pool import (
    CALL_RETRY_INTERVAL,
    UNREACHABLE_WAIT,
    DatabaseUnreachable,
    LedgerPool,
    open_pool,
)
from support.ledger import CREDIT, new_account
from support.server import ServerThread
from support.settings import ActorMetadata
from support.sources import DAY, Sources, dt
from support.tcp_proxy import SwitchableProxy
from workers import db as worker_db

# A zone whose clocks go forward on 14 March 2027: 30 calendar days there from 1 March are
# 29 days 23 hours.
NEW_YORK = "America/New_York"


async def _backend(pool: Any) -> int:
    async with pool.connection() as conn:
        return int(conn.info.backend_pid)


async def _hold_three(pool: Any) -> list[int]:
    """Borrows three connections at once and returns them in borrowing order."""
    borrowed = [await pool.getconn() for _ in range(3)]
    pids = [int(conn.info.backend_pid) for conn in borrowed]
    for conn in borrowed:
        await pool.putconn(conn)
    return pids


def test_calls_one_after_another_reuse_the_connection_returned_last(ledger_db_url: str) -> None:
    async def scenario() -> tuple[list[int], list[int]]:
        pool = await open_pool(ledger_db_url, 3, 3)
        try:
            returned = await _hold_three(pool)
            return returned, [await _backend(pool) for _ in range(6)]
        finally:
            await pool.close()

    returned, used = asyncio.run(scenario())
    assert len(set(returned)) == 3
    # FIFO (psycopg_pool's own order) would go round all three, the first returned first.
    assert used == [returned[-1]] * 6


def test_shrinking_closes_the_connection_idle_longest(ledger_db_url: str) -> None:
    async def scenario() -> tuple[list[int], list[int]]:
        pool = await open_pool(ledger_db_url, 1, 3)
        try:
            returned = await _hold_three(pool)
            for _ in range(3):
                await _backend(pool)
            # What the pool's scheduled shrinking runs after max_idle: the first call resets
            # its low-water mark, the second closes one connection unused since then.
            await pool._shrink_pool()
            await pool._shrink_pool()
            # The closed backend leaves pg_stat_activity once it has seen the close.
            alive: list[int] = []
            for _ in range(100):
                async with pool.connection() as conn:
                    cursor = await conn.execute(
                        "SELECT pid FROM pg_stat_activity WHERE pid = ANY (%s)", (returned,)
                    )
                    alive = sorted(int(row[0]) for row in await cursor.fetchall())
                if len(alive) < len(returned):
                    break
                await asyncio.sleep(0.05)
            return returned, alive
        finally:
            await pool.close()

    returned, alive = asyncio.run(scenario())
    assert alive == sorted(returned[1:])  # the first returned, never lent since, is gone


def test_a_loan_refused_for_lack_of_time_leaves_the_order_alone(ledger_db_url: str) -> None:
    async def scenario() -> tuple[list[int], int]:
        pool = await open_pool(ledger_db_url, 3, 3)
        try:
            returned = await _hold_three(pool)
            with pytest.raises(PoolTimeout):
                await pool._get_ready_connection(0.0)  # what a caller out of time meets
            return returned, await _backend(pool)
        finally:
            await pool.close()

    returned, used = asyncio.run(scenario())
    assert used == returned[-1]


def test_calls_wait_for_a_busy_pool_but_fail_fast_when_postgresql_cannot_be_reached(
    ledger_db_url: str,
) -> None:
    """helper-outage: a call waited its whole pool time-out (30 s) for a connection while
    PostgreSQL was down. Now, once the pool's connection attempt fails and it holds no open
    connection, the calls waiting fail at once and new ones within UNREACHABLE_WAIT; a busy
    pool (a connection lent) still makes them wait, even if growing it fails. The outage is
    the pool's URL turned to a closed port, and a lost connection one closed."""
    url = {"now": ledger_db_url}
    down = "postgresql://postgres@127.0.0.1:1/none?connect_timeout=2"

    async def scenario() -> None:
        pool = LedgerPool(lambda: url["now"], min_size=1, max_size=2, open=False)
        await pool.open(wait=True, timeout=10)
        try:
            held = await pool.getconn()
            url["now"] = down  # the pool cannot grow, but its lent connection is open
            waiting = asyncio.create_task(pool.getconn(timeout=30))
            await asyncio.sleep(UNREACHABLE_WAIT + 0.2)
            assert not waiting.done()
            await pool.putconn(held)
            held = await asyncio.wait_for(waiting, 5)

            waiting = asyncio.create_task(pool.getconn(timeout=30))
            await asyncio.sleep(0.05)
            await held.close()  # lost with PostgreSQL: the pool now has no open connection
            await pool.putconn(held)
            with pytest.raises(DatabaseUnreachable):
                await asyncio.wait_for(waiting, 5)
            started = time.monotonic()
            with pytest.raises(DatabaseUnreachable):
                await pool.getconn(timeout=30)
            assert time.monotonic() - started < 5

            url["now"] = ledger_db_url
            pool.reconnect_now()  # what the health task does on reaching PostgreSQL
            async with pool.connection(timeout=5) as conn:
                await conn.execute("SELECT 1")
        finally:
            await pool.close()

    asyncio.run(scenario())


def test_calls_during_an_outage_retry_the_reconnection_once_a_second_and_get_it_once_back(
    ledger_db_url: str,
) -> None:
    """helper-reconnect: after an outage every call failed (each in about a second) until the
    health task next reached PostgreSQL (every LEDGER_HEALTH_CHECK_INTERVAL_SECONDS, up to a
    minute) and had the pool reconnect, or the pool's own backoff ran out (up to half a
    minute). Now a call while the pool is unreachable has a pending reconnection attempt run
    at once: the first call once PostgreSQL answers gets a connection, and no reconnect_now.
    Calls ten at a time, over and over through the outage, still fail fast and cost at most
    about one connection attempt a second (each attempt resolves the pool's URL: counted),
    and the pool is back to its size at once."""
    url = {"now": ledger_db_url}
    down = "postgresql://postgres@127.0.0.1:1/none?connect_timeout=2"
    attempts: list[float] = []

    def conninfo() -> str:
        attempts.append(time.monotonic())
        return url["now"]

    async def scenario() -> tuple[int, float, int, float, float]:
        pool = LedgerPool(conninfo, min_size=2, max_size=2, open=False)
        await pool.open(wait=True, timeout=10)
        try:
            held = [await pool.getconn() for _ in range(2)]
            url["now"] = down
            for conn in held:
                await conn.close()  # lost with PostgreSQL
                await pool.putconn(conn)
            for _ in range(100):
                if pool.unreachable:
                    break
                await asyncio.sleep(0.05)
            assert pool.unreachable

            before, started, calls, slowest = len(attempts), time.monotonic(), 0, 0.0
            while time.monotonic() - started < 4.0:
                sent = time.monotonic()
                results = await asyncio.gather(
                    *(pool.getconn(timeout=30) for _ in range(10)), return_exceptions=True
                )
                slowest = max(slowest, time.monotonic() - sent)
                assert all(isinstance(r, DatabaseUnreachable) for r in results), results
                calls += len(results)
                await asyncio.sleep(0.02)
            outage = time.monotonic() - started
            during = len(attempts) - before

            url["now"] = ledger_db_url  # PostgreSQL answers again; nobody calls reconnect_now
            back = time.monotonic()
            async with pool.connection(timeout=30) as conn:
                await conn.execute("SELECT 1")
            first_call = time.monotonic() - back
            both = [await pool.getconn(timeout=2) for _ in range(2)]
            for conn in both:
                await conn.execute("SELECT 1")
                await pool.putconn(conn)
            return calls, outage, during, slowest, first_call
        finally:
            await pool.close()

    calls, outage, during, slowest, first_call = asyncio.run(scenario())
    assert calls >= 40
    # About one attempt a second however many calls: one a second that calls run early,
    # and the pool's own retries (1, 2, 4 s apart).
    assert during <= outage + 4, (
        f"{during} connection attempts for {calls} calls in {outage:.1f} s of outage"
    )
    assert slowest < CALL_RETRY_INTERVAL + UNREACHABLE_WAIT + 0.5, slowest
    assert first_call < CALL_RETRY_INTERVAL + UNREACHABLE_WAIT, first_call


def _session_setting(
    database_url: str, name: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, str]:
    """A setting as a pooled session of the server and one of the workers see it."""

    async def server_setting() -> str:
        pool = await open_pool(database_url, 1, 1)
        try:
            async with pool.connection() as conn:
                row = await (await conn.execute(f"SHOW {name}")).fetchone()
                return str(row[0]) if row else ""
        finally:
            await pool.close()

    served = asyncio.run(server_setting())
    monkeypatch.setenv("DATABASE_URL", database_url)
    worker_db.close()
    try:
        with worker_db.connection() as conn:
            row = conn.execute(f"SHOW {name}").fetchone()
    finally:
        worker_db.close()
    return served, str(row[0]) if row else ""


def test_the_server_and_worker_sessions_end_a_transaction_left_idle_for_a_minute(
    ledger_db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transaction whose client vanished keeps its locks (an account, an event row) until
    TCP keepalive gives up, two hours by default; every pooled session ends one idle for a
    minute (ledger_server/db/session_limits.py)."""
    assert _session_setting(ledger_db_url, "idle_in_transaction_session_timeout", monkeypatch) == (
        "1min",
        "1min",
    )


def _tcp_settings(conn: Any) -> dict[str, int]:
    """The keepalive and user time-out the kernel holds for a connection's own socket."""
    with socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
        return {
            "keepalives": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            "keepalives_idle": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            "keepalives_interval": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            "keepalives_count": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            "tcp_user_timeout": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
        }


def test_server_and_worker_connections_give_up_on_a_silent_network_within_half_a_minute(
    ledger_db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection whose network went away mid-statement waited for TCP: two hours of
    keepalive silence by default, so a stalled group-commit lane held every charging call.
    Every connection of the server's pool, the workers' pool and of their own
    (db/connect.py) now has the kernel probe it after 10 s idle, every 5 s, 3 times, and
    drop data unacknowledged for 25 s; a URL's own values win."""
    # Keepalive is TCP's: a proxy on loopback in front of the database (the embedded one
    # listens on a unix socket only).
    params = conninfo_to_dict(ledger_db_url)
    proxy = SwitchableProxy(str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432))
    proxy.up()
    try:
        _check_tcp_settings(
            make_conninfo(ledger_db_url, host="127.0.0.1", port=proxy.port), monkeypatch
        )
    finally:
        proxy.down()


def _check_tcp_settings(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async def server_settings() -> dict[str, int]:
        pool = await open_pool(url, 1, 1)
        try:
            async with pool.connection() as conn:
                return _tcp_settings(conn)
        finally:
            await pool.close()

    expected = dict(DEFAULT_TCP_SETTINGS)
    assert asyncio.run(server_settings()) == expected
    monkeypatch.setenv("DATABASE_URL", url)
    worker_db.close()
    try:
        with worker_db.connection() as conn:
            assert _tcp_settings(conn) == expected
    finally:
        worker_db.close()
    with connect(url) as conn:
        assert _tcp_settings(conn) == expected
    with connect(make_conninfo(url, keepalives_idle=60, tcp_user_timeout=90_000)) as conn:
        assert _tcp_settings(conn) == expected | {"keepalives_idle": 60, "tcp_user_timeout": 90_000}


# A worker's session, in a process of its own: sets the session limits, says its backend's
# pid, then waits for an account row the test holds locked.
_WAITING_SESSION = """
import sys, psycopg
from workers import db
with psycopg.connect(sys.argv[1], autocommit=True) as conn:
    db._configure(conn)
    print(conn.info.backend_pid, flush=True)
    conn.execute("SELECT 1 FROM accounts WHERE account_id = %s FOR UPDATE", (sys.argv[2],))
"""


def test_a_session_whose_client_died_while_it_waits_ends_without_waiting_on(
    ledger_db_url: str,
) -> None:
    """A worker killed while its job waits for an account's lock: its session went on
    waiting (holding the payment event's row) until the account was free, then ran the
    statement to its end (helper-154's review). It now notices within
    client_connection_check_interval (ledger_server/db/session_limits.py) and ends."""
    account = new_account("dead-client")
    with psycopg.connect(ledger_db_url, autocommit=True) as holder:
        holder.execute("SELECT ledger_open_account(%s, '', now())", (account,))
        holder.execute("BEGIN")
        holder.execute("SELECT 1 FROM accounts WHERE account_id = %s FOR UPDATE", (account,))
        waiting = subprocess.Popen(
            [sys.executable, "-c", _WAITING_SESSION, ledger_db_url, account],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert waiting.stdout is not None
            backend = int(waiting.stdout.readline())
            time.sleep(0.5)  # its statement is waiting for the lock now
        finally:
            waiting.kill()  # no goodbye to PostgreSQL: the socket just closes
            waiting.wait()
        deadline = time.monotonic() + 10
        with psycopg.connect(ledger_db_url, autocommit=True) as watcher:
            while True:
                alive = watcher.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (backend,)
                ).fetchone()
                if alive == (0,):
                    break
                assert time.monotonic() < deadline, "the dead client's session still waits"
                time.sleep(0.2)
        holder.execute("ROLLBACK")


@pytest.fixture
def new_york_database_url(fresh_database_url: str) -> str:
    """A migrated database whose sessions start in New York time unless they set their own."""
    migrate(fresh_database_url)
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET TimeZone = {}").format(
                sql.Identifier(conn.info.dbname), sql.Literal(NEW_YORK)
            )
        )
    with psycopg.connect(fresh_database_url) as conn:
        assert conn.execute("SHOW TimeZone").fetchone() == (NEW_YORK,)
    return fresh_database_url


def test_the_server_and_worker_sessions_run_in_utc_whatever_the_database_default(
    new_york_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _session_setting(new_york_database_url, "TimeZone", monkeypatch) == ("UTC", "UTC")


@pytest.fixture
def new_york_sources(new_york_database_url: str) -> Iterator[tuple[Sources, OffsetClock]]:
    """A server on the New York database, its clock on 1 March (UTC noon) of the coming
    year, so a 30-day expiry spans New York's change to summer time."""
    clock = OffsetClock()
    now = clock.now()
    first_of_march = datetime(now.year, 3, 1, 12, tzinfo=UTC)
    if first_of_march <= now + timedelta(minutes=1):
        first_of_march = first_of_march.replace(year=now.year + 1)
    clock.advance(first_of_march - now)
    server = ServerThread(Settings(database_url=new_york_database_url), clock).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            admin_channel = grpc.intercept_channel(channel, ActorMetadata("test-admin"))
            yield (
                Sources(
                    ledger_service_pb2_grpc.LedgerServiceStub(channel),
                    admin_service_pb2_grpc.AdminServiceStub(admin_channel),
                    billing_service_pb2_grpc.BillingServiceStub(admin_channel),
                ),
                clock,
            )
    finally:
        server.stop()


def test_day_based_expiries_are_whole_24_hour_days_whatever_the_database_zone(
    new_york_sources: tuple[Sources, OffsetClock],
) -> None:
    """PostgreSQL adds an interval's days in the session's zone: on a database defaulting to
    New York a 30-day expiry from 1 March was 29 days 23 hours."""
    sources, _ = new_york_sources
    sources.update_setting("signup.expire_days", 30, "a month")
    sources.update_setting("daily.expire_days", 30, "a month")
    account = new_account("tz")

    signup = sources.create_account(account).signup_lot
    assert dt(signup.expires_at) - dt(signup.created_at) == 30 * DAY

    daily = sources.claim_daily(account).lot
    assert dt(daily.expires_at) - dt(daily.created_at) == 30 * DAY

    (code,) = sources.create_batch(
        5 * CREDIT, credit_lifetime=Duration(seconds=int((30 * DAY).total_seconds()))
    ).codes
    redeemed = sources.redeem(account, code).lot
    assert dt(redeemed.expires_at) - dt(redeemed.created_at) == 30 * DAY
