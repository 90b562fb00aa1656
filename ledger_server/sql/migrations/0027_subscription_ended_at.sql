-- When a subscription ended (customer.subscription.deleted), kept apart from its period's
-- end: a subscription whose period has passed while its renewal invoice is not paid yet
-- (Stripe charges it about an hour after the period ends, and retries a failed payment for
-- days) is still the account's, for subscription.renewal_grace_days, and one that ended is
-- not (helper-85: in that gap a second subscription could be checked out and charged beside
-- the first, and a subscriber was refused packs). Ended subscriptions are those whose
-- deleted event is stored (migration 0020's index).
ALTER TABLE subscriptions ADD COLUMN ended_at timestamptz;

UPDATE subscriptions s
   SET ended_at = s.current_period_end
 WHERE EXISTS (SELECT FROM payment_events e
                WHERE e.type = 'customer.subscription.deleted'
                  AND e.payload #>> '{data,object,id}' = s.external_ref);
