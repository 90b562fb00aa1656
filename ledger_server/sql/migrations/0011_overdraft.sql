-- Overdraft (DESIGN section 3): a balance may go below zero only by an account's explicit
-- overdraft limit. The unused part of the limit is one lot per account, of source
-- 'overdraft', consumed after every other lot (the highest priority number): charges,
-- holds, commits, releases and refunds then work through it as through any lot, and
-- accounts.balance_micros stays the sum of the main lots' remaining credits. The balance
-- the API shows is balance_micros - overdraft_limit_micros; the debt is the overdraft
-- lot's amount (= the limit) minus its remaining credits. A debt never stands beside
-- spendable main credits: they pay it back at once (ledger_settle_overdraft).
-- A refund of credits charged from the overdraft lot after the debt was repaid has no room
-- there: it becomes a lot of its own, source 'refund'.
INSERT INTO credit_sources (source, priority, is_paid) VALUES
    ('overdraft', 32767, false),
    ('refund',    100,   false);

-- The limit is also the overdraft lot's amount (the audit checks both agree); kept on the
-- account row, which every call reads anyway, so an account without one costs no lookup.
ALTER TABLE accounts
    ADD COLUMN overdraft_limit_micros bigint NOT NULL DEFAULT 0,
    ADD CONSTRAINT accounts_overdraft_limit_nonnegative CHECK (overdraft_limit_micros >= 0);

-- An overdraft lot whose limit went back to zero stays, empty (lots are never deleted).
-- That it is a main, permanent lot is left to the audit: every CHECK of lots is compiled
-- for each statement that writes a lot, and this one cost a single Consume 1.5% more
-- instructions (bench.sql_cost); only ledger_set_overdraft_limit makes that lot.
ALTER TABLE lots
    DROP CONSTRAINT lots_amount_positive,
    ADD CONSTRAINT lots_amount_positive CHECK (amount_micros > 0 OR source = 'overdraft');
CREATE UNIQUE INDEX lots_one_overdraft_per_account ON lots (account_id) WHERE source = 'overdraft';

-- A change of the limit: the overdraft lot grows or shrinks by its unused credits.
ALTER TABLE journal_transactions
    DROP CONSTRAINT journal_transactions_kind_known,
    ADD CONSTRAINT journal_transactions_kind_known CHECK (kind IN
        ('grant', 'hold', 'charge', 'release', 'refund', 'expiry', 'adjustment', 'transfer',
         'overdraft'));
