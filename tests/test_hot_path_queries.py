"""Every hot-path query reaches its rows through account_id (docs/SCALING.md).

Distributed by account_id (Citus), a statement that finds an account's rows by anything
else becomes a query over every shard. This runs each named query the hot-path RPCs use
(grant, balance and its batched read, reserve, commit, release, refund, consume and its
coalesced batch,
get_reservation, list_lots, list_transactions) against the test database with auto_explain
loaded into the session (log_nested_statements on, JSON plans sent to the client as LOG
notices), so it sees the
plan of the top-level statement and of every statement the PL/pgSQL functions run inside
it, and asserts that every scan of an account-keyed table has an index condition on
account_id.

Tiny test tables would make sequential scans the cheapest plan for any query, so the
session runs with enable_seqscan = off: the planner then takes an index whenever one fits
the query, and a statement that still scans sequentially (or walks an index without a
condition) has no account_id index path at all.

Opening an account (the first Grant, CreateAccount) is deliberately not on the list: it
looks the new referral code up across all accounts (see docs/SCALING.md).
"""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from psycopg.types.json import Jsonb

from ledger_server.db.queries import load_queries, query
from support.plans import Conn, Plan, PlanRecorder, scans

ACCOUNT_TABLES = frozenset(
    {
        "accounts",
        "lots",
        "reservations",
        "reservation_lots",
        "journal_transactions",
        "postings",
        "idempotency_keys",
        "low_balance_alerts",
        "monthly_allowances",
        "daily_claims",
    }
)
HOT_PATH_RPCS = (
    "grant",
    "balance",
    "reserve",
    "commit",
    "release",
    "refund",
    "consume",
    "get_reservation",
    "list_lots",
    "list_transactions",
)
# Where an index scan's condition lives: Index Cond (index and index-only scans),
# Recheck Cond (a bitmap heap scan, whose bitmap index scans carry the same condition).
_INDEX_CONDITION = {
    "Index Scan": "Index Cond",
    "Index Only Scan": "Index Cond",
    "Bitmap Heap Scan": "Recheck Cond",
}
_ACCOUNT_ID = re.compile(r"\baccount_id\b")


# --- reading plans --------------------------------------------------------------------------


def violations(statement: str, plan: Plan) -> list[str]:
    """Scans of account-keyed tables that do not find their rows by account_id."""
    found = []
    for node in scans(plan):
        table = node["Relation Name"]
        if table not in ACCOUNT_TABLES:
            continue  # reference tables: credit_sources, settings, prices, ...
        condition_key = _INDEX_CONDITION.get(node["Node Type"])
        condition = node.get(condition_key, "") if condition_key else ""
        if not _ACCOUNT_ID.search(condition):
            found.append(
                f"{node['Node Type']} on {table}"
                f" ({condition_key or 'no index'}: {condition or '-'}) in: {statement}"
            )
    return found


# --- the session ----------------------------------------------------------------------------


class Flow:
    """Runs the hot-path named queries the way the handlers call them, with the same
    parameters, on one account; records the plans of each."""

    def __init__(self, conn: Conn, recorder: PlanRecorder) -> None:
        self.conn = conn
        self.recorder = recorder
        self.account = f"hot-path-{secrets.token_hex(4)}"
        self.now = datetime.now(UTC)
        self.plans: dict[str, list[tuple[str, Plan]]] = {name: [] for name in HOT_PATH_RPCS}

    def call(self, name: str, rpc: str | None = None, /, **params: object) -> Any:
        common: dict[str, object] = {
            "account_id": self.account,
            "key": secrets.token_hex(8),
            "hash": bytes(32),  # keys are unique except the deliberate replay
            "now": self.now,
        }
        rows = self.conn.execute(query(name), {**common, **params}).fetchall()
        self.plans[rpc or name] += self.recorder.take()
        return rows[0][0] if rows else None

    def grant(self, amount: int, source: str, expires_at: datetime | None) -> Any:
        return self.call(
            "grant", amount=amount, source=source, expires_at=expires_at, balance_kind="main",
            external_ref="", comment="", actor=None,
        )  # fmt: skip

    def reserve(self, amount: int, ttl: timedelta = timedelta(minutes=15)) -> str:
        data = self.call(
            "reserve", amount=amount, usage=None, expires_at=self.now + ttl, feature="chat",
            comment="",
        )  # fmt: skip
        return str(data["reservation"]["reservation_id"])

    def run(self) -> None:
        credit = 1_000_000
        # Opening the account is not hot path (see the module docstring): not recorded.
        self.grant(100 * credit, "purchase", None)
        self.recorder.take()
        self.plans["grant"].clear()

        self.grant(5 * credit, "promotion", self.now + timedelta(days=1))
        self.grant(1 * credit, "daily", None)
        self.call("balance")
        self.call("balances", "balance", accounts=[self.account])  # Balance calls read together
        held = self.reserve(8 * credit)
        self.call("get_reservation", reservation_id=held)
        self.call("commit", reservation_id=held, amount=6 * credit, usage=None, comment="")
        self.call("refund", reservation_id=held, amount=credit, reason="")
        other = self.reserve(credit)
        self.call("release", reservation_id=other, reason="", job_failed=False)
        failed = self.reserve(credit)
        self.call("release", reservation_id=failed, reason="", job_failed=True)
        consume: dict[str, object] = {
            "amount": 2 * credit,
            "usage": None,
            "feature": "chat",
            "comment": "",
        }
        self.call("consume", **consume)
        self.call("consume", key="same-key", **consume)
        self.call("consume", key="same-key", **consume)  # a replay
        if "consume_batch" in load_queries():  # Consume calls committed together
            batch = [
                {"account": self.account, "key": f"batch-{i}", "hash": "00" * 32,
                 "amount": credit, "usage": None, "feature": "chat", "comment": ""}
                for i in range(3)
            ]  # fmt: skip
            self.call("consume_batch", "consume", requests=Jsonb(batch))
            pending = self.reserve(2 * credit)
            commits = [
                {"op": "commit", "account": self.account, "key": "batch-commit",
                 "hash": "00" * 32, "amount": credit, "usage": None, "comment": "",
                 "reservation_id": pending}
            ]  # fmt: skip
            self.call("consume_batch", "commit", requests=Jsonb(commits))
            # Releases (the set path) and a Refund of that Commit (call by call) together.
            releases = [
                {"op": "release", "account": self.account, "key": f"batch-release-{i}",
                 "hash": "00" * 32, "reservation_id": self.reserve(credit), "reason": "",
                 "job_failed": i == 0}
                for i in range(2)
            ]  # fmt: skip
            self.call("consume_batch", "release", requests=Jsonb(releases))
            refund = {"op": "refund", "account": self.account, "key": "batch-refund",
                      "hash": "00" * 32, "reservation_id": pending, "amount": None,
                      "reason": ""}  # fmt: skip
            self.call("consume_batch", "refund", requests=Jsonb([refund]))
        self.call(
            "list_lots", include_inactive=False, after_priority=None, after_expires=None,
            after_lot=None, limit=101,
        )  # fmt: skip
        self.call(
            "list_transactions", before=None, kinds=None, start_time=None, end_time=None,
            feature=None, model=None, statuses=None, limit=101, scan=None,
        )  # fmt: skip
        # A filter no index serves: a stretch of two entries, where it ended, and whether
        # anything below it was made since start_time (each, so far, of the account).
        self.call(
            "list_transactions", before=None, kinds=None, start_time=self.now - timedelta(days=1),
            end_time=None, feature="none-such", model=None, statuses=None, limit=101, scan=2,
        )  # fmt: skip

        # Two days on: the promotion lot has expired and a reservation timed out, so the
        # next operation first runs the account's maintenance (release, expiry, allowance).
        self.reserve(credit, ttl=timedelta(hours=1))
        self.now += timedelta(days=2)
        self.call("balance")
        self.reserve(credit, ttl=timedelta(hours=1))
        self.now += timedelta(days=2)
        self.call("consume", amount=credit, usage=None, feature="chat", comment="")


@pytest.fixture(scope="module")
def recorded(explained_conn: tuple[Conn, PlanRecorder]) -> dict[str, list[tuple[str, Plan]]]:
    flow = Flow(*explained_conn)
    flow.run()
    return flow.plans


# --- the checks -----------------------------------------------------------------------------


@pytest.mark.parametrize("rpc", HOT_PATH_RPCS)
def test_every_scan_of_an_account_table_uses_account_id(
    recorded: dict[str, list[tuple[str, Plan]]], rpc: str
) -> None:
    plans = recorded[rpc]
    account_scans = [
        node for _, plan in plans for node in scans(plan) if node["Relation Name"] in ACCOUNT_TABLES
    ]
    assert account_scans, f"{rpc}: no plan of an account-keyed table was captured"
    problems = [problem for statement, plan in plans for problem in violations(statement, plan)]
    assert problems == [], f"{rpc}:\n" + "\n".join(problems)


def test_nested_statements_are_captured(recorded: dict[str, list[tuple[str, Plan]]]) -> None:
    """The functions' own statements are seen, not only the top-level SELECT ledger_x()."""
    statements = " ".join(statement for statement, _ in recorded["consume"])
    assert "FROM lots" in statements and "FOR UPDATE" in statements


def test_the_check_flags_a_scan_without_account_id(
    explained_conn: tuple[Conn, PlanRecorder],
) -> None:
    conn, recorder = explained_conn
    recorder.take()
    conn.execute("SELECT count(*) FROM lots WHERE source = 'purchase'").fetchall()
    conn.execute(
        "SELECT count(*) FROM postings p JOIN lots l USING (account_id, lot_id)"
        " WHERE l.account_id = 'x'"
    ).fetchall()
    first, second = recorder.take()
    assert any("on lots" in v for v in violations(*first))
    assert violations(*second) == []
