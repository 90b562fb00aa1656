"""The ledger audit: every invariant checked over the whole database.

Postings of every transaction sum to zero; each transaction's amount equals its
account-side postings; for every account the balance equals the sum of its lots'
remaining credits and the sum of its postings; holds agree between accounts, lots
and reservations; no lot is below zero or above its amount. The figures stored beside
the journal agree with it: lots' expired credits, what reservations and each of their
lots committed and refunded (and what of that expired at once), what payments' refunds
clawed back; expiries come after their lot's expiry and overdraft entries touch the
overdraft lot only; hold and release entries touch no lot; a lot's postings carry its
source. The inviter an account names is another account. The append-only tables' triggers
(row and TRUNCATE) exist and are enabled. Each check is a branch of the one query in
sql/queries/audit.sql. The database must be migrated to this
release (AuditCannotRun otherwise)."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg.rows import TupleRow

from ledger_server.db.connect import connect
from ledger_server.db.migrate import migrations
from ledger_server.db.queries import query
from ledger_server.db.session_limits import SET_SESSION_LIMITS


@dataclass(frozen=True)
class Violation:
    check: str
    account_id: str
    detail: str

    def __str__(self) -> str:
        return f"{self.check} [{self.account_id}] {self.detail}"


class AuditCannotRun(Exception):
    """The audit did not run (its callers exit 3, as for a database out of reach): a
    violation report must never be confused with a database it could not read."""


def _require_migrated(conn: psycopg.Connection[TupleRow]) -> None:
    # The query reads this release's schema: on an older one it fails on whatever table or
    # column is missing first, which says nothing of what to do.
    applied: set[int] = set()
    if conn.execute(b"SELECT to_regclass('schema_migrations')").fetchone() != (None,):
        applied = {int(r[0]) for r in conn.execute(b"SELECT version FROM schema_migrations")}
    missing = sorted({m.version for m in migrations()} - applied)
    if missing:
        raise AuditCannotRun(
            f"the database is not migrated (migration {missing[0]:04d} and {len(missing) - 1} "
            "more missing): run `migrate` first"
        )


def run_audit(conn: psycopg.Connection[TupleRow]) -> list[Violation]:
    rows = conn.execute(query("audit")).fetchall()
    return [Violation(str(r[0]), str(r[1]), str(r[2])) for r in rows]


def audit_database(database_url: str) -> list[Violation]:
    # Repeatable read: one snapshot for every check, so a running ledger audits
    # consistently while it keeps serving.
    with connect(database_url, autocommit=True) as conn:
        conn.execute(SET_SESSION_LIMITS)
        with conn.transaction():
            conn.execute(b"SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            _require_migrated(conn)
            return run_audit(conn)
