-- Pricing by the rate card (DESIGN.md section 6). Further SQLSTATEs:
--   LE029 feature not found   LE030 model not found   LE031 price not found

-- The current price of (feature, model, unit): its newest version, unless that
-- version withdrew it. NULL when there is none.
CREATE OR REPLACE FUNCTION ledger_current_price(p_feature text, p_model text, p_unit text) RETURNS prices
LANGUAGE sql STABLE AS $$
    SELECT p.* FROM (
        SELECT * FROM prices
         WHERE feature = p_feature AND model = p_model AND unit = p_unit
         ORDER BY price_version DESC LIMIT 1) p
     WHERE p.active
$$;

-- The current multiplier of a model: its newest version, unless that version withdrew it
-- (RemoveModelMultiplier). NULL when there is none.
CREATE OR REPLACE FUNCTION ledger_current_multiplier(p_model text) RETURNS model_multipliers
LANGUAGE sql STABLE AS $$
    SELECT m.* FROM (
        SELECT * FROM model_multipliers
         WHERE model = p_model ORDER BY multiplier_version DESC LIMIT 1) m
     WHERE m.active
$$;

-- The rate card as it stands: every current, active price.
CREATE OR REPLACE FUNCTION ledger_rate_card() RETURNS SETOF prices
LANGUAGE sql STABLE AS $$
    SELECT p.* FROM (
        SELECT DISTINCT ON (feature, model, unit) *
          FROM prices ORDER BY feature, model, unit, price_version DESC) p
     WHERE p.active
$$;

-- Prices a usage: p_quantities is [{unit, quantity}]. With p_snapshot (a priced
-- usage a reservation was made with) each unit is priced as in the snapshot;
-- otherwise by the current rate card: a model-specific price as it is, else the
-- feature-wide price times the model's multiplier. The cost is the exact sum of
-- quantity x unit price x multiplier / unit size over the lines, rounded up once. The sum
-- is kept as an integer fraction (total_num / total_den): a numeric quotient per line
-- would be cut to a finite scale, and those cuts, added up, can cross a whole micro-credit
-- before the one rounding (three lines of 2/3 each must cost 2, not 3).
CREATE OR REPLACE FUNCTION ledger_price_usage(
    p_feature text, p_model text, p_quantities jsonb, p_snapshot jsonb) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    q record;
    p prices;
    m model_multipliers;
    snap jsonb;
    unit_price bigint;
    unit_size bigint;
    multiplier bigint;
    price_version text;
    multiplier_version text;
    lines jsonb := '[]'::jsonb;
    total_num numeric := 0;
    total_den numeric := 1;
    line_den numeric;
    common_den numeric;
    cost numeric;
BEGIN
    IF p_snapshot IS NULL AND NOT EXISTS (SELECT 1 FROM ledger_rate_card() WHERE feature = p_feature) THEN
        PERFORM ledger_fail('LE029', 'the rate card has no price for this feature',
            jsonb_build_object('feature', p_feature));
    END IF;
    FOR q IN
        SELECT t.unit, t.quantity FROM jsonb_to_recordset(p_quantities) AS t(unit text, quantity bigint)
    LOOP
        multiplier_version := NULL;
        IF p_snapshot IS NOT NULL THEN
            SELECT l INTO snap FROM jsonb_array_elements(p_snapshot -> 'lines') l
             WHERE l ->> 'unit' = q.unit LIMIT 1;
            IF snap IS NULL THEN
                PERFORM ledger_fail('LE031', 'the reservation was not priced per this unit',
                    jsonb_build_object('feature', p_feature, 'model', p_model, 'unit', q.unit));
            END IF;
            unit_price := (snap ->> 'unit_price_micros')::bigint;
            unit_size := (snap ->> 'unit_size')::bigint;
            multiplier := (snap ->> 'multiplier_ppm')::bigint;
            price_version := snap ->> 'price_version';
            multiplier_version := snap ->> 'multiplier_version';
        ELSE
            p := NULL;
            IF p_model <> '' THEN
                p := ledger_current_price(p_feature, p_model, q.unit);
            END IF;
            IF p.price_version IS NOT NULL THEN
                multiplier := 1000000;
            ELSE
                p := ledger_current_price(p_feature, '', q.unit);
                IF p_model <> '' THEN
                    m := ledger_current_multiplier(p_model);
                    -- Without a multiplier the feature-wide prices are not the model's, only
                    -- its own are. MODEL_NOT_FOUND is for a model with none of the feature's
                    -- prices; one that has some, but not per this unit, misses a price
                    -- (helper-88: it was MODEL_NOT_FOUND when a feature-wide price existed).
                    IF m.multiplier_version IS NULL THEN
                        IF NOT EXISTS (SELECT 1 FROM ledger_rate_card()
                                        WHERE feature = p_feature AND model = p_model) THEN
                            PERFORM ledger_fail('LE030', 'the feature has no price for this model',
                                jsonb_build_object('feature', p_feature, 'model', p_model));
                        END IF;
                        PERFORM ledger_fail('LE031', 'the feature has no price for this model per this unit',
                            jsonb_build_object('feature', p_feature, 'model', p_model, 'unit', q.unit));
                    END IF;
                    multiplier := m.multiplier_ppm;
                    multiplier_version := m.multiplier_version::text;
                ELSE
                    multiplier := 1000000;
                END IF;
                IF p.price_version IS NULL THEN
                    PERFORM ledger_fail('LE031', 'the feature has no price per this unit',
                        jsonb_build_object('feature', p_feature, 'model', p_model, 'unit', q.unit));
                END IF;
            END IF;
            unit_price := p.unit_price_micros;
            unit_size := p.unit_size;
            price_version := p.price_version::text;
        END IF;
        line_den := unit_size * 1000000::numeric;
        common_den := lcm(total_den, line_den);
        total_num := total_num * div(common_den, total_den)
                     + q.quantity::numeric * unit_price * multiplier * div(common_den, line_den);
        total_den := common_den;
        lines := lines || jsonb_build_object(
            'unit', q.unit, 'quantity', q.quantity, 'unit_price_micros', unit_price,
            'unit_size', unit_size, 'multiplier_ppm', multiplier, 'price_version', price_version,
            'multiplier_version', multiplier_version);
    END LOOP;
    -- The ceiling of total_num / total_den in integers (div truncates toward zero).
    cost := div(total_num, total_den)
            + CASE WHEN mod(total_num, total_den) > 0 THEN 1 ELSE 0 END;
    IF cost > 9223372036854775807 THEN  -- past bigint: bad input, not a balance limit
        PERFORM ledger_fail('LE010', 'the usage costs more than an amount can be',
            jsonb_build_object('field', 'usage.quantities',
                               'violation', 'cost more than an amount can be'));
    END IF;
    RETURN jsonb_build_object('feature', p_feature, 'model', p_model, 'lines', lines,
                              'cost_micros', cost::bigint);
END $$;

CREATE OR REPLACE FUNCTION ledger_price_json(p prices) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'feature', p.feature, 'model', p.model, 'unit', p.unit, 'unit_size', p.unit_size,
        'unit_price_micros', p.unit_price_micros, 'price_version', p.price_version::text,
        'updated_by', p.created_by, 'update_time', ledger_micros(p.created_at))
$$;

CREATE OR REPLACE FUNCTION ledger_multiplier_json(m model_multipliers) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'model', m.model, 'multiplier_ppm', m.multiplier_ppm,
        'multiplier_version', m.multiplier_version::text,
        'updated_by', m.created_by, 'update_time', ledger_micros(m.created_at))
$$;
