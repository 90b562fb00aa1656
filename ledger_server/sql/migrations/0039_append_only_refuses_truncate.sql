-- The append-only tables (the journal's two, 0001; setting_changes, 0002; the rate card's
-- two, 0003) refused UPDATE and DELETE row by row, but TRUNCATE fires no row trigger:
-- `TRUNCATE postings` or `TRUNCATE journal_transactions CASCADE` emptied the journal.
-- A statement trigger refuses it with the rows' error (LE100, naming the operation and the
-- table); a TRUNCATE ... CASCADE that reaches one of them fires it too. The audit checks
-- that these triggers and the row ones exist and are enabled (queries/audit.sql).
CREATE TRIGGER journal_transactions_no_truncate BEFORE TRUNCATE ON journal_transactions
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_reject_journal_change();
CREATE TRIGGER postings_no_truncate BEFORE TRUNCATE ON postings
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_reject_journal_change();
CREATE TRIGGER setting_changes_no_truncate BEFORE TRUNCATE ON setting_changes
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_reject_journal_change();
CREATE TRIGGER prices_no_truncate BEFORE TRUNCATE ON prices
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_reject_journal_change();
CREATE TRIGGER model_multipliers_no_truncate BEFORE TRUNCATE ON model_multipliers
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_reject_journal_change();
