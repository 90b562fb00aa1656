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
-- Newest first; keyset on transaction_id (per account, ids grow in commit order
-- because every write to an account holds its row lock).
SELECT jsonb_build_object(
           'transaction_id', t.transaction_id,
           'account_id', t.account_id,
           'kind', t.kind,
           'amount_micros', t.amount_micros,
           'reservation_id', t.reservation_id::text,
           'feature', t.feature,
           'model', t.model,
           'usage', t.usage,
           'comment', t.comment,
           'actor', t.actor,
           'external_ref', t.external_ref,
           'created_at', ledger_micros(t.created_at),
           'status', ledger_transaction_status(t.kind, r.status, r.committed_micros,
                                               r.refunded_micros),
           'postings', coalesce((
               SELECT jsonb_agg(jsonb_build_object(
                          'ledger_account', p.ledger_account, 'lot_id', p.lot_id,
                          'source', p.source, 'amount_micros', p.amount_micros, 'memo', p.memo)
                      ORDER BY p.posting_no)
                 FROM postings p
                WHERE p.account_id = t.account_id AND p.transaction_id = t.transaction_id),
               '[]'::jsonb)),
       t.transaction_id
  FROM journal_transactions t
  LEFT JOIN reservations r ON r.account_id = t.account_id AND r.reservation_id = t.reservation_id
 WHERE t.account_id = %(account_id)s::text
   AND t.transaction_id < coalesce(%(before)s::bigint, 9223372036854775807)
   AND (%(kinds)s::text[] IS NULL OR t.kind = ANY (%(kinds)s::text[]))
   -- "IS NULL OR" rather than coalesce(): the generic plan psycopg switches to after
   -- five runs then still walks the primary key backwards for the far pages.
   AND (%(start_time)s::timestamptz IS NULL OR t.created_at >= %(start_time)s::timestamptz)
   AND (%(end_time)s::timestamptz IS NULL OR t.created_at < %(end_time)s::timestamptz)
   AND (%(feature)s::text IS NULL OR t.feature = %(feature)s::text)
   AND (%(model)s::text IS NULL OR t.model = %(model)s::text)
   AND (%(statuses)s::text[] IS NULL OR ledger_transaction_status(t.kind, r.status,
            r.committed_micros, r.refunded_micros) = ANY (%(statuses)s::text[]))
 ORDER BY t.transaction_id DESC
 LIMIT %(limit)s::int

-- name: estimate
SELECT ledger_price_usage(%(feature)s::text, %(model)s::text, %(quantities)s::jsonb, NULL)
