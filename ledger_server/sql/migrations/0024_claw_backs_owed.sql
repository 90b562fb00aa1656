-- What a payment's refund took back is at most what was unspent then; the rest of its share
-- is owed: credits that come back to the purchase's lots later (a Refund of a charge they
-- paid) are taken as they come (ledger_settle_claw_backs), not left to the customer whose
-- payment was refunded (helper-62).
ALTER TABLE purchases
    ADD COLUMN claw_back_owed_micros bigint NOT NULL DEFAULT 0,
    ADD COLUMN bonus_claw_back_owed_micros bigint NOT NULL DEFAULT 0,
    ADD CONSTRAINT purchases_claw_back_owed_nonnegative
        CHECK (claw_back_owed_micros >= 0 AND bonus_claw_back_owed_micros >= 0);
