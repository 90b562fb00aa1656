"""A report's totals over every account can pass an int64: each balance is bounded, their
sum is not. The summary reads them exactly (numeric in SQL) and answers OUT_OF_RANGE with
the field named for a total its int64 field cannot carry, not INTERNAL (helper-78), nor
BALANCE_LIMIT, which speaks of a balance a read does not change."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import psycopg
import pytest

from ledger_server.db.migrate import migrate
from ledger_server.db.queries import query
from ledger_server.errors import LedgerError
from ledger_server.runtime_settings import environment_defaults, sync_environment_defaults
from ledger_server.server.report_service import AMOUNT_FIELDS, summary_amounts

INT64_MAX = 2**63 - 1
MOST_PER_GRANT = 10**15


def _row(source: str, allocated: int) -> tuple[object, ...]:
    amounts = dict.fromkeys(AMOUNT_FIELDS, 0)
    amounts["allocated_micros"] = allocated
    return (source, True, *amounts.values())


def test_totals_within_int64_are_added_exactly() -> None:
    half = INT64_MAX // 2
    total = summary_amounts([_row("purchase", half), _row("admin", half + 1)])
    assert total.allocated_micros == INT64_MAX


def test_a_total_past_int64_is_out_of_range_by_field() -> None:
    with pytest.raises(LedgerError) as raised:
        summary_amounts([_row("purchase", INT64_MAX), _row("admin", 1)])
    error = raised.value
    assert error.code == grpc.StatusCode.OUT_OF_RANGE
    assert error.reason == "REPORT_OUT_OF_RANGE"
    assert error.metadata == {"field": "allocated_micros"}


def test_the_summary_query_reads_a_source_past_int64_exactly(fresh_database_url: str) -> None:
    migrate(fresh_database_url)
    now = datetime.now(UTC)
    grants = INT64_MAX // MOST_PER_GRANT + 1  # one source's grants add up past int64
    accounts = 10  # each balance stays within its bigint
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        sync_environment_defaults(conn, environment_defaults(), now)
        conn.execute(
            "SELECT ledger_grant('big-' || (n %% %s), 'g' || n, '\\x01', %s, 'purchase', NULL,"
            " 'main', '', '', NULL, %s) FROM generate_series(1, %s) n",
            (accounts, MOST_PER_GRANT, now, grants),
        )
        params = {
            "account_id": None,
            "start": now - timedelta(hours=1),
            "end": now + timedelta(hours=1),
            "now": now + timedelta(minutes=1),
        }
        rows = conn.execute(query("report_summary_by_source"), params).fetchall()
    [purchase] = [row for row in rows if row[0] == "purchase"]
    assert int(purchase[3]) == grants * MOST_PER_GRANT > INT64_MAX  # allocated
    with pytest.raises(LedgerError) as raised:
        summary_amounts(rows)
    assert raised.value.reason == "REPORT_OUT_OF_RANGE"
