"""Pages of the journal, newest first, as LedgerService.ListTransactions (one account) and
ReportService.ListJournal (every account, or one) answer them: the same filters, checked
the same way, the same bound on what a page reads, and the same keyset page tokens: the id
below which the next page reads (the last entry listed, or the last one read by a page
that read its stretch without filling)."""

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

# How many journal entries one page reads at most, matching the filters or not, where a
# filter could match little of a long journal (every account's log; one account's filtered
# by kind, feature, model or status, which no index of its entries serves). It would
# otherwise read on until the page filled or the statement timed out (124 ms for nothing
# matched on the bench's account of a million entries); with the bound a page may come back
# short, even empty, with a token to read on below the last entry it read. 20,000 entries
# take about 10 ms to read.
SCAN_ENTRIES = 20_000

# One account's filters that its indexes do not serve: its pages walk its primary key and
# test each entry. Its times have an index (journal_transactions_account_time).
_UNINDEXED_FILTERS = ("kinds", "feature", "model", "statuses")


def scan_bound(account_id: str | None, params: dict[str, object]) -> int | None:
    """How many entries the page may read (None: until it fills)."""
    if account_id is None or any(params[name] is not None for name in _UNINDEXED_FILTERS):
        return SCAN_ENTRIES
    return None


def _names(values: Sequence[int], to_db: dict[Any, str], field: str, what: str) -> list[str] | None:
    if not values:
        return None
    names = []
    for value in values:
        if value not in to_db:
            raise invalid_field(field, f"unknown {what} {value}")
        if to_db[value] in names:
            # Each value once: a 4 MiB request of 4 million kinds, read to its end on the
            # event loop, held every other tenant's calls for 10 s and more; this stops
            # within one more value than there are.
            raise invalid_field(field, f"names {what} {value} twice")
        names.append(to_db[value])
    return names


def filters(request: JournalQuery) -> dict[str, object]:
    """The query parameters of the request's filters (None: not filtered)."""
    has_start, has_end = request.HasField("start_time"), request.HasField("end_time")
    start_time = validation.range_bound(request.start_time, "start_time") if has_start else None
    end_time = validation.range_bound(request.end_time, "end_time") if has_end else None
    # As GetSummary's range: bounds swapped by mistake answered an empty log, as if nothing
    # had happened (helper-153's review).
    if has_start and has_end and not validation.ends_after(request.start_time, request.end_time):
        raise invalid_field("end_time", "must be after start_time")
    return {
        "kinds": _names(request.kinds, mapping.TRANSACTION_KIND_TO_DB, "kinds", "transaction kind"),
        "start_time": start_time,
        "end_time": end_time,
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


# A page's entries stop short of page_size past this many bytes, well under gRPC's default
# message limit of 4 MiB (a client's own limit): 1,000 entries with long comments and
# references made a response too large to send (helper-65).
PAGE_BYTES = 3 * 1024 * 1024


def page_bytes(max_message_bytes: int) -> int:
    """Where a page stops: PAGE_BYTES, or three quarters of a server's smaller message
    limit (LEDGER_MAX_MESSAGE_BYTES), leaving room for the page's token and framing."""
    return min(PAGE_BYTES, max_message_bytes * 3 // 4)


def fill(
    transactions: Any,
    rows: list[tuple[Any, ...]],
    page_size: int,
    bound_to: list[object],
    max_bytes: int = PAGE_BYTES,
) -> str:
    """Adds the page's entries (rows of ledger_journal_read, at most page_size + 1) to
    ``transactions``; returns the next page's token ("": none). A page that read its
    stretch without filling ends with a marker row (no kind): the last entry it read, below
    which the next page reads on. A page ends early, with a token, past ``max_bytes``."""
    resume_below = None
    if rows and rows[-1][2] is None:
        resume_below = rows.pop()[0]
    add = transactions.add
    size = 0
    for number, row in enumerate(rows[:page_size]):
        entry = add()
        mapping.fill_transaction(entry, row)
        size += entry.ByteSize()
        if size > max_bytes and number > 0:
            # Measured before it is kept: one entry is at most 32,767 postings (~2.3 MB).
            del transactions[-1]
            return page_tokens.encode([rows[number - 1][0]], bound_to)
    if len(rows) > page_size:
        # The keyset: the last entry's transaction_id (the row's first column).
        return page_tokens.encode([rows[page_size - 1][0]], bound_to)
    if resume_below is not None:
        return page_tokens.encode([resume_below], bound_to)
    return ""
