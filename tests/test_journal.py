"""The platform-wide transaction log (ReportService.ListJournal, DESIGN.md section 7): every
account's journal entries, or one account's, newest first, with the filters of
ListTransactions and keyset pages."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import psycopg
import pytest

from ledger.v1 import ledger_service_pb2 as pb
from ledger.v1 import report_service_pb2 as report_pb
from ledger.v1 import report_service_pb2_grpc
from ledger_server.server import journal_pages
from support.ledger import CREDIT, Ledger, expect_error, new_account

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def reports(server_address: str) -> Iterator[report_service_pb2_grpc.ReportServiceStub]:
    with grpc.insecure_channel(server_address) as channel:
        yield report_service_pb2_grpc.ReportServiceStub(channel)


def _walk(reports: Any, **request: Any) -> list[pb.Transaction]:
    """Every page of a listing, one entry per page."""
    seen: list[pb.Transaction] = []
    token = ""
    while True:
        page = reports.ListJournal(
            report_pb.ListJournalRequest(page_size=1, page_token=token, **request)
        )
        seen += page.transactions
        token = page.next_page_token
        if not token:
            return seen


def test_the_journal_lists_every_accounts_entries_newest_first(
    reports: Any, ledger: Ledger
) -> None:
    feature = f"journal-{uuid.uuid4().hex[:8]}"
    first, second = new_account("journal-a"), new_account("journal-b")
    for account in (first, second):
        ledger.grant(account, 10)
    charges = [
        ledger.consume(account, amount * CREDIT, feature=feature).transaction_id
        for account, amount in ((first, 1), (second, 2), (first, 3))
    ]

    listed = reports.ListJournal(report_pb.ListJournalRequest(feature=feature)).transactions
    assert [t.transaction_id for t in listed] == charges[::-1]
    assert [(t.account_id, t.amount_micros) for t in listed] == [
        (first, -3 * CREDIT),
        (second, -2 * CREDIT),
        (first, -CREDIT),
    ]
    assert all(t.kind == pb.TRANSACTION_KIND_CHARGE and t.postings for t in listed)
    # Page by page: the same entries.
    assert [t.transaction_id for t in _walk(reports, feature=feature)] == charges[::-1]

    # One account, all its entries (the grant too), as ListTransactions shows them.
    mine = _walk(reports, account_id=first)
    assert [t.transaction_id for t in mine] == [
        t.transaction_id for t in ledger.transactions(first)
    ]
    only_grants = reports.ListJournal(
        report_pb.ListJournalRequest(account_id=second, kinds=[pb.TRANSACTION_KIND_GRANT])
    ).transactions
    assert [t.kind for t in only_grants] == [pb.TRANSACTION_KIND_GRANT]
    # Every account, filtered by kind: the newest grant on top is one of ours or newer.
    newest_charges = reports.ListJournal(
        report_pb.ListJournalRequest(kinds=[pb.TRANSACTION_KIND_CHARGE], page_size=2)
    )
    assert {t.kind for t in newest_charges.transactions} == {pb.TRANSACTION_KIND_CHARGE}
    assert int(newest_charges.transactions[0].transaction_id) >= int(charges[-1])
    assert newest_charges.next_page_token


def test_a_page_of_every_accounts_log_reads_a_bounded_stretch_and_goes_on_from_there(
    reports: Any, ledger: Ledger, ledger_db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DESIGN.md section 7: pages stay fast at millions of rows. A filter that matches little
    would read the whole journal for one page; a page reads at most SCAN_ENTRIES entries, comes
    back short (even empty) with a token, and the pages after it go on from there."""
    feature = f"journal-{uuid.uuid4().hex[:8]}"
    account, busy = new_account("journal-rare"), new_account("journal-busy")
    ledger.grant(account, 10)
    older = ledger.consume(account, CREDIT, feature=feature).transaction_id
    for _ in range(12):
        ledger.grant(busy, 1)  # journal entries the filter does not match
    with psycopg.connect(ledger_db_url, autocommit=True) as conn:
        # A gap in the ids (rolled-back transactions, a moved sequence) holds no entries,
        # so it costs no pages: the stretch counts entries, not ids.
        conn.execute(
            "SELECT setval('journal_transactions_transaction_id_seq',"
            " nextval('journal_transactions_transaction_id_seq') + 1000000)"
        )
    newer = ledger.consume(account, CREDIT, feature=feature).transaction_id
    monkeypatch.setattr(journal_pages, "SCAN_ENTRIES", 5)

    first = reports.ListJournal(report_pb.ListJournalRequest(feature=feature, page_size=10))
    assert [t.transaction_id for t in first.transactions] == [newer]  # short, not the end
    assert first.next_page_token
    token, empty_pages = first.next_page_token, 0
    while True:
        page = reports.ListJournal(
            report_pb.ListJournalRequest(feature=feature, page_size=10, page_token=token)
        )
        if page.transactions:
            break
        empty_pages += 1
        assert empty_pages < 10, "the older entry was skipped"
        token = page.next_page_token
    assert [t.transaction_id for t in page.transactions] == [older]
    assert empty_pages >= 1  # twelve entries lay between them: a stretch of five held none of ours


def test_journal_requests_are_checked(reports: Any, ledger: Ledger) -> None:
    feature = f"journal-{uuid.uuid4().hex[:8]}"
    account = new_account("journal-checks")
    ledger.grant(account, 10)
    for _ in range(2):
        ledger.consume(account, CREDIT, feature=feature)
    page = reports.ListJournal(report_pb.ListJournalRequest(feature=feature, page_size=1))
    assert page.next_page_token
    # A token is bound to its filters.
    expect_error(
        lambda: reports.ListJournal(
            report_pb.ListJournalRequest(feature="other", page_token=page.next_page_token)
        ),
        INVALID,
        "INVALID_FIELD",
        "page_token",
    )
    expect_error(
        lambda: reports.ListJournal(report_pb.ListJournalRequest(account_id="has space")),
        INVALID,
        "INVALID_FIELD",
        "account_id",
    )
    expect_error(
        lambda: reports.ListJournal(report_pb.ListJournalRequest(kinds=[99])),
        INVALID,
        "INVALID_FIELD",
        "kinds",
    )
    expect_error(
        lambda: reports.ListJournal(report_pb.ListJournalRequest(account_id=new_account("none"))),
        grpc.StatusCode.NOT_FOUND,
        "ACCOUNT_NOT_FOUND",
    )
