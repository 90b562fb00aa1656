-- The checkouts Stripe answered with an error. Stripe saves a request's first answer under
-- its idempotency key and replays it to every retry (a 500 included) for a day, so the next
-- attempt of such a checkout asks under a fresh Stripe key, numbered by `attempt`
-- (server/stripe_checkout.py). No row: attempt 0, the key derived before attempts were
-- counted. A checkout whose session is recorded never asks Stripe again; its row stays, as
-- small as the idempotency key it belongs to.
CREATE TABLE checkout_stripe_attempts (
    account_id      text COLLATE "C" NOT NULL,
    idempotency_key text COLLATE "C" NOT NULL,
    attempt         integer          NOT NULL,
    answered_at     timestamptz      NOT NULL,
    CONSTRAINT checkout_stripe_attempts_pkey PRIMARY KEY (account_id, idempotency_key),
    CONSTRAINT checkout_stripe_attempts_positive CHECK (attempt > 0)
);
