-- Payments (issue 5): Stripe events as received, the Checkout Sessions this ledger
-- created, and how much of each purchase a refund clawed back.

-- Every Stripe event the webhook receiver accepted (signature verified), stored
-- before it is answered, under Stripe's own event id: a duplicate delivery finds its
-- row and is not processed again. PostgreSQL, not Redis, is the record of pending
-- work: the sweeper re-queues events whose job never finished.
CREATE TABLE payment_events (
    event_id        text        PRIMARY KEY,
    type            text        NOT NULL,
    -- Known at receipt when the event carries it (metadata), else once processed.
    account_id      text,
    payload         jsonb       NOT NULL,
    received_at     timestamptz NOT NULL,
    status          text        NOT NULL DEFAULT 'received',
    -- Processing attempts started (each RQ run, including the one that succeeded).
    attempts        integer     NOT NULL DEFAULT 0,
    last_error      text,
    processed_at    timestamptz,
    -- Credits the event moved: granted > 0, clawed back < 0.
    credits_micros  bigint      NOT NULL DEFAULT 0,
    -- The idempotency key the ledger operation ran under ('stripe:' || event_id).
    idempotency_key text,
    CONSTRAINT payment_events_event_id_format CHECK (event_id ~ '^[A-Za-z0-9_-]{1,255}$'),
    CONSTRAINT payment_events_status_known CHECK (status IN ('received', 'processing', 'processed',
                                                             'ignored', 'failed')),
    CONSTRAINT payment_events_attempts_nonnegative CHECK (attempts >= 0),
    CONSTRAINT payment_events_processed_when_done CHECK (
        (status IN ('processed', 'ignored')) = (processed_at IS NOT NULL))
);
-- The sweeper: unfinished events by age.
CREATE INDEX payment_events_sweep ON payment_events (status, received_at);
-- The payment log, newest first, for everyone and per account.
CREATE INDEX payment_events_log ON payment_events (received_at DESC, event_id DESC);
CREATE INDEX payment_events_account_log ON payment_events (account_id, received_at DESC, event_id DESC)
    WHERE account_id IS NOT NULL;

-- Checkout Sessions created through BillingService.CreateCheckoutSession, one per
-- account and idempotency key (a retry returns the same session).
CREATE TABLE checkout_sessions (
    session_id       text        PRIMARY KEY,
    account_id       text        NOT NULL,
    idempotency_key  text        NOT NULL,
    request_hash     bytea       NOT NULL,
    kind             text        NOT NULL,
    pack_id          text        CONSTRAINT checkout_sessions_pack_fk REFERENCES credit_packs (pack_id),
    plan_id          text        CONSTRAINT checkout_sessions_plan_fk REFERENCES subscription_plans (plan_id),
    amount_minor     bigint      NOT NULL,
    currency         text        NOT NULL,
    url              text        NOT NULL,
    -- The Stripe subscription a completed subscription checkout created.
    subscription_ref text,
    created_at       timestamptz NOT NULL,
    completed_at     timestamptz,
    CONSTRAINT checkout_sessions_kind_known CHECK (kind IN ('pack', 'recharge', 'subscription')),
    CONSTRAINT checkout_sessions_kind_target CHECK (
        (kind = 'pack') = (pack_id IS NOT NULL) AND (kind = 'subscription') = (plan_id IS NOT NULL)),
    CONSTRAINT checkout_sessions_amount_nonnegative CHECK (amount_minor >= 0),
    CONSTRAINT checkout_sessions_one_per_key UNIQUE (account_id, idempotency_key)
);
CREATE INDEX checkout_sessions_subscription ON checkout_sessions (subscription_ref)
    WHERE subscription_ref IS NOT NULL;

-- A refund claws back the unspent part of the purchase's lots (charge.refunded).
ALTER TABLE purchases
    ADD COLUMN clawed_back_micros bigint NOT NULL DEFAULT 0,
    ADD COLUMN bonus_clawed_back_micros bigint NOT NULL DEFAULT 0,
    ADD CONSTRAINT purchases_clawed_back_within_credits
        CHECK (clawed_back_micros >= 0 AND clawed_back_micros <= credits_micros),
    ADD CONSTRAINT purchases_bonus_clawed_back_within_bonus
        CHECK (bonus_clawed_back_micros >= 0 AND bonus_clawed_back_micros <= bonus_micros);
-- A refund names the payment, not the account, when the event carries no metadata.
CREATE INDEX purchases_external_ref ON purchases (external_ref) WHERE external_ref IS NOT NULL;
