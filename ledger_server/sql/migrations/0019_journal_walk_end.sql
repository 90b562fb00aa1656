-- A walk of every account's log from a start_time on (ReportService.ListJournal, DESIGN.md
-- section 7) pages newest first by transaction_id. Ids and times need not follow each
-- other (a call takes its time before its transaction draws an id, and servers' clocks
-- differ), so a page cannot tell from its own entries that none further down is as
-- recent as the start_time: before, the walk read on, stretch by stretch, to the oldest
-- entry of the journal.
--
-- Asked of 0018's index on created_at alone, "is any entry below this id as recent?"
-- reads every range made since the start_time, all of them above the id. One BRIN index
-- over both columns keeps a range only where its ids reach below the id and its times
-- reach the start_time: the few ranges where the two overlap (0.05 ms on the bench's
-- journal of a million entries, where a sequential scan took 76 ms).
--
-- It serves the summary's reads by time as well as 0018's index did (a BRIN index checks
-- each column's summary on its own, first column or not; on the bench's journal the
-- summaries took the same time with either), so it replaces that one: a single BRIN index
-- on the journal. Like 0018's it is a few pages per million rows and left alone by
-- inserts until its range is summarized.
--
-- On a large ledger, build it beforehand with CREATE INDEX CONCURRENTLY and the same
-- definition: IF NOT EXISTS then makes this migration a no-op but for the drop. A
-- concurrent build that failed leaves an invalid index of that name, which IF NOT EXISTS
-- would take for the index and the drop would leave the journal without either: such an
-- index is dropped and built again here.
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_index
                WHERE indexrelid = to_regclass('journal_transactions_id_created')
                  AND NOT indisvalid) THEN
        DROP INDEX journal_transactions_id_created;
    END IF;
END $$;
CREATE INDEX IF NOT EXISTS journal_transactions_id_created ON journal_transactions
    USING brin (transaction_id, created_at) WITH (autosummarize = on);
DROP INDEX IF EXISTS journal_transactions_created;
