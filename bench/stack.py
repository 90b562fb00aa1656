"""The stack under test, started the way `make run` starts it: PostgreSQL and Redis from
DATABASE_URL / REDIS_URL, else embedded servers under the bench data dir (never the
`.data/pg` of `make run`), and the gRPC server as its own process
(`python -m ledger_server serve`, migrating on start) on ports it picks itself."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psycopg
from grpc_health.v1 import health_pb2

from bench import health
from ledger_server.devstack import embedded
from ledger_server.devstack.parent_death import dying_with_parent

BENCH_DB = "ledger_bench"
REPO = embedded.repo_root()


@dataclass
class Databases:
    server_url: str  # the cluster (for CREATE DATABASE)
    database_url: str  # the bench database the server uses
    redis_url: str
    embedded_pgdata: Path | None
    started: list[embedded.Stoppable] = field(default_factory=list)


_LISTENING = re.compile(r"listening on \S+ \(port (\d+)\)")
_METRICS = re.compile(r"metrics on (http://\S+:(\d+)/metrics)")


@dataclass(frozen=True)
class Ports:
    grpc: int | None = None
    metrics_url: str = ""  # empty: not served (the server logs why)


def ports_from_log(text: str) -> Ports:
    """The ports the server bound, from the lines it logs once it has bound them."""
    grpc_port = _LISTENING.search(text)
    metrics = _METRICS.search(text)
    return Ports(
        grpc=int(grpc_port.group(1)) if grpc_port else None,
        metrics_url=metrics.group(1) if metrics else "",
    )


def wait_for_ports(
    log_path: Path, offset: int, timeout: float, process: subprocess.Popen[bytes]
) -> Ports:
    """Reads the server's log from ``offset`` (where this start began) until it names its
    gRPC port. The metrics line comes before it; a server without metrics has none."""
    deadline = time.monotonic() + timeout
    while True:
        with log_path.open("rb") as log:
            log.seek(offset)
            ports = ports_from_log(log.read().decode(errors="replace"))
        if ports.grpc is not None:
            return ports
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}; see {log_path}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server named no port after {timeout}s; see {log_path}")
        time.sleep(0.1)


def _preload_pg_stat_statements(pgdata: Path, url: str) -> str:
    """Loads pg_stat_statements into the bench cluster (ours alone: a restart is fine), so
    round trips per operation and the cost of each statement inside the ledger functions
    can be read from the server's own counters. Returns the (possibly new) URL."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SHOW shared_preload_libraries").fetchone()
        if row and "pg_stat_statements" in str(row[0]):
            return url
        conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        conn.execute("ALTER SYSTEM SET pg_stat_statements.track = 'top'")
        conn.execute("ALTER SYSTEM SET pg_stat_statements.max = 10000")
    print("bench: restarting the bench PostgreSQL to load pg_stat_statements", flush=True)
    embedded.EmbeddedPostgres(pgdata=pgdata, url=url, started=True).stop()
    return embedded.start_postgres(pgdata).url


@contextlib.contextmanager
def databases(data_dir: Path) -> Iterator[Databases]:
    """PostgreSQL (with a `ledger_bench` database when embedded) and Redis; stops what it
    started on exit."""
    given_db = os.environ.get("DATABASE_URL") or ""
    server_url, redis_url, started = embedded.resolve_urls(data_dir)
    pgdata: Path | None = None
    try:
        if given_db:
            database_url = given_db  # the caller's database, used as it is
        else:
            pgdata = (data_dir / "pg").resolve()
            server_url = _preload_pg_stat_statements(pgdata, server_url)
            with psycopg.connect(server_url, autocommit=True) as conn:
                exists = conn.execute(
                    "SELECT 1 FROM pg_database WHERE datname = %s", (BENCH_DB,)
                ).fetchone()
            if not exists:
                embedded.create_database(server_url, BENCH_DB)
            database_url = embedded.with_database(server_url, BENCH_DB)
        with (
            psycopg.connect(database_url, autocommit=True) as conn,
            contextlib.suppress(psycopg.Error),
        ):
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        yield Databases(server_url, database_url, redis_url, pgdata, started)
    finally:
        for server in reversed(started):
            with contextlib.suppress(Exception):
                server.stop()


def postmaster_pid(dbs: Databases) -> int | None:
    """The postmaster's pid when the cluster runs on this machine (for its CPU time)."""
    with psycopg.connect(dbs.database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'"
        ).fetchone()
    if row is None:
        return None
    try:
        stat = Path(f"/proc/{row[0]}/stat").read_text()
    except OSError:
        return None  # a remote server: its CPU is not ours to read
    return int(stat.rsplit(")", 1)[1].split()[1])  # the checkpointer's parent


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    address: str
    log_path: Path
    metrics_url: str

    @property
    def pid(self) -> int:
        return self.process.pid


def wait_serving(address: str, timeout: float, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        check = health.check(channel)
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}")
            try:
                reply = check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server is not serving on {address} after {timeout}s")
            time.sleep(0.2)


@contextlib.contextmanager
def server(
    dbs: Databases, log_path: Path, extra_env: dict[str, str] | None = None
) -> Iterator[Server]:
    """`python -m ledger_server serve`, as `make run` starts it. Both ports are the
    server's own pick (port 0), read back from its log, so nothing else can take them
    between a probe and the bind."""
    env = {
        **os.environ,
        "DATABASE_URL": dbs.database_url,
        "REDIS_URL": dbs.redis_url,
        "LEDGER_GRPC_ADDR": "127.0.0.1:0",
        # Its own port: the bench reads it, and a `make run` beside it keeps the default one.
        "LEDGER_METRICS_ADDR": "127.0.0.1:0",
        "LEDGER_MIGRATE_ON_START": "true",
        "PYTHONUNBUFFERED": "1",
        # The ports are read from INFO lines, whatever level the caller's environment sets.
        "LEDGER_LOG_LEVEL": "INFO",
        **(extra_env or {}),
    }
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("ab")
    offset = log.tell()
    process = subprocess.Popen(
        dying_with_parent([sys.executable, "-m", "ledger_server", "serve"]),
        env=env,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        ports = wait_for_ports(log_path, offset, 90, process)
        address = f"127.0.0.1:{ports.grpc}"
        wait_serving(address, 90, process)
        yield Server(process, address, log_path, ports.metrics_url)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()
