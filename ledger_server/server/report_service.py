"""ReportService: the summary report and the platform-wide transaction log (DESIGN.md
section 7, seed 004). Reads only: one connection (for the summary one REPEATABLE READ
transaction), the named queries of sql/queries/reports.sql."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import date, datetime, timedelta
from typing import Any

import grpc
from psycopg import AsyncConnection
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from ledger.v1 import report_service_pb2 as pb
from ledger.v1 import report_service_pb2_grpc
from ledger_server.clock import Clock
from ledger_server.db.queries import query
from ledger_server.errors import LedgerError, invalid_field
from ledger_server.ledger import mapping, validation
from ledger_server.server import journal_pages
from ledger_server.server.calls import Context

_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_MONTH = re.compile(r"[0-9]{4}-[0-9]{2}")

# The columns of report_summary_by_source after (source, is_paid), in SummaryAmounts order.
AMOUNT_FIELDS = (
    "opening_micros",
    "allocated_micros",
    "consumed_micros",
    "adjusted_micros",
    "refunded_micros",
    "expired_micros",
    "transferred_micros",
    "remaining_micros",
)

Period = tuple[datetime | None, datetime | None, datetime | None, datetime | None]


# A period's end must still be a date: the day after 9999-12-31 is not.
_LAST_YEAR = 9998
# A period's start must still be an instant: a day of the year 1 in a zone east of UTC
# begins in the year 0, which neither PostgreSQL nor a protobuf Timestamp can hold.
_FIRST_YEAR = 2


def _local_period(request: pb.GetSummaryRequest) -> Period:
    """(local_start, local_end, start, end): a day or month as local wall-clock times
    (the SQL turns them into instants in the ledger's zone), or a range as instants."""
    which = request.WhichOneof("period")
    if which == "day":
        if not _DAY.fullmatch(request.day):
            raise invalid_field("day", "must be a date YYYY-MM-DD")
        try:
            day = date.fromisoformat(request.day)
        except ValueError:
            raise invalid_field("day", "must be a date YYYY-MM-DD") from None
        if not _FIRST_YEAR <= day.year <= _LAST_YEAR:
            raise invalid_field("day", f"must be in the years {_FIRST_YEAR} to {_LAST_YEAR}")
        start = datetime(day.year, day.month, day.day)
        return start, start + timedelta(days=1), None, None
    if which == "month":
        if not _MONTH.fullmatch(request.month):
            raise invalid_field("month", "must be a month YYYY-MM")
        year, month = int(request.month[:4]), int(request.month[5:])
        if not 1 <= month <= 12 or year < 1:
            raise invalid_field("month", "must be a month YYYY-MM")
        if not _FIRST_YEAR <= year <= _LAST_YEAR:
            raise invalid_field("month", f"must be in the years {_FIRST_YEAR} to {_LAST_YEAR}")
        start = datetime(year, month, 1)
        following = datetime(year + month // 12, month % 12 + 1, 1)
        return start, following, None, None
    if which == "range":
        if not request.range.HasField("start_time"):
            raise invalid_field("range.start_time", "is required")
        if not request.range.HasField("end_time"):
            raise invalid_field("range.end_time", "is required")
        asked_start, asked_end = request.range.start_time, request.range.end_time
        start_time = validation.range_bound(asked_start, "range.start_time")
        end_time = validation.range_bound(asked_end, "range.end_time")
        if not validation.ends_after(asked_start, asked_end):
            raise invalid_field("range.end_time", "must be after range.start_time")
        return None, None, start_time, end_time
    raise invalid_field("period", "set one of day, month or range")


_INT64 = range(-(2**63), 2**63)

# The feature and model pairs a summary lists; the rest come added up in other_usage.
# Callers may charge under any number of features: 60,000 of them made a summary larger
# than a gRPC message (4 MiB), which then failed to send at all. A pair takes at most about
# 170 bytes (two 64-character codes and three int64s), so 1,000 stay near 170 KiB.
USAGE_ROWS = 1000


def report_amount(value: Any, field: str) -> int:
    """A report's total as its int64 field carries it. The ledger holds up to int64 micros
    per balance, not per report: a period's flows over every account can add up past it."""
    amount = int(value)
    if amount not in _INT64:
        raise LedgerError(
            grpc.StatusCode.OUT_OF_RANGE,
            "REPORT_OUT_OF_RANGE",
            f"the report's {field} is beyond what an int64 of micro-credits carries;"
            " ask for a shorter period or one account",
            {"field": field},
        )
    return amount


def summary_amounts(rows: Iterable[tuple[Any, ...]]) -> pb.SummaryAmounts:
    """Adds up rows of report_summary_by_source."""
    totals = dict.fromkeys(AMOUNT_FIELDS, 0)
    for row in rows:
        for name, value in zip(AMOUNT_FIELDS, row[2:], strict=True):
            totals[name] += int(value)
    return pb.SummaryAmounts(**{name: report_amount(v, name) for name, v in totals.items()})


def _feature_usage(row: tuple[Any, ...]) -> pb.FeatureUsage:
    """A row of report_usage: one feature and model, or the others added up (no names)."""
    return pb.FeatureUsage(
        feature=row[0] or "",
        model=row[1] or "",
        charges=report_amount(row[2], "charges"),
        consumed_micros=report_amount(row[3], "consumed_micros"),
        refunded_micros=report_amount(row[4], "refunded_micros"),
    )


async def _rows(
    conn: AsyncConnection[TupleRow], name: str, params: Mapping[str, object]
) -> list[TupleRow]:
    # Unprepared: planned with its parameters every time, so a one-account report folds
    # `account_id IS NULL OR account_id = ...` to an index condition (a cached generic
    # plan, which psycopg would switch to after a few runs, could not).
    cursor = await conn.execute(query(name), params, prepare=False)
    return await cursor.fetchall() if cursor.description is not None else []


async def _require_account(conn: AsyncConnection[TupleRow], account_id: str) -> None:
    exists = await _rows(conn, "account_exists", {"account_id": account_id})
    if not exists[0][0]:
        raise LedgerError(
            grpc.StatusCode.NOT_FOUND,
            "ACCOUNT_NOT_FOUND",
            "account not found",
            {"account_id": account_id},
        )


class ReportService(report_service_pb2_grpc.ReportServiceServicer):
    def __init__(
        self,
        pool: AsyncConnectionPool,
        clock: Clock,
        max_message_bytes: int,
    ) -> None:
        self._pool = pool
        self._clock = clock
        self._page_bytes = journal_pages.page_bytes(max_message_bytes)

    async def ListJournal(
        self, request: pb.ListJournalRequest, context: Context
    ) -> pb.ListJournalResponse:
        account_id = validation.account_id(request.account_id) if request.account_id else None
        page_size = validation.page_size(request.page_size)
        params = journal_pages.filters(request)
        bound_to = journal_pages.token_filters("journal", account_id, params)
        position = journal_pages.position(request, bound_to)
        query = {
            **params,
            "account_id": account_id,
            "before": position[0] if position else None,
            "scan": journal_pages.scan_bound(account_id, params),
            "limit": page_size + 1,
        }
        async with self._pool.connection() as conn:
            if account_id is not None:
                await _require_account(conn, account_id)
            rows = await _rows(conn, "list_journal", query)
        response = pb.ListJournalResponse()
        response.next_page_token = journal_pages.fill(
            response.transactions, rows, page_size, bound_to, self._page_bytes
        )
        return response

    async def GetSummary(
        self, request: pb.GetSummaryRequest, context: Context
    ) -> pb.GetSummaryResponse:
        account_id = validation.account_id(request.account_id) if request.account_id else None
        local_start, local_end, start, end = _local_period(request)
        now = self._clock.now()
        async with self._pool.connection() as conn, conn.transaction():
            await _rows(conn, "report_snapshot", {})
            if account_id is not None:
                await _require_account(conn, account_id)
            zone, zoned_start, zoned_end = (
                await _rows(
                    conn, "report_period", {"local_start": local_start, "local_end": local_end}
                )
            )[0]
            start = start or zoned_start
            end = end or zoned_end
            params = {"account_id": account_id, "start": start, "end": end, "now": now}
            sources = await _rows(conn, "report_summary_by_source", params)
            usage = await _rows(conn, "report_usage", {**params, "usage_rows": USAGE_ROWS})
        sources = [row for row in sources if any(row[2:])]
        # The query's last row, with no rank, adds up the pairs past the first USAGE_ROWS.
        others = usage.pop() if usage and usage[-1][6] is None else None
        response = pb.GetSummaryResponse(
            account_id=account_id or "",
            time_zone=str(zone),
            total=summary_amounts(sources),
            free=summary_amounts(row for row in sources if not row[1]),
            purchased=summary_amounts(row for row in sources if row[1]),
            sources=[
                pb.SourceSummary(
                    source=mapping.source_from_db(row[0]),
                    purchased=bool(row[1]),
                    amounts=summary_amounts([row]),
                )
                for row in sources
            ],
            usage=[_feature_usage(row) for row in usage],
        )
        if others is not None:
            response.other_usage.CopyFrom(_feature_usage(others))
            response.other_usage_pairs = int(others[5])
        response.start_time.FromDatetime(start)
        response.end_time.FromDatetime(end)
        response.as_of.FromDatetime(now)
        return response
