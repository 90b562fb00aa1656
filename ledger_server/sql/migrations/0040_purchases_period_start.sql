-- The period a subscription payment paid for, by its start (helper-151's review). A plan
-- change within a period grants nothing for a plan no higher than one the period was
-- granted already (ledger_change_subscription_plan, 0002_sources.sql); it found those
-- grants by their lots' expiry, the period's end. A period applied after it ended grants
-- lots that last its length from when it is applied (ledger_grant_subscription_period), so
-- its grants were not found: applied late, premium then basic then pro granted premium's
-- credits and pro's for one period.
ALTER TABLE purchases
    ADD COLUMN period_start timestamptz,
    ADD CONSTRAINT purchases_period_only_of_subscriptions
        CHECK (period_start IS NULL OR kind = 'subscription');

-- The payments of each account's current period, the only one a plan change compares with
-- (helper-155's review: a period in progress at the deploy, granted late, was still open to
-- the double grant): its lots last to the period's end, or were granted after it ended for
-- its length. Older periods' rows stay NULL and are found by their expiry as before.
UPDATE purchases pu
   SET period_start = s.current_period_start
  FROM subscriptions s, lots l
 WHERE pu.kind = 'subscription'
   AND s.account_id = pu.account_id
   AND l.account_id = pu.account_id AND l.lot_id = pu.lot_id
   AND (l.expires_at = s.current_period_end
        OR (l.created_at >= s.current_period_end
            AND l.expires_at - l.created_at = s.current_period_end - s.current_period_start));
