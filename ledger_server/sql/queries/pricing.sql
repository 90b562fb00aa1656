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
-- A page of the rate card, after the (feature, model, unit) of the last row of the page
-- before: all of it in one answer outgrew a gRPC message (helper-88: 40,000 prices).
SELECT ledger_price_json(p), p.feature, p.model, p.unit FROM ledger_rate_card() p
 WHERE (%(feature)s::text IS NULL OR p.feature = %(feature)s::text)
   AND (%(after_feature)s::text IS NULL
        OR (p.feature, p.model, p.unit)
           > (%(after_feature)s::text, %(after_model)s::text, %(after_unit)s::text))
 ORDER BY p.feature, p.model, p.unit
 LIMIT %(limit)s

-- name: insert_multiplier
INSERT INTO model_multipliers (model, multiplier_ppm, active, created_by, created_at)
VALUES (%(model)s, %(multiplier_ppm)s, %(active)s, %(actor)s, %(now)s)
RETURNING ledger_multiplier_json(model_multipliers)

-- name: current_multiplier
SELECT ledger_multiplier_json(m) FROM ledger_current_multiplier(%(model)s) m
 WHERE m.multiplier_version IS NOT NULL

-- name: list_multipliers
-- The multipliers in force: a model whose newest version withdrew it is not listed.
-- A page of them, after the model of the last row of the page before.
SELECT ledger_multiplier_json(m), m.model
  FROM (SELECT DISTINCT ON (model) * FROM model_multipliers
         ORDER BY model, multiplier_version DESC) m
 WHERE m.active AND (%(after_model)s::text IS NULL OR m.model > %(after_model)s::text)
 ORDER BY m.model
 LIMIT %(limit)s
