"""The summary of every account reads the period, not the history (DESIGN.md section 7).

GetSummary with no account reads the journal by time alone and sums the lots of every
account. Its cost must follow the period's activity and the live lots: a platform's
journal and its spent lots only grow. This runs the report's named queries for every
account in a session that explains each statement (enable_seqscan off, so the planner
takes an index wherever one fits) and checks where the rows come from.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import pytest

from ledger_server.db.queries import query
from ledger_server.server.report_service import USAGE_ROWS
from support.ledger import CREDIT
from support.plans import Conn, Plan, PlanRecorder, scans

# Partial indexes that hold only lots with credits left, or the overdraft lots.
LIVE_LOT_INDEXES = frozenset(
    {"lots_consumption_order", "lots_account_expiry", "lots_one_overdraft_per_account"}
)


def index_names(node: Plan) -> set[str]:
    """The indexes a scan reads (a bitmap heap scan's are in its bitmap index scans)."""
    names = {node["Index Name"]} if "Index Name" in node else set()
    for child in node.get("Plans", []):
        names |= index_names(child)
    return names


def statement_plan(plans: list[tuple[str, Plan]], name: str) -> Plan:
    """The plan of the named query among those recorded, which include the statements of
    the functions it calls (logged first, as they finish first)."""
    opening = " ".join(query(name).decode().split())[:60]
    (plan,) = [plan for text, plan in plans if text.startswith(opening)]
    return plan


def index_condition(node: Plan) -> str:
    found = [node.get("Index Cond", ""), node.get("Recheck Cond", "")]
    found += [index_condition(child) for child in node.get("Plans", [])]
    return " ".join(part for part in found if part)


class ReportPlans(NamedTuple):
    """The plans (with the rows and loops each node ran) of every account's summary and
    usage, and what the period holds that needs a look-up."""

    summary: Plan
    usage: Plan
    refunds: int
    expired_lots: int  # account-side postings of expiries since the start


def _charges_and_a_refund(conn: Conn, now: datetime) -> None:
    """An account with three charges and one refund, through the handlers' named queries."""
    account = f"report-plans-{secrets.token_hex(4)}"

    def call(name: str, **params: object) -> Any:
        common = {"account_id": account, "key": secrets.token_hex(8), "hash": bytes(32)}
        row = conn.execute(query(name), {**common, "now": now, **params}).fetchone()
        return row[0] if row else None

    call("grant", amount=100 * CREDIT, source="purchase", expires_at=None,
         balance_kind="main", external_ref="", comment="", actor=None)  # fmt: skip
    for _ in range(3):
        charged = call("consume", amount=CREDIT, usage=None, feature="chat", comment="")
    reservation = charged["reservation"]["reservation_id"]
    call("refund", reservation_id=reservation, amount=CREDIT // 2, reason="")


@pytest.fixture(scope="module")
def every_account_plans(explained_conn: tuple[Conn, PlanRecorder]) -> ReportPlans:
    conn, recorder = explained_conn
    now = datetime.now(UTC)
    _charges_and_a_refund(conn, now)
    params = {"account_id": None, "start": now - timedelta(days=1), "end": now + timedelta(days=1),
              "now": now, "usage_rows": USAGE_ROWS}  # fmt: skip
    refunds = conn.execute(
        "SELECT count(*) FROM journal_transactions"
        " WHERE kind = 'refund' AND created_at >= %(start)s AND created_at < %(end)s",
        params,
    ).fetchone()
    expiries = conn.execute(
        "SELECT count(*) FROM journal_transactions t JOIN postings p USING (account_id,"
        " transaction_id) WHERE t.kind = 'expiry' AND t.created_at >= %(start)s"
        " AND p.lot_id IS NOT NULL",
        params,
    ).fetchone()
    recorder.take()
    conn.execute("SET auto_explain.log_analyze = on")
    try:
        for name in ("report_summary_by_source", "report_usage"):
            conn.execute(query(name), params).fetchall()
    finally:
        conn.execute("SET auto_explain.log_analyze = off")
    plans = recorder.take()
    summary, usage = (
        statement_plan(plans, name) for name in ("report_summary_by_source", "report_usage")
    )
    assert refunds is not None and expiries is not None
    return ReportPlans(summary, usage, refunds[0], expiries[0])


def table_scans(plans: ReportPlans, table: str) -> list[Plan]:
    found = [
        node
        for plan in (plans.summary, plans.usage)
        for node in scans(plan)
        if node["Relation Name"] == table
    ]
    assert found, f"no scan of {table} in the plans"
    return found


@pytest.mark.parametrize("table", ["journal_transactions", "postings", "reservations"])
def test_the_history_is_read_from_the_period_on_only(
    every_account_plans: ReportPlans, table: str
) -> None:
    """Every read of the journal, the postings and the reservations names what it wants in
    an index condition: the time or id the period starts at, or one entry's key. A
    sequential scan or a walk of a whole index reads every entry ever made."""
    for node in table_scans(every_account_plans, table):
        condition = index_condition(node)
        assert node["Node Type"] != "Seq Scan" and condition, (
            f"every row of {table} is read: {node['Node Type']} {index_names(node)}"
        )


def test_the_journal_and_postings_are_reached_by_time_and_id(
    every_account_plans: ReportPlans,
) -> None:
    conditions = {
        table: [index_condition(node) for node in table_scans(every_account_plans, table)]
        for table in ("journal_transactions", "postings")
    }
    assert any("created_at" in c for c in conditions["journal_transactions"]), conditions
    assert any("transaction_id" in c and "account_id" not in c for c in conditions["postings"]), (
        conditions
    )


def test_only_live_and_overdraft_lots_are_read(every_account_plans: ReportPlans) -> None:
    for node in table_scans(every_account_plans, "lots"):
        names = index_names(node)
        assert node["Node Type"] != "Seq Scan", "every lot ever granted is read"
        if not index_condition(node):
            assert names <= LIVE_LOT_INDEXES, f"spent lots are read too, through {names}"


def test_usage_looks_up_the_reservations_of_refunds_only(
    every_account_plans: ReportPlans,
) -> None:
    """A refund's model is its charge's, found through its reservation; looked up for every
    charge too, the plan reads (or probes) a reservation per entry of the period."""
    lookups = sum(
        node["Actual Loops"]
        for node in scans(every_account_plans.usage)
        if node["Relation Name"] == "reservations"
    )
    assert every_account_plans.refunds >= 1 and lookups <= every_account_plans.refunds


def test_the_summary_looks_up_the_lots_of_expiries_only(
    every_account_plans: ReportPlans,
) -> None:
    """An expiry counts when its lot expired; looked up for every movement, the plan reads
    (or probes) a lot per posting since the start."""
    lookups = sum(
        node["Actual Loops"]
        for node in scans(every_account_plans.summary)
        if node["Relation Name"] == "lots" and "lots_pkey" in index_names(node)
    )
    assert lookups <= every_account_plans.expired_lots


def test_the_time_and_id_indexes_serve_the_read_alone(
    explained_conn: tuple[Conn, PlanRecorder],
) -> None:
    """On these tiny tables the planner may prefer walking the account-leading indexes
    account by account (PostgreSQL 18's skip scan), or all of one, which on a real ledger
    costs a descent per account or every row. With those out of the way (dropped in a
    transaction rolled back), the read still finds the period through an index: the BRIN
    indexes of migrations 0018 and 0019."""
    conn, recorder = explained_conn
    now = datetime.now(UTC)
    params = {"account_id": None, "start": now - timedelta(days=1), "end": now, "now": now}
    with conn.transaction(force_rollback=True):
        conn.execute("DROP INDEX journal_transactions_account_time")
        conn.execute("ALTER TABLE postings DROP CONSTRAINT postings_pkey")
        conn.execute("DROP INDEX postings_lot")
        recorder.take()
        conn.execute(query("report_summary_by_source"), params).fetchall()
        # In a transaction block the statement's portal, and so its end and the plan
        # auto_explain logs then, lasts until the next statement.
        conn.execute("SELECT 1")
        plan = statement_plan(recorder.take(), "report_summary_by_source")
    used = {
        name
        for node in scans(plan)
        if node["Relation Name"] in ("journal_transactions", "postings")
        for name in index_names(node)
    }
    assert {"journal_transactions_id_created", "postings_transaction"} <= used, used
