-- The database limit of scenario "consume": the same SQL call the server makes for a
-- Consume (ledger_server/sql/queries/ledger.sql, name: consume) with the same kind of
-- arguments, driven by pgbench with no gRPC or Python in between. Run with
-- -M prepared (psycopg prepares a statement after 5 executions, so the server runs
-- prepared statements too) and -D naccounts=<accounts of the dataset>.
\set n random(0, :naccounts - 1)
\set amount random(1000, 100000)
SELECT ledger_consume('bench-acct-' || lpad(:n::text, 6, '0'), gen_random_uuid()::text,
                      sha256(:n::text::bytea), :amount::bigint, NULL::jsonb, 'bench'::text,
                      ''::text, now());
