-- A subscription that ended (customer.subscription.deleted: cancelled at once, at its
-- period's end, or for non-payment) ends the account's subscriber status then, not at the
-- end of the period it had paid for. Stripe does not deliver events in order, so a paid
-- invoice or a plan change of the same subscription may be applied after its end; each
-- asks whether the subscription has ended, by this index, and leaves the end in place.
-- Small: one entry per ended subscription.
CREATE INDEX payment_events_subscription_ends
    ON payment_events ((payload #>> '{data,object,id}'))
    WHERE type = 'customer.subscription.deleted';
