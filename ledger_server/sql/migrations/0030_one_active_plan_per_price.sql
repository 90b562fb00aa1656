-- One active plan per payment-provider price (helper-99): a paid invoice names only its
-- price, and with two active plans on one price the worker picked one by plan id, so a
-- subscriber's renewal could grant another plan's credits and move the subscription to
-- it. CreateSubscriptionPlan and UpdateSubscriptionPlan (reactivating a plan included)
-- answer INVALID_FIELD plan.provider_price_id on this index (db/errors.py). Inactive
-- plans may keep a price an active one has: their subscribers' renewals still find them
-- (plan_for_price prefers the subscription's own plan).
--
-- A database that already has two active plans on one price keeps working as before: the
-- index is created only when there are none (CREATE UNIQUE INDEX would fail and stop the
-- migration), with a warning naming the prices otherwise; deactivate or re-price all but
-- one plan of each, then create the index by hand with the statement below.
DO $$
DECLARE
    shared text;
BEGIN
    SELECT string_agg(provider_price_id, ', ' ORDER BY provider_price_id) INTO shared
      FROM (SELECT provider_price_id FROM subscription_plans
             WHERE active AND provider_price_id <> ''
             GROUP BY provider_price_id HAVING count(*) > 1) d;
    IF shared IS NULL THEN
        CREATE UNIQUE INDEX subscription_plans_one_active_per_price
            ON subscription_plans (provider_price_id)
            WHERE active AND provider_price_id <> '';
    ELSE
        RAISE WARNING 'subscription_plans_one_active_per_price not created: several active '
                      'plans have the provider prices %', shared;
    END IF;
END
$$;
