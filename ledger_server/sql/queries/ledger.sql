-- Named queries of the ledger service. Each operation is one call into a ledger
-- function (sql/functions/), so it is one SQL round trip and one transaction.

-- name: grant
SELECT ledger_grant(%(account_id)s::text, %(key)s::text, %(hash)s::bytea, %(amount)s::bigint,
                    %(source)s::text, %(expires_at)s::timestamptz, %(balance_kind)s::text,
                    %(external_ref)s::text, %(comment)s::text, %(actor)s::text, %(now)s::timestamptz)

-- name: balance
SELECT ledger_balance(%(account_id)s::text, %(now)s::timestamptz)

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
                      %(hash)s::bytea, %(reason)s::text, %(now)s::timestamptz)

-- name: refund
SELECT ledger_refund(%(account_id)s::text, %(reservation_id)s::uuid, %(key)s::text,
                     %(hash)s::bytea, %(amount)s::bigint, %(reason)s::text, %(now)s::timestamptz)

-- name: consume
SELECT ledger_consume(%(account_id)s::text, %(key)s::text, %(hash)s::bytea, %(amount)s::bigint,
                      %(usage)s::jsonb, %(feature)s::text, %(comment)s::text, %(now)s::timestamptz)

-- name: consume_batch
-- Concurrent Consume calls on one account, coalesced (server/coalescing.py).
SELECT ledger_consume_batch(%(account_id)s::text, %(requests)s::jsonb, %(now)s::timestamptz)

-- name: get_reservation
SELECT ledger_get_reservation(%(account_id)s::text, %(reservation_id)s::uuid, %(now)s::timestamptz)

-- name: account_exists_after_maintenance
SELECT (ledger_read_account(%(account_id)s::text, %(now)s::timestamptz)).account_id IS NOT NULL

-- name: list_lots
-- Consumption order; keyset position (priority, expiry or infinity, lot_id).
SELECT ledger_lot_json(l), l.priority, ledger_micros(l.expires_at), l.lot_id
  FROM lots l
 WHERE l.account_id = %(account_id)s::text
   AND (%(include_inactive)s::boolean
        OR (l.remaining_micros > 0 AND (l.expires_at IS NULL OR l.expires_at > %(now)s::timestamptz)))
   AND (%(after_lot)s::bigint IS NULL
        OR (l.priority, coalesce(l.expires_at, 'infinity'::timestamptz), l.lot_id)
           > (%(after_priority)s::smallint,
              coalesce('epoch'::timestamptz + %(after_expires)s::bigint * interval '1 microsecond',
                       'infinity'::timestamptz),
              %(after_lot)s::bigint))
 ORDER BY l.priority, coalesce(l.expires_at, 'infinity'::timestamptz), l.lot_id
 LIMIT %(limit)s::int

-- name: list_transactions
-- One round trip: the account's due maintenance, then the page (sql/functions/0001_ledger.sql).
SELECT transaction_id, account_id, kind, amount_micros, reservation_id, feature, model, usage,
       comment, actor, external_ref, created_micros, status, posting_accounts, posting_lots,
       posting_sources, posting_amounts, posting_memos
  FROM ledger_list_transactions(%(account_id)s::text, %(before)s::bigint, %(kinds)s::text[],
                                %(start_time)s::timestamptz, %(end_time)s::timestamptz,
                                %(feature)s::text, %(model)s::text, %(statuses)s::text[],
                                %(limit)s::int, %(now)s::timestamptz)

-- name: estimate
SELECT ledger_price_usage(%(feature)s::text, %(model)s::text, %(quantities)s::jsonb, NULL)
