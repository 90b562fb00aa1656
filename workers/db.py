"""The one synchronous PostgreSQL pool of a worker process (RQ jobs, the webhook receiver).

`connection()` lends an autocommit connection: a job that needs several statements in one
transaction opens `conn.transaction()` itself. The pool is opened lazily on first use from
DATABASE_URL. Run-time settings are only read here, from PostgreSQL: a worker or webhook
receiver runs without the server's LEDGER_* settings variables, and writing its own
defaults at start put every setting no administrator changed back to its built-in value
(`migrate` and the gRPC server write them).

RQ's default worker forks a work horse per job. A pool inherited across fork() must not be
used (its connections and threads belong to the parent), so the pool is keyed by process id:
a forked child opens its own and leaves the parent's alone (psycopg never closes a connection
that another process opened).

While PostgreSQL cannot be reached the pool fails fast (workers/pool.py): `connection()`
raises DatabaseUnreachable within about a second instead of waiting 30 s, and so does the
first use of a new pool (a work horse opens one for each job)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg.rows import TupleRow

from ledger_server.config import ConfigError
from ledger_server.db.connect import connect, with_network_timeouts
from ledger_server.db.session_limits import SET_SESSION_LIMITS
from workers.pool import WorkerPool

_lock = threading.Lock()
_pool: WorkerPool | None = None
_pool_pid: int | None = None
_pool_url: str | None = None
# Pools inherited from a parent process: kept referenced, never closed or used here.
_inherited: list[WorkerPool] = []

POOL_MIN_SIZE = 1
POOL_MAX_SIZE_DEFAULT = 8


def _configure(conn: psycopg.Connection[TupleRow]) -> None:
    conn.autocommit = True
    conn.execute(SET_SESSION_LIMITS)


def database_url() -> str:
    url = os.environ.get("DATABASE_URL", "")
    if not url:
        raise ConfigError("DATABASE_URL is not set (make run starts an embedded PostgreSQL)")
    return url


def _max_size() -> int:
    raw = os.environ.get("LEDGER_DB_POOL_MAX", "")
    try:
        return max(POOL_MIN_SIZE, int(raw)) if raw else POOL_MAX_SIZE_DEFAULT
    except ValueError as exc:
        raise ConfigError(f"LEDGER_DB_POOL_MAX must be an integer, got {raw!r}") from exc


def init() -> None:
    """Call once at a worker's start, before RQ forks work horses: an unreachable database
    fails the start, not the first job, over a connection of its own (no pool is left for
    the horses to inherit)."""
    with connect(database_url(), autocommit=True) as conn:
        conn.execute(b"SELECT 1")


def pool() -> WorkerPool:
    """This process's pool, opened on first use (DATABASE_URL, LEDGER_DB_POOL_MAX). Its
    first connection is made in the background: the first `connection()` waits for it, and
    gets DatabaseUnreachable as soon as it fails (waiting for the pool to fill, as before,
    took 30 s to fail while PostgreSQL was down)."""
    global _pool, _pool_pid, _pool_url
    url = database_url()
    with _lock:
        if _pool is not None and _pool_pid != os.getpid():
            _inherited.append(_pool)
            _pool = None
        if _pool is not None and _pool_url != url:
            # DATABASE_URL changed in this process (tests pointing a worker elsewhere).
            _pool.close()
            _pool = None
        if _pool is None:
            new_pool = WorkerPool(
                with_network_timeouts(url),
                min_size=POOL_MIN_SIZE,
                max_size=_max_size(),
                configure=_configure,
                open=False,
                name="ledger-worker",
            )
            new_pool.open(wait=False)
            _pool, _pool_pid, _pool_url = new_pool, os.getpid(), url
        return _pool


@contextmanager
def connection(timeout: float | None = None) -> Iterator[psycopg.Connection[TupleRow]]:
    """A pooled connection with autocommit=True, returned to the pool on exit. Waits for
    one up to `timeout` seconds (the pool's 30 s when None) while the pool is busy, about a
    second while PostgreSQL cannot be reached (psycopg.OperationalError either way)."""
    with pool().connection(timeout) as conn:
        yield conn


def close() -> None:
    """Closes this process's pool (on shutdown); the next `connection()` opens a new one."""
    global _pool
    with _lock:
        if _pool is not None and _pool_pid == os.getpid():
            _pool.close()
        _pool = None
