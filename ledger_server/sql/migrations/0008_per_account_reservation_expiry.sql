-- The global index of pending reservations by expiry let the planner answer an
-- account's "which of my holds timed out" (ledger_maintain) by scanning every account's
-- pending reservations, a hot-path scan that does not filter on account_id
-- (tests/test_hot_path_queries.py caught it on a fresh database). Nothing needs a global
-- order: the sweeper finds due accounts through accounts.next_maintenance_at.
DROP INDEX reservations_pending_expiry;
