-- The database limit of scenario "hot_account": every client consumes from one account,
-- so every transaction waits for the previous one's row lock (serialized commits).
\set amount 1000
SELECT ledger_consume('bench-hot', gen_random_uuid()::text, sha256('hot'::bytea),
                      :amount::bigint, NULL::jsonb, 'bench'::text, ''::text, now());
