"""Pages of the journal, newest first, as LedgerService.ListTransactions (one account) and
ReportService.ListJournal (every account, or one) answer them: the same filters, checked
the same way, and the same keyset page tokens (the last entry's transaction id)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ledger.v1 import ledger_service_pb2 as ledger_pb
from ledger.v1 import report_service_pb2 as report_pb
from ledger_server.errors import invalid_field
from ledger_server.ledger import mapping, page_tokens, validation
from ledger_server.ledger.page_tokens import Position

# The requests whose filters are the same fields.
JournalQuery = ledger_pb.ListTransactionsRequest | report_pb.ListJournalRequest


def _names(values: Sequence[int], to_db: dict[Any, str], field: str, what: str) -> list[str] | None:
    if not values:
        return None
    names = []
    for value in values:
        if value not in to_db:
            raise invalid_field(field, f"unknown {what} {value}")
        names.append(to_db[value])
    return names


def filters(request: JournalQuery) -> dict[str, object]:
    """The query parameters of the request's filters (None: not filtered)."""
    return {
        "kinds": _names(request.kinds, mapping.TRANSACTION_KIND_TO_DB, "kinds", "transaction kind"),
        "start_time": (
            validation.timestamp(request.start_time, "start_time")
            if request.HasField("start_time")
            else None
        ),
        "end_time": (
            validation.timestamp(request.end_time, "end_time")
            if request.HasField("end_time")
            else None
        ),
        "feature": validation.code(request.feature, "feature") or None,
        "model": validation.code(request.model, "model") or None,
        "statuses": _names(
            request.statuses, mapping.TRANSACTION_STATUS_TO_DB, "statuses", "transaction status"
        ),
    }


def token_filters(scope: str, account_id: str | None, params: dict[str, object]) -> list[object]:
    """What a page token is bound to: a token of other filters is refused."""
    return [scope, account_id, *(params[name] for name in _FILTER_ORDER)]


_FILTER_ORDER = ("kinds", "start_time", "end_time", "feature", "model", "statuses")


def position(request: JournalQuery, bound_to: list[object]) -> Position | None:
    return page_tokens.decode(request.page_token, bound_to, (page_tokens.ID,))


def fill(
    transactions: Any, rows: list[tuple[Any, ...]], page_size: int, bound_to: list[object]
) -> str:
    """Adds the page's entries to ``transactions``; returns the next page's token ("": none)."""
    add = transactions.add
    for row in rows[:page_size]:
        mapping.fill_transaction(add(), row)
    if len(rows) > page_size:
        # The keyset: the last entry's transaction_id (the row's first column).
        return page_tokens.encode([rows[page_size - 1][0]], bound_to)
    return ""
