-- name: audit
-- Run without parameters: psycopg then sends it as written, so format() keeps its %s.
-- Every invariant of the ledger, over the whole database. Each row is a violation.
WITH lot_sums AS (
    SELECT account_id,
           coalesce(sum(remaining_micros) FILTER (WHERE balance_kind = 'main'), 0) AS main,
           coalesce(sum(remaining_micros) FILTER (WHERE balance_kind = 'reward'), 0) AS reward,
           coalesce(sum(held_micros), 0) AS held
      FROM lots GROUP BY account_id
), posting_sums AS (
    SELECT account_id,
           coalesce(sum(amount_micros) FILTER (WHERE ledger_account = 'account:main'), 0) AS main,
           coalesce(sum(amount_micros) FILTER (WHERE ledger_account = 'account:reward'), 0) AS reward
      FROM postings WHERE lot_id IS NOT NULL GROUP BY account_id
), pending_holds AS (
    SELECT r.account_id, sum(r.held_micros) AS held
      FROM reservations r WHERE r.status = 'pending' GROUP BY r.account_id
), balances AS (
    SELECT a.account_id, a.balance_micros, a.reward_balance_micros, a.held_micros,
           coalesce(l.main, 0) AS lot_main, coalesce(l.reward, 0) AS lot_reward,
           coalesce(l.held, 0) AS lot_held,
           coalesce(p.main, 0) AS posted_main, coalesce(p.reward, 0) AS posted_reward,
           coalesce(h.held, 0) AS pending_held
      FROM accounts a
      LEFT JOIN lot_sums l USING (account_id)
      LEFT JOIN posting_sums p USING (account_id)
      LEFT JOIN pending_holds h USING (account_id)
), lot_journal AS (
    -- What the journal says went out of each lot by expiry: its EXPIRY entries' postings,
    -- and the negative legs of refunds into a lot that had expired (ledger_refund posts
    -- +give then -give there: "expired at once"; a refund's other lot postings are
    -- positive). As the summary report counts expiries (reports.sql).
    SELECT p.account_id, p.lot_id,
           -coalesce(sum(p.amount_micros) FILTER (
                         WHERE t.kind = 'expiry' OR (t.kind = 'refund' AND p.amount_micros < 0)),
                     0) AS expired,
           min(t.created_at) FILTER (WHERE t.kind = 'expiry') AS first_expiry_at,
           count(*) FILTER (WHERE t.kind = 'overdraft') AS overdraft_postings
      FROM journal_transactions t
      JOIN postings p ON p.account_id = t.account_id AND p.transaction_id = t.transaction_id
     WHERE t.kind IN ('expiry', 'refund', 'overdraft') AND p.lot_id IS NOT NULL
     GROUP BY p.account_id, p.lot_id
), lot_postings AS (
    -- Each lot's postings: their sum, and the sources they name. A lot's postings carry its
    -- source (every SQL function posts the lot's own), which reports count its credits by,
    -- paid or free, as they count the lot's (reports.sql). The bounds by byte order ("C")
    -- tell one source from several without a locale's comparison per posting.
    SELECT account_id, lot_id, sum(amount_micros) AS total, count(*) AS postings,
           count(source) AS sourced, min(source COLLATE "C") AS min_source,
           max(source COLLATE "C") AS max_source
      FROM postings WHERE lot_id IS NOT NULL GROUP BY account_id, lot_id
), lot_figures AS (
    SELECT l.account_id, l.lot_id, l.source, l.expires_at, l.expired_micros, l.remaining_micros,
           coalesce(j.expired, 0) AS journal_expired, j.first_expiry_at,
           coalesce(j.overdraft_postings, 0) AS overdraft_postings,
           coalesce(p.total, 0) AS posted, coalesce(p.postings, 0) AS postings,
           coalesce(p.sourced, 0) AS sourced, p.min_source, p.max_source
      FROM lots l
      LEFT JOIN lot_journal j ON j.account_id = l.account_id AND j.lot_id = l.lot_id
      LEFT JOIN lot_postings p ON p.account_id = l.account_id AND p.lot_id = l.lot_id
), charge_lot_journal AS (
    -- What each CHARGE entry took from each lot, under the reservation it names
    -- (journal_transactions.reservation_id; a reservation has one charge).
    SELECT t.account_id, t.reservation_id, p.lot_id, -sum(p.amount_micros) AS charged
      FROM journal_transactions t
      JOIN postings p ON p.account_id = t.account_id AND p.transaction_id = t.transaction_id
     WHERE t.kind = 'charge' AND t.reservation_id IS NOT NULL AND p.lot_id IS NOT NULL
     GROUP BY t.account_id, t.transaction_id, t.reservation_id, p.lot_id
), refund_journal AS (
    -- What a reservation's REFUND entries took back out of the revenue its charge credited.
    -- (What it committed needs no check of its own here: it is the sum of its lots',
    -- reservation_lots_vs_reservation, and each lot's is its charge's, reservation_lot_vs_charge.)
    SELECT t.account_id, t.reservation_id, -sum(p.amount_micros) AS refunded
      FROM journal_transactions t
      JOIN postings p ON p.account_id = t.account_id AND p.transaction_id = t.transaction_id
     WHERE t.kind = 'refund' AND t.reservation_id IS NOT NULL AND p.ledger_account LIKE 'revenue%'
     GROUP BY t.account_id, t.reservation_id
), refund_lot_postings AS (
    -- Each REFUND entry's lot postings by lot (ledger_refund): given back to a lot the charge
    -- took from (memo 'refund'); given, of what the overdraft lot had no room for, to the lots
    -- that repaid its debt ('overdraft repayment refunded') or to a new refund lot (no memo:
    -- ledger_add_lot); and the legs expiring at once what went to an expired lot, of either.
    SELECT t.account_id, t.reservation_id, p.lot_id,
           coalesce(sum(p.amount_micros) FILTER (WHERE p.memo = 'refund'), 0) AS given,
           coalesce(sum(p.amount_micros)
                        FILTER (WHERE p.amount_micros > 0 AND p.memo IS DISTINCT FROM 'refund'),
                    0) AS overflow,
           -coalesce(sum(p.amount_micros) FILTER (WHERE p.amount_micros < 0), 0) AS expired_legs
      FROM journal_transactions t
      JOIN postings p ON p.account_id = t.account_id AND p.transaction_id = t.transaction_id
     WHERE t.kind = 'refund' AND t.reservation_id IS NOT NULL AND p.lot_id IS NOT NULL
     GROUP BY t.account_id, t.transaction_id, t.reservation_id, p.lot_id
), refund_lot_journal AS (
    -- What each reservation's refunds gave back to each of its lots, and what of it expired
    -- at once. Only the overdraft lot's credits overflow (ledger_refund): they are its. A lot
    -- that expired takes everything of the entry's at once, what it got as a repaying lot
    -- too: the rest of its expiring legs is its own refund's.
    SELECT account_id, reservation_id, lot_id, sum(refunded) AS refunded,
           sum(refund_expired) AS refund_expired
      FROM (SELECT account_id, reservation_id, lot_id, given AS refunded,
                   greatest(expired_legs - overflow, 0) AS refund_expired
              FROM refund_lot_postings WHERE given <> 0 OR expired_legs > overflow
            UNION ALL
            SELECT f.account_id, f.reservation_id, o.lot_id, f.overflow, 0
              FROM refund_lot_postings f
              JOIN lots o ON o.account_id = f.account_id AND o.source = 'overdraft'
             WHERE f.overflow > 0) given_back
     GROUP BY account_id, reservation_id, lot_id
), claw_back_journal AS (
    -- A payment's claw-backs are ADJUSTMENT entries under its purchase's external_ref
    -- (ledger_claw_back_purchase, ledger_settle_claw_backs): what they took from the bonus
    -- lot is the bonus's, the rest (the purchase's lot, carried-over lots) the credits'.
    SELECT pu.account_id, pu.purchase_id,
           -coalesce(sum(p.amount_micros)
                         FILTER (WHERE p.lot_id IS DISTINCT FROM pu.bonus_lot_id), 0) AS clawed,
           -coalesce(sum(p.amount_micros) FILTER (WHERE p.lot_id = pu.bonus_lot_id), 0) AS bonus_clawed
      FROM purchases pu
      JOIN journal_transactions t ON t.account_id = pu.account_id
                                 AND t.external_ref = pu.external_ref AND t.kind = 'adjustment'
      JOIN postings p ON p.account_id = t.account_id AND p.transaction_id = t.transaction_id
     WHERE p.lot_id IS NOT NULL
     GROUP BY pu.account_id, pu.purchase_id
)
SELECT 'unbalanced_transaction', account_id,
       format('transaction %s: postings sum to %s', transaction_id, sum(amount_micros))
  FROM postings GROUP BY account_id, transaction_id HAVING sum(amount_micros) <> 0
UNION ALL
-- Two checks of one scan of the lot postings by entry, told apart by the entry's kind.
-- A hold or a release only marks a lot's credits held or free again (its amount is what it
-- held or gave back): no SQL function posts to a lot under one, so lot postings there are
-- credits moved where the amounts are not checked (hold_or_release_posts_to_lots).
SELECT CASE WHEN t.kind IN ('hold', 'release') THEN 'hold_or_release_posts_to_lots'
            ELSE 'transaction_amount_mismatch' END,
       t.account_id,
       CASE WHEN t.kind IN ('hold', 'release')
            THEN format('transaction %s (%s): %s lot posting(s), moving %s in and %s out',
                        t.transaction_id, t.kind, s.postings, coalesce(s.moved_in, 0),
                        coalesce(s.moved_in, 0) - s.total)
            ELSE format('transaction %s (%s): amount %s but account postings sum to %s (moved in %s)',
                        t.transaction_id, t.kind, t.amount_micros, coalesce(s.total, 0),
                        coalesce(s.moved_in, 0)) END
  FROM journal_transactions t
  LEFT JOIN (SELECT account_id, transaction_id, sum(amount_micros) AS total, count(*) AS postings,
                    sum(amount_micros) FILTER (WHERE amount_micros > 0) AS moved_in
               FROM postings WHERE lot_id IS NOT NULL GROUP BY account_id, transaction_id) s
         ON s.account_id = t.account_id AND s.transaction_id = t.transaction_id
 -- A transfer moves credits between the account's lots: its amount is what moved,
 -- and the account's side nets to zero.
 WHERE (t.kind = 'transfer' AND (t.amount_micros <> coalesce(s.moved_in, 0) OR coalesce(s.total, 0) <> 0))
    OR (t.kind NOT IN ('hold', 'release', 'transfer') AND t.amount_micros <> coalesce(s.total, 0))
    OR (t.kind IN ('hold', 'release') AND s.postings > 0)
UNION ALL
SELECT 'balance_vs_lots', account_id,
       format('main balance %s, lots remaining %s', balance_micros, lot_main)
  FROM balances WHERE balance_micros <> lot_main
UNION ALL
SELECT 'balance_vs_postings', account_id,
       format('main balance %s, postings %s', balance_micros, posted_main)
  FROM balances WHERE balance_micros <> posted_main
UNION ALL
SELECT 'reward_vs_lots', account_id,
       format('reward balance %s, lots remaining %s', reward_balance_micros, lot_reward)
  FROM balances WHERE reward_balance_micros <> lot_reward
UNION ALL
SELECT 'reward_vs_postings', account_id,
       format('reward balance %s, postings %s', reward_balance_micros, posted_reward)
  FROM balances WHERE reward_balance_micros <> posted_reward
UNION ALL
SELECT 'held_vs_lots', account_id,
       format('held %s, lots held %s, pending reservations %s', held_micros, lot_held, pending_held)
  FROM balances WHERE held_micros <> lot_held OR held_micros <> pending_held
UNION ALL
SELECT 'lot_bounds', account_id,
       format('lot %s: amount %s remaining %s held %s', lot_id, amount_micros, remaining_micros, held_micros)
  FROM lots
 WHERE remaining_micros < 0 OR remaining_micros > amount_micros
    OR held_micros < 0 OR held_micros > remaining_micros
UNION ALL
SELECT 'lot_vs_postings', account_id,
       format('lot %s: remaining %s, postings %s', lot_id, remaining_micros, posted)
  FROM lot_figures WHERE remaining_micros <> posted
UNION ALL
SELECT 'lot_source_vs_postings', account_id,
       format('lot %s: source %s, its postings %s%s', lot_id, source,
              CASE WHEN sourced = 0 THEN 'none'
                   WHEN min_source = max_source THEN min_source
                   ELSE min_source || ' to ' || max_source END,
              CASE WHEN sourced BETWEEN 1 AND postings - 1
                   THEN format(' (%s with none)', postings - sourced) END)
  FROM lot_figures
 WHERE sourced < postings OR min_source <> source OR max_source <> source
UNION ALL
SELECT 'lot_holds_vs_reservations', l.account_id,
       format('lot %s: held %s, pending reservations hold %s', l.lot_id, l.held_micros, coalesce(h.held, 0))
  FROM lots l
  LEFT JOIN (SELECT rl.account_id, rl.lot_id, sum(rl.held_micros) AS held
               FROM reservation_lots rl
               JOIN reservations r ON r.account_id = rl.account_id AND r.reservation_id = rl.reservation_id
              WHERE r.status = 'pending' GROUP BY rl.account_id, rl.lot_id) h
         ON h.account_id = l.account_id AND h.lot_id = l.lot_id
 WHERE l.held_micros <> coalesce(h.held, 0)
UNION ALL
SELECT 'reservation_lots_vs_reservation', r.account_id,
       format('reservation %s (%s): held %s committed %s refunded %s; its lots: held %s committed %s refunded %s',
              r.reservation_id, r.status, r.held_micros, r.committed_micros, r.refunded_micros,
              coalesce(s.held, 0), coalesce(s.committed, 0), coalesce(s.refunded, 0))
  FROM reservations r
  LEFT JOIN (SELECT account_id, reservation_id, sum(held_micros) AS held,
                    sum(committed_micros) AS committed, sum(refunded_micros) AS refunded
               FROM reservation_lots GROUP BY account_id, reservation_id) s
         ON s.account_id = r.account_id AND s.reservation_id = r.reservation_id
 WHERE r.held_micros <> coalesce(s.held, 0)
    OR r.committed_micros <> coalesce(s.committed, 0)
    OR r.refunded_micros <> coalesce(s.refunded, 0)
UNION ALL
-- Overdraft (migration 0011): the overdraft lot is main and permanent, its amount is the
-- account's limit and so is what the 'overdraft' system account granted it; a debt never
-- stands beside spendable main credits (ledger_settle_overdraft).
SELECT 'overdraft_vs_limit', a.account_id,
       format('limit %s; overdraft lot %s: %s, amount %s, expires %s; overdraft postings %s',
              a.overdraft_limit_micros, o.lot_id, o.balance_kind, o.amount_micros, o.expires_at,
              coalesce(p.total, 0))
  FROM accounts a
  LEFT JOIN lots o ON o.account_id = a.account_id AND o.source = 'overdraft'
  LEFT JOIN (SELECT account_id, sum(amount_micros) AS total FROM postings
              WHERE ledger_account = 'overdraft' GROUP BY account_id) p
         ON p.account_id = a.account_id
 WHERE a.overdraft_limit_micros <> coalesce(o.amount_micros, 0)
    OR coalesce(p.total, 0) <> -a.overdraft_limit_micros
    OR o.balance_kind <> 'main' OR o.expires_at IS NOT NULL
UNION ALL
SELECT 'lot_expired_vs_journal', account_id,
       format('lot %s: expired %s, journal expired %s', lot_id, expired_micros, journal_expired)
  FROM lot_figures WHERE expired_micros <> journal_expired
UNION ALL
-- Reports date an expiry at its lot's expiry: an entry before it, or on a lot that never
-- expires, put credits in the wrong period.
SELECT 'expiry_before_lot_expires', account_id,
       format('lot %s: expiry entry at %s, lot expires %s', lot_id, first_expiry_at,
              coalesce(expires_at::text, 'never'))
  FROM lot_figures
 WHERE first_expiry_at < expires_at OR (first_expiry_at IS NOT NULL AND expires_at IS NULL)
UNION ALL
SELECT 'overdraft_entry_off_overdraft_lot', account_id,
       format('lot %s (%s): %s postings of OVERDRAFT entries', lot_id, source, overdraft_postings)
  FROM lot_figures WHERE overdraft_postings > 0 AND source <> 'overdraft'
UNION ALL
SELECT 'reservation_lot_vs_charge', coalesce(rl.account_id, j.account_id),
       format('reservation %s, lot %s: committed %s, its charge took %s',
              coalesce(rl.reservation_id, j.reservation_id), coalesce(rl.lot_id, j.lot_id),
              coalesce(rl.committed_micros, 0), coalesce(j.charged, 0))
  FROM reservation_lots rl
  FULL JOIN charge_lot_journal j
         ON j.account_id = rl.account_id AND j.reservation_id = rl.reservation_id
        AND j.lot_id = rl.lot_id
 WHERE coalesce(rl.committed_micros, 0) <> coalesce(j.charged, 0)
UNION ALL
SELECT 'reservation_refunded_vs_journal', coalesce(r.account_id, j.account_id),
       format('reservation %s: refunded %s; its refunds took %s out of revenue',
              coalesce(r.reservation_id, j.reservation_id), coalesce(r.refunded_micros, 0),
              coalesce(j.refunded, 0))
  FROM (SELECT * FROM reservations WHERE refunded_micros <> 0) r
  FULL JOIN refund_journal j ON j.account_id = r.account_id AND j.reservation_id = r.reservation_id
 WHERE coalesce(r.refunded_micros, 0) <> coalesce(j.refunded, 0)
UNION ALL
SELECT 'reservation_lot_refunds_vs_journal', coalesce(rl.account_id, j.account_id),
       format('reservation %s, lot %s: refunded %s (expired %s); its refunds gave %s (expired %s)',
              coalesce(rl.reservation_id, j.reservation_id), coalesce(rl.lot_id, j.lot_id),
              coalesce(rl.refunded_micros, 0), coalesce(rl.refund_expired_micros, 0),
              coalesce(j.refunded, 0), coalesce(j.refund_expired, 0))
  FROM (SELECT * FROM reservation_lots WHERE refunded_micros <> 0) rl
  FULL JOIN refund_lot_journal j
         ON j.account_id = rl.account_id AND j.reservation_id = rl.reservation_id
        AND j.lot_id = rl.lot_id
 WHERE coalesce(rl.refunded_micros, 0) <> coalesce(j.refunded, 0)
    OR coalesce(rl.refund_expired_micros, 0) <> coalesce(j.refund_expired, 0)
UNION ALL
-- The amounts still owed (claw_back_owed_micros, migration 0024) are not checked: they
-- follow from the share of the payment refunded, which Stripe's events hold, not the journal.
SELECT 'purchase_claw_back_vs_journal', pu.account_id,
       format('purchase %s (%s): clawed back %s bonus %s; its adjustments took %s bonus %s',
              pu.purchase_id, pu.external_ref, pu.clawed_back_micros, pu.bonus_clawed_back_micros,
              coalesce(j.clawed, 0), coalesce(j.bonus_clawed, 0))
  FROM purchases pu
  LEFT JOIN claw_back_journal j ON j.account_id = pu.account_id AND j.purchase_id = pu.purchase_id
 WHERE pu.clawed_back_micros <> coalesce(j.clawed, 0)
    OR pu.bonus_clawed_back_micros <> coalesce(j.bonus_clawed, 0)
UNION ALL
-- No foreign key guards referred_by (migration 0034: it locked the inviter's row).
SELECT 'referred_by_not_another_account', a.account_id,
       format('referred by %s, %s', a.referred_by,
              CASE WHEN a.referred_by = a.account_id THEN 'itself' ELSE 'which is no account' END)
  FROM accounts a
 WHERE a.referred_by IS NOT NULL
   AND (a.referred_by = a.account_id
        OR NOT EXISTS (SELECT 1 FROM accounts i WHERE i.account_id = a.referred_by))
UNION ALL
SELECT 'debt_beside_credits', o.account_id,
       format('debt %s while main lots hold %s spendable credits',
              o.amount_micros - o.remaining_micros, s.spendable)
  FROM lots o
  JOIN (SELECT account_id, sum(remaining_micros - held_micros) AS spendable FROM lots
         WHERE balance_kind = 'main' AND source <> 'overdraft' AND remaining_micros > held_micros
           AND (expires_at IS NULL OR expires_at > now())
         GROUP BY account_id) s ON s.account_id = o.account_id
 WHERE o.source = 'overdraft' AND o.remaining_micros < o.amount_micros
UNION ALL
-- The append-only tables refuse UPDATE and DELETE row by row and TRUNCATE by statement
-- (migrations 0001, 0002, 0003, 0039). Without one of these triggers the history can be
-- changed or emptied, and every other check then passes on what is left. Enabled means
-- firing in an ordinary session: 'O' or 'A' ('R' fires only where a replica applies
-- changes, 'D' never). Not an account's: account_id ''.
SELECT 'append_only_trigger', '',
       format('%s%s on %s: %s', t.table_name, k.suffix, t.table_name,
              CASE WHEN g.oid IS NULL THEN 'missing'
                   WHEN g.tgtype <> k.tgtype
                     OR g.tgfoid IS DISTINCT FROM to_regproc('ledger_reject_journal_change')
                   THEN format('changed (not a %s of ledger_reject_journal_change)', k.kind)
                   ELSE 'disabled' END)
  FROM (VALUES ('journal_transactions'), ('postings'), ('setting_changes'), ('prices'),
               ('model_multipliers')) AS t(table_name)
  -- pg_trigger.tgtype bits: 1 row, 2 before, 8 delete, 16 update, 32 truncate.
  CROSS JOIN (VALUES ('_append_only', 27, 'BEFORE UPDATE OR DELETE row trigger'),
                     ('_no_truncate', 34, 'BEFORE TRUNCATE statement trigger'))
          AS k(suffix, tgtype, kind)
  -- The schema's own tables: a session's temporary relations of those names come first in
  -- its search path (tests/support/scoped_audit.py audits a few accounts through such views).
  LEFT JOIN pg_trigger g
         ON g.tgrelid = to_regclass(format('%I.%I', current_schema(), t.table_name))
        AND g.tgname = t.table_name || k.suffix
 WHERE g.oid IS NULL OR g.tgenabled NOT IN ('O', 'A') OR g.tgtype <> k.tgtype
    OR g.tgfoid IS DISTINCT FROM to_regproc('ledger_reject_journal_change')
ORDER BY 1, 2, 3
