"""The ledger audit: every invariant checked over the whole database.

Postings of every transaction sum to zero; each transaction's amount equals its
account-side postings; for every account the balance equals the sum of its lots'
remaining credits and the sum of its postings; holds agree between accounts, lots
and reservations; no lot is below zero or above its amount. The figures stored beside
the journal agree with it: lots' expired credits, what reservations and each of their
lots committed and refunded (and what of that expired at once), what payments' refunds
clawed back; expiries come after their lot's expiry and overdraft entries touch the
overdraft lot only. Each check is a branch of the one query in sql/queries/audit.sql."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg.rows import TupleRow

from ledger_server.db.queries import query
from ledger_server.db.session_limits import SET_SESSION_LIMITS


@dataclass(frozen=True)
class Violation:
    check: str
    account_id: str
    detail: str

    def __str__(self) -> str:
        return f"{self.check} [{self.account_id}] {self.detail}"


def run_audit(conn: psycopg.Connection[TupleRow]) -> list[Violation]:
    rows = conn.execute(query("audit")).fetchall()
    return [Violation(str(r[0]), str(r[1]), str(r[2])) for r in rows]


def audit_database(database_url: str) -> list[Violation]:
    # Repeatable read: one snapshot for every check, so a running ledger audits
    # consistently while it keeps serving.
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(SET_SESSION_LIMITS)
        with conn.transaction():
            conn.execute(b"SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            return run_audit(conn)
