"""Connections of their own (migrating, the settings written at start, the audit, a worker's
start-up check) and the pools' (db/pool.py, workers/pool.py) give a connection attempt a
time-out unless the URL or the environment names one."""

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


def with_connect_timeout(database_url: str) -> str:
    """``database_url`` with DEFAULT_CONNECT_TIMEOUT_SECONDS unless it, or the environment
    (PGCONNECT_TIMEOUT), sets a connect_timeout of its own."""
    if "connect_timeout" in conninfo_to_dict(database_url) or os.environ.get("PGCONNECT_TIMEOUT"):
        return database_url
    return make_conninfo(database_url, connect_timeout=DEFAULT_CONNECT_TIMEOUT_SECONDS)


def connect(database_url: str, **kwargs: Any) -> psycopg.Connection[Any]:
    """psycopg.connect with the connection attempt's time-out (with_connect_timeout)."""
    return psycopg.connect(with_connect_timeout(database_url), **kwargs)
