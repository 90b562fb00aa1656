"""The platform-wide transaction log (ReportService.ListJournal, DESIGN.md section 7): every
account's journal entries, or one account's, newest first, with the filters of
ListTransactions and keyset pages."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import grpc
import psycopg
import pytest
from google.protobuf.duration_pb2 import Duration

from ledger.v1 import admin_service_pb2 as admin_pb
from ledger.v1 import ledger_service_pb2 as pb
from ledger.v1 import ledger_service_pb2_grpc, report_service_pb2_grpc, types_pb2
from ledger.v1 import report_service_pb2 as report_pb
from ledger_server.clock import OffsetClock
from ledger_server.config import Settings
from ledger_server.db.migrate import migrate
from ledger_server.server import journal_pages
from support.ledger import CREDIT, Ledger, expect_error, new_account, new_key
from support.plans import Conn, Plan, PlanRecorder, explained_connection, scans
from support.server import ServerThread

INVALID = grpc.StatusCode.INVALID_ARGUMENT
JOURNAL_ENTRIES, JOURNAL_ACCOUNTS = 50_000, 500


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


def test_a_time_range_ending_where_or_before_it_starts_is_refused(
    reports: Any, ledger: Ledger
) -> None:
    """Bounds swapped by mistake answered an empty page, as if nothing had happened
    (helper-153's review); GetSummary's range refused them already. Within one microsecond
    apart, as asked, the range is not reversed."""
    account = new_account("range")
    ledger.grant(account, 1)
    start = report_pb.ListJournalRequest().start_time
    start.seconds, start.nanos = 1_800_000_000, 500
    for end_seconds, end_nanos in ((1_700_000_000, 0), (1_800_000_000, 500)):
        end = report_pb.ListJournalRequest().end_time
        end.seconds, end.nanos = end_seconds, end_nanos
        journal = report_pb.ListJournalRequest(account_id=account, start_time=start, end_time=end)
        listing = pb.ListTransactionsRequest(account_id=account, start_time=start, end_time=end)
        for call in (
            lambda: reports.ListJournal(journal),  # noqa: B023 - called within the iteration
            lambda: ledger.stub.ListTransactions(listing),  # noqa: B023
        ):
            expect_error(call, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD", "end_time")
    end.seconds, end.nanos = 1_800_000_000, 900  # the same microsecond, later: empty
    assert ledger.transactions(account, start_time=start, end_time=end) == []


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


class DayApart(NamedTuple):
    """Two servers on one ledger, their clocks a day apart, and the reports of one."""

    old: Ledger
    new: Ledger
    reports: Any
    old_clock: OffsetClock
    new_clock: OffsetClock


@contextmanager
def servers_a_day_apart(database_url: str) -> Iterator[DayApart]:
    """A migrated ledger written by two servers whose clocks are a day apart: ids and
    times need not follow each other."""
    migrate(database_url)
    clocks = OffsetClock(), OffsetClock()
    clocks[1].advance(timedelta(days=1))
    with ExitStack() as stack:
        ledgers = []
        for clock in clocks:
            server = ServerThread(Settings(database_url=database_url), clock).start()
            stack.callback(server.stop)
            channel = stack.enter_context(grpc.insecure_channel(server.address))
            ledgers.append(Ledger(ledger_service_pb2_grpc.LedgerServiceStub(channel)))
        reports = report_service_pb2_grpc.ReportServiceStub(channel)
        yield DayApart(*ledgers, reports, *clocks)


def _walk_from(reports: Any, since: datetime) -> tuple[list[int], int]:
    """Every account's log from ``since`` on, page by page: the ids listed, and the pages."""
    request = report_pb.ListJournalRequest(page_size=10)
    request.start_time.FromDatetime(since)
    listed: list[int] = []
    pages, token = 0, ""
    while True:
        request.page_token = token
        page = reports.ListJournal(request)
        pages, token = pages + 1, page.next_page_token
        listed += [t.transaction_id for t in page.transactions]
        if not token or pages > 20:
            return listed, pages


def test_a_walk_from_a_time_on_ends_where_nothing_below_is_as_recent(
    fresh_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every account's log from start_time on stops once nothing below a page was made
    since then, instead of reading on, stretch by stretch, to the journal's oldest entry.
    Ids and times need not follow each other: two servers whose clocks are a day apart
    write to one ledger, and an entry made since start_time lies below four that were not,
    so the walk goes on past them to it. A database of its own: the journal holds only
    these entries."""
    monkeypatch.setattr(journal_pages, "SCAN_ENTRIES", 2)
    with servers_a_day_apart(fresh_database_url) as (old, new, reports, _, ahead):
        for account in ("journal-old", "journal-new"):  # opened (any sign-up bonus) behind
            for _ in range(6):
                old.grant(account, 1)
        since = ahead.now()
        early = new.grant("journal-new", 1).transaction_id
        for _ in range(4):
            old.grant("journal-old", 1)  # above it in ids, a day before it in time
        recent = [new.grant("journal-new", 1).transaction_id for _ in range(2)]

        listed, pages = _walk_from(reports, since)
    assert listed == [*recent[::-1], early]
    # Stretches of two: the recent pair, the four made behind (two pages), then the early
    # entry with the newest of the old; the eight or more old entries below are not read.
    assert pages == 4, pages


def test_one_accounts_filtered_walk_from_a_time_on_ends_where_nothing_below_is_as_recent(
    fresh_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One account's log filtered by kind (a bounded stretch a page, as every account's)
    from start_time on stops once nothing of the account's below a page was made since
    then, instead of reading on to its oldest entry. Two servers whose clocks are a day
    apart write to the account, so an entry made since start_time lies below four that
    were not, and the walk goes on past them to it. Stretches of five: with more than that
    made since start_time the question would not tell, and the walk would go on."""
    monkeypatch.setattr(journal_pages, "SCAN_ENTRIES", 5)
    with servers_a_day_apart(fresh_database_url) as (old, new, reports, _, ahead):
        for _ in range(6):
            old.grant("journal-one", 1)
        since = ahead.now()
        early = new.grant("journal-one", 1).transaction_id
        for _ in range(4):
            old.grant("journal-one", 1)  # above it in ids, a day before it in time
        recent = [new.grant("journal-one", 1).transaction_id for _ in range(2)]
        new.consume("journal-one", CREDIT)  # since then, of another kind

        request = report_pb.ListJournalRequest(
            account_id="journal-one", kinds=[pb.TRANSACTION_KIND_GRANT], page_size=10
        )
        request.start_time.FromDatetime(since)
        listed: list[str] = []
        pages, token = 0, ""
        while pages <= 20:
            request.page_token = token
            page = reports.ListJournal(request)
            pages, token = pages + 1, page.next_page_token
            listed += [t.transaction_id for t in page.transactions]
            if not token:
                break
    assert listed == [*recent[::-1], early]
    # Stretches of five: the charge, the recent grants and two made behind, then the other
    # two made behind, the early entry and two old ones; the four old entries below are
    # not read.
    assert pages == 2, pages


def test_a_walk_up_to_a_time_starts_below_what_was_made_since(
    fresh_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every account's log up to end_time: the first page starts below the entries made
    since then instead of reading down through them, stretch by stretch. Two servers
    whose clocks are a day apart write to one ledger; an entry made before end_time lies
    among those made after it, and is the first page's first entry. A database of its own:
    the journal holds only these entries."""
    monkeypatch.setattr(journal_pages, "SCAN_ENTRIES", 2)
    with servers_a_day_apart(fresh_database_url) as (old, new, reports, behind, _):
        for _ in range(4):
            old.grant("journal-old", 1)
        until = behind.now() + timedelta(hours=12)
        for _ in range(6):
            new.grant("journal-new", 1)
        late = old.grant("journal-old", 1).transaction_id  # above six made after `until`
        for _ in range(6):
            new.grant("journal-new", 1)

        request = report_pb.ListJournalRequest(page_size=10)
        request.end_time.FromDatetime(until)
        first = reports.ListJournal(request)
        listed, token = [t.transaction_id for t in first.transactions], first.next_page_token
        while token:
            request.page_token = token
            page = reports.ListJournal(request)
            listed += [t.transaction_id for t in page.transactions]
            token = page.next_page_token
    with psycopg.connect(fresh_database_url) as conn:
        made_before = conn.execute(
            "SELECT transaction_id FROM journal_transactions WHERE created_at < %s"
            " ORDER BY transaction_id DESC",
            (until,),
        ).fetchall()
    assert first.transactions and first.transactions[0].transaction_id == late
    assert listed == [str(row[0]) for row in made_before]


@contextmanager
def _account_journal(
    database_url: str, account: str, batches: tuple[tuple[str, int], ...]
) -> Iterator[tuple[Conn, PlanRecorder]]:
    """A migrated database of its own whose journal holds the account's entries, made in
    batches of (time as SQL, how many) a millisecond apart, analysed; its connection
    logs the plans of everything it runs, with their actual rows."""
    migrate(database_url)
    with explained_connection(database_url) as (conn, recorder):
        conn.execute("SET enable_seqscan = on")  # the session's default, not the test's
        conn.execute("SET auto_explain.log_analyze = on")
        conn.execute("SELECT ledger_open_account(%s, '', now() - interval '1 day')", (account,))
        for since, entries in batches:
            conn.execute(
                "INSERT INTO journal_transactions (account_id, kind, amount_micros, created_at)"
                f" SELECT %s, 'grant', 1, {since} + n * interval '1 ms'"
                "   FROM generate_series(1, %s) n",
                (account, entries),
            )
        conn.execute("ANALYZE journal_transactions")
        recorder.take()
        yield conn, recorder


def _journal_rows_read(plans: list[tuple[str, Plan]], statement_prefix: str = "") -> float:
    """The journal rows the plans' scans read, matching or not."""
    return sum(
        node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)
        for text, plan in plans if text.startswith(statement_prefix)
        for node in scans(plan) if node["Relation Name"] == "journal_transactions"
    )  # fmt: skip


def _explained(
    conn: Conn, recorder: PlanRecorder, sql: str, params: Any = ()
) -> tuple[list[tuple[Any, ...]], list[tuple[str, Plan]]]:
    """Runs one statement: its rows, and the plans of everything it ran."""
    recorder.take()
    rows = conn.execute(sql, params).fetchall()
    conn.execute("SELECT 1")  # auto_explain logs a plan when its portal closes
    return rows, recorder.take()


def test_one_accounts_first_page_up_to_a_time_skips_what_it_made_since(
    fresh_database_url: str,
) -> None:
    """One account's page up to end_time (ledger_journal_read, which ListTransactions and
    ListJournal with an account call): an account that made 20,000 entries or more since
    then has its first page start below them (where a walk of every account's would),
    instead of reading down through them all to its first match. A database of its own,
    with the plans' actual rows."""
    # Five entries a day back, then more than 20,000 since end_time.
    batches = (("now() - interval '1 day'", 5), ("now()", 20_001))
    with _account_journal(fresh_database_url, "journal-big", batches) as (conn, recorder):
        until = conn.execute("SELECT now() - interval '1 hour'").fetchone()
        assert until is not None
        made_before = conn.execute(
            "SELECT transaction_id FROM journal_transactions"
            " WHERE account_id = 'journal-big' AND created_at < %s ORDER BY transaction_id DESC",
            until,
        ).fetchall()
        page, plans = _explained(
            conn,
            recorder,
            "SELECT transaction_id FROM ledger_journal_read('journal-big', NULL, NULL, NULL,"
            " %s, NULL, NULL, NULL, 100)",
            until,
        )
    assert page == made_before and len(page) >= 5
    read = _journal_rows_read(plans, "SELECT t.transaction_id, t.account_id")
    assert 0 < read < 1_000, read


def test_one_accounts_filtered_page_reads_its_stretch_and_ends_without_reading_below(
    fresh_database_url: str,
) -> None:
    """One account's page filtered by kind from start_time on, where nothing matches: it
    reads its stretch (1,000 here), finds where that ended, and asks whether anything of
    the account's below was made since start_time, reading only what was: 900 entries since
    then above 20,000 older ones, none of which is read. Unbounded, the page read all
    20,900; asked down the primary key, the question read the 20,000 older ones (and the
    planner takes that path without the "+ 0"). A database of its own, with the plans'
    actual rows."""
    batches = (("now() - interval '1 day'", 20_000), ("now()", 900))
    with _account_journal(fresh_database_url, "journal-long", batches) as (conn, recorder):
        page, plans = _explained(
            conn,
            recorder,
            "SELECT transaction_id, kind FROM ledger_journal_read('journal-long', NULL,"
            " ARRAY['refund'], now() - interval '1 hour', NULL, NULL, NULL, NULL, 11, 1000)",
        )
    assert page == []  # nothing listed, and no marker: the walk ends here
    read = _journal_rows_read(plans)
    assert 0 < read < 5_000, read


def test_the_question_where_a_walk_from_a_time_on_ends_reads_a_bounded_stretch_too(
    fresh_database_url: str,
) -> None:
    """Below 3,000 entries made since start_time (a page token deep in a walk of them), a
    page of older entries that match nothing asks whether anything of the account's below
    it was made since then. It reads at most its stretch (100) of the entries since then
    and counts at most as many in the index; unable to tell, it lets the walk go on (a
    marker row) instead of reading all 3,000 on this one page."""
    batches = (("now() - interval '1 day'", 1_000), ("now()", 3_000))
    with _account_journal(fresh_database_url, "journal-deep", batches) as (conn, recorder):
        row = conn.execute(
            "SELECT min(transaction_id) FROM journal_transactions"
            " WHERE account_id = 'journal-deep' AND created_at >= now() - interval '1 hour'"
        ).fetchone()
        assert row is not None
        page, plans = _explained(
            conn,
            recorder,
            "SELECT transaction_id, kind FROM ledger_journal_read('journal-deep', %s,"
            " ARRAY['refund'], now() - interval '1 hour', NULL, NULL, NULL, NULL, 11, 100)",
            row,
        )
    assert page and page[0][1] is None  # the marker: the walk goes on
    read = _journal_rows_read(plans)
    assert 0 < read <= 400, read


@pytest.mark.parametrize("plan", ["force_custom_plan", "force_generic_plan"])
def test_one_accounts_unfiltered_page_reads_a_large_account_by_its_key_whatever_the_estimate(
    fresh_database_url: str, plan: str
) -> None:
    """One account's unfiltered page is planned once per connection, so its plan has to
    suit every account: planned for a typical account of a platform of small ones (a
    generic plan), or on statistics taken before the account grew, it still reads the
    account's primary key from the position, not all of the account's entries to sort
    them."""
    with _account_journal(fresh_database_url, "journal-large", ()) as (conn, recorder):
        conn.execute("ALTER TABLE journal_transactions SET (autovacuum_enabled = false)")
        conn.execute(
            "INSERT INTO accounts (account_id, created_at)"
            " SELECT 'journal-small-' || n, now() FROM generate_series(0, 1999) n"
        )
        conn.execute(
            "INSERT INTO journal_transactions (account_id, kind, amount_micros, created_at)"
            " SELECT 'journal-small-' || (n % 2000), 'grant', 1, now()"
            "   FROM generate_series(0, 5999) n"
        )
        conn.execute("ANALYZE journal_transactions")
        conn.execute(
            "INSERT INTO journal_transactions (account_id, kind, amount_micros, created_at)"
            " SELECT 'journal-large', 'grant', 1, now() FROM generate_series(1, 5000)"
        )
        conn.execute(f"SET plan_cache_mode = {plan}")
        page, plans = _explained(
            conn,
            recorder,
            "SELECT transaction_id FROM ledger_account_journal_page('journal-large', NULL, 11)",
        )
    assert len(page) == 11
    read = _journal_rows_read(plans, "SELECT t.transaction_id, t.account_id")
    assert 0 < read <= 11, read


def test_one_accounts_unfiltered_pages_are_planned_once_and_list_as_filtered_ones(
    ledger: Ledger, ledger_db_url: str
) -> None:
    """One account's pages with no filter run a static statement (ledger_journal_read),
    planned once per connection: after a few pages its generic plan stays cached, and it
    still reads the account's primary key from each page's position, no further than the
    page. Its columns and joins repeat the statement run for filtered pages: every page
    lists what the same page filtered by a start_time that keeps everything lists."""
    account = new_account("journal-static")
    ledger.grant(account, 10)
    held = ledger.reserve(account, 2 * CREDIT, feature="chat").reservation.reservation_id
    ledger.commit(account, held, CREDIT)
    dropped = ledger.reserve(account, CREDIT).reservation.reservation_id
    ledger.release(account, dropped)
    for _ in range(10):
        charged = ledger.consume(account, CREDIT // 10, feature="image")
    ledger.refund(account, charged.reservation.reservation_id, CREDIT // 20)
    page = "ledger_journal_read(%s, %s, NULL, {start}, NULL, NULL, NULL, NULL, 4)"
    pages: list[list[tuple[Any, ...]]] = []
    with explained_connection(ledger_db_url) as (conn, recorder):
        conn.execute("SET auto_explain.log_analyze = on")
        before = None
        while True:
            sql = f"SELECT * FROM {page.format(start='NULL')}"
            listed, plans = _explained(conn, recorder, sql, (account, before))
            read = _journal_rows_read(plans, "SELECT t.transaction_id, t.account_id")
            assert 0 < read <= 4, read
            everything = page.format(start="'-infinity'")
            filtered = conn.execute(f"SELECT * FROM {everything}", (account, before)).fetchall()
            assert listed == filtered
            pages.append(listed)
            if len(listed) < 4:
                break
            before = listed[2][0]
        entries = conn.execute(
            "SELECT transaction_id FROM journal_transactions WHERE account_id = %s"
            " ORDER BY transaction_id DESC",
            (account,),
        ).fetchall()
        cached = conn.execute(
            "SELECT count(*) FROM pg_backend_memory_contexts"
            " WHERE name = 'CachedPlan' AND ident LIKE 'SELECT t.transaction_id%%'"
        ).fetchone()
    assert len(pages) >= 6  # the plan cache tries five custom plans first
    assert cached == (1,)
    walked = [row[0] for listed in pages[:-1] for row in listed[:3]] + [r[0] for r in pages[-1]]
    assert walked == [row[0] for row in entries]
    assert {row[2] for listed in pages for row in listed} >= {"grant", "hold", "charge", "refund"}


def test_the_previous_releases_page_forms_still_answer(ledger: Ledger, ledger_db_url: str) -> None:
    """Servers of the previous release call ledger_list_transactions without p_scan, and
    ledger_journal_page for every account's pages, which they map row by row, having found
    where a stretch ended themselves: no marker row for them, until a rolling deploy
    replaces them."""
    account = new_account("journal-previous")
    for _ in range(3):
        ledger.grant(account, 1)
    with psycopg.connect(ledger_db_url, autocommit=True) as conn:
        listed = conn.execute(
            "SELECT transaction_id FROM ledger_list_transactions(%s, NULL, NULL, NULL, NULL,"
            " NULL, NULL, NULL, 11, now())",
            (account,),
        ).fetchall()
        pages = [
            conn.execute(
                f"SELECT kind FROM {function}(NULL, NULL, NULL, NULL, NULL, 'none-such', NULL,"
                " NULL, 11, 2)"
            ).fetchall()
            for function in ("ledger_journal_page", "ledger_journal_read")
        ]
    assert [str(row[0]) for row in listed] == [
        t.transaction_id for t in ledger.transactions(account)
    ]
    assert pages == [[], [(None,)]]  # the marker only for this release's servers


def test_a_walk_up_to_a_time_starts_at_the_newest_entry_made_before_it(
    fresh_database_url: str,
) -> None:
    """ledger_journal_walk_top against its definition, the id above the newest entry made
    before end_time (0 for none), and ledger_journal_first_since (the summary's bound)
    against min() over the entries since a time, over an empty journal, ids with a gap,
    times out of id order, and times before, between, at and after the entries."""
    migrate(fresh_database_url)
    with explained_connection(fresh_database_url) as (conn, _):
        conn.execute("SET enable_seqscan = on")

        def walk_top(end: datetime) -> int:
            row = conn.execute("SELECT ledger_journal_walk_top(%s)", (end,)).fetchone()
            assert row is not None
            return int(row[0])

        def expected(end: datetime) -> int:
            row = conn.execute(
                "SELECT coalesce(max(transaction_id) + 1, 0) FROM journal_transactions"
                " WHERE created_at < %s",
                (end,),
            ).fetchone()
            assert row is not None
            return int(row[0])

        def first_since(start: datetime) -> tuple[object, object]:
            """ledger_journal_first_since, and min() over the entries since then."""
            row = conn.execute(
                "SELECT ledger_journal_first_since(%(t)s),"
                " (SELECT min(transaction_id) FROM journal_transactions WHERE created_at >= %(t)s)",
                {"t": start},
            ).fetchone()
            assert row is not None
            return row[0], row[1]

        base = datetime(2026, 1, 1, tzinfo=UTC)
        assert walk_top(base) == 0  # an empty journal
        assert first_since(base) == (None, None)
        conn.execute("SELECT ledger_open_account('journal-top', '', %s)", (base,))
        offsets = [0, 5, 3, 9, 1, 12, 7, 7, 20, 2]  # minutes after base, out of id order
        for i, minutes in enumerate(offsets):
            if i == 5:  # a gap in the ids: the sequence moved on
                conn.execute(
                    "SELECT setval('journal_transactions_transaction_id_seq',"
                    " nextval('journal_transactions_transaction_id_seq') + 1000)"
                )
            conn.execute(
                "INSERT INTO journal_transactions (account_id, kind, amount_micros, created_at)"
                " VALUES ('journal-top', 'grant', 1, %s)",
                (base + timedelta(minutes=minutes),),
            )
        ends = [base - timedelta(days=1)] + [
            base + timedelta(minutes=m, seconds=s) for m in range(22) for s in (0, 30)
        ]
        for end in ends:
            assert walk_top(end) == expected(end), end
            found, least = first_since(end)
            assert found == least, end


def test_the_walks_ends_are_found_through_the_index_over_ids_and_times(
    fresh_database_url: str,
) -> None:
    """Where a walk from a start_time ends and where one up to an end_time starts are read
    from the BRIN index over ids and times (migration 0019), whatever the session's
    settings. Left to itself, the planner reckons ids and times independent and takes a
    sequential scan to find a row at once: where none matches that reads the whole
    journal (76 ms on the bench's million entries, where the end check takes 0.05 ms). A
    journal of its own, long enough for the planner to weigh its indexes as it would a
    real one's."""
    migrate(fresh_database_url)
    with explained_connection(fresh_database_url) as (conn, recorder):
        conn.execute("SET enable_seqscan = on")  # the session's default, not the test's
        conn.execute(
            "SELECT ledger_open_account('journal-' || n, '', now()) FROM generate_series(1, %s) n",
            (JOURNAL_ACCOUNTS,),
        )
        conn.execute(
            """
            INSERT INTO journal_transactions (account_id, kind, amount_micros, created_at)
            SELECT 'journal-' || (1 + n %% %s), 'grant', 1, now() + n * interval '10 ms'
              FROM generate_series(1, %s) n
            """,
            (JOURNAL_ACCOUNTS, JOURNAL_ENTRIES),
        )
        conn.execute("ANALYZE journal_transactions")
        # As autovacuum does once a range of pages fills (autosummarize): summarized, the
        # index leaves out the ranges that cannot match.
        conn.execute("SELECT brin_summarize_new_values('journal_transactions_id_created')")
        # Half the journal lies below the middle entry and half was made since it: the
        # planner counts a quarter as both, where none is.
        middle, since = conn.execute(
            "SELECT transaction_id, created_at FROM journal_transactions"
            " ORDER BY transaction_id OFFSET %s LIMIT 1",
            (JOURNAL_ENTRIES // 2,),
        ).fetchone() or (None, None)
        [below], end_check = _explained(
            conn, recorder, "SELECT ledger_journal_reaches_back(%s, %s)", (middle, since)
        )
        [top], start_search = _explained(
            conn, recorder, "SELECT ledger_journal_walk_top(%s)", (since,)
        )
        [first], first_search = _explained(
            conn, recorder, "SELECT ledger_journal_first_since(%s)", (since,)
        )
        # The summary of every account calls it: marked unsafe (the default), it would keep
        # that whole statement from parallel workers (10-15% slower on the bench's journal).
        parallel = conn.execute(
            "SELECT proparallel FROM pg_proc WHERE proname = 'ledger_journal_first_since'"
        ).fetchone()
    assert parallel == ("r",)
    assert below == (False,)
    assert top == (middle,)  # the middle entry is the first made at or after `since`
    assert first == (middle,)
    for what, plans in (
        ("end check", end_check),
        ("start search", start_search),
        ("summary's first id", first_search),
    ):
        reads = [
            node for text, plan in plans if "FROM journal_transactions WHERE" in text
            for node in scans(plan) if node["Relation Name"] == "journal_transactions"
        ]  # fmt: skip
        assert reads, f"no plan of the {what} was recorded"
        assert {node["Node Type"] for node in reads} == {"Bitmap Heap Scan"}, (what, reads)
        indexes = {child.get("Index Name") for node in reads for child in node.get("Plans", [])}
        assert indexes == {"journal_transactions_id_created"}, (what, reads)


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


def test_a_models_refunds_and_releases_are_listed_under_it(
    reports: Any, ledger: Ledger, admin: Any, ledger_db_url: str, clock: OffsetClock
) -> None:
    """A refund or a release, of a Release or a time-out, carries its reservation's model
    as it does its feature. They were written without one, so filtered by model they were
    left out, though GetSummary counts a refund under its charge's model. Entries written so
    (before the fix) are listed under the reservation's model too."""
    feature, model = f"modelled-{uuid.uuid4().hex[:8]}", "model-x"
    admin.SetPrice(
        admin_pb.SetPriceRequest(
            price=admin_pb.Price(feature=feature, model=model, unit_size=1,
                                 unit=types_pb2.USAGE_UNIT_GENERATIONS, unit_price_micros=CREDIT),
            idempotency_key=new_key(),
        )
    )  # fmt: skip
    account = new_account("journal-model")
    ledger.grant(account, 50)
    usage = types_pb2.Usage(
        feature=feature,
        model=model,
        quantities=[types_pb2.UsageQuantity(unit=types_pb2.USAGE_UNIT_GENERATIONS, quantity=3)],
    )

    def reserve(**fields: Any) -> str:
        request = pb.ReserveRequest(
            account_id=account, idempotency_key=new_key(), usage=usage, **fields
        )
        return str(ledger.stub.Reserve(request).reservation.reservation_id)

    charged = ledger.stub.Consume(
        pb.ConsumeRequest(account_id=account, idempotency_key=new_key(), usage=usage)
    ).reservation.reservation_id
    ledger.refund(account, charged, CREDIT)
    ledger.release(account, reserve())
    reserve(ttl=Duration(seconds=60))
    clock.advance(timedelta(minutes=2))
    ledger.balance(account)  # times the last hold out
    every = ["RELEASE", "HOLD", "RELEASE", "HOLD", "REFUND", "CHARGE"]
    period = report_pb.TimeRange()
    period.start_time.FromDatetime(clock.now() - timedelta(hours=1))
    period.end_time.FromDatetime(clock.now() + timedelta(hours=1))

    def shown() -> None:
        for entries in (
            ledger.transactions(account, model=model),
            reports.ListJournal(
                report_pb.ListJournalRequest(account_id=account, model=model)
            ).transactions,
        ):
            assert [pb.TransactionKind.Name(e.kind)[17:] for e in entries] == every
            assert {e.model for e in entries} == {model}
        assert {e.model for e in ledger.transactions(account, feature=feature)} == {model}
        # The usage report counts the refund under the charge's model, once.
        summary = reports.GetSummary(report_pb.GetSummaryRequest(account_id=account, range=period))
        assert [
            (u.feature, u.model, u.charges, u.consumed_micros, u.refunded_micros)
            for u in summary.usage
        ] == [(feature, model, 1, 3 * CREDIT, CREDIT)]

    shown()
    with psycopg.connect(ledger_db_url, autocommit=True) as conn:
        written = conn.execute(
            "SELECT kind, model FROM journal_transactions "
            "WHERE account_id = %s AND kind IN ('refund', 'release') ORDER BY transaction_id",
            (account,),
        ).fetchall()
        assert written == [("refund", model), ("release", model), ("release", model)]
        conn.execute("SET session_replication_role = replica")  # past the append-only trigger
        conn.execute(
            "UPDATE journal_transactions SET model = NULL "
            "WHERE account_id = %s AND kind IN ('refund', 'release')",
            (account,),
        )
    shown()
