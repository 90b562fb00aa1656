-- The platform-wide transaction log (ReportService.ListJournal, DESIGN.md section 7) pages
-- through every account's entries newest first, by transaction_id: without an index of its
-- own that is a sort of the whole journal per page. Ids are drawn from one sequence, so
-- each insert lands at the right edge of this index. account_id is its second column so
-- that a lookup by the whole key (the postings' foreign key check), which may take this
-- index instead of the primary key, still names the account (tests/test_hot_path_queries).
CREATE INDEX journal_transactions_by_id ON journal_transactions (transaction_id, account_id);
