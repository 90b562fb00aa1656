-- An account has one idempotency key namespace: CreateCheckoutSession's keys join the
-- ledger operations' (ledger_record_checkout_session writes each new one there too), so a
-- Consume or Grant sent with a checkout's key is refused as a different request instead of
-- succeeding beside it. The sessions created before this release join them here. A key both
-- took before (each succeeded) stays the ledger operation's; the checkout's retry still
-- finds its session first.
INSERT INTO idempotency_keys (account_id, idempotency_key, operation, request_hash, response,
                              created_at)
SELECT account_id, idempotency_key, 'create_checkout_session', request_hash,
       jsonb_build_object('session_id', session_id), created_at
  FROM checkout_sessions
ON CONFLICT ON CONSTRAINT idempotency_keys_one_per_account DO NOTHING;
