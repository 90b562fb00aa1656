"""Patched copies of the ledger's SQL functions with one guarantee switched off, for the
test that proves the concurrency and idempotency tests bite. Applied only to a scratch
database; the real files are never touched.

Each patch replaces exact text and fails loudly when the text is not there (the SQL was
changed), so a patch can never silently leave the guarantee in place."""

from __future__ import annotations

from importlib import resources

import psycopg

LEDGER_FUNCTIONS = "0001_ledger.sql"

# (a) No row locks: the account row is read without FOR UPDATE, then the transaction
# sleeps so that every concurrent call reads the same balances (the race made certain);
# lots are read without FOR UPDATE.
NO_LOCKS: list[tuple[str, str, int]] = [
    (
        "    SELECT * INTO a FROM accounts WHERE account_id = p_account FOR UPDATE;\n"
        "    IF NOT FOUND THEN\n"
        "        PERFORM ledger_fail('LE003'",
        "    SELECT * INTO a FROM accounts WHERE account_id = p_account;\n"
        "    PERFORM pg_sleep(0.3);  -- widen the race window\n"
        "    IF NOT FOUND THEN\n"
        "        PERFORM ledger_fail('LE003'",
        1,
    ),
    (
        "         ORDER BY priority, expires_at, lot_id\n           FOR UPDATE;\n",
        "         ORDER BY priority, expires_at, lot_id;\n",
        1,
    ),
    ("     ORDER BY lot_id\n       FOR UPDATE;\n", "     ORDER BY lot_id;\n", 1),
]

# (b) No idempotency: a key is never found and never stored.
NO_IDEMPOTENCY: list[tuple[str, str, int]] = [
    (
        "    SELECT * INTO k FROM idempotency_keys\n"
        "     WHERE account_id = p_account AND idempotency_key = p_key;\n"
        "    IF NOT FOUND THEN\n",
        "    SELECT * INTO k FROM idempotency_keys\n"
        "     WHERE account_id = p_account AND idempotency_key = p_key;\n"
        "    IF TRUE THEN  -- every key is new\n",
        1,
    ),
    (
        "    INSERT INTO idempotency_keys (account_id, idempotency_key, operation, request_hash,"
        " response, created_at)\n"
        "    VALUES (p_account, p_key, p_operation, p_hash, p_response, p_now);\n",
        "",
        1,
    ),
]


def original() -> str:
    folder = resources.files("ledger_server") / "sql" / "functions"
    return (folder / LEDGER_FUNCTIONS).read_text(encoding="utf-8")


def patched(patches: list[tuple[str, str, int]]) -> str:
    sql = original()
    for old, new, count in patches:
        found = sql.count(old)
        assert found == count, f"patch target found {found} times, expected {count}:\n{old}"
        sql = sql.replace(old, new)
    return sql


def apply(database_url: str, sql: str) -> None:
    """Runs a function file (all CREATE OR REPLACE) on the database."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.encode())
