-- Low-balance alerts and the sweepers' functions (DESIGN.md section 7, issue 5).

-- Signatures that changed: CREATE OR REPLACE would leave the old one beside the new.
DROP FUNCTION IF EXISTS ledger_low_balance_check(text, bigint, bigint, timestamptz);

-- The one rule of a low-balance alert: a charge takes the main balance from at or above
-- the threshold to below it (no alerts with a threshold of 0 or less). NULL when the
-- threshold is unknown. IMMUTABLE over an immutable body, so it is inlined where it is used
-- in a statement (the batch sets, 0008/0009).
CREATE OR REPLACE FUNCTION ledger_crosses_low_balance(
    p_threshold bigint, p_before bigint, p_after bigint) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT p_threshold > 0 AND p_before >= p_threshold AND p_after < p_threshold
$$;

-- Called by every charge (commit, consume, admin debit) with the main balance before
-- it: when the charge takes the balance from at or above the account's threshold to
-- below it, records one alert (its email pending when there is an address). Charges
-- that start below the threshold raise nothing, so one crossing is one alert and the
-- next comes only after the balance went back up. `a` is the account row after the
-- charge. Returns the alert id, or NULL. Both balances are compared as the API shows
-- them: less the overdraft limit, if any (the charge does not change the limit).
CREATE OR REPLACE FUNCTION ledger_low_balance_check(
    a accounts, p_before bigint, p_txn bigint, p_now timestamptz) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    threshold bigint;
    email text;
    alert bigint;
    shown_after bigint := a.balance_micros - a.overdraft_limit_micros;
BEGIN
    threshold := coalesce(a.low_balance_threshold_micros,
                          (ledger_setting('alerts.low_balance_threshold_micros'))::bigint);
    IF NOT ledger_crosses_low_balance(threshold, p_before - a.overdraft_limit_micros,
                                      shown_after) THEN
        RETURN NULL;
    END IF;
    email := coalesce(a.alert_email, nullif(ledger_setting('alerts.email_to') #>> '{}', ''));
    INSERT INTO low_balance_alerts (account_id, threshold_micros, balance_micros, transaction_id,
                                    created_at, email_to, email_status)
    VALUES (a.account_id, threshold, shown_after, p_txn, p_now, email,
            CASE WHEN email IS NULL THEN 'skipped' ELSE 'pending' END)
    RETURNING alert_id INTO alert;
    RETURN CASE WHEN email IS NULL THEN NULL ELSE alert END;
END $$;

CREATE OR REPLACE FUNCTION ledger_alert_json(l low_balance_alerts) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'alert_id', l.alert_id::text, 'account_id', l.account_id,
        'threshold_micros', l.threshold_micros, 'balance_micros', l.balance_micros,
        'transaction_id', l.transaction_id::text, 'create_time', ledger_micros(l.created_at),
        'email_to', coalesce(l.email_to, ''), 'email_status', l.email_status,
        'email_error', coalesce(l.email_error, ''), 'email_sent_time', ledger_micros(l.email_sent_at))
$$;

-- Applies what is due (timed-out holds, expired lots, monthly allowances) to up to
-- p_limit accounts, oldest due first, but those in p_skip (whose maintenance failed
-- earlier in the sweeper's run), and takes no further account once p_max_ms milliseconds
-- have passed (NULL: no time limit). Every account it maintains stays locked until the
-- caller commits, and calls on it wait till then (a batch of calls, for any of its
-- accounts): the sweeper commits small chunks (workers/sweepers.py). One account locked at
-- a time, so that none is held that it does not maintain. SKIP LOCKED: an account busy
-- with a charge (or with another sweeper) is left for later; the charge applies what is
-- due itself. Safe to run any number of times at once. Returns how many accounts it swept.
DROP FUNCTION IF EXISTS ledger_sweep(timestamptz, int);
DROP FUNCTION IF EXISTS ledger_sweep(timestamptz, int, text[]);
CREATE OR REPLACE FUNCTION ledger_sweep(p_now timestamptz, p_limit int,
                                        p_skip text[] DEFAULT '{}', p_max_ms int DEFAULT NULL)
    RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    deadline timestamptz := clock_timestamp() + make_interval(secs => p_max_ms / 1000.0);
    acc text;
    n int := 0;
BEGIN
    WHILE n < p_limit AND (deadline IS NULL OR clock_timestamp() < deadline) LOOP
        SELECT account_id INTO acc FROM accounts
         WHERE next_maintenance_at <= p_now AND account_id <> ALL (p_skip)
         ORDER BY next_maintenance_at
         LIMIT 1
           FOR UPDATE SKIP LOCKED;
        EXIT WHEN NOT FOUND;
        PERFORM ledger_maintain(acc, p_now);
        n := n + 1;
    END LOOP;
    RETURN n;
END $$;

-- Its first form: one UPDATE of every account, locking them all in the heap's order until
-- it committed (every call on them waited, and a batch locking in account_id order could
-- deadlock with it).
DROP FUNCTION IF EXISTS ledger_schedule_monthly_allowances(timestamptz);

-- The scheduled monthly allowance, one chunk of accounts per call (and per transaction):
-- makes this month's allowance due now on the accounts after p_after (in account_id order,
-- the one lock order of the batches) that lack it, of the next p_limit, and of those at most
-- p_lock_limit (NULL: p_limit); the sweep then grants it. Each one marked stays locked until
-- the caller commits, and locking the next may wait for a call on it: every call on those
-- already marked waits as long. Granting checks the month's row, so running this twice in a
-- month grants once. Returns how many accounts it marked and the last account it is done
-- with (NULL: no account after p_after).
DROP FUNCTION IF EXISTS ledger_schedule_monthly_allowances(timestamptz, text, int);
CREATE OR REPLACE FUNCTION ledger_schedule_monthly_allowances(
    p_now timestamptz, p_after text, p_limit int, p_lock_limit int DEFAULT NULL)
    RETURNS TABLE (marked int, last_account text)
LANGUAGE plpgsql AS $$
DECLARE
    tz text := ledger_timezone();
    this_month date := date_trunc('month', p_now AT TIME ZONE tz)::date;
    lock_limit int := coalesce(p_lock_limit, p_limit);
BEGIN
    -- An amount of 0 pauses the allowance as being off does: marked, every account would be
    -- due now, granted nothing, pushed back to next month, and marked again at the next run
    -- (helper-85: each hourly run swept the whole ledger).
    IF NOT (ledger_setting('monthly_free.enabled'))::boolean
       OR (ledger_setting('monthly_free.amount_micros'))::bigint <= 0 THEN
        RETURN QUERY SELECT 0, NULL::text;
        RETURN;
    END IF;
    RETURN QUERY
    WITH chunk_end AS (
        -- The last of the next p_limit accounts (NULL: none after p_after), from the index.
        SELECT max(c.account_id) AS account_id
          FROM (SELECT a.account_id FROM accounts a
                 WHERE a.account_id > p_after
                 ORDER BY a.account_id
                 LIMIT p_limit) c
    ), candidates AS (
        -- Read without a lock, so that only the accounts it marks are locked; the next call
        -- goes on after the last of them when the cap cut the chunk short. An index scan
        -- that stops at the cap: reading the whole chunk for each cap's worth read every
        -- account p_limit / p_lock_limit times (helper-128: 6.7 times as long).
        SELECT a.account_id FROM accounts a, chunk_end e
         WHERE a.account_id > p_after AND a.account_id <= e.account_id
           AND (a.monthly_free_next_at IS NULL OR a.monthly_free_next_at > p_now)
           AND NOT EXISTS (SELECT 1 FROM monthly_allowances m  -- or a later month's
                            WHERE m.account_id = a.account_id AND m.month >= this_month)
         ORDER BY a.account_id
         LIMIT lock_limit
    ), due AS (
        SELECT a.account_id FROM accounts a JOIN candidates c ON c.account_id = a.account_id
         WHERE (a.monthly_free_next_at IS NULL OR a.monthly_free_next_at > p_now)
           AND NOT EXISTS (SELECT 1 FROM monthly_allowances m  -- or a later month's
                            WHERE m.account_id = a.account_id AND m.month >= this_month)
         ORDER BY a.account_id
           FOR UPDATE OF a
    ), marked AS (
        UPDATE accounts a
           SET monthly_free_next_at = p_now,
               next_maintenance_at = least(a.next_maintenance_at, p_now)
          FROM due WHERE a.account_id = due.account_id
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM marked)::int,
           CASE WHEN (SELECT count(*) FROM candidates) = lock_limit
                THEN (SELECT max(c.account_id) FROM candidates c)
                ELSE (SELECT e.account_id FROM chunk_end e) END;
END $$;
