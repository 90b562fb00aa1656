-- Every charge updates a lot. PostgreSQL can update a row in place on its page without new
-- index entries (a HOT update) only when no indexed column changes, and a column named in
-- a partial index's predicate counts: the predicates on remaining_micros made every lot
-- update write a new entry into each lot index (and WAL for each). A stored flag that
-- changes only when a lot runs out takes their place, so an ordinary charge leaves the
-- lot indexes alone; the free space fillfactor leaves on each page gives the new row
-- version room on its own page.
ALTER TABLE lots SET (fillfactor = 90);
ALTER TABLE lots ADD COLUMN depleted boolean GENERATED ALWAYS AS (remaining_micros = 0) STORED;

DROP INDEX lots_consumption_order;
CREATE INDEX lots_consumption_order ON lots (account_id, balance_kind, priority, expires_at, lot_id)
    WHERE NOT depleted;
DROP INDEX lots_account_expiry;
CREATE INDEX lots_account_expiry ON lots (account_id, expires_at)
    WHERE NOT depleted AND expires_at IS NOT NULL;
-- No query reads lots by expiry across accounts: the sweeper finds due accounts through
-- accounts.next_maintenance_at (0006), so this index only cost writes.
DROP INDEX lots_expiry;
