-- The summary of every account (ReportService.GetSummary with no account, DESIGN.md
-- section 7) reads the journal by time alone: the transactions made since the period's
-- start and their postings. The only indexes on either lead with account_id, so that read
-- was a sequential scan of the whole journal and of every posting, however recent the
-- period and however long the history.
--
-- BRIN indexes: both tables are append-only, and created_at and transaction_id grow with
-- them, so each range of pages covers a short stretch of time and of ids, and a read
-- from the period's start visits only the ranges at the end. They take a few pages per
-- million rows, and an insert leaves them alone until its range is summarized
-- (autosummarize: by autovacuum once the range is full), so the charges pay nearly
-- nothing for them. Rows out of order (the servers' clocks, ids drawn before a slow
-- commit) only widen a range: rows are rechecked, never missed.
--
-- Building them reads each table once while writes to it wait. On a large ledger, build
-- them beforehand with CREATE INDEX CONCURRENTLY and the same definitions: IF NOT EXISTS
-- then makes this migration a no-op.
CREATE INDEX IF NOT EXISTS journal_transactions_created ON journal_transactions
    USING brin (created_at) WITH (autosummarize = on);
CREATE INDEX IF NOT EXISTS postings_transaction ON postings
    USING brin (transaction_id) WITH (autosummarize = on);
