-- Credit sources and their rules (DESIGN.md section 5), and run-time settings.

-- Run-time settings: one row per key. Rows with source 'environment' follow the
-- environment defaults of the servers (each server writes its defaults at start);
-- rows with source 'admin' were set through AdminService.UpdateSetting and stay
-- until reset. SQL functions read them in the same transaction as the effect.
CREATE TABLE settings (
    key        text        PRIMARY KEY,
    value      jsonb       NOT NULL,
    source     text        NOT NULL,
    updated_by text        NOT NULL,
    updated_at timestamptz NOT NULL,
    CONSTRAINT settings_source_known CHECK (source IN ('environment', 'admin'))
);

-- Every change of a setting, who made it and why. Append-only.
CREATE TABLE setting_changes (
    change_id  bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key        text        NOT NULL,
    old_value  jsonb,
    new_value  jsonb       NOT NULL,
    source     text        NOT NULL,
    actor      text        NOT NULL,
    reason     text,
    changed_at timestamptz NOT NULL,
    CONSTRAINT setting_changes_source_known CHECK (source IN ('environment', 'admin'))
);
CREATE INDEX setting_changes_by_key ON setting_changes (key, change_id);
CREATE TRIGGER setting_changes_append_only BEFORE UPDATE OR DELETE ON setting_changes
    FOR EACH ROW EXECUTE FUNCTION ledger_reject_journal_change();

-- When the account's next monthly allowance falls due (start of next month);
-- it takes part in next_maintenance_at, so the allowance is granted lazily.
ALTER TABLE accounts ADD COLUMN monthly_free_next_at timestamptz;
ALTER TABLE accounts ADD CONSTRAINT accounts_referred_by_fk
    FOREIGN KEY (referred_by) REFERENCES accounts (account_id);
ALTER TABLE accounts ADD CONSTRAINT accounts_not_self_referred CHECK (referred_by <> account_id);

-- Seed 000: at most one daily reward per account per day (in the configured zone).
CREATE TABLE daily_claims (
    account_id text        NOT NULL,
    claim_date date        NOT NULL,
    lot_id     bigint      NOT NULL,
    claimed_at timestamptz NOT NULL,
    CONSTRAINT daily_claims_once_per_day PRIMARY KEY (account_id, claim_date),
    CONSTRAINT daily_claims_lot_fk FOREIGN KEY (account_id, lot_id) REFERENCES lots (account_id, lot_id)
);

-- Seed 004: at most one monthly free allowance per account per calendar month.
CREATE TABLE monthly_allowances (
    account_id text        NOT NULL,
    month      date        NOT NULL,
    lot_id     bigint      NOT NULL,
    granted_at timestamptz NOT NULL,
    CONSTRAINT monthly_allowances_once_per_month PRIMARY KEY (account_id, month),
    CONSTRAINT monthly_allowances_lot_fk FOREIGN KEY (account_id, lot_id) REFERENCES lots (account_id, lot_id),
    CONSTRAINT monthly_allowances_first_of_month CHECK (extract(day FROM month) = 1)
);

CREATE TABLE credit_packs (
    pack_id           text        PRIMARY KEY,
    translation_key   text        NOT NULL,
    credits_micros    bigint      NOT NULL,
    price_minor       bigint      NOT NULL,
    currency          text        NOT NULL,
    provider_price_id text,
    active            boolean     NOT NULL,
    created_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL,
    updated_by        text        NOT NULL,
    CONSTRAINT credit_packs_id_format CHECK (pack_id ~ '^[a-z0-9][a-z0-9._-]{0,63}$'),
    CONSTRAINT credit_packs_credits_positive CHECK (credits_micros > 0),
    CONSTRAINT credit_packs_price_nonnegative CHECK (price_minor >= 0),
    CONSTRAINT credit_packs_currency_format CHECK (currency ~ '^[A-Z]{3}$')
);

CREATE TABLE subscription_plans (
    plan_id           text        PRIMARY KEY,
    translation_key   text        NOT NULL,
    credits_micros    bigint      NOT NULL,
    period_unit       text        NOT NULL,
    period_count      integer     NOT NULL,
    rank              integer     NOT NULL,
    price_minor       bigint      NOT NULL,
    currency          text        NOT NULL,
    provider_price_id text,
    active            boolean     NOT NULL,
    created_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL,
    updated_by        text        NOT NULL,
    CONSTRAINT subscription_plans_id_format CHECK (plan_id ~ '^[a-z0-9][a-z0-9._-]{0,63}$'),
    CONSTRAINT subscription_plans_credits_nonnegative CHECK (credits_micros >= 0),
    CONSTRAINT subscription_plans_period_unit_known CHECK (period_unit IN ('day', 'month', 'year')),
    CONSTRAINT subscription_plans_period_count_positive CHECK (period_count > 0),
    CONSTRAINT subscription_plans_price_nonnegative CHECK (price_minor >= 0),
    CONSTRAINT subscription_plans_currency_format CHECK (currency ~ '^[A-Z]{3}$')
);

-- An account's current subscription (one at a time).
CREATE TABLE subscriptions (
    account_id           text        PRIMARY KEY CONSTRAINT subscriptions_account_fk
                                     REFERENCES accounts (account_id),
    plan_id              text        NOT NULL CONSTRAINT subscriptions_plan_fk
                                     REFERENCES subscription_plans (plan_id),
    current_period_start timestamptz NOT NULL,
    current_period_end   timestamptz NOT NULL,
    external_ref         text,
    updated_at           timestamptz NOT NULL,
    CONSTRAINT subscriptions_period_ordered CHECK (current_period_end > current_period_start)
);

-- Every paid grant (pack, recharge, subscription period): what was paid, which
-- lots it created, and the provider's reference, fulfilled once per account.
-- Refunds of payments (the workers) claw back from these lots.
CREATE TABLE purchases (
    account_id     text        NOT NULL,
    purchase_id    bigint      GENERATED ALWAYS AS IDENTITY,
    kind           text        NOT NULL,
    pack_id        text        CONSTRAINT purchases_pack_fk REFERENCES credit_packs (pack_id),
    plan_id        text        CONSTRAINT purchases_plan_fk REFERENCES subscription_plans (plan_id),
    amount_minor   bigint,
    currency       text,
    credits_micros bigint      NOT NULL,
    bonus_micros   bigint      NOT NULL DEFAULT 0,
    lot_id         bigint      NOT NULL,
    bonus_lot_id   bigint,
    external_ref   text,
    created_at     timestamptz NOT NULL,
    PRIMARY KEY (account_id, purchase_id),
    CONSTRAINT purchases_kind_known CHECK (kind IN ('pack', 'recharge', 'subscription')),
    CONSTRAINT purchases_lot_fk FOREIGN KEY (account_id, lot_id) REFERENCES lots (account_id, lot_id),
    CONSTRAINT purchases_bonus_lot_fk FOREIGN KEY (account_id, bonus_lot_id) REFERENCES lots (account_id, lot_id),
    CONSTRAINT purchases_one_per_external_ref UNIQUE (account_id, external_ref)
);

-- Seed 003: admin-generated redemption codes. Codes are looked up by value, so
-- they are not keyed by account (a reference table when distributed).
CREATE TABLE redemption_batches (
    batch_id                 uuid        PRIMARY KEY,
    amount_micros            bigint      NOT NULL,
    code_count               integer     NOT NULL,
    max_redemptions_per_code integer     NOT NULL,
    code_expires_at          timestamptz,
    credit_lifetime          interval,
    disabled                 boolean     NOT NULL DEFAULT false,
    disabled_by              text,
    disabled_reason          text,
    disabled_at              timestamptz,
    note                     text,
    created_by               text        NOT NULL,
    created_at               timestamptz NOT NULL,
    CONSTRAINT redemption_batches_amount_positive CHECK (amount_micros > 0),
    CONSTRAINT redemption_batches_code_count_range CHECK (code_count BETWEEN 1 AND 10000),
    CONSTRAINT redemption_batches_max_redemptions_positive CHECK (max_redemptions_per_code > 0)
);

CREATE TABLE redemption_codes (
    code             text    PRIMARY KEY,
    batch_id         uuid    NOT NULL CONSTRAINT redemption_codes_batch_fk
                             REFERENCES redemption_batches (batch_id),
    redemption_count integer NOT NULL DEFAULT 0,
    -- Copied from the batch so the limit is a constraint on the row concurrent
    -- redeemers update: PostgreSQL itself refuses one redemption too many.
    max_redemptions  integer NOT NULL,
    CONSTRAINT redemption_codes_format CHECK (code ~ '^[A-Z0-9]{16}$'),
    CONSTRAINT redemption_codes_within_limit CHECK (redemption_count BETWEEN 0 AND max_redemptions)
);
CREATE INDEX redemption_codes_batch ON redemption_codes (batch_id);

CREATE TABLE redemptions (
    account_id  text        NOT NULL,
    code        text        NOT NULL CONSTRAINT redemptions_code_fk REFERENCES redemption_codes (code),
    lot_id      bigint      NOT NULL,
    redeemed_at timestamptz NOT NULL,
    CONSTRAINT redemptions_once_per_account PRIMARY KEY (account_id, code),
    CONSTRAINT redemptions_lot_fk FOREIGN KEY (account_id, lot_id) REFERENCES lots (account_id, lot_id)
);
CREATE INDEX redemptions_by_code ON redemptions (code);
