-- Idempotency of the administrators' changes that move no credits (admin_requests,
-- migration 0015); used by ledger_server/server/admin_requests.py in the change's own
-- transaction.

-- name: claim_admin_request
-- A row when the key is new (now claimed by this transaction); none when it was used.
INSERT INTO admin_requests (idempotency_key, operation, request_hash, actor, created_at)
VALUES (%(key)s, %(operation)s, %(hash)s, nullif(%(actor)s, ''), %(now)s)
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING idempotency_key

-- name: admin_request
SELECT operation, request_hash, response FROM admin_requests WHERE idempotency_key = %(key)s

-- name: answer_admin_request
UPDATE admin_requests SET response = %(response)s WHERE idempotency_key = %(key)s
RETURNING idempotency_key
