-- The period a subscription payment paid for, by its start (helper-151's review). A plan
-- change within a period grants nothing for a plan no higher than one the period was
-- granted already (ledger_change_subscription_plan, 0002_sources.sql); it found those
-- grants by their lots' expiry, the period's end. A period applied after it ended grants
-- lots that last its length from when it is applied (ledger_grant_subscription_period), so
-- its grants were not found: applied late, premium then basic then pro granted premium's
-- credits and pro's for one period. Rows written before this migration keep the old rule
-- (NULL: found by their lot's expiry).
ALTER TABLE purchases
    ADD COLUMN period_start timestamptz,
    ADD CONSTRAINT purchases_period_only_of_subscriptions
        CHECK (period_start IS NULL OR kind = 'subscription');
