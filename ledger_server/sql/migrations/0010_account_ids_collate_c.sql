-- Account ids are identifiers, compared by their bytes: the "C" collation. In the
-- database's default collation (a libc locale such as en_US.UTF-8, or C.UTF-8, which
-- PostgreSQL does not treat as C) every comparison of two ids calls strcoll: each index
-- probe by account_id, each sort and grouping by account; ~8% of the instructions of a
-- group-commit batch (bench.sql_cost). Ids are ASCII letters, digits and ._:@/+=-
-- (ledger/validation.py), so their order changes only where a locale sorted upper and
-- lower case or punctuation otherwise. The indexes holding account_id are rebuilt (and
-- the foreign keys checked again); the rows are not rewritten.
ALTER TABLE accounts ALTER COLUMN account_id TYPE text COLLATE "C",
                     ALTER COLUMN referred_by TYPE text COLLATE "C";
ALTER TABLE lots ALTER COLUMN account_id TYPE text COLLATE "C";
ALTER TABLE journal_transactions ALTER COLUMN account_id TYPE text COLLATE "C";
ALTER TABLE postings ALTER COLUMN account_id TYPE text COLLATE "C";
ALTER TABLE reservations ALTER COLUMN account_id TYPE text COLLATE "C";
ALTER TABLE reservation_lots ALTER COLUMN account_id TYPE text COLLATE "C";
-- Idempotency keys too (printable ASCII, ledger/validation.py): every charge probes and
-- inserts its key in the key index.
ALTER TABLE idempotency_keys ALTER COLUMN account_id TYPE text COLLATE "C",
                             ALTER COLUMN idempotency_key TYPE text COLLATE "C";
ALTER TABLE low_balance_alerts ALTER COLUMN account_id TYPE text COLLATE "C";
ALTER TABLE daily_claims ALTER COLUMN account_id TYPE text COLLATE "C";
ALTER TABLE monthly_allowances ALTER COLUMN account_id TYPE text COLLATE "C";
ALTER TABLE subscriptions ALTER COLUMN account_id TYPE text COLLATE "C";
ALTER TABLE purchases ALTER COLUMN account_id TYPE text COLLATE "C";
ALTER TABLE redemptions ALTER COLUMN account_id TYPE text COLLATE "C";
ALTER TABLE checkout_sessions ALTER COLUMN account_id TYPE text COLLATE "C";
ALTER TABLE payment_events ALTER COLUMN account_id TYPE text COLLATE "C";
