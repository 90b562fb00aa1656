"""Shared pytest fixtures. Tests talk to a real PostgreSQL and a real Redis."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import redis
from google.protobuf import struct_pb2

from ledger.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    billing_service_pb2_grpc,
    ledger_service_pb2_grpc,
)
from ledger_client import LedgerClient
from ledger_server.audit import audit_database
from ledger_server.clock import OffsetClock
from ledger_server.config import Settings
from ledger_server.db.migrate import migrate
from ledger_server.devstack import embedded
from ledger_server.server.identity import ACTOR_METADATA_KEY
from support.client import FAST_RETRY
from support.ledger import Ledger
from support.plans import Conn, PlanRecorder, explained_connection
from support.proxy import DropProxy
from support.rq_workers import session_redis_url
from support.server import ServerThread
from support.settings import ActorMetadata, SettingsChanger

DATA_DIR = embedded.default_data_dir()  # <repo>/.data unless LEDGER_DATA_DIR is set

# --- infrastructure ---------------------------------------------------------------------------
#
# DATABASE_URL / REDIS_URL select servers; unset, embedded ones start under .data/test-* (never
# the .data/pg and .data/redis that `make run` uses). Every session gets its own database, so
# sessions can run side by side on one server. Migrations are not applied here.


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """URL of a fresh, empty database ``ledger_test_<random>`` dropped at session end."""
    server_url = os.environ.get("DATABASE_URL")
    server: embedded.EmbeddedPostgres | None = None
    if not server_url:
        server = embedded.start_postgres(DATA_DIR / "test-pg")
        embedded.tune_for_tests(server.url)  # fsync etc. off: throw-away cluster only
        server_url = server.url
    name = f"ledger_test_{secrets.token_hex(6)}"
    embedded.create_database(server_url, name)
    try:
        yield embedded.with_database(server_url, name)
    finally:
        try:
            embedded.drop_database(server_url, name)
        finally:
            if server is not None:
                server.release(stop_when_unused=True)  # the last session using it stops it


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a Redis database, flushed at session start: REDIS_URL's, one of its own for
    each test process of a run, or an embedded server of the session's own."""
    url = os.environ.get("REDIS_URL")
    server: embedded.EmbeddedRedis | None = None
    if url:
        url = session_redis_url(url)
    else:
        sessions = DATA_DIR / "test-redis"
        _remove_dead_sessions(sessions)
        server = embedded.start_redis(sessions / str(os.getpid()), persist=False, reuse=False)
        url = server.url
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()
    try:
        yield url
    finally:
        if server is not None:
            server.stop()
            shutil.rmtree(server.data_dir, ignore_errors=True)


def _remove_dead_sessions(sessions: Path) -> None:
    """Drops .data/test-redis/<pid> dirs of sessions that died without cleaning up."""
    if not sessions.is_dir():
        return
    for path in sessions.iterdir():
        if path.name.isdigit() and not _pid_alive(int(path.name)):
            shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- ledger ------------------------------------------------------------------------------------
#
# One migrated database and one real gRPC server (in a background thread, on an ephemeral
# port) per session. Tests isolate themselves by using fresh account ids, so they never need
# to clean up; the clock only moves forward, so a test that jumps ahead harms no other.


@pytest.fixture(scope="session")
def ledger_db_url(database_url: str) -> str:
    migrate(database_url)
    return database_url


@pytest.fixture
def fresh_database_url(database_url: str) -> Iterator[str]:
    """An empty database of its own, for tests that migrate or break invariants on purpose."""
    name = f"ledger_scratch_{secrets.token_hex(6)}"
    embedded.create_database(database_url, name)
    try:
        yield embedded.with_database(database_url, name)
    finally:
        embedded.drop_database(database_url, name)


@pytest.fixture(scope="session")
def clock() -> OffsetClock:
    return OffsetClock()


@pytest.fixture(scope="session")
def server_address(ledger_db_url: str, redis_url: str, clock: OffsetClock) -> Iterator[str]:
    settings = Settings(
        database_url=ledger_db_url, redis_url=redis_url, db_pool_min_size=2, db_pool_max_size=16
    )
    server = ServerThread(settings, clock).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            # The suite's baseline: no sign-up bonus, so opening an account by a grant gives
            # exact balances. Tests of the bonus turn it on with `configure`.
            admin_service_pb2_grpc.AdminServiceStub(channel).UpdateSetting(
                admin_service_pb2.UpdateSettingRequest(
                    key="signup.enabled",
                    value=struct_pb2.Value(bool_value=False),
                    reason="test suite baseline",
                    idempotency_key=f"baseline-{secrets.token_hex(8)}",
                ),
                metadata=((ACTOR_METADATA_KEY, "test-suite"),),
            )
        yield server.address
    finally:
        server.stop()


@pytest.fixture(scope="session")
def stub(server_address: str) -> Iterator[ledger_service_pb2_grpc.LedgerServiceStub]:
    with grpc.insecure_channel(server_address) as channel:
        yield ledger_service_pb2_grpc.LedgerServiceStub(channel)


@pytest.fixture
def ledger(stub: ledger_service_pb2_grpc.LedgerServiceStub) -> Ledger:
    return Ledger(stub)


@pytest.fixture
def client(server_address: str) -> Iterator[LedgerClient]:
    """The typed Python client (clients/python) on the session's server."""
    with LedgerClient(server_address, retry=FAST_RETRY) as client:
        yield client


@pytest.fixture
def proxy(server_address: str) -> Iterator[DropProxy]:
    """A TCP proxy to the session's server that can drop or hold a response."""
    with DropProxy(server_address) as proxy:
        yield proxy


@pytest.fixture(scope="session")
def admin_channel(server_address: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server_address) as channel:
        yield grpc.intercept_channel(channel, ActorMetadata("test-admin"))


@pytest.fixture(scope="session")
def admin(admin_channel: grpc.Channel) -> admin_service_pb2_grpc.AdminServiceStub:
    """AdminService, calling as the administrator "test-admin"."""
    return admin_service_pb2_grpc.AdminServiceStub(admin_channel)


@pytest.fixture(scope="session")
def billing(admin_channel: grpc.Channel) -> billing_service_pb2_grpc.BillingServiceStub:
    return billing_service_pb2_grpc.BillingServiceStub(admin_channel)


@pytest.fixture
def configure(admin: admin_service_pb2_grpc.AdminServiceStub) -> Iterator[SettingsChanger]:
    """configure(key, value) / configure.reset(key): change run-time settings for one
    test; each is put back as it was when the test ends."""
    changer = SettingsChanger(admin)
    try:
        yield changer
    finally:
        changer.restore()


@pytest.fixture
def assert_audit_clean(ledger_db_url: str) -> Callable[[], None]:
    def check() -> None:
        violations = audit_database(ledger_db_url)
        assert violations == [], "\n".join(str(v) for v in violations)

    return check


@pytest.fixture(scope="module")
def explained_conn(ledger_db_url: str) -> Iterator[tuple[Conn, PlanRecorder]]:
    """A session that explains every statement it runs (support/plans.py)."""
    with explained_connection(ledger_db_url) as explained:
        yield explained
