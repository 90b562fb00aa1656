-- Named queries of the ledger service. Each operation is one call into a ledger
-- function (sql/functions/), so it is one SQL round trip and one transaction.

-- name: grant
SELECT ledger_grant(%(account_id)s::text, %(key)s::text, %(hash)s::bytea, %(amount)s::bigint,
                    %(source)s::text, %(expires_at)s::timestamptz, %(balance_kind)s::text,
                    %(external_ref)s::text, %(comment)s::text, %(actor)s::text, %(now)s::timestamptz)

-- name: hold_grace
-- The server checks at start-up that its bound on a call's wait fits it (db/waits.py).
SELECT ledger_hold_grace()

-- name: balance
SELECT ledger_balance(%(account_id)s::text, %(now)s::timestamptz)

-- name: balances
-- Balance calls queued in the server, read together (server/balance_reads.py): the accounts
-- ledger_read_account would read without its lock. Those due maintenance and those not found
-- are left out and go through `balance`.
SELECT a.account_id, ledger_balance_json(a, %(now)s::timestamptz)
  FROM accounts a
 WHERE a.account_id = ANY (%(accounts)s::text[])
   AND (a.next_maintenance_at <= %(now)s::timestamptz) IS NOT TRUE

-- name: reserve
SELECT ledger_reserve(%(account_id)s::text, %(key)s::text, %(hash)s::bytea, %(amount)s::bigint,
                      %(usage)s::jsonb, %(expires_at)s::timestamptz, %(feature)s::text, %(comment)s::text,
                      %(now)s::timestamptz)

-- name: commit
SELECT ledger_commit(%(account_id)s::text, %(reservation_id)s::uuid, %(key)s::text,
                     %(hash)s::bytea, %(amount)s::bigint, %(usage)s::jsonb, %(comment)s::text,
                     %(now)s::timestamptz)

-- name: release
SELECT ledger_release(%(account_id)s::text, %(reservation_id)s::uuid, %(key)s::text,
                      %(hash)s::bytea, %(reason)s::text, %(now)s::timestamptz,
                      %(job_failed)s::boolean)

-- name: refund
SELECT ledger_refund(%(account_id)s::text, %(reservation_id)s::uuid, %(key)s::text,
                     %(hash)s::bytea, %(amount)s::bigint, %(reason)s::text, %(now)s::timestamptz)

-- name: consume
SELECT ledger_consume(%(account_id)s::text, %(key)s::text, %(hash)s::bytea, %(amount)s::bigint,
                      %(usage)s::jsonb, %(feature)s::text, %(comment)s::text, %(now)s::timestamptz)

-- name: consume_batch
-- Consume, Reserve, Commit, Release and Refund calls queued in the server, committed together
-- (server/group_commit.py).
SELECT ledger_consume_batch(%(requests)s::jsonb, %(now)s::timestamptz)

-- name: get_reservation
SELECT ledger_get_reservation(%(account_id)s::text, %(reservation_id)s::uuid, %(now)s::timestamptz)

-- name: list_lots
-- One round trip: the account's due maintenance, then the page (sql/functions/0001_ledger.sql).
SELECT lot, priority, expires_micros, lot_id
  FROM ledger_list_lots(%(account_id)s::text, %(include_inactive)s::boolean,
                        %(after_priority)s::smallint, %(after_expires)s::bigint,
                        %(after_lot)s::bigint, %(limit)s::int, %(now)s::timestamptz)

-- name: list_transactions
-- One round trip: the account's due maintenance, then the page, and the marker row of
-- a page that read its stretch (scan entries) without filling (sql/functions/0001_ledger.sql).
SELECT transaction_id, account_id, kind, amount_micros, reservation_id, feature, model, usage,
       comment, actor, external_ref, created_micros, status, posting_accounts, posting_lots,
       posting_sources, posting_amounts, posting_memos
  FROM ledger_list_transactions(%(account_id)s::text, %(before)s::bigint, %(kinds)s::text[],
                                %(start_time)s::timestamptz, %(end_time)s::timestamptz,
                                %(feature)s::text, %(model)s::text, %(statuses)s::text[],
                                %(limit)s::int, %(scan)s::int, %(now)s::timestamptz)

-- name: estimate
SELECT ledger_price_usage(%(feature)s::text, %(model)s::text, %(quantities)s::jsonb, NULL)

-- name: account_exists
-- For reads that answer ACCOUNT_NOT_FOUND without a ledger function (reports, alerts).
SELECT EXISTS (SELECT 1 FROM accounts WHERE account_id = %(account_id)s::text)
