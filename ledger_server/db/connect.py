"""Connections of their own (migrating, the settings written at start, the audit, a worker's
start-up check) and the pools' (db/pool.py, workers/pool.py) give a connection attempt a
time-out, and an established connection TCP time-outs, unless the URL or the environment
names them."""

from __future__ import annotations

import os
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

# How long one connection attempt may take when the URL names no connect_timeout (nor
# PGCONNECT_TIMEOUT): to a PostgreSQL behind a network that drops packets an attempt waited
# for the operating system's TCP time-out (about two minutes on Linux), so the pools never
# saw it fail and every call waited out its own time-out instead of failing fast; a server
# starting (migrating) waited as long, deaf to SIGTERM meanwhile.
DEFAULT_CONNECT_TIMEOUT_SECONDS = 10

# An established connection whose network went away while it waited for an answer (a
# partition, a host gone without a reset) waited for TCP itself: two hours of keepalive
# silence by default, or about fifteen minutes of retransmissions. PostgreSQL's statement
# time-outs cannot help: their answer never arrives. A group-commit lane held so stalled
# every charging call behind it, and a worker's job waited out RQ's time-out. With these, the
# kernel probes an idle connection after 10 s, every 5 s, and gives up after 3 unanswered
# probes, or after 25 s of data sent and not acknowledged: the call fails (psycopg's
# OperationalError, answered UNAVAILABLE), the pool replaces the connection, and the lane is
# free again before a waiting call's MAX_WAIT (45 s, db/waits.py) runs out. A healthy peer's
# kernel answers the probes even while a statement runs for minutes, so a long statement is
# never cut. libpq applies them to TCP connections only (not to a Unix socket), and
# tcp_user_timeout only with keepalive: a URL's keepalives=0 turns both off.
DEFAULT_TCP_SETTINGS: dict[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 25_000,  # milliseconds
}


def with_network_timeouts(database_url: str) -> str:
    """``database_url`` with DEFAULT_CONNECT_TIMEOUT_SECONDS unless it, or the environment
    (PGCONNECT_TIMEOUT), sets a connect_timeout of its own, and with each of
    DEFAULT_TCP_SETTINGS it does not set."""
    given = conninfo_to_dict(database_url)
    added: dict[str, int] = {k: v for k, v in DEFAULT_TCP_SETTINGS.items() if k not in given}
    if "connect_timeout" not in given and not os.environ.get("PGCONNECT_TIMEOUT"):
        added["connect_timeout"] = DEFAULT_CONNECT_TIMEOUT_SECONDS
    return make_conninfo(database_url, **added) if added else database_url


def connect(database_url: str, **kwargs: Any) -> psycopg.Connection[Any]:
    """psycopg.connect with the connection attempt's and the connection's time-outs
    (with_network_timeouts)."""
    return psycopg.connect(with_network_timeouts(database_url), **kwargs)
