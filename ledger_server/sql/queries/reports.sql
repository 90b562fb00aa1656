-- Named queries of the report service (ReportService.GetSummary). Reads only; the
-- handler runs them in one REPEATABLE READ transaction so they see one snapshot.
--
-- %(account_id)s NULL means every account. The handler runs these unprepared, so
-- each is planned with its parameters: for one account `account_id IS NULL OR ...`
-- folds to `account_id = ...` and the (account_id, ...) indexes are used.

-- name: report_snapshot
SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY

-- name: report_period
-- The ledger's time zone and a local period [local_start, local_end) as instants, the
-- way the monthly allowance computes its months (ledger_monthly_allowance): each bound's
-- first instant, so a doubled local midnight ends October at the first (helper-85).
SELECT tz, ledger_local_instant(%(local_start)s::timestamp, tz),
       ledger_local_instant(%(local_end)s::timestamp, tz)
  FROM (SELECT ledger_timezone() AS tz) zone

-- name: report_summary_by_source
-- Per credit source: opening balance, movements in [start, end) by kind, and the
-- balance at the end. Balances at an instant T are computed backwards from the lots'
-- remaining credits now (equal to the sum of their postings; the audit checks it):
-- balance(T) = now - (movements at or after T). So only transactions made since the
-- start are read, however long the account's history.
--
-- A movement's time is its transaction's, except for expiry: credits count as
-- expired when their lot expired (one microsecond before expires_at, so a lot
-- expiring at midnight expires in the day that ends then), even when the expiry was
-- journaled later by the first operation that touched the account. Expiries that
-- are due but not journaled yet count too (the lazy sweep has not reached them).
-- Credits held when their lot expired are not expired then (a report of that day counts
-- them as remaining): they expire when their hold settles, and their postings say so
-- (ledger_expire_due_lots' p_released), so they keep their transaction's time.
--
-- The overdraft source's balance is minus the debt (its lot's remaining credits less its
-- amount, the limit): changes of the limit move no credits, so they are not movements.
--
-- Only lots with credits left, and overdraft lots, count now: a lot that ran out adds
-- nothing (its remaining credits are zero, so are its held ones, lots_held_within_remaining,
-- and only the overdraft source subtracts an amount). So every account's summary need
-- not read every lot ever granted: the partial indexes hold the live ones.
WITH recent_zone_change AS (
    -- An allowance is stretched only after a zone change since it was granted, within
    -- about a month before now: without one, no lot is asked about (at a month's start
    -- every account's allowance is due at once until swept, and asking each cost every
    -- account's summary ~7x; helper-166).
    SELECT EXISTS (SELECT 1 FROM setting_changes c
                    WHERE c.key = 'ledger.timezone'
                      AND c.changed_at > %(now)s::timestamptz - interval '40 days'
                      AND c.changed_at <= %(now)s::timestamptz) AS zone_moved
), current_lots AS (
    SELECT l.source,
           sum(l.remaining_micros
               - CASE WHEN l.source = 'overdraft' THEN l.amount_micros ELSE 0 END) AS remaining,
           -- Due but not journaled yet: the unheld credits of lots already expired
           -- (but an allowance the account's maintenance will stretch, ledger_maintain).
           sum(l.remaining_micros - l.held_micros)
               FILTER (WHERE l.expires_at <= %(now)s::timestamptz
                         AND CASE WHEN l.source = 'monthly_free'
                                       AND (SELECT zone_moved FROM recent_zone_change)
                                  THEN ledger_allowance_stretch(l.account_id, l.lot_id,
                                                                %(now)s::timestamptz) IS NULL
                                  ELSE true END) AS due_expiry
      FROM lots l
     WHERE (%(account_id)s::text IS NULL OR l.account_id = %(account_id)s::text)
       AND (NOT l.depleted OR l.source = 'overdraft')
     GROUP BY l.source
), since_start AS (
    -- The oldest transaction of the read: postings reached by their id (a bound the
    -- join implies, which lets every account's read take the postings' BRIN index).
    -- Every account's by a search of the journal's BRIN index (ledger_journal_first_since):
    -- min() would read every entry since the start once more.
    SELECT CASE WHEN %(account_id)s::text IS NULL
                THEN ledger_journal_first_since(%(start)s::timestamptz)
                ELSE (SELECT min(t.transaction_id)
                        FROM journal_transactions t
                       WHERE t.account_id = %(account_id)s::text
                         AND t.created_at >= %(start)s::timestamptz) END AS first_id
), moves AS (
    SELECT p.source, t.kind, p.amount_micros AS amount,
           -- A sub-select, run for expiries alone: a join would read every lot.
           CASE WHEN t.kind = 'expiry'
                     AND p.memo IS DISTINCT FROM 'released after its lot expired'
                THEN (SELECT l.expires_at FROM lots l
                       WHERE l.account_id = p.account_id AND l.lot_id = p.lot_id)
                     - interval '1 microsecond'
                ELSE t.created_at END AS at
      FROM journal_transactions t
      JOIN postings p ON p.account_id = t.account_id AND p.transaction_id = t.transaction_id
     WHERE (%(account_id)s::text IS NULL OR t.account_id = %(account_id)s::text)
       AND t.created_at >= %(start)s::timestamptz
       AND p.transaction_id >= (SELECT first_id FROM since_start)
       AND p.lot_id IS NOT NULL  -- the account's side only
       AND t.kind <> 'overdraft'
    UNION ALL
    SELECT l.source, 'expiry', -(l.remaining_micros - l.held_micros),
           l.expires_at - interval '1 microsecond'
      FROM lots l
     WHERE (%(account_id)s::text IS NULL OR l.account_id = %(account_id)s::text)
       AND NOT l.depleted  -- implied by what follows; lets the plan take a partial index
       AND l.remaining_micros > l.held_micros
       AND l.expires_at <= %(now)s::timestamptz
       AND l.expires_at > %(start)s::timestamptz
       AND CASE WHEN l.source = 'monthly_free' AND (SELECT zone_moved FROM recent_zone_change)
                THEN ledger_allowance_stretch(l.account_id, l.lot_id, %(now)s::timestamptz) IS NULL
                ELSE true END
), flows AS (
    SELECT source,
           sum(amount) FILTER (WHERE at >= %(start)s::timestamptz) AS since_start,
           sum(amount) FILTER (WHERE at >= %(end)s::timestamptz) AS since_end,
           sum(amount) FILTER (WHERE kind = 'grant' AND in_period) AS allocated,
           -sum(amount) FILTER (WHERE kind = 'charge' AND in_period) AS consumed,
           -sum(amount) FILTER (WHERE kind = 'adjustment' AND in_period) AS adjusted,
           sum(amount) FILTER (WHERE kind = 'refund' AND amount > 0 AND in_period) AS refunded,
           -- Expiry, and refunds into expired lots (their negative account-side legs).
           -sum(amount) FILTER (WHERE (kind = 'expiry' OR (kind = 'refund' AND amount < 0))
                                  AND in_period) AS expired,
           sum(amount) FILTER (WHERE kind = 'transfer' AND in_period) AS transferred
      FROM (SELECT m.*, m.at >= %(start)s::timestamptz AND m.at < %(end)s::timestamptz AS in_period
              FROM moves m) m
     GROUP BY source
)
-- sum(bigint) is numeric, and stays so: a period's flows over every account can pass a
-- bigint; the server answers OUT_OF_RANGE for a total the report cannot carry.
SELECT s.source,
       coalesce(cs.is_paid, false),
       now_balance - coalesce(f.since_start, 0),
       coalesce(f.allocated, 0),
       coalesce(f.consumed, 0),
       coalesce(f.adjusted, 0),
       coalesce(f.refunded, 0),
       coalesce(f.expired, 0),
       coalesce(f.transferred, 0),
       now_balance - coalesce(f.since_end, 0)
  FROM (SELECT coalesce(c.source, f.source) AS source,
               coalesce(c.remaining, 0) - coalesce(c.due_expiry, 0) AS now_balance
          FROM current_lots c FULL JOIN flows f ON f.source = c.source) s
  LEFT JOIN flows f ON f.source = s.source
  LEFT JOIN credit_sources cs ON cs.source = s.source
 ORDER BY s.source

-- name: report_usage
-- Charges in [start, end) by feature and model, and the refunds made in the period
-- of charges of each (a refund carries its reservation's feature; its model is the
-- charge's). Only the refunds look up their reservation, charge and postings: joined
-- for every entry, the lookups made the plan read every reservation and entry ever made.
-- The first usage_rows pairs, most consumed first, each with its rank; then, when there
-- are more, one row (feature, model and rank NULL) adding up all the others and counting
-- them. A caller may charge under any number of features: listing every pair made the
-- summary too large for one gRPC message, and the totals must stay exact.
WITH usage AS (
    SELECT feature, model,
           count(*) FILTER (WHERE kind = 'charge') AS charges,
           coalesce(-sum(amount) FILTER (WHERE kind = 'charge'), 0) AS consumed,  -- numeric, as above
           coalesce(sum(refunded) FILTER (WHERE kind = 'refund'), 0) AS refunded
      FROM (
        SELECT t.kind, coalesce(t.feature, '') AS feature, coalesce(t.model, '') AS model,
               t.amount_micros AS amount, NULL::bigint AS refunded
          FROM journal_transactions t
         WHERE (%(account_id)s::text IS NULL OR t.account_id = %(account_id)s::text)
           AND t.kind = 'charge'
           AND t.created_at >= %(start)s::timestamptz
           AND t.created_at < %(end)s::timestamptz
        UNION ALL
        SELECT t.kind, coalesce(t.feature, ''), coalesce(t.model, c.model, ''),
               t.amount_micros, refunded.gross
          FROM journal_transactions t
          LEFT JOIN reservations r
                 ON r.account_id = t.account_id AND r.reservation_id = t.reservation_id
          LEFT JOIN journal_transactions c
                 ON c.account_id = r.account_id AND c.transaction_id = r.charge_transaction_id
          LEFT JOIN LATERAL (
                SELECT sum(p.amount_micros) AS gross
                  FROM postings p
                 WHERE p.account_id = t.account_id AND p.transaction_id = t.transaction_id
                   AND p.lot_id IS NOT NULL AND p.amount_micros > 0) refunded ON true
         WHERE (%(account_id)s::text IS NULL OR t.account_id = %(account_id)s::text)
           AND t.kind = 'refund'
           AND t.created_at >= %(start)s::timestamptz
           AND t.created_at < %(end)s::timestamptz
      ) entries
     GROUP BY 1, 2
), ranked AS (
    SELECT u.*, row_number() OVER (ORDER BY consumed DESC, feature, model) AS rank FROM usage u
)
SELECT feature, model, charges, consumed, refunded, 1::bigint AS pairs, rank
  FROM ranked
 WHERE rank <= %(usage_rows)s::bigint
 UNION ALL
SELECT NULL, NULL, sum(charges), sum(consumed), sum(refunded), count(*), NULL
  FROM ranked
 WHERE rank > %(usage_rows)s::bigint
HAVING count(*) > 0
 ORDER BY rank NULLS LAST

-- name: list_journal
-- The platform-wide transaction log: every account's entries (or one account's), newest
-- first (sql/functions/0001_ledger.sql), and the marker row of a page that read its
-- stretch (scan entries) without filling. Reads only: no account's maintenance is applied.
SELECT transaction_id, account_id, kind, amount_micros, reservation_id, feature, model, usage,
       comment, actor, external_ref, created_micros, status, posting_accounts, posting_lots,
       posting_sources, posting_amounts, posting_memos
  FROM ledger_journal_read(%(account_id)s::text, %(before)s::bigint, %(kinds)s::text[],
                           %(start_time)s::timestamptz, %(end_time)s::timestamptz,
                           %(feature)s::text, %(model)s::text, %(statuses)s::text[],
                           %(limit)s::int, %(scan)s::int)

