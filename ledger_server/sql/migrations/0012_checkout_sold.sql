-- What a one-time checkout sold, fixed when its session is created: the payment's webhook
-- grants exactly this, without asking the catalogue, the recharge tiers or the sale rules
-- again. The customer has paid by then; a pack taken off sale, a setting changed or a
-- subscription ended in between must not leave the payment without its credits. NULL for
-- subscription checkouts (their invoices grant) and for sessions stored before this column.
ALTER TABLE checkout_sessions
    ADD COLUMN credits_micros bigint,
    ADD COLUMN bonus_micros bigint,
    ADD CONSTRAINT checkout_sessions_sold_amounts
        CHECK (credits_micros > 0 AND bonus_micros >= 0);
