-- The rate card (DESIGN.md section 6). Prices are versioned: a change inserts a new
-- row (its id is the price version) and never updates one, so a reservation can be
-- settled at the prices it was made with. The current price of (feature, model,
-- unit) is its newest row; a row with active = false withdraws it.
CREATE TABLE prices (
    price_version     bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    feature           text        NOT NULL,
    -- '' for the feature-wide price (times the model multiplier).
    model             text        NOT NULL,
    unit              text        NOT NULL,
    unit_size         bigint      NOT NULL,
    unit_price_micros bigint      NOT NULL,
    active            boolean     NOT NULL,
    created_by        text        NOT NULL,
    created_at        timestamptz NOT NULL,
    CONSTRAINT prices_feature_format CHECK (feature ~ '^[A-Za-z0-9._:/-]{1,64}$'),
    CONSTRAINT prices_model_format CHECK (model ~ '^[A-Za-z0-9._:/-]{0,64}$'),
    CONSTRAINT prices_unit_known CHECK (unit IN ('input_tokens', 'output_tokens', 'tokens', 'images',
                                                 'generations', 'video_seconds', 'workflow_runs')),
    CONSTRAINT prices_unit_size_positive CHECK (unit_size > 0),
    CONSTRAINT prices_unit_price_nonnegative CHECK (unit_price_micros >= 0)
);
CREATE INDEX prices_current ON prices (feature, model, unit, price_version DESC);

CREATE TABLE model_multipliers (
    multiplier_version bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    model              text        NOT NULL,
    multiplier_ppm     bigint      NOT NULL,
    created_by         text        NOT NULL,
    created_at         timestamptz NOT NULL,
    CONSTRAINT model_multipliers_model_format CHECK (model ~ '^[A-Za-z0-9._:/-]{1,64}$'),
    CONSTRAINT model_multipliers_nonnegative CHECK (multiplier_ppm >= 0)
);
CREATE INDEX model_multipliers_current ON model_multipliers (model, multiplier_version DESC);

CREATE TRIGGER prices_append_only BEFORE UPDATE OR DELETE ON prices
    FOR EACH ROW EXECUTE FUNCTION ledger_reject_journal_change();
CREATE TRIGGER model_multipliers_append_only BEFORE UPDATE OR DELETE ON model_multipliers
    FOR EACH ROW EXECUTE FUNCTION ledger_reject_journal_change();

-- A charge's pricing: the priced usage (feature, model, lines with unit prices and
-- versions, cost), replacing the single-unit columns of 0001 (a chat call has input
-- and output tokens at two prices).
ALTER TABLE journal_transactions
    DROP COLUMN units, DROP COLUMN unit, DROP COLUMN unit_price_micros, DROP COLUMN price_version,
    ADD COLUMN usage jsonb;
ALTER TABLE reservations DROP COLUMN unit_price_micros, DROP COLUMN price_version;
