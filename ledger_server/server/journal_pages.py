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

# How many transaction ids one page of every account's log reads at most. A filter that
# matches little of a long journal would otherwise read on until the page filled or the
# statement timed out; with the bound a page may come back short, even empty, with a token
# to read on from where it stopped. 20,000 entries take a few milliseconds to read.
SCAN_IDS = 20_000


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


def scan_bounds(before: int | None, newest_id: int | None) -> tuple[int | None, int | None]:
    """Where a page of every account's log reads: below ``before`` (the page token's id, or
    past ``newest_id`` for the first page) and above the returned floor, at most SCAN_IDS
    ids. (None, None): the journal is empty. A floor of None reads to the oldest entry."""
    upper = before if before is not None else (None if newest_id is None else newest_id + 1)
    if upper is None:
        return None, None
    floor = upper - 1 - SCAN_IDS
    return upper, (floor if floor > 0 else None)


def fill(
    transactions: Any,
    rows: list[tuple[Any, ...]],
    page_size: int,
    bound_to: list[object],
    floor: int | None = None,
) -> str:
    """Adds the page's entries to ``transactions``; returns the next page's token ("": none).
    ``floor``: the page read only ids above it, so a page that did not fill goes on below."""
    add = transactions.add
    for row in rows[:page_size]:
        mapping.fill_transaction(add(), row)
    if len(rows) > page_size:
        # The keyset: the last entry's transaction_id (the row's first column).
        return page_tokens.encode([rows[page_size - 1][0]], bound_to)
    if floor is not None:
        return page_tokens.encode([floor + 1], bound_to)
    return ""
