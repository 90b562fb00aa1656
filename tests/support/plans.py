"""Reading the plans PostgreSQL chooses, statements inside PL/pgSQL functions included:
auto_explain loaded into one session sends each plan to the client as a JSON LOG notice."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.errors import Diagnostic
from psycopg.rows import TupleRow

from ledger_server import runtime_settings

Plan = dict[str, Any]
Conn = psycopg.Connection[TupleRow]


def scans(plan: Plan) -> Iterator[Plan]:
    """Every node of a plan tree that reads a table (not the ModifyTable above it)."""
    if "Scan" in plan.get("Node Type", "") and "Relation Name" in plan:
        yield plan
    for child in plan.get("Plans", []):
        yield from scans(child)


class PlanRecorder:
    """Collects the JSON plans auto_explain sends as LOG notices on one connection."""

    def __init__(self, conn: Conn) -> None:
        self.plans: list[tuple[str, Plan]] = []
        conn.add_notice_handler(self._on_notice)

    def _on_notice(self, diag: Diagnostic) -> None:
        message = diag.message_primary or ""
        if "plan:" not in message:
            return
        document = json.loads(message[message.index("{") :])
        text = " ".join(document.get("Query Text", "").split())
        self.plans.append((text[:160], document["Plan"]))

    def take(self) -> list[tuple[str, Plan]]:
        plans, self.plans = self.plans, []
        return plans


@contextmanager
def explained_connection(database_url: str) -> Iterator[tuple[Conn, PlanRecorder]]:
    """A session that explains every statement it runs. Tiny test tables would make a
    sequential scan the cheapest plan for any query, so it runs with enable_seqscan = off:
    the planner then takes an index whenever one fits the query."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        # The ledger functions read run-time settings, which a server writes at start.
        runtime_settings.sync_environment_defaults(
            conn, runtime_settings.environment_defaults(), datetime.now(UTC)
        )
        try:
            conn.execute("LOAD 'auto_explain'")
        except psycopg.errors.InsufficientPrivilege as exc:
            # Not skipped: the check would silently vanish. The embedded server and the
            # documented local setup both connect as a superuser.
            raise RuntimeError(
                "this test loads auto_explain, which needs a superuser: point DATABASE_URL "
                "at the server as one (the embedded server's postgres user is)"
            ) from exc
        for setting, value in (
            ("auto_explain.log_min_duration", "0"),
            ("auto_explain.log_nested_statements", "on"),
            ("auto_explain.log_format", "json"),
            ("auto_explain.log_level", "log"),
            ("client_min_messages", "log"),
            ("enable_seqscan", "off"),
        ):
            conn.execute(f"SET {setting} = {value}")
        yield conn, PlanRecorder(conn)
