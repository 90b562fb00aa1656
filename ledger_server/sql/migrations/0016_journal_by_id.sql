-- The platform-wide transaction log (ReportService.ListJournal, DESIGN.md section 7) pages
-- through every account's entries newest first, by transaction_id: without an index of its
-- own that is a sort of the whole journal per page. Ids are drawn from one sequence, so
-- each insert lands at one edge of this index.
--
-- On -transaction_id, an expression only that listing names (ledger_journal_page): an
-- index on the column itself is taken by the planner for one account's pages too, where it
-- walks past every other account's entries (ten times the reads of the primary key for the
-- far page of a 1,000,000-entry account), and for the postings' foreign key checks.
CREATE INDEX journal_transactions_newest_first ON journal_transactions ((-transaction_id));
