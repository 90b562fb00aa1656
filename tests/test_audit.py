"""The audit finds every broken invariant, and is clean on a healthy ledger."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime

import psycopg

from ledger.v1 import types_pb2
from ledger_server.audit import audit_database
from ledger_server.db.migrate import migrate
from ledger_server.runtime_settings import environment_defaults, sync_environment_defaults
from support.ledger import CREDIT, Ledger, new_account


def _fill(database_url: str) -> None:
    """A small healthy ledger written through the SQL functions directly."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        sync_environment_defaults(conn, environment_defaults(), datetime.now(UTC))
        conn.execute(
            "SELECT ledger_grant('audited', 'g1', '\\x01', 10000000, 'purchase', NULL, 'main', "
            "'', '', NULL, now())"
        )
        conn.execute(
            "SELECT ledger_consume('audited', 'c1', '\\x02', 4000000, NULL, 'chat', '', now())"
        )
        conn.execute(
            "SELECT ledger_reserve('audited', 'r1', '\\x03', 1000000, NULL, "
            "now() + interval '1 hour', 'chat', '', now())"
        )


def test_a_healthy_ledger_audits_clean(ledger: Ledger, ledger_db_url: str) -> None:
    account = new_account()
    ledger.grant(account, 10, source=types_pb2.CREDIT_SOURCE_SIGNUP)
    ledger.consume(account, 3 * CREDIT)
    assert audit_database(ledger_db_url) == []


def test_each_broken_invariant_is_reported(fresh_database_url: str) -> None:
    migrate(fresh_database_url)
    _fill(fresh_database_url)
    assert audit_database(fresh_database_url) == []
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE lots SET remaining_micros = remaining_micros - 1 WHERE account_id = 'audited'"
        )
        found = {v.check for v in audit_database(fresh_database_url)}
        assert {"balance_vs_lots", "lot_vs_postings"} <= found

        conn.execute(
            "UPDATE lots SET remaining_micros = remaining_micros + 1 WHERE account_id = 'audited'"
        )
        conn.execute(
            "UPDATE accounts SET balance_micros = balance_micros + 5 WHERE account_id = 'audited'"
        )
        found = {v.check for v in audit_database(fresh_database_url)}
        assert {"balance_vs_lots", "balance_vs_postings"} <= found
        conn.execute(
            "UPDATE accounts SET balance_micros = balance_micros - 5 WHERE account_id = 'audited'"
        )
        assert audit_database(fresh_database_url) == []

        conn.execute(
            "INSERT INTO postings (account_id, transaction_id, posting_no, ledger_account, "
            "amount_micros) SELECT account_id, transaction_id, 99, 'revenue', 7 "
            "FROM journal_transactions WHERE account_id = 'audited' AND kind = 'charge'"
        )
        found = {v.check for v in audit_database(fresh_database_url)}
        assert "unbalanced_transaction" in found


def test_held_credits_must_agree(fresh_database_url: str) -> None:
    migrate(fresh_database_url)
    _fill(fresh_database_url)
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        conn.execute("UPDATE accounts SET held_micros = 0 WHERE account_id = 'audited'")
    found = {v.check for v in audit_database(fresh_database_url)}
    assert "held_vs_lots" in found


def test_the_audit_command_exit_code(fresh_database_url: str) -> None:
    migrate(fresh_database_url)
    _fill(fresh_database_url)
    env = {"DATABASE_URL": fresh_database_url, "PATH": "/usr/bin:/bin"}
    clean = subprocess.run(
        [sys.executable, "-m", "ledger_server", "audit"], env=env, capture_output=True, text=True
    )
    assert clean.returncode == 0, clean.stderr
    assert "audit clean" in clean.stdout
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        conn.execute("UPDATE lots SET remaining_micros = remaining_micros - 1")
    broken = subprocess.run(
        [sys.executable, "-m", "ledger_server", "audit"], env=env, capture_output=True, text=True
    )
    assert broken.returncode == 1
    assert "balance_vs_lots" in broken.stdout


def test_overdraft_invariants_are_audited(fresh_database_url: str) -> None:
    """The overdraft lot matches the limit and what the 'overdraft' account granted it,
    and a debt never stands beside spendable credits (tests/test_overdraft.py)."""
    migrate(fresh_database_url)
    _fill(fresh_database_url)
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        conn.execute(
            "SELECT ledger_set_overdraft_limit('audited', 'k', '\\x05', 5000000, 'r', 'a', now())"
        )
        conn.execute(
            "SELECT ledger_consume('audited', 'c2', '\\x04', 107000000, NULL, 'chat', '', now())"
        )
        # All but the credit held spent, and 2 of the overdraft.
        assert audit_database(fresh_database_url) == []

        conn.execute("UPDATE accounts SET overdraft_limit_micros = 6000000")
        assert {v.check for v in audit_database(fresh_database_url)} == {"overdraft_vs_limit"}
        conn.execute("UPDATE accounts SET overdraft_limit_micros = 5000000")

        # A hold given back behind the ledger's back: its credits and the debt side by side.
        conn.execute("UPDATE lots SET held_micros = 0 WHERE source = 'signup'")
        conn.execute("UPDATE accounts SET held_micros = 0")
        conn.execute("UPDATE reservations SET status = 'released', finalized_at = now()")
        assert {v.check for v in audit_database(fresh_database_url)} == {"debt_beside_credits"}
