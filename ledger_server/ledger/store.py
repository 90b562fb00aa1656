"""Repository calls: each takes a connection the handler owns, runs one named
query and never commits. psycopg errors leave here as domain errors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import TupleRow

from ledger_server.db.errors import translate
from ledger_server.db.queries import query

Json = dict[str, Any]


async def _rows(
    conn: AsyncConnection[TupleRow], name: str, params: Mapping[str, object]
) -> list[TupleRow]:
    try:
        cursor = await conn.execute(query(name), params)
        return await cursor.fetchall()
    except psycopg.Error as exc:
        domain_error = translate(exc)
        if domain_error is None:
            raise
        raise domain_error from exc


async def call_json(
    conn: AsyncConnection[TupleRow], name: str, params: Mapping[str, object]
) -> Json:
    """Runs a query whose single row holds one jsonb value (a ledger function)."""
    rows = await _rows(conn, name, params)
    value = rows[0][0]
    if not isinstance(value, dict):
        raise TypeError(f"query {name} returned {type(value).__name__}, not a JSON object")
    return value


async def fetch_all(
    conn: AsyncConnection[TupleRow], name: str, params: Mapping[str, object]
) -> list[TupleRow]:
    return await _rows(conn, name, params)


async def call_json_array(
    conn: AsyncConnection[TupleRow], name: str, params: Mapping[str, object]
) -> list[Json]:
    """Runs a query whose single row holds one jsonb array (a batch function)."""
    rows = await _rows(conn, name, params)
    value = rows[0][0]
    if not isinstance(value, list):
        raise TypeError(f"query {name} returned {type(value).__name__}, not a JSON array")
    return value
