-- Set-based Commit for a batch of the group commit (issue 7), the counterpart of
-- 0008_take_set.sql for the second half of a Reserve + Commit pair. Called by
-- ledger_take_set with the batch's accounts locked.
--
-- It takes only what is sure to succeed, decided before anything is written: an account's
-- calls are taken all together when every one is a Commit of a plain amount (no usage to
-- price) with a key new to the account and distinct within the batch, of a pending
-- reservation of the account named once in the batch, for no more than it holds; nothing
-- is due on the account (expiry, timed-out holds, allowance), none of the held lots has
-- expired since it was held (its unused part would expire now), and the Commits raise no
-- low-balance alert. An account with Consumes or Reserves beside its Commits goes call by
-- call: what a Commit gives back becomes spendable for the calls after it.
--
-- Each call ends exactly as ledger_commit would have left it, the account's calls one
-- after the other in arrival order: the charge is taken from the reservation's lots in
-- their order and the rest of the hold goes back; an account's journal entries are
-- numbered in arrival order; the stored answer is the one the call stores alone.
--
-- p_txn_ids: the journal entry id of each call (ledger_take_set draws them); p_results:
-- ledger_take_set's answers so far, returned with the Commits made filled in.

-- Its first form, without p_txn_ids: CREATE OR REPLACE would leave it beside this one.
DROP FUNCTION IF EXISTS ledger_commit_set(jsonb, timestamptz, text[], bigint, jsonb[]);
CREATE OR REPLACE FUNCTION ledger_commit_set(
    p_requests jsonb, p_now timestamptz, p_batch_accounts text[], p_default_threshold bigint,
    p_txn_ids bigint[], p_results jsonb[]) RETURNS jsonb[]
LANGUAGE plpgsql
-- As ledger_take_set: one generic plan per connection.
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    results jsonb[] := p_results;
    positions int[];
    responses jsonb[];
BEGIN
    WITH request AS (
        SELECT t.n::int AS n, t.r ->> 'account' AS account_id, t.r ->> 'key' AS key,
               decode(t.r ->> 'hash', 'hex') AS hash,
               -- NULL (not taken) with usage to price
               CASE WHEN jsonb_typeof(t.r -> 'usage') IS DISTINCT FROM 'object'
                    THEN (t.r ->> 'amount')::bigint END AS amount,
               CASE WHEN t.r ->> 'op' = 'commit' THEN (t.r ->> 'reservation_id')::uuid
                    END AS reservation_id,
               nullif(t.r ->> 'comment', '') AS comment, p_txn_ids[t.n] AS txn,
               -- when the server received the call: what it records (p_now judges)
               coalesce((t.r ->> 'now')::timestamptz, p_now) AS call_at
          FROM jsonb_array_elements(p_requests) WITH ORDINALITY AS t(r, n)
    ), settle AS (
        -- Each call with the pending reservation it settles (none for other calls).
        SELECT q.n, q.account_id, q.key, q.hash, q.amount, q.reservation_id, q.txn, q.call_at,
               coalesce(q.comment, v.comment) AS comment, v.held_micros AS held, v.feature,
               v.model
          FROM request q
          -- LATERAL ... OFFSET 0 (not merged into the join): each call's rows looked up by
          -- their key, whatever the plan estimates of the batch and the tables
          LEFT JOIN LATERAL (
              SELECT v.held_micros, v.feature, v.model, v.comment
                FROM reservations v
               WHERE v.account_id = q.account_id AND v.reservation_id = q.reservation_id
                 AND v.status = 'pending'
                 -- a hold past its expiry, left pending for its grace (ledger_hold_grace),
                 -- is refused (ledger_commit) at the call's own time: call by call
                 AND v.expires_at > p_now OFFSET 0) v ON true
    ), held AS (
        -- The reservation's lots in their order: what each gives to the charge (used).
        SELECT s.n, s.account_id, s.reservation_id, s.txn, h.lot_id, h.seq, h.held_micros,
               h.source, h.expires_at,
               greatest(0, least(h.held_micros, s.amount - (sum(h.held_micros)
                   OVER (PARTITION BY s.n ORDER BY h.seq) - h.held_micros)))::bigint AS used
          FROM settle s
          CROSS JOIN LATERAL (
              SELECT rl.lot_id, rl.seq, rl.held_micros, l.source, l.expires_at
                FROM reservation_lots rl
                JOIN lots l ON l.account_id = s.account_id AND l.lot_id = rl.lot_id
               WHERE rl.account_id = s.account_id AND rl.reservation_id = s.reservation_id
              OFFSET 0) h
    ), account_need AS (
        SELECT s.account_id, sum(s.amount)::bigint AS spent, sum(s.held)::bigint AS unheld,
               -- coalesce: bool_and skips NULLs; held is NULL for a call that is not a
               -- Commit of a pending reservation
               bool_and(coalesce(s.amount >= 0 AND s.amount <= s.held
                                 AND s.key IS NOT NULL AND s.hash IS NOT NULL
                                 AND k.idempotency_key IS NULL, false))
                   AND count(DISTINCT s.key) = count(*)
                   AND count(DISTINCT s.reservation_id) = count(*) AS plain
          FROM settle s
          LEFT JOIN LATERAL (  -- a key used before: a replay or a conflict
              SELECT k.idempotency_key FROM idempotency_keys k
               WHERE k.account_id = s.account_id AND k.idempotency_key = s.key OFFSET 0) k
            ON true
         GROUP BY s.account_id
    ), ready AS (
        SELECT a.account_id, a.balance_micros, a.held_micros, a.reward_balance_micros
          FROM account_need n
          -- "= ANY": the plan looks up the batch's accounts, whatever it estimates of n.
          JOIN accounts a ON a.account_id = ANY (p_batch_accounts) AND a.account_id = n.account_id
         WHERE n.plain
           AND (a.next_maintenance_at IS NULL OR a.next_maintenance_at > p_now)
           -- The balances the set answers with have no overdraft (ledger_balance_json)
           AND a.overdraft_limit_micros = 0
           -- ledger_low_balance_check would record an alert for one of the Commits
           AND NOT coalesce(ledger_crosses_low_balance(
                   coalesce(a.low_balance_threshold_micros, p_default_threshold),
                   a.balance_micros, a.balance_micros - n.spent), true)
           AND NOT EXISTS (SELECT FROM held h
                            WHERE h.account_id = a.account_id AND h.expires_at <= p_now)
    ), returned_expiry AS (
        -- The nearest expiry of a lot each account's Commits give credits back to.
        SELECT h.account_id, min(h.expires_at) AS expiry
          FROM held h WHERE h.held_micros > h.used GROUP BY h.account_id
    ), charge AS (
        -- Each Commit and the account's balances once it is made.
        SELECT s.n, s.account_id, s.key, s.hash, s.amount, s.reservation_id, s.txn, s.comment,
               s.feature, s.model, s.call_at,
               r.balance_micros - (sum(s.amount) OVER w)::bigint AS balance_after,
               r.held_micros - (sum(s.held) OVER w)::bigint AS held_after,
               r.reward_balance_micros
          FROM settle s JOIN ready r ON r.account_id = s.account_id
        WINDOW w AS (PARTITION BY s.account_id ORDER BY s.n ROWS UNBOUNDED PRECEDING)
    ), taken AS (
        SELECT h.*, (count(*) FILTER (WHERE h.used > 0) OVER (PARTITION BY h.n))::smallint
                        AS lots_used
          FROM held h JOIN ready r ON r.account_id = h.account_id
    ), journal AS (
        INSERT INTO journal_transactions (account_id, transaction_id, kind, amount_micros,
                                          reservation_id, feature, comment, created_at, model,
                                          usage)
        OVERRIDING SYSTEM VALUE
        -- No usage: a Commit of an amount was not priced by the rate card (as ledger_commit)
        SELECT account_id, txn, 'charge', -amount, reservation_id, nullif(feature, ''),
               comment, call_at, nullif(model, ''), NULL::jsonb
          FROM charge ORDER BY account_id COLLATE "C", n
    ), lots_charged AS (
        UPDATE lots l SET held_micros = l.held_micros - t.held,
                          remaining_micros = l.remaining_micros - t.used
          FROM (SELECT account_id, lot_id, sum(held_micros)::bigint AS held,
                       sum(used)::bigint AS used
                  FROM taken GROUP BY account_id, lot_id) t
         WHERE l.account_id = t.account_id AND l.lot_id = t.lot_id
    ), reserved_charged AS (
        UPDATE reservation_lots rl SET committed_micros = t.used
          FROM taken t
         WHERE rl.account_id = t.account_id AND rl.reservation_id = t.reservation_id
           AND rl.lot_id = t.lot_id AND t.used > 0
    ), posted AS (
        INSERT INTO postings (account_id, transaction_id, posting_no, ledger_account, lot_id,
                              source, amount_micros)
        -- used > 0 on a prefix of the lots in seq order, so seq numbers them
        SELECT t.account_id, t.txn, t.seq, 'account:main', t.lot_id, t.source, -t.used
          FROM taken t
         WHERE t.used > 0
        UNION ALL
        SELECT c.account_id, c.txn, coalesce(u.lots_used, 0), ledger_revenue_account(c.feature),
               NULL, NULL, c.amount
          FROM charge c
          LEFT JOIN (SELECT DISTINCT n, lots_used FROM taken) u ON u.n = c.n
         WHERE c.amount <> 0
    ), settled AS (
        UPDATE reservations v
           SET status = 'committed', committed_micros = c.amount, finalized_at = c.call_at,
               charge_transaction_id = c.txn
          FROM charge c
         WHERE v.account_id = c.account_id AND v.reservation_id = c.reservation_id
        RETURNING v.reservation_id, v AS row
    ), charged AS (
        UPDATE accounts a
           SET balance_micros = a.balance_micros - n.spent,
               held_micros = a.held_micros - n.unheld,
               -- as ledger_commit: what goes back to a lot is expired in time, though the
               -- lot's expiry was applied by a call of a later time
               next_maintenance_at = least(a.next_maintenance_at, e.expiry)
          FROM account_need n
          LEFT JOIN returned_expiry e ON e.account_id = n.account_id
         WHERE a.account_id = ANY (p_batch_accounts) AND a.account_id = n.account_id
           AND n.account_id IN (SELECT account_id FROM ready)
    ), stored AS (
        INSERT INTO idempotency_keys (account_id, idempotency_key, operation, request_hash,
                                      response, created_at)
        SELECT c.account_id, c.key, 'commit', c.hash,
               jsonb_build_object(
                   'reservation', ledger_reservation_row_json(v.row, (
                       SELECT jsonb_agg(ledger_reservation_lot_json(t.lot_id, t.source,
                                                                    t.held_micros, t.used)
                                        ORDER BY t.seq)
                         FROM taken t WHERE t.n = c.n)),
                   'transaction_id', c.txn::text,
                   'low_balance_alert_id', NULL::bigint,
                   'balance', ledger_balance_values_json(c.account_id, c.balance_after,
                                                         c.held_after, c.reward_balance_micros,
                                                         c.call_at)),
               c.call_at
          FROM charge c
          JOIN settled v ON v.reservation_id = c.reservation_id
        RETURNING account_id, idempotency_key, response
    )
    SELECT array_agg(c.n), array_agg(s.response) INTO positions, responses
      FROM stored s JOIN charge c ON c.account_id = s.account_id AND c.key = s.idempotency_key;
    RETURN ledger_set_answers(results, positions, responses);
END $$;
