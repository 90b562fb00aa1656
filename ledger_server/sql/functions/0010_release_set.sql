-- Set-based Release for a batch of the group commit (issue 7): when many jobs fail at once
-- (a model outage), their Releases queue up together. Called by ledger_take_set with the
-- batch's accounts locked, beside ledger_commit_set (0009_commit_set.sql).
--
-- It takes only what is sure to succeed, decided before anything is written: an account's
-- calls are taken all together when every one is a Release with a key new to the account
-- and distinct within the batch, of a pending reservation of the account named once in the
-- batch; nothing is due on the account (expiry, timed-out holds, allowance), it has no
-- overdraft limit, and none of the held lots has expired (the credits given back would
-- expire at once). Anything else (an unknown, settled or timed-out reservation, a replay,
-- an account with other calls beside its Releases) is left to ledger_consume_batch's
-- call-by-call path.
--
-- Each call ends exactly as ledger_release would have left it, the account's calls one
-- after the other in arrival order: the hold goes back to the lots it was on, the
-- reservation is released (or failed, for a failed job), one journal entry records it, and
-- the stored answer is the one the call stores alone. A Release moves no credits, so it
-- raises no low-balance alert.
--
-- p_txn_ids: the journal entry id of each call (ledger_take_set draws them); p_results:
-- the answers so far, returned with the Releases made filled in.
CREATE OR REPLACE FUNCTION ledger_release_set(
    p_requests jsonb, p_now timestamptz, p_batch_accounts text[], p_txn_ids bigint[],
    p_results jsonb[]) RETURNS jsonb[]
LANGUAGE plpgsql
-- As ledger_take_set: one generic plan per connection.
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    positions int[];
    responses jsonb[];
BEGIN
    WITH request AS (
        SELECT t.n::int AS n, t.r ->> 'account' AS account_id, t.r ->> 'key' AS key,
               decode(t.r ->> 'hash', 'hex') AS hash,
               CASE WHEN t.r ->> 'op' = 'release' THEN (t.r ->> 'reservation_id')::uuid
                    END AS reservation_id,
               coalesce((t.r ->> 'job_failed')::boolean, false) AS job_failed,
               t.r ->> 'reason' AS reason, p_txn_ids[t.n] AS txn,
               -- when the server received the call: what it records (p_now judges)
               coalesce((t.r ->> 'now')::timestamptz, p_now) AS call_at
          FROM jsonb_array_elements(p_requests) WITH ORDINALITY AS t(r, n)
    ), give_back AS (
        -- Each call with the pending reservation it releases (none for other calls).
        SELECT q.n, q.account_id, q.key, q.hash, q.reservation_id, q.txn, q.call_at,
               ledger_release_status(q.job_failed) AS status,
               ledger_release_comment(q.job_failed, q.reason) AS comment,
               v.held_micros AS held, v.feature, v.model
          FROM request q
          -- LATERAL ... OFFSET 0 (not merged into the join): each call's rows looked up by
          -- their key, whatever the plan estimates of the batch and the tables
          LEFT JOIN LATERAL (
              SELECT v.held_micros, v.feature, v.model
                FROM reservations v
               WHERE v.account_id = q.account_id AND v.reservation_id = q.reservation_id
                 AND v.status = 'pending'
                 -- a hold past its expiry, left pending for its grace (ledger_hold_grace),
                 -- times out (ledger_release) at the call's own time: call by call
                 AND v.expires_at > p_now OFFSET 0) v ON true
    ), held AS (
        -- The lots each reservation holds credits on.
        SELECT g.n, g.account_id, h.lot_id, h.seq, h.held_micros, h.source, h.committed_micros,
               h.refunded_micros, h.refund_expired_micros, h.expires_at
          FROM give_back g
          CROSS JOIN LATERAL (
              SELECT rl.lot_id, rl.seq, rl.held_micros, rl.committed_micros, rl.refunded_micros,
                     rl.refund_expired_micros, l.source, l.expires_at
                FROM reservation_lots rl
                JOIN lots l ON l.account_id = g.account_id AND l.lot_id = rl.lot_id
               WHERE rl.account_id = g.account_id AND rl.reservation_id = g.reservation_id
              OFFSET 0) h
    ), account_need AS (
        SELECT g.account_id, sum(g.held)::bigint AS unheld,
               -- coalesce: bool_and skips NULLs; held is NULL for a call that is not a
               -- Release of a pending reservation
               bool_and(coalesce(g.held IS NOT NULL AND g.key IS NOT NULL
                                 AND g.hash IS NOT NULL AND k.idempotency_key IS NULL, false))
                   AND count(DISTINCT g.key) = count(*)
                   AND count(DISTINCT g.reservation_id) = count(*) AS plain
          FROM give_back g
          LEFT JOIN LATERAL (  -- a key used before: a replay or a conflict
              SELECT k.idempotency_key FROM idempotency_keys k
               WHERE k.account_id = g.account_id AND k.idempotency_key = g.key OFFSET 0) k
            ON true
         GROUP BY g.account_id
    ), ready AS (
        SELECT a.account_id, a.balance_micros, a.held_micros, a.reward_balance_micros
          FROM account_need n
          -- "= ANY": the plan looks up the batch's accounts, whatever it estimates of n.
          JOIN accounts a ON a.account_id = ANY (p_batch_accounts) AND a.account_id = n.account_id
         WHERE n.plain
           AND (a.next_maintenance_at IS NULL OR a.next_maintenance_at > p_now)
           -- The balances the set answers with have no overdraft (ledger_balance_json)
           AND a.overdraft_limit_micros = 0
           AND NOT EXISTS (SELECT FROM held h
                            WHERE h.account_id = a.account_id AND h.expires_at <= p_now)
    ), returned_expiry AS (
        -- The nearest expiry of a lot each account's Releases give credits back to.
        SELECT h.account_id, min(h.expires_at) AS expiry
          FROM held h WHERE h.held_micros > 0 GROUP BY h.account_id
    ), release AS (
        -- Each Release and the account's hold once it is made.
        SELECT g.n, g.account_id, g.key, g.hash, g.reservation_id, g.txn, g.status, g.comment,
               g.held, g.feature, g.model, g.call_at, r.balance_micros,
               r.held_micros - (sum(g.held) OVER w)::bigint AS held_after,
               r.reward_balance_micros
          FROM give_back g JOIN ready r ON r.account_id = g.account_id
        WINDOW w AS (PARTITION BY g.account_id ORDER BY g.n ROWS UNBOUNDED PRECEDING)
    ), journal AS (
        INSERT INTO journal_transactions (account_id, transaction_id, kind, amount_micros,
                                          reservation_id, feature, model, comment, created_at)
        OVERRIDING SYSTEM VALUE
        SELECT account_id, txn, 'release', held, reservation_id, feature, model, comment,
               call_at
          FROM release ORDER BY account_id COLLATE "C", n
    ), lots_unheld AS (
        UPDATE lots l SET held_micros = l.held_micros - t.held
          FROM (SELECT h.account_id, h.lot_id, sum(h.held_micros)::bigint AS held
                  FROM held h JOIN ready r ON r.account_id = h.account_id
                 GROUP BY h.account_id, h.lot_id) t
         WHERE l.account_id = t.account_id AND l.lot_id = t.lot_id
    ), released AS (
        UPDATE reservations v SET status = r.status, finalized_at = r.call_at
          FROM release r
         WHERE v.account_id = r.account_id AND v.reservation_id = r.reservation_id
        RETURNING v.account_id, v.reservation_id, v AS row
    ), accounts_unheld AS (
        UPDATE accounts a
           SET held_micros = a.held_micros - n.unheld,
               -- as ledger_release_holds: what goes back to a lot is expired in time,
               -- though the lot's expiry was applied by a call of a later time
               next_maintenance_at = least(a.next_maintenance_at, e.expiry)
          FROM account_need n
          LEFT JOIN returned_expiry e ON e.account_id = n.account_id
         WHERE a.account_id = ANY (p_batch_accounts) AND a.account_id = n.account_id
           AND n.account_id IN (SELECT account_id FROM ready)
    ), stored AS (
        INSERT INTO idempotency_keys (account_id, idempotency_key, operation, request_hash,
                                      response, created_at)
        SELECT r.account_id, r.key, 'release', r.hash,
               jsonb_build_object(
                   'reservation', ledger_reservation_row_json(v.row, (
                       SELECT jsonb_agg(ledger_reservation_lot_json(
                                  h.lot_id, h.source, h.held_micros, h.committed_micros,
                                  h.refunded_micros, h.refund_expired_micros) ORDER BY h.seq)
                         FROM held h WHERE h.n = r.n)),
                   'balance', ledger_balance_values_json(r.account_id, r.balance_micros,
                                                         r.held_after, r.reward_balance_micros,
                                                         r.call_at)),
               r.call_at
          FROM release r
          JOIN released v ON v.account_id = r.account_id AND v.reservation_id = r.reservation_id
        RETURNING account_id, idempotency_key, response
    )
    SELECT array_agg(r.n), array_agg(s.response) INTO positions, responses
      FROM stored s JOIN release r ON r.account_id = s.account_id AND r.key = s.idempotency_key;
    RETURN ledger_set_answers(p_results, positions, responses);
END $$;
