-- Named queries of the rate card (AdminService). A change is a new row: prices and
-- multipliers are versioned, never updated.

-- name: lock_rate_card_entry
-- One change of a rate card entry at a time, until it commits: its versions are drawn in
-- the order the changes commit in, so of two changes at once the one committed last is in
-- force (helper-55: the one that drew the later version, though committed first, was).
SELECT pg_advisory_xact_lock(hashtextextended('rate-card:' || %(entry)s::text, 0))

-- name: insert_price
INSERT INTO prices (feature, model, unit, unit_size, unit_price_micros, active, created_by, created_at)
VALUES (%(feature)s, %(model)s, %(unit)s, %(unit_size)s, %(unit_price_micros)s, %(active)s,
        %(actor)s, %(now)s)
RETURNING ledger_price_json(prices)

-- name: current_price
SELECT ledger_price_json(p) FROM ledger_current_price(%(feature)s, %(model)s, %(unit)s) p
 WHERE p.price_version IS NOT NULL

-- name: list_prices
SELECT ledger_price_json(p) FROM ledger_rate_card() p
 WHERE %(feature)s::text IS NULL OR p.feature = %(feature)s::text
 ORDER BY p.feature, p.model, p.unit

-- name: insert_multiplier
INSERT INTO model_multipliers (model, multiplier_ppm, active, created_by, created_at)
VALUES (%(model)s, %(multiplier_ppm)s, %(active)s, %(actor)s, %(now)s)
RETURNING ledger_multiplier_json(model_multipliers)

-- name: current_multiplier
SELECT ledger_multiplier_json(m) FROM ledger_current_multiplier(%(model)s) m
 WHERE m.multiplier_version IS NOT NULL

-- name: list_multipliers
-- The multipliers in force: a model whose newest version withdrew it is not listed.
SELECT ledger_multiplier_json(m)
  FROM (SELECT DISTINCT ON (model) * FROM model_multipliers
         ORDER BY model, multiplier_version DESC) m
 WHERE m.active
 ORDER BY m.model
