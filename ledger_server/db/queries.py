"""Named SQL queries, loaded once from ledger_server/sql/queries/*.sql.

A file holds several queries, each introduced by a `-- name: <query_name>` line;
the text up to the next such line is the query."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

_NAME_LINE = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


def parse_queries(text: str) -> dict[str, bytes]:
    parts = _NAME_LINE.split(text)
    queries: dict[str, bytes] = {}
    # parts = [preamble, name1, body1, name2, body2, ...]
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        queries[name] = body.strip().encode()
    return queries


@cache
def load_queries() -> dict[str, bytes]:
    """All named queries. Bytes, because psycopg accepts bytes as a query
    without the LiteralString typing that loaded text cannot satisfy."""
    queries: dict[str, bytes] = {}
    folder = resources.files("ledger_server") / "sql" / "queries"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".sql"):
            continue
        for name, body in parse_queries(entry.read_text(encoding="utf-8")).items():
            if name in queries:
                raise ValueError(f"query {name!r} is defined in more than one file")
            queries[name] = body
    return queries


def query(name: str) -> bytes:
    return load_queries()[name]
