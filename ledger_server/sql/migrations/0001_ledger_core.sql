-- The ledger core: accounts, lots, reservations, the double-entry journal and
-- idempotency keys. Every table is keyed by account_id first so the schema can be
-- distributed by account_id (Citus) without change; see docs/SCALING.md.
--
-- Lock order, everywhere: the accounts row (FOR UPDATE), then its lots (in
-- consumption order), then its reservations. Functions in functions/ follow it.

-- One row per credit source: consumption priority (lower first) and whether its
-- credits count as purchased in reports. Lots copy the priority when granted.
CREATE TABLE credit_sources (
    source       text     PRIMARY KEY,
    priority     smallint NOT NULL,
    is_paid      boolean  NOT NULL,
    CONSTRAINT credit_sources_source_format CHECK (source ~ '^[a-z_]+$')
);

INSERT INTO credit_sources (source, priority, is_paid) VALUES
    ('daily',                   0,   false),  -- seed 000: daily credits go first
    ('signup',                  100, false),
    ('monthly_free',            100, false),
    ('subscription',            100, true),
    ('subscription_carry_over', 100, true),
    ('purchase',                100, true),
    ('recharge',                100, true),
    ('recharge_bonus',          100, true),
    ('admin',                   100, false),
    ('redemption',              100, false),
    ('referral',                100, false),
    ('reward_transfer',         100, false),
    ('promotion',               100, false);

CREATE TABLE accounts (
    account_id            text        PRIMARY KEY,
    -- Sum of remaining_micros over the account's main lots (live or awaiting expiry).
    balance_micros        bigint      NOT NULL DEFAULT 0,
    -- Sum of remaining_micros over the account's reward lots.
    reward_balance_micros bigint      NOT NULL DEFAULT 0,
    -- Sum of held_micros over the account's lots (pending reservations).
    held_micros           bigint      NOT NULL DEFAULT 0,
    -- Earliest moment a lot may expire or a reservation time out; operations on the
    -- account apply due expiries first, so reads never show stale credits.
    next_maintenance_at   timestamptz,
    referral_code         text,
    referred_by           text,
    low_balance_threshold_micros bigint,
    low_balance_alert_armed boolean   NOT NULL DEFAULT true,
    created_at            timestamptz NOT NULL,
    CONSTRAINT accounts_account_id_length CHECK (char_length(account_id) BETWEEN 1 AND 128),
    CONSTRAINT accounts_balance_nonnegative CHECK (balance_micros >= 0),
    CONSTRAINT accounts_reward_balance_nonnegative CHECK (reward_balance_micros >= 0),
    CONSTRAINT accounts_held_within_balance CHECK (held_micros >= 0 AND held_micros <= balance_micros),
    CONSTRAINT accounts_low_balance_threshold_nonnegative CHECK (low_balance_threshold_micros >= 0),
    CONSTRAINT accounts_referral_code_unique UNIQUE (referral_code)
);

CREATE TABLE lots (
    account_id           text        NOT NULL CONSTRAINT lots_account_fk REFERENCES accounts (account_id),
    lot_id               bigint      GENERATED ALWAYS AS IDENTITY,
    source               text        NOT NULL CONSTRAINT lots_source_fk REFERENCES credit_sources (source),
    balance_kind         text        NOT NULL,
    amount_micros        bigint      NOT NULL,
    remaining_micros     bigint      NOT NULL,
    held_micros          bigint      NOT NULL DEFAULT 0,
    expired_micros       bigint      NOT NULL DEFAULT 0,
    priority             smallint    NOT NULL,
    expires_at           timestamptz,
    created_at           timestamptz NOT NULL,
    external_ref         text,
    parent_lot_id        bigint,
    grant_transaction_id bigint      NOT NULL,
    PRIMARY KEY (account_id, lot_id),
    CONSTRAINT lots_balance_kind_known CHECK (balance_kind IN ('main', 'reward')),
    CONSTRAINT lots_amount_positive CHECK (amount_micros > 0),
    CONSTRAINT lots_remaining_nonnegative CHECK (remaining_micros >= 0),
    CONSTRAINT lots_remaining_within_amount CHECK (remaining_micros <= amount_micros),
    CONSTRAINT lots_held_within_remaining CHECK (held_micros >= 0 AND held_micros <= remaining_micros),
    CONSTRAINT lots_expired_within_amount CHECK (expired_micros >= 0 AND expired_micros <= amount_micros),
    CONSTRAINT lots_parent_fk FOREIGN KEY (account_id, parent_lot_id) REFERENCES lots (account_id, lot_id)
);

-- Consumption order (seed 000): priority (daily first), nearest expiry, permanent
-- last (NULLs sort last ascending), then creation order. Only lots with credits left.
CREATE INDEX lots_consumption_order ON lots (account_id, balance_kind, priority, expires_at, lot_id)
    WHERE remaining_micros > 0;
-- Expiry: the next lot to expire per account, and the global sweep.
CREATE INDEX lots_expiry ON lots (expires_at, account_id)
    WHERE remaining_micros > 0 AND expires_at IS NOT NULL;
CREATE INDEX lots_account_expiry ON lots (account_id, expires_at)
    WHERE remaining_micros > 0 AND expires_at IS NOT NULL;

-- The journal: one row per movement, each with balanced postings. Append-only.
CREATE TABLE journal_transactions (
    account_id        text        NOT NULL CONSTRAINT journal_transactions_account_fk
                                  REFERENCES accounts (account_id),
    transaction_id    bigint      GENERATED ALWAYS AS IDENTITY,
    kind              text        NOT NULL,
    -- Net change of the account's balances; for holds and releases, the amount held or returned.
    amount_micros     bigint      NOT NULL,
    reservation_id    uuid,
    feature           text,
    model             text,
    -- Usage and price the charge was computed with (rate card; see pricing).
    units             bigint,
    unit              text,
    unit_price_micros bigint,
    price_version     bigint,
    comment           text,
    actor             text,
    external_ref      text,
    created_at        timestamptz NOT NULL,
    PRIMARY KEY (account_id, transaction_id),
    CONSTRAINT journal_transactions_kind_known CHECK (kind IN
        ('grant', 'hold', 'charge', 'release', 'refund', 'expiry', 'adjustment', 'transfer'))
);
CREATE INDEX journal_transactions_account_time ON journal_transactions (account_id, created_at);
CREATE INDEX journal_transactions_reservation ON journal_transactions (account_id, reservation_id)
    WHERE reservation_id IS NOT NULL;

-- ledger_account: 'account:main' / 'account:reward' (with lot_id) for the customer;
-- 'issuance:<source>', 'revenue', 'breakage' for the system side.
CREATE TABLE postings (
    account_id     text   NOT NULL,
    transaction_id bigint NOT NULL,
    posting_no     smallint NOT NULL,
    ledger_account text   NOT NULL,
    lot_id         bigint,
    source         text,
    amount_micros  bigint NOT NULL,
    memo           text,
    PRIMARY KEY (account_id, transaction_id, posting_no),
    CONSTRAINT postings_transaction_fk FOREIGN KEY (account_id, transaction_id)
        REFERENCES journal_transactions (account_id, transaction_id),
    CONSTRAINT postings_lot_fk FOREIGN KEY (account_id, lot_id) REFERENCES lots (account_id, lot_id),
    CONSTRAINT postings_customer_side_has_lot CHECK (
        (ledger_account LIKE 'account:%') = (lot_id IS NOT NULL)),
    CONSTRAINT postings_amount_nonzero CHECK (amount_micros <> 0)
);
CREATE INDEX postings_lot ON postings (account_id, lot_id) WHERE lot_id IS NOT NULL;

CREATE FUNCTION ledger_reject_journal_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the journal is append-only: % on % is not allowed', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'LE100';
END $$;

CREATE TRIGGER journal_transactions_append_only BEFORE UPDATE OR DELETE ON journal_transactions
    FOR EACH ROW EXECUTE FUNCTION ledger_reject_journal_change();
CREATE TRIGGER postings_append_only BEFORE UPDATE OR DELETE ON postings
    FOR EACH ROW EXECUTE FUNCTION ledger_reject_journal_change();

CREATE TABLE reservations (
    account_id            text        NOT NULL CONSTRAINT reservations_account_fk
                                      REFERENCES accounts (account_id),
    reservation_id        uuid        NOT NULL,
    status                text        NOT NULL,
    held_micros           bigint      NOT NULL,
    committed_micros      bigint      NOT NULL DEFAULT 0,
    refunded_micros       bigint      NOT NULL DEFAULT 0,
    expires_at            timestamptz NOT NULL,
    created_at            timestamptz NOT NULL,
    finalized_at          timestamptz,
    feature               text,
    model                 text,
    comment               text,
    -- The priced usage and price version a reservation was made with (pricing).
    usage                 jsonb,
    unit_price_micros     bigint,
    price_version         bigint,
    hold_transaction_id   bigint,
    charge_transaction_id bigint,
    PRIMARY KEY (account_id, reservation_id),
    CONSTRAINT reservations_status_known CHECK (status IN ('pending', 'committed', 'released', 'expired')),
    CONSTRAINT reservations_held_nonnegative CHECK (held_micros >= 0),
    CONSTRAINT reservations_committed_within_held CHECK (committed_micros >= 0 AND committed_micros <= held_micros),
    CONSTRAINT reservations_refunded_within_committed CHECK (refunded_micros >= 0 AND refunded_micros <= committed_micros),
    CONSTRAINT reservations_finalized_when_done CHECK ((status = 'pending') = (finalized_at IS NULL))
);
CREATE INDEX reservations_pending_by_account ON reservations (account_id, expires_at) WHERE status = 'pending';
CREATE INDEX reservations_pending_expiry ON reservations (expires_at) WHERE status = 'pending';

-- Which lots a reservation holds (and then charged), in consumption order.
CREATE TABLE reservation_lots (
    account_id            text     NOT NULL,
    reservation_id        uuid     NOT NULL,
    lot_id                bigint   NOT NULL,
    seq                   smallint NOT NULL,
    held_micros           bigint   NOT NULL,
    committed_micros      bigint   NOT NULL DEFAULT 0,
    refunded_micros       bigint   NOT NULL DEFAULT 0,
    refund_expired_micros bigint   NOT NULL DEFAULT 0,
    PRIMARY KEY (account_id, reservation_id, lot_id),
    CONSTRAINT reservation_lots_reservation_fk FOREIGN KEY (account_id, reservation_id)
        REFERENCES reservations (account_id, reservation_id),
    CONSTRAINT reservation_lots_lot_fk FOREIGN KEY (account_id, lot_id) REFERENCES lots (account_id, lot_id),
    CONSTRAINT reservation_lots_held_positive CHECK (held_micros > 0),
    CONSTRAINT reservation_lots_committed_within_held CHECK (committed_micros >= 0 AND committed_micros <= held_micros),
    CONSTRAINT reservation_lots_refunded_within_committed CHECK (refunded_micros >= 0 AND refunded_micros <= committed_micros),
    CONSTRAINT reservation_lots_refund_expired_within_refunded CHECK (refund_expired_micros >= 0 AND refund_expired_micros <= refunded_micros)
);

-- A retried request finds its original response here. Stored in the same SQL
-- transaction as the effect, so a key exists if and only if the effect does.
CREATE TABLE idempotency_keys (
    account_id      text        NOT NULL,
    idempotency_key text        NOT NULL,
    operation       text        NOT NULL,
    request_hash    bytea       NOT NULL,
    response        jsonb       NOT NULL,
    created_at      timestamptz NOT NULL,
    CONSTRAINT idempotency_keys_one_per_account PRIMARY KEY (account_id, idempotency_key),
    CONSTRAINT idempotency_keys_key_length CHECK (char_length(idempotency_key) BETWEEN 1 AND 128)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
