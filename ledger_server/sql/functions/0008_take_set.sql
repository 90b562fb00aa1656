-- Set-based Consume and Reserve for a batch of the group commit (issue 7). Run one by one,
-- each call of a batch pays ~10 statements, a savepoint and its own start-up of every
-- statement (plans, the CHECK constraints of each table it writes); here the plain
-- Consumes and Reserves of a batch are written together, one statement per table for all.
--
-- It takes only what is sure to succeed, decided before anything is written: an account's
-- calls are taken all together when every one is a Consume or a Reserve of a plain amount
-- (no usage to price) with a key new to the account and distinct within the batch, nothing
-- is due on the account (expiry, timed-out holds, allowance), its available credits cover
-- them all, its Consumes raise no low-balance alert, it has no overdraft limit, and its
-- first 64 lots with credits cover them. The plain Commits are taken by ledger_commit_set
-- (0009_commit_set.sql) and the plain Releases by ledger_release_set (0010_release_set.sql)
-- on the same terms. Anything else (a refusal, a replay, a first alert, an account with a
-- Commit, Release or Refund beside its Consumes) is left to ledger_consume_batch's
-- call-by-call path, which gives it the answer it gets alone.
--
-- Each call ends exactly as ledger_consume or ledger_reserve would have left it, the
-- account's calls one after the other in arrival order: the account's lots, in consumption
-- order, are one range of spendable credits and each call takes the next slice of it (a
-- Consume spends its slice, a Reserve holds it); an account's journal entries are numbered
-- in arrival order; the stored answer is the one the call stores alone. It locks every
-- account of the batch first, in the batch's one order (0007_coalesced.sql), so the calls
-- it leaves find their accounts locked already.
--
-- Returns an array as long as p_requests: {"ok": <response>} for each call it made,
-- NULL for the others.
-- The answers of the calls a set made (positions in p_requests, stored responses) put
-- into the batch's results as the call alone answers: {"ok": <response, not replayed>}.
CREATE OR REPLACE FUNCTION ledger_set_answers(
    p_results jsonb[], p_positions int[], p_responses jsonb[]) RETURNS jsonb[]
LANGUAGE plpgsql AS $$
DECLARE
    results jsonb[] := p_results;
BEGIN
    FOR i IN 1 .. coalesce(cardinality(p_positions), 0) LOOP
        results[p_positions[i]] := jsonb_build_object(
            'ok', p_responses[i] || jsonb_build_object('replayed', false));
    END LOOP;
    RETURN results;
END $$;

CREATE OR REPLACE FUNCTION ledger_take_set(p_requests jsonb, p_now timestamptz)
    RETURNS jsonb[]
LANGUAGE plpgsql
-- Planned once per connection: a custom plan, made for each batch's values, costs more
-- than the batch it would speed up, and the plan's choices do not depend on the values
-- (every table is reached by its key, the accounts by "= ANY").
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    results jsonb[] := array_fill(NULL::jsonb, ARRAY[jsonb_array_length(p_requests)]);
    default_threshold bigint := (ledger_setting('alerts.low_balance_threshold_micros'))::bigint;
    batch_accounts text[];
    positions int[];
    responses jsonb[];
    -- A journal entry's id for each call, drawn before anything is written, so each write
    -- names its entry without joining back to the rows the journal insert returns. Ids of
    -- calls left to the call-by-call path go unused (a sequence has gaps anyway); each
    -- account's calls get increasing ids in arrival order, as one by one. Drawn once the
    -- accounts are locked: an account's journal ids then grow in commit order, which the
    -- keyset pages of ListTransactions rely on (drawn before, an entry committed while this
    -- batch waited for a lock got a higher id than the batch's, and a reader who had paged
    -- past it never saw the batch's entries).
    txn_ids bigint[];
    any_commit boolean;
    any_release boolean;
    any_charge boolean;
BEGIN
    -- One pass over the calls for what the batch holds. The sets judge at p_now, which is
    -- sure for each call at its own time only when no call came later: the server passes
    -- the latest, and a caller that did not is held to the same (helper-45's review).
    SELECT coalesce(array_agg(DISTINCT r ->> 'account'), '{}'),
           coalesce(bool_or(r ->> 'op' = 'commit'), false),
           coalesce(bool_or(r ->> 'op' = 'release'), false),
           coalesce(bool_or(coalesce(r ->> 'op', 'consume') IN ('consume', 'reserve')), false),
           greatest(p_now, max((r ->> 'now')::timestamptz))
      INTO batch_accounts, any_commit, any_release, any_charge, p_now
      FROM jsonb_array_elements(p_requests) r;
    PERFORM FROM accounts WHERE account_id = ANY (batch_accounts)
      ORDER BY account_id COLLATE "C"
        FOR UPDATE;
    txn_ids := ARRAY(SELECT nextval('journal_transactions_transaction_id_seq')
                       FROM generate_series(1, jsonb_array_length(p_requests)));
    IF any_commit THEN
        results := ledger_commit_set(p_requests, p_now, batch_accounts, default_threshold,
                                     txn_ids, results);
    END IF;
    IF any_release THEN
        results := ledger_release_set(p_requests, p_now, batch_accounts, txn_ids, results);
    END IF;
    IF NOT any_charge THEN
        RETURN results;
    END IF;
    WITH request AS (
        SELECT t.n::int AS n, t.r ->> 'account' AS account_id, t.r ->> 'key' AS key,
               decode(t.r ->> 'hash', 'hex') AS hash, coalesce(t.r ->> 'op', 'consume') AS op,
               -- NULL (not taken) for a call of another kind or with usage to price
               CASE WHEN coalesce(t.r ->> 'op', 'consume') IN ('consume', 'reserve')
                     AND jsonb_typeof(t.r -> 'usage') IS DISTINCT FROM 'object'
                    THEN (t.r ->> 'amount')::bigint END AS amount,
               (t.r ->> 'expires_at')::timestamptz AS expires_at,
               nullif(t.r ->> 'feature', '') AS feature, nullif(t.r ->> 'comment', '') AS comment,
               -- when the server received the call: what it records (p_now judges)
               coalesce((t.r ->> 'now')::timestamptz, p_now) AS call_at
          FROM jsonb_array_elements(p_requests) WITH ORDINALITY AS t(r, n)
    ), account_need AS (
        SELECT q.account_id, sum(q.amount)::bigint AS total,
               coalesce(sum(q.amount) FILTER (WHERE q.op = 'consume'), 0)::bigint AS spent,
               min(q.expires_at) FILTER (WHERE q.op = 'reserve') AS hold_until,
               -- coalesce: bool_and skips NULLs
               bool_and(coalesce(q.amount > 0 AND q.key IS NOT NULL AND q.hash IS NOT NULL
                                 AND (q.op = 'consume' OR q.expires_at IS NOT NULL)
                                 AND k.idempotency_key IS NULL, false))
                   AND count(DISTINCT q.key) = count(*) AS plain
          FROM request q
          -- A key used before: a replay or a conflict. LATERAL ... OFFSET 0 (not merged
          -- into the join): each key looked up by itself, whatever the plan estimates.
          LEFT JOIN LATERAL (
              SELECT k.idempotency_key FROM idempotency_keys k
               WHERE k.account_id = q.account_id AND k.idempotency_key = q.key OFFSET 0) k
            ON true
         GROUP BY q.account_id
    ), ready AS (
        SELECT a.account_id, a.balance_micros, a.held_micros, a.reward_balance_micros,
               n.total, n.spent, n.hold_until
          FROM account_need n
          -- "= ANY": the plan looks up the batch's accounts, whatever it estimates of n.
          JOIN accounts a ON a.account_id = ANY (batch_accounts) AND a.account_id = n.account_id
         WHERE n.plain
           AND (a.next_maintenance_at IS NULL OR a.next_maintenance_at > p_now)
           -- nor due through a hold of the batch: a later call would release it first
           AND (n.hold_until IS NULL OR n.hold_until > p_now)
           -- The balances the set answers with have no overdraft (ledger_balance_json)
           AND a.overdraft_limit_micros = 0
           AND a.balance_micros - a.held_micros >= n.total
           -- ledger_low_balance_check would record an alert for one of the Consumes
           AND NOT coalesce(ledger_crosses_low_balance(
                   coalesce(a.low_balance_threshold_micros, default_threshold),
                   a.balance_micros, a.balance_micros - n.spent), true)
    ), lot AS (
        -- Each ready account's main lots with credits, in consumption order, as ranges
        -- [lot_start, lot_end) of its spendable credits.
        SELECT r.account_id, l.lot_id, l.source,
               (sum(l.spendable) OVER w)::bigint - l.spendable AS lot_start,
               (sum(l.spendable) OVER w)::bigint AS lot_end
          FROM ready r
          CROSS JOIN LATERAL (
              SELECT lot_id, source, remaining_micros - held_micros AS spendable, priority,
                     expires_at
                FROM lots
               WHERE account_id = r.account_id AND balance_kind = 'main' AND NOT depleted
                 AND (expires_at IS NULL OR expires_at > p_now)
                 AND remaining_micros > held_micros
               ORDER BY priority, expires_at, lot_id
               LIMIT 64) l
        WINDOW w AS (PARTITION BY r.account_id ORDER BY l.priority, l.expires_at, l.lot_id
                     ROWS UNBOUNDED PRECEDING)
    ), covered AS (
        SELECT r.account_id, r.balance_micros, r.held_micros, r.reward_balance_micros,
               r.total, r.spent, r.hold_until
          FROM ready r
         WHERE r.total <= (SELECT max(lot_end) FROM lot WHERE lot.account_id = r.account_id)
    ), charge AS (
        -- Each call's slice [call_start, call_end) of its account's credits, in arrival
        -- order, and the account's balances once it is made.
        SELECT q.n, q.op, q.account_id, q.key, q.hash, q.amount, q.feature, q.comment,
               q.call_at, txn_ids[q.n] AS txn,
               CASE WHEN q.op = 'consume' THEN q.call_at ELSE q.expires_at END AS expires_at,
               gen_random_uuid() AS reservation_id,
               c.balance_micros - coalesce(sum(q.amount) FILTER (WHERE q.op = 'consume')
                                               OVER w, 0)::bigint AS balance_after,
               c.held_micros + coalesce(sum(q.amount) FILTER (WHERE q.op = 'reserve')
                                            OVER w, 0)::bigint AS held_after,
               c.reward_balance_micros,
               (sum(q.amount) OVER w)::bigint - q.amount AS call_start,
               (sum(q.amount) OVER w)::bigint AS call_end
          FROM request q JOIN covered c ON c.account_id = q.account_id
        WINDOW w AS (PARTITION BY q.account_id ORDER BY q.n ROWS UNBOUNDED PRECEDING)
    ), take AS (
        SELECT c.n, c.account_id, c.reservation_id, c.txn, l.lot_id, l.source, t.micros,
               CASE WHEN c.op = 'consume' THEN t.micros ELSE 0 END AS spent,
               (row_number() OVER (PARTITION BY c.n ORDER BY l.lot_start) - 1)::smallint AS seq
          FROM charge c
          JOIN lot l ON l.account_id = c.account_id
                    AND l.lot_start < c.call_end AND l.lot_end > c.call_start
          CROSS JOIN LATERAL (SELECT least(c.call_end, l.lot_end)
                                     - greatest(c.call_start, l.lot_start) AS micros) t
    ), took AS (
        SELECT n, count(*)::int AS lot_count,
               jsonb_agg(ledger_reservation_lot_json(lot_id, source, micros, spent)
                         ORDER BY seq) AS lots_json
          FROM take GROUP BY n
    ), journal AS (
        INSERT INTO journal_transactions (account_id, transaction_id, kind, amount_micros,
                                          reservation_id, feature, comment, created_at)
        OVERRIDING SYSTEM VALUE
        SELECT account_id, txn, CASE op WHEN 'consume' THEN 'charge' ELSE 'hold' END,
               CASE op WHEN 'consume' THEN -amount ELSE amount END, reservation_id, feature,
               comment, call_at
          FROM charge ORDER BY account_id COLLATE "C", n
    ), reserved AS (
        INSERT INTO reservations AS r (account_id, reservation_id, status, held_micros,
                                       committed_micros, expires_at, created_at, finalized_at,
                                       feature, comment, charge_transaction_id,
                                       hold_transaction_id)
        SELECT c.account_id, c.reservation_id,
               CASE c.op WHEN 'consume' THEN 'committed' ELSE 'pending' END, c.amount,
               CASE c.op WHEN 'consume' THEN c.amount ELSE 0 END, c.expires_at, c.call_at,
               CASE c.op WHEN 'consume' THEN c.call_at END, c.feature, c.comment,
               CASE c.op WHEN 'consume' THEN c.txn END,
               CASE c.op WHEN 'reserve' THEN c.txn END
          FROM charge c
        RETURNING r.reservation_id, r AS row
    ), lots_taken AS (
        UPDATE lots l SET held_micros = l.held_micros + t.held,
                          remaining_micros = l.remaining_micros - t.spent
          FROM (SELECT account_id, lot_id, sum(micros - spent)::bigint AS held,
                       sum(spent)::bigint AS spent
                  FROM take GROUP BY account_id, lot_id) t
         WHERE l.account_id = t.account_id AND l.lot_id = t.lot_id
    ), posted AS (
        INSERT INTO postings (account_id, transaction_id, posting_no, ledger_account, lot_id,
                              source, amount_micros)
        SELECT t.account_id, t.txn, t.seq, 'account:main', t.lot_id, t.source, -t.spent
          FROM take t
         WHERE t.spent > 0
        UNION ALL
        SELECT c.account_id, c.txn, k.lot_count, ledger_revenue_account(c.feature), NULL, NULL,
               c.amount
          FROM charge c
          JOIN took k ON k.n = c.n
         WHERE c.op = 'consume'
    ), reserved_lots AS (
        INSERT INTO reservation_lots (account_id, reservation_id, lot_id, seq, held_micros,
                                      committed_micros)
        SELECT account_id, reservation_id, lot_id, seq, micros, spent FROM take
    ), charged AS (
        UPDATE accounts a
           SET balance_micros = a.balance_micros - c.spent,
               held_micros = a.held_micros + (c.total - c.spent),
               next_maintenance_at = least(a.next_maintenance_at, c.hold_until + ledger_hold_grace())
          FROM covered c
         WHERE a.account_id = ANY (batch_accounts) AND a.account_id = c.account_id
    ), stored AS (
        INSERT INTO idempotency_keys (account_id, idempotency_key, operation, request_hash,
                                      response, created_at)
        SELECT c.account_id, c.key, c.op, c.hash,
               jsonb_build_object(
                   'reservation', ledger_reservation_row_json(r.row, k.lots_json),
                   'balance', ledger_balance_values_json(c.account_id, c.balance_after,
                                                         c.held_after, c.reward_balance_micros,
                                                         c.call_at))
               || CASE c.op WHEN 'consume' THEN jsonb_build_object(
                      'transaction_id', c.txn::text,
                      'low_balance_alert_id', NULL::bigint) ELSE '{}' END,
               c.call_at
          FROM charge c
          JOIN took k ON k.n = c.n
          JOIN reserved r ON r.reservation_id = c.reservation_id
        RETURNING account_id, idempotency_key, response
    )
    SELECT array_agg(c.n), array_agg(s.response) INTO positions, responses
      FROM stored s JOIN charge c ON c.account_id = s.account_id AND c.key = s.idempotency_key;
    RETURN ledger_set_answers(results, positions, responses);
END $$;
