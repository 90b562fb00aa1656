-- A subscription's customer.subscription.updated events by subscription: one that a newer
-- one has superseded is not applied (Stripe does not deliver events in order; applied
-- late, an old plan change would undo a newer one).
CREATE INDEX payment_events_subscription_updates
    ON payment_events ((payload #>> '{data,object,id}'), ((payload ->> 'created')::bigint))
    WHERE type = 'customer.subscription.updated';
