-- Credit sources and their rules (DESIGN.md section 5): opening accounts (sign-up
-- bonus, referral), daily rewards, the monthly allowance, packs, recharges,
-- subscriptions, redemption codes, reward transfers, admin debits and settings.
-- Same conventions as 0001_ledger.sql; further SQLSTATEs:
--   LE011 daily reward already claimed   LE012 source disabled
--   LE013 referral code not found        LE014 account exists
--   LE015 redemption code not found      LE016 redemption code expired
--   LE017 redemption code disabled       LE018 redemption code exhausted
--   LE019 redemption code already redeemed by the account
--   LE020 insufficient reward balance    LE021 pack not found
--   LE022 pack inactive                  LE023 purchase requires subscription
--   LE024 plan not found                 LE025 external reference already fulfilled
--   LE026 already exists (pack, plan)    LE027 setting not found
--   LE028 redemption batch not found

-- Settings -------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION ledger_setting(p_key text) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v jsonb;
BEGIN
    SELECT value INTO v FROM settings WHERE key = p_key;
    IF NOT FOUND THEN
        -- Servers and workers write every setting at start; a missing one is a deployment bug.
        RAISE EXCEPTION 'setting % is missing: start a server or worker to write the defaults', p_key
            USING ERRCODE = 'LE102';
    END IF;
    RETURN v;
END $$;

CREATE OR REPLACE FUNCTION ledger_setting_json(s settings) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object('key', s.key, 'value', s.value, 'source', s.source,
                              'updated_by', s.updated_by, 'updated_at', ledger_micros(s.updated_at))
$$;

-- Whether PostgreSQL reads the zone name as an abbreviation of another meaning. AT TIME ZONE
-- (how the ledger finds a local day, month or report period) looks a name up among the
-- abbreviations first: CET, EET, MET and WET are read as fixed offsets, though the zones of
-- those names keep summer time, so days and months would start an hour off half the year
-- (helper-156's review). A name whose zone keeps the abbreviation's offset all year (UTC,
-- GMT, EST) means the same either way. The zone's own offsets are read through the session
-- TimeZone, which takes zone names only, in the middle of January and July of p_now's year.
CREATE OR REPLACE FUNCTION ledger_zone_read_as_abbreviation(p_zone text, p_now timestamptz)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    fixed interval;
    session_zone text := current_setting('TimeZone');
    january timestamptz := date_trunc('year', p_now) + interval '14 days 12 hours';
    july timestamptz := date_trunc('year', p_now) + interval '195 days 12 hours';
    offsets interval[];
BEGIN
    SELECT utc_offset INTO fixed FROM pg_timezone_abbrevs WHERE lower(abbrev) = lower(p_zone);
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM set_config('TimeZone', p_zone, true);
    offsets := ARRAY[make_interval(secs => extract(timezone FROM january)),
                     make_interval(secs => extract(timezone FROM july))];
    PERFORM set_config('TimeZone', session_zone, true);
    RETURN fixed <> ANY (offsets);
END $$;

-- Writes a setting and records the change (when it is one). Without
-- p_over_admin, an administrator's value stands (the start-up sync of environment
-- defaults); with it, it is replaced (UpdateSetting, including a reset to the
-- default). Returns the setting as stored.
CREATE OR REPLACE FUNCTION ledger_put_setting(
    p_key text, p_value jsonb, p_source text, p_actor text, p_reason text, p_now timestamptz,
    p_over_admin boolean) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    old settings;
    new settings;
BEGIN
    SELECT * INTO old FROM settings WHERE key = p_key FOR UPDATE;
    IF FOUND AND old.source = 'admin' AND NOT p_over_admin THEN
        RETURN ledger_setting_json(old);
    END IF;
    IF FOUND AND old.value = p_value AND old.source = p_source THEN
        RETURN ledger_setting_json(old);
    END IF;
    -- The servers check the name against Python's zone database, which knows names that
    -- PostgreSQL's does not (right/UTC, posixrules): every opening, claim and month-start
    -- maintenance would then fail. PostgreSQL's is the one that computes the days.
    IF p_key = 'ledger.timezone'
       AND NOT EXISTS (SELECT 1 FROM pg_timezone_names WHERE name = p_value #>> '{}') THEN
        PERFORM ledger_fail('LE010', 'unknown time zone', jsonb_build_object(
            'field', 'value', 'violation', 'PostgreSQL does not know the time zone '
                                           || (p_value #>> '{}')));
    END IF;
    IF p_key = 'ledger.timezone' AND ledger_zone_read_as_abbreviation(p_value #>> '{}', p_now) THEN
        PERFORM ledger_fail('LE010', 'time zone read as an abbreviation', jsonb_build_object(
            'field', 'value', 'violation', 'PostgreSQL reads ' || (p_value #>> '{}')
                || ' as a time-zone abbreviation, a fixed offset without the summer time of'
                || ' the zone of that name: name the zone by a city, such as Europe/Paris'));
    END IF;
    INSERT INTO settings (key, value, source, updated_by, updated_at)
    VALUES (p_key, p_value, p_source, p_actor, p_now)
    ON CONFLICT (key) DO UPDATE
        SET value = excluded.value, source = excluded.source,
            updated_by = excluded.updated_by, updated_at = excluded.updated_at
    RETURNING * INTO new;
    INSERT INTO setting_changes (key, old_value, new_value, source, actor, reason, changed_at)
    VALUES (p_key, old.value, p_value, p_source, p_actor, p_reason, p_now);
    RETURN ledger_setting_json(new);
END $$;

-- The value a setting had just before p_at, from its recorded changes: the last one before
-- p_at, else what the first one after replaced, else (no change recorded around p_at, or
-- only its first write after) the current value. For the terms of a day that has ended, for
-- a grant of it made later by a release that did not record them (daily_reward_runs), and
-- the zone an allowance's expiry came under (ledger_stretch_allowance). Without the second,
-- a setting changed only after p_at read as its new value at p_at.
CREATE OR REPLACE FUNCTION ledger_setting_in_force(p_key text, p_at timestamptz) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT coalesce(
        (SELECT c.new_value FROM setting_changes c
          WHERE c.key = p_key AND c.changed_at < p_at
          ORDER BY c.changed_at DESC, c.change_id DESC LIMIT 1),
        (SELECT c.old_value FROM setting_changes c
          WHERE c.key = p_key AND c.changed_at >= p_at
          ORDER BY c.changed_at, c.change_id LIMIT 1),
        ledger_setting(p_key))
$$;

CREATE OR REPLACE FUNCTION ledger_require_setting(p_key text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM settings WHERE key = p_key) THEN
        PERFORM ledger_fail('LE027', 'no such setting', jsonb_build_object('setting', p_key));
    END IF;
END $$;

CREATE OR REPLACE FUNCTION ledger_timezone() RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT ledger_setting('ledger.timezone') #>> '{}'
$$;

-- The first instant at which the wall clock of p_tz shows p_local: where a local day or month
-- begins. Every local boundary is turned into an instant by this, never by a bare
-- `p_local AT TIME ZONE p_tz`: where the clocks go back, the local times of the hour (the
-- half hour at Australia/Lord_Howe) before happen twice and PostgreSQL takes the later
-- instant, while `(now AT TIME ZONE tz)::date` already says the new day from the earlier one
-- (helper-85: in America/Havana midnight comes twice on 2026-11-01; October's allowance
-- expired at the second one, an hour after November's was granted, and the two were live at
-- once). A local time that does not exist (the clocks jump over it) keeps PostgreSQL's answer,
-- the instant the clock jumps to. The earlier reading is the local time less the offset in
-- force a little before the later one (a few hours: before the clocks went back, and after
-- any change before); it is taken only when the wall clock then really shows p_local.
CREATE OR REPLACE FUNCTION ledger_local_instant(p_local timestamp, p_tz text) RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    later timestamptz := p_local AT TIME ZONE p_tz;
    probe timestamptz := later - interval '3 hours';
    earlier timestamptz;
BEGIN
    earlier := (p_local - ((probe AT TIME ZONE p_tz) - (probe AT TIME ZONE 'UTC'))) AT TIME ZONE 'UTC';
    IF earlier < later AND earlier AT TIME ZONE p_tz = p_local THEN
        RETURN earlier;
    END IF;
    RETURN later;
END $$;

-- Accounts -------------------------------------------------------------------------

-- Whether the account's subscription is running at p_now: within its period, or past its
-- end by at most subscription.renewal_grace_days while the renewal is paid (the next
-- period's invoice.paid moves the period on), unless the subscription ended (deleted).
CREATE OR REPLACE FUNCTION ledger_subscribed(s subscriptions, p_now timestamptz) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT s.current_period_end > p_now
           OR (s.ended_at IS NULL
               AND s.current_period_end
                   + make_interval(days => (ledger_setting('subscription.renewal_grace_days'))::int)
                   > p_now)
$$;

CREATE OR REPLACE FUNCTION ledger_account_json(p_account text, p_now timestamptz) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'account_id', a.account_id,
        'referral_code', coalesce(a.referral_code, ''),
        'referred_by_account_id', coalesce(a.referred_by, ''),
        'create_time', ledger_micros(a.created_at),
        'subscription', (
            SELECT jsonb_build_object(
                       'plan_id', s.plan_id,
                       'current_period_start', ledger_micros(s.current_period_start),
                       'current_period_end', ledger_micros(s.current_period_end),
                       'external_ref', coalesce(s.external_ref, ''))
              FROM subscriptions s
             WHERE s.account_id = a.account_id AND ledger_subscribed(s, p_now)))
      FROM accounts a
     WHERE a.account_id = p_account
$$;

-- Characters from an alphabet without look-alikes (no 0/O, 1/I/L), drawn from the
-- server's cryptographic source (gen_random_uuid's pg_strong_random). random() would not
-- do: setseed() fixes its sequence, and its next values follow from a few seen, so codes
-- handed to one customer would tell another's.
CREATE OR REPLACE FUNCTION ledger_random_code(p_length int) RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    alphabet constant text := '23456789ABCDEFGHJKMNPQRSTUVWXYZ';
    code text := '';
    pool bytea;
    b int;
BEGIN
    WHILE length(code) < p_length LOOP
        pool := uuid_send(gen_random_uuid());
        FOR i IN 0..15 LOOP
            b := get_byte(pool, i);
            -- Bytes 6 and 8 hold the UUID's version and variant bits; bytes from 248
            -- (8 * 31) up are dropped so that every character is equally likely.
            CONTINUE WHEN i IN (6, 8) OR b >= 248;
            code := code || substr(alphabet, 1 + b % 31, 1);
            EXIT WHEN length(code) = p_length;
        END LOOP;
    END LOOP;
    RETURN code;
END $$;

-- Moves the expiry of the account's allowance for the month now current in ledger.timezone
-- out to that month's end there, when it would end sooner: only after the zone moved west.
-- An allowance expires at its month's end in the zone it was granted in, which comes hours
-- before the new zone's (UTC -> America/Los_Angeles: March's ended at 00:00Z on April 1,
-- Los Angeles' April began at 07:00Z), and for those hours the account had no allowance:
-- what was left of it expired, and what it spent came out of paid credits (helper-156's
-- review). Call first in ledger_maintain, which every expiry goes through (a lot's expiry
-- makes the account's maintenance due). Only a lot whose month had not ended at its expiry
-- in the zone then in force: one that reached its month's end there has ended, though a
-- hold on all of it left nothing expired yet (helper-161's review: moved west after, such an
-- allowance came back when the hold ended), whatever zones came after (helper-162's: a
-- second move, Los Angeles to Vancouver, before the account's next call). Nor one a later
-- month's allowance ended. The journal is untouched: a lot's expires_at is state, and the
-- reports date its expiry when it comes.
CREATE OR REPLACE FUNCTION ledger_stretch_allowance(p_account text, p_now timestamptz)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    this_month date := date_trunc('month', p_now AT TIME ZONE ledger_timezone())::date;
BEGIN
    UPDATE lots l
       SET expires_at = s.until
      FROM (SELECT m.lot_id, ledger_allowance_stretch(p_account, m.lot_id, p_now) AS until
              FROM monthly_allowances m
             WHERE m.account_id = p_account AND m.month = this_month) s
     WHERE l.account_id = p_account AND l.lot_id = s.lot_id AND s.until IS NOT NULL;
END $$;

-- The expiry ledger_stretch_allowance gives the allowance lot at p_now, or NULL when it
-- leaves it as it is: one place for the rule, which the reports follow too, so a summary
-- read between the lot's old expiry and the account's next call or sweep does not count
-- as expired what the ledger will still let the account spend (helper-163's review).
CREATE OR REPLACE FUNCTION ledger_allowance_stretch(
    p_account text, p_lot bigint, p_now timestamptz) RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT month_end
      FROM (SELECT date_trunc('month', p_now AT TIME ZONE tz) AS this_month, tz
              FROM (SELECT ledger_timezone() AS tz) zone) now_local
     CROSS JOIN LATERAL (
        SELECT ledger_local_instant(now_local.this_month + interval '1 month', now_local.tz)
               AS month_end) e
      JOIN monthly_allowances m
        ON m.account_id = p_account AND m.lot_id = p_lot
       AND m.month = now_local.this_month::date
      JOIN lots l ON l.account_id = p_account AND l.lot_id = p_lot
     WHERE NOT l.depleted AND l.expired_micros = 0 AND l.expires_at < e.month_end
       AND NOT EXISTS (SELECT 1 FROM monthly_allowances later
                        WHERE later.account_id = p_account AND later.month > m.month)
       AND date_trunc('month', l.expires_at AT TIME ZONE
               (ledger_setting_in_force('ledger.timezone', l.expires_at) #>> '{}'))::date = m.month
$$;

-- Ends, at p_now, the account's monthly allowances of months before p_month that are still
-- live, before p_month's is granted: two months' allowances are never spendable together.
-- Only after ledger.timezone moved east: an allowance expires at its month's end in the zone
-- it was granted in, so the old zone's month can end hours after the new zone's next month
-- began (UTC -> Asia/Shanghai: March's lived till 00:00Z while April's came at 16:00Z, and
-- for those hours an account could spend 3,000 credits of a 1,500 allowance). The lot's
-- expiry is moved to p_now and its unheld credits expire as any expired lot's do, in an
-- EXPIRY entry dated p_now, which the reports and the audit date at the lot's (new) expiry;
-- its held credits expire when their hold settles ('released after its lot expired'). The
-- journal is untouched: a lot's expires_at is state, not journal. Call with the account
-- locked, after what was due already expired (ledger_maintain), so that nothing else
-- expires here; no low-balance check: the allowance granted next replaces these credits.
CREATE OR REPLACE FUNCTION ledger_end_earlier_allowances(
    p_account text, p_month date, p_now timestamptz) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE lots l
       SET expires_at = p_now
      FROM monthly_allowances m
     WHERE m.account_id = p_account AND m.month < p_month
       AND l.account_id = p_account AND l.lot_id = m.lot_id
       AND NOT l.depleted AND l.expires_at > p_now;
    IF FOUND THEN
        PERFORM ledger_expire_due_lots(p_account, p_now, false);
    END IF;
END $$;

-- Grants the monthly free allowance when it is due (seed 004): a lot for the
-- calendar month in the configured zone, expiring when the month ends, at most one
-- per account and month. Then schedules the next one. Call with the account locked.
-- An allowance is never carried forward: granting one ends any earlier month's still live
-- (ledger_end_earlier_allowances).
CREATE OR REPLACE FUNCTION ledger_monthly_allowance(p_account text, p_now timestamptz) RETURNS lots
LANGUAGE plpgsql AS $$
DECLARE
    due timestamptz;
    tz text;
    month_start timestamp;
    next_start timestamptz;
    amount bigint;
    l lots;
BEGIN
    SELECT monthly_free_next_at INTO due FROM accounts WHERE account_id = p_account;
    IF due IS NULL OR due > p_now THEN
        RETURN NULL;
    END IF;
    tz := ledger_timezone();
    month_start := date_trunc('month', p_now AT TIME ZONE tz);
    next_start := ledger_local_instant(month_start + interval '1 month', tz);
    amount := (ledger_setting('monthly_free.amount_micros'))::bigint;
    IF (ledger_setting('monthly_free.enabled'))::boolean AND amount > 0
       -- A later month's counts too: moved west in a month's first hours, the new zone
       -- is back in the month before, and granting that beside the later one made two
       -- spendable at once (helper-156's review).
       AND NOT EXISTS (SELECT 1 FROM monthly_allowances
                        WHERE account_id = p_account AND month >= month_start::date) THEN
        PERFORM ledger_end_earlier_allowances(p_account, month_start::date, p_now);
        l := ledger_grant_lot(p_account, amount, 'monthly_free', 'main', next_start, NULL,
                              'monthly free allowance ' || to_char(month_start, 'YYYY-MM'), NULL, p_now);
        INSERT INTO monthly_allowances (account_id, month, lot_id, granted_at)
        VALUES (p_account, month_start::date, l.lot_id, p_now);
    END IF;
    UPDATE accounts
       SET monthly_free_next_at = next_start,
           next_maintenance_at = least(next_maintenance_at, next_start)
     WHERE account_id = p_account;
    RETURN l;
END $$;

-- Opens an account unless it exists: its referral code, the inviter's reward when
-- it signs up with one, the sign-up bonus and the month's allowance. Returns the
-- sign-up lot as JSON ('null' without a bonus), or NULL when the account existed.
-- Lock order: the new account (inserted, so held by this transaction), then the
-- inviter, which exists already and so can never be waiting on the new one.
CREATE OR REPLACE FUNCTION ledger_open_account(p_account text, p_referral_code text, p_now timestamptz)
    RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    code text := ledger_random_code(10);
    inviter text;
    signup_amount bigint;
    expire_days bigint;
    signup lots;
    reward bigint;
BEGIN
    IF EXISTS (SELECT 1 FROM accounts WHERE account_id = p_account) THEN
        RETURN NULL;  -- the common case, without an insert attempt
    END IF;
    WHILE EXISTS (SELECT 1 FROM accounts WHERE referral_code = code) LOOP
        code := ledger_random_code(10);
    END LOOP;
    INSERT INTO accounts (account_id, created_at, referral_code, monthly_free_next_at, next_maintenance_at)
    VALUES (p_account, p_now, code, p_now, p_now)
    ON CONFLICT (account_id) DO NOTHING;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;

    IF coalesce(p_referral_code, '') <> '' THEN
        SELECT account_id INTO inviter FROM accounts
         WHERE referral_code = upper(p_referral_code) AND account_id <> p_account
           FOR UPDATE;
        IF NOT FOUND THEN
            PERFORM ledger_fail('LE013', 'no account has this referral code',
                jsonb_build_object('referral_code', p_referral_code));
        END IF;
        -- No foreign key holds this (migration 0034: it locked the inviter's row at every
        -- later write of the invitee's); the inviter is locked here and never deleted.
        UPDATE accounts SET referred_by = inviter WHERE account_id = p_account;
        reward := (ledger_setting('referral.reward_micros'))::bigint;
        IF (ledger_setting('referral.enabled'))::boolean AND reward > 0 THEN
            PERFORM ledger_grant_lot(inviter, reward, 'referral', 'reward', NULL, p_account,
                                     'referral reward: ' || p_account || ' signed up', NULL, p_now);
        END IF;
    END IF;

    signup_amount := (ledger_setting('signup.amount_micros'))::bigint;
    IF (ledger_setting('signup.enabled'))::boolean AND signup_amount > 0 THEN
        expire_days := (ledger_setting('signup.expire_days'))::bigint;
        signup := ledger_grant_lot(
            p_account, signup_amount, 'signup', 'main',
            CASE WHEN expire_days > 0 THEN p_now + make_interval(days => expire_days::int) END,
            NULL, 'sign-up bonus', NULL, p_now);
    END IF;
    PERFORM ledger_monthly_allowance(p_account, p_now);
    UPDATE accounts SET next_maintenance_at = ledger_next_maintenance(p_account, p_now)
     WHERE account_id = p_account;
    RETURN CASE WHEN signup.lot_id IS NULL THEN 'null'::jsonb ELSE ledger_lot_json(signup) END;
END $$;

CREATE OR REPLACE FUNCTION ledger_create_account(
    p_account text, p_key text, p_hash bytea, p_referral_code text, p_now timestamptz) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    signup jsonb;
    replay jsonb;
BEGIN
    signup := ledger_open_account(p_account, p_referral_code, p_now);
    a := ledger_lock_account(p_account, p_now);
    IF signup IS NULL THEN
        replay := ledger_idempotent_replay(p_account, p_key, 'create_account', p_hash);
        IF replay IS NOT NULL THEN
            RETURN replay;
        END IF;
        PERFORM ledger_fail('LE014', 'the account exists', jsonb_build_object('account_id', p_account));
    END IF;
    RETURN ledger_idempotent_store(p_account, p_key, 'create_account', p_hash, jsonb_build_object(
        'account', ledger_account_json(p_account, p_now),
        'signup_lot', signup,
        'balance', ledger_balance_json(a, p_now)), p_now);
END $$;

CREATE OR REPLACE FUNCTION ledger_get_account(p_account text, p_now timestamptz) RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM ledger_read_existing_account(p_account, p_now);  -- 0001_ledger.sql
    RETURN ledger_account_json(p_account, p_now);
END $$;

-- Daily reward (seed 000) -----------------------------------------------------------

-- Whether the account has the reward of p_day, whose local day runs from p_start to p_end in
-- p_tz: a claim of that date, or a claim of another date made in that span while its own day
-- lasted. The second is one made before a change of ledger.timezone: claimed at 20:00Z of a
-- day in UTC, it was made in the next day of Pacific/Kiritimati, whose date had no row, and
-- the account claimed again two minutes after the change. A claim made after its own day
-- ended (an automatic grant of an earlier day, made by the first run after midnight) counts
-- only for its date: the same run then grants today. A claim's date is at most two days
-- from the date of any zone at the instant it was made (offsets differ by at most 26
-- hours), so the check reads a short range of the primary key. accounts_without_daily_claim
-- (sql/queries/sources.sql) writes the same test out.
CREATE OR REPLACE FUNCTION ledger_daily_claimed(
    p_account text, p_day date, p_start timestamptz, p_end timestamptz, p_tz text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (
        SELECT 1 FROM daily_claims c
         WHERE c.account_id = p_account
           AND c.claim_date BETWEEN p_day - 2 AND p_day + 2
           AND (c.claim_date = p_day
                OR (c.claimed_at >= p_start AND c.claimed_at < p_end
                    AND c.claimed_at < coalesce(
                        c.day_ends_at,
                        ledger_local_instant((c.claim_date + 1)::timestamp, p_tz)))))
$$;

-- The reward of p_day (today when NULL) in ledger.timezone, granted at p_now. The automatic
-- rewards name their day: a run that started before midnight and reaches an account after
-- it still grants the day it set out to, not the next one (which the next run grants). A
-- named day is granted at the amount and expiry its latest scheduled run recorded when it
-- set out (daily_reward_runs), not at those in force when the grant is made: a day is also
-- granted after it ended (to accounts opened after its last run, by the first run after
-- midnight; to those a run that stopped part-way did not reach, by the next days' runs), and
-- after a change of daily.amount_micros at midnight they got the day at the new amount
-- while every other account had the old one. An account's own claim (no day) takes the
-- terms in force. Either is refused while the reward is off or paused (an amount of 0).
CREATE OR REPLACE FUNCTION ledger_claim_daily_reward_of_day(
    p_account text, p_key text, p_hash bytea, p_day date, p_now timestamptz) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    replay jsonb;
    tz text;
    today date;
    day_start timestamptz;
    next_claim timestamptz;
    amount bigint;
    expire_days bigint;
    run_amount bigint;
    run_expire_days bigint;
    l lots;
BEGIN
    PERFORM ledger_open_account(p_account, '', p_now);
    a := ledger_lock_account(p_account, p_now);
    replay := ledger_idempotent_replay(p_account, p_key, 'claim_daily_reward', p_hash);
    IF replay IS NOT NULL THEN
        RETURN replay;
    END IF;
    IF NOT (ledger_setting('daily.enabled'))::boolean THEN
        PERFORM ledger_fail('LE012', 'the daily reward is switched off',
            jsonb_build_object('setting', 'daily.enabled'));
    END IF;
    amount := (ledger_setting('daily.amount_micros'))::bigint;
    IF amount <= 0 THEN
        -- Named, so an operator who finds daily.enabled true knows what to change.
        PERFORM ledger_fail('LE012', 'the daily reward is paused (an amount of 0)',
            jsonb_build_object('setting', 'daily.amount_micros'));
    END IF;
    expire_days := (ledger_setting('daily.expire_days'))::bigint;
    tz := ledger_timezone();
    today := (p_now AT TIME ZONE tz)::date;
    IF p_day > today THEN
        PERFORM ledger_fail('LE010', 'a daily reward cannot be claimed before its day',
            jsonb_build_object('field', 'day'));
    END IF;
    today := coalesce(p_day, today);
    day_start := ledger_local_instant(today::timestamp, tz);
    next_claim := ledger_local_instant((today + 1)::timestamp, tz);  -- when the day ends
    -- A named day only: a claim of its own day may run after a call of a later time opened
    -- the account (the day had not ended when the claim was received).
    IF p_day IS NOT NULL AND a.created_at >= next_claim THEN
        PERFORM ledger_fail('LE010', 'the account did not exist on that day',
            jsonb_build_object('field', 'day', 'violation', 'before the account was opened'));
    END IF;
    IF ledger_daily_claimed(p_account, today, day_start, next_claim, tz) THEN
        PERFORM ledger_fail('LE011', 'today''s daily reward was claimed already',
            jsonb_build_object('next_claim_time',
                to_char(next_claim AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')));
    END IF;
    IF p_day IS NOT NULL THEN
        SELECT r.amount_micros, r.expire_days INTO run_amount, run_expire_days
          FROM daily_reward_runs r WHERE r.day = p_day;
        IF run_amount IS NOT NULL THEN
            amount := run_amount;
            expire_days := run_expire_days;
        ELSIF p_now >= next_claim THEN
            -- A day the previous release's runs set out to grant (no terms recorded), ended:
            -- the terms in force at its end.
            amount := (ledger_setting_in_force('daily.amount_micros', next_claim))::bigint;
            expire_days := (ledger_setting_in_force('daily.expire_days', next_claim))::bigint;
        END IF;
        IF amount <= 0 THEN  -- paused when the day's terms were taken: not meant to be granted
            PERFORM ledger_fail('LE012', 'the daily reward was paused for that day',
                jsonb_build_object('setting', 'daily.amount_micros'));
        END IF;
    END IF;
    l := ledger_grant_lot(
        p_account, amount, 'daily', 'main',
        CASE WHEN expire_days > 0 THEN p_now + make_interval(days => expire_days::int) END,
        NULL, 'daily reward ' || today::text, NULL, p_now);
    INSERT INTO daily_claims (account_id, claim_date, lot_id, claimed_at, day_ends_at)
    VALUES (p_account, today, l.lot_id, p_now, next_claim);
    SELECT * INTO a FROM accounts WHERE account_id = p_account;
    RETURN ledger_idempotent_store(p_account, p_key, 'claim_daily_reward', p_hash, jsonb_build_object(
        'lot', ledger_lot_json(l),
        'balance', ledger_balance_json(a, p_now),
        'next_claim_time', ledger_micros(next_claim)), p_now);
END $$;

CREATE OR REPLACE FUNCTION ledger_claim_daily_reward(
    p_account text, p_key text, p_hash bytea, p_now timestamptz) RETURNS jsonb
LANGUAGE sql AS $$
    SELECT ledger_claim_daily_reward_of_day(p_account, p_key, p_hash, NULL::date, p_now)
$$;

-- Referral rewards -------------------------------------------------------------------

-- Moves reward credits into main lots, taking reward lots in consumption order: one new
-- lot per expiry among the credits taken, so a reward that lapses still lapses on the main
-- balance (one lot of no expiry made lapsing rewards permanent, helper-54).
CREATE OR REPLACE FUNCTION ledger_transfer_reward(
    p_account text, p_key text, p_hash bytea, p_amount bigint, p_now timestamptz) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    replay jsonb;
    amount bigint;
    txn bigint;
    n int := 0;
    part record;
    l lots;
    made jsonb := '[]';
    postings_needed bigint;
    most_lots bigint;
    most_micros bigint;
BEGIN
    a := ledger_lock_account(p_account, p_now);
    replay := ledger_idempotent_replay(p_account, p_key, 'transfer_reward', p_hash);
    IF replay IS NOT NULL THEN
        RETURN replay;
    END IF;
    amount := coalesce(p_amount, a.reward_balance_micros);
    IF amount <= 0 OR amount > a.reward_balance_micros THEN
        PERFORM ledger_fail('LE020', 'the reward balance does not cover the transfer', jsonb_build_object(
            'reward_balance_micros', a.reward_balance_micros, 'requested_micros', amount));
    END IF;
    -- The entry posts a new lot per expiry and then each reward lot it takes: numbered
    -- within smallint (ledger_last_posting_no), else refused with the most one call moves.
    SELECT max(lots + expiries) FILTER (WHERE upto - unheld < amount),
           max(lots) FILTER (WHERE lots + expiries <= ledger_last_posting_no() + 1),
           max(upto) FILTER (WHERE lots + expiries <= ledger_last_posting_no() + 1)
      INTO postings_needed, most_lots, most_micros
      FROM (SELECT unheld, sum(unheld) OVER w AS upto, row_number() OVER w AS lots,
                   count(*) FILTER (WHERE first_of_expiry) OVER w AS expiries
              FROM (SELECT priority, expires_at, lot_id, remaining_micros - held_micros AS unheld,
                           row_number() OVER (PARTITION BY expires_at
                                              ORDER BY priority, expires_at, lot_id) = 1
                               AS first_of_expiry
                      FROM lots
                     WHERE account_id = p_account AND balance_kind = 'reward' AND NOT depleted
                       AND source <> 'overdraft' AND (expires_at IS NULL OR expires_at > p_now)
                       AND remaining_micros > held_micros) reward_lots
            WINDOW w AS (ORDER BY priority, expires_at, lot_id ROWS UNBOUNDED PRECEDING)) taken;
    IF postings_needed > ledger_last_posting_no() + 1 THEN
        PERFORM ledger_fail_too_many_lots(most_lots, most_micros, amount);
    END IF;
    txn := ledger_new_transaction(p_account, 'transfer', amount, p_now,
                                  p_comment => 'reward balance transferred to main');
    -- What ledger_move_out_of_lots takes below (its lots, its order), summed by expiry.
    FOR part IN
        SELECT expires_at, sum(take)::bigint AS micros
          FROM (SELECT expires_at,
                       least(unheld, amount - coalesce(sum(unheld) OVER (
                           ORDER BY priority, expires_at, lot_id
                           ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0)) AS take
                  FROM (SELECT lot_id, priority, expires_at, remaining_micros - held_micros AS unheld
                          FROM lots
                         WHERE account_id = p_account AND balance_kind = 'reward' AND NOT depleted
                           AND source <> 'overdraft' AND (expires_at IS NULL OR expires_at > p_now)
                           AND remaining_micros > held_micros) reward_lots) taken
         WHERE take > 0
         GROUP BY expires_at
         ORDER BY expires_at NULLS LAST
    LOOP
        l := ledger_add_lot(p_account, txn, n, part.micros, 'reward_transfer', 'main',
                            part.expires_at, NULL, NULL, p_now);
        made := made || jsonb_build_array(ledger_lot_json(l));
        n := n + 1;
    END LOOP;
    PERFORM ledger_move_out_of_lots(p_account, 'reward', amount, txn, n, 'transferred to main',
                                    p_now);
    UPDATE accounts SET reward_balance_micros = reward_balance_micros - amount
     WHERE account_id = p_account
    RETURNING * INTO a;
    RETURN ledger_idempotent_store(p_account, p_key, 'transfer_reward', p_hash, jsonb_build_object(
        'transferred_micros', amount,
        'lot', made -> 0,
        'lots', made,
        'transaction_id', txn::text,
        'balance', ledger_balance_json(a, p_now)), p_now);
END $$;

-- Redemption codes (seed 003) -----------------------------------------------------

CREATE OR REPLACE FUNCTION ledger_redemption_batch_json(p_batch uuid) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'batch_id', b.batch_id::text,
        'amount_micros', b.amount_micros,
        'code_count', b.code_count,
        'max_redemptions_per_code', b.max_redemptions_per_code,
        'code_expire_time', ledger_micros(b.code_expires_at),
        'credit_lifetime_seconds', extract(epoch FROM b.credit_lifetime)::bigint,
        'disabled', b.disabled,
        'note', coalesce(b.note, ''),
        'created_by', b.created_by,
        'create_time', ledger_micros(b.created_at),
        'redemption_count', (SELECT coalesce(sum(redemption_count), 0)::bigint
                               FROM redemption_codes WHERE batch_id = b.batch_id),
        'disabled_by', coalesce(b.disabled_by, ''),
        'disabled_reason', coalesce(b.disabled_reason, ''),
        'disable_time', ledger_micros(b.disabled_at),
        'account_prefix', coalesce(b.account_prefix, ''))
      FROM redemption_batches b WHERE b.batch_id = p_batch
$$;

-- Makes a batch and its codes: {batch, codes}. Idempotency is the caller's. p_account_prefix
-- NULL: any account may redeem its codes.
DROP FUNCTION IF EXISTS ledger_make_redemption_batch(
    bigint, int, int, timestamptz, interval, text, text, timestamptz);  -- called here only
CREATE OR REPLACE FUNCTION ledger_make_redemption_batch(
    p_amount bigint, p_count int, p_max_redemptions int, p_code_expires_at timestamptz,
    p_credit_lifetime interval, p_note text, p_account_prefix text, p_actor text,
    p_now timestamptz) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    batch uuid := gen_random_uuid();
    made int := 0;
BEGIN
    -- Checked here, after the callers' replay lookups: a retry sent after the codes' expiry
    -- still gets the original response (the codes it would otherwise never learn).
    IF p_code_expires_at <= p_now THEN
        PERFORM ledger_fail('LE010', 'code_expire_time is not in the future', jsonb_build_object(
            'field', 'code_expire_time', 'violation', 'must be in the future'));
    END IF;
    INSERT INTO redemption_batches (batch_id, amount_micros, code_count, max_redemptions_per_code,
                                    code_expires_at, credit_lifetime, note, account_prefix,
                                    created_by, created_at)
    VALUES (batch, p_amount, p_count, p_max_redemptions, p_code_expires_at, p_credit_lifetime,
            nullif(p_note, ''), nullif(p_account_prefix, ''), p_actor, p_now);
    WHILE made < p_count LOOP
        INSERT INTO redemption_codes (code, batch_id, max_redemptions)
        SELECT ledger_random_code(16), batch, p_max_redemptions
          FROM generate_series(1, p_count - made)
        ON CONFLICT (code) DO NOTHING;  -- a collision just draws again
        SELECT count(*) INTO made FROM redemption_codes WHERE batch_id = batch;
    END LOOP;
    RETURN jsonb_build_object(
        'batch', ledger_redemption_batch_json(batch),
        'codes', (SELECT jsonb_agg(code ORDER BY code) FROM redemption_codes WHERE batch_id = batch));
END $$;

-- CreateRedemptionBatch, run by admin_requests.once in the transaction that claimed the key
-- in admin_requests (one key namespace for every administrator's change). Releases before
-- it kept a batch's key in idempotency_keys under the pseudo-account '@admin' (the previous
-- release's servers still do, in ledger_create_redemption_batch below): such a record of
-- the key is answered (replayed: true) or refused as a different request, so the retry of a
-- batch made there makes no second one. Only batch records count: an account named '@admin'
-- keeps its own keys. The advisory lock is the one ledger_create_redemption_batch takes, so
-- a batch an old server is making under this key commits before the lookup, and one made
-- here commits before that server looks in admin_requests.
CREATE OR REPLACE FUNCTION ledger_create_redemption_batch_for_admin_request(
    p_key text, p_hash bytea, p_amount bigint, p_count int, p_max_redemptions int,
    p_code_expires_at timestamptz, p_credit_lifetime interval, p_note text,
    p_account_prefix text, p_actor text, p_now timestamptz) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    legacy idempotency_keys;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('@admin:' || p_key, 0));
    SELECT * INTO legacy FROM idempotency_keys
     WHERE account_id = '@admin' AND idempotency_key = p_key
       AND operation = 'create_redemption_batch';
    IF FOUND THEN
        IF legacy.request_hash <> p_hash THEN
            PERFORM ledger_fail('LE002', 'idempotency key was used for a different request',
                jsonb_build_object('idempotency_key', p_key, 'original_operation', legacy.operation));
        END IF;
        RETURN legacy.response || jsonb_build_object('replayed', true);
    END IF;
    RETURN ledger_make_redemption_batch(p_amount, p_count, p_max_redemptions, p_code_expires_at,
                                        p_credit_lifetime, p_note, p_account_prefix, p_actor,
                                        p_now)
           || jsonb_build_object('replayed', false);
END $$;

-- The previous release's form, without an account prefix (its servers keep working during a
-- rolling deploy): a batch for any account.
CREATE OR REPLACE FUNCTION ledger_create_redemption_batch_for_admin_request(
    p_key text, p_hash bytea, p_amount bigint, p_count int, p_max_redemptions int,
    p_code_expires_at timestamptz, p_credit_lifetime interval, p_note text, p_actor text,
    p_now timestamptz) RETURNS jsonb
LANGUAGE sql AS $$
    SELECT ledger_create_redemption_batch_for_admin_request(
        p_key, p_hash, p_amount, p_count, p_max_redemptions, p_code_expires_at,
        p_credit_lifetime, p_note, NULL, p_actor, p_now)
$$;

-- The form of the previous release (its key in idempotency_keys under '@admin', an advisory
-- lock on the key standing in for an account row lock), kept so that its servers keep
-- working during a rolling deploy; drop it in the release after. A key admin_requests holds
-- is refused: it is this release's (a batch or another change), and a retry of its batch
-- made here would make a second one.
CREATE OR REPLACE FUNCTION ledger_create_redemption_batch(
    p_key text, p_hash bytea, p_amount bigint, p_count int, p_max_redemptions int,
    p_code_expires_at timestamptz, p_credit_lifetime interval, p_note text, p_actor text,
    p_now timestamptz) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    scope constant text := '@admin';
    replay jsonb;
    holder text;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended(scope || ':' || p_key, 0));
    replay := ledger_idempotent_replay(scope, p_key, 'create_redemption_batch', p_hash);
    IF replay IS NOT NULL THEN
        RETURN replay;
    END IF;
    SELECT operation INTO holder FROM admin_requests WHERE idempotency_key = p_key;
    IF FOUND THEN
        PERFORM ledger_fail('LE002', 'idempotency key was used by a request to a newer server',
            jsonb_build_object('idempotency_key', p_key, 'original_operation', holder));
    END IF;
    RETURN ledger_idempotent_store(scope, p_key, 'create_redemption_batch', p_hash,
        ledger_make_redemption_batch(p_amount, p_count, p_max_redemptions, p_code_expires_at,
                                     p_credit_lifetime, p_note, NULL, p_actor, p_now),
        p_now);
END $$;

-- NULL when there is no such batch. Redemptions already made stand. A batch disabled
-- already keeps who disabled it, why and when: the record of the first disable is the one
-- that stopped the codes, and nothing else keeps it.
CREATE OR REPLACE FUNCTION ledger_disable_redemption_batch(
    p_batch uuid, p_actor text, p_reason text, p_now timestamptz) RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE redemption_batches
       SET disabled = true, disabled_by = p_actor, disabled_reason = p_reason, disabled_at = p_now
     WHERE batch_id = p_batch AND NOT disabled;
    RETURN ledger_redemption_batch_json(p_batch);
END $$;

CREATE OR REPLACE FUNCTION ledger_redeem(
    p_account text, p_key text, p_hash bytea, p_code text, p_now timestamptz) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    replay jsonb;
    c redemption_codes;
    b redemption_batches;
    l lots;
BEGIN
    PERFORM ledger_open_account(p_account, '', p_now);
    a := ledger_lock_account(p_account, p_now);
    replay := ledger_idempotent_replay(p_account, p_key, 'redeem', p_hash);
    IF replay IS NOT NULL THEN
        RETURN replay;
    END IF;
    -- Lock order: the account, the code row every redeemer of the code updates, its batch.
    SELECT * INTO c FROM redemption_codes WHERE code = p_code FOR UPDATE;
    IF FOUND THEN
        -- Shared: a disable in flight is waited for and then seen, and a disable waits for
        -- the redemptions in flight, so none commits after DisableRedemptionBatch has answered.
        SELECT * INTO b FROM redemption_batches WHERE batch_id = c.batch_id FOR SHARE;
    END IF;
    -- A batch made for another tenant's accounts is as unknown as a wrong code.
    IF NOT FOUND OR NOT starts_with(p_account, coalesce(b.account_prefix, '')) THEN
        PERFORM ledger_fail('LE015', 'no such redemption code', jsonb_build_object('code', p_code));
    END IF;
    IF b.disabled THEN
        PERFORM ledger_fail('LE017', 'the redemption code is disabled', jsonb_build_object('code', p_code));
    END IF;
    IF b.code_expires_at <= p_now THEN
        PERFORM ledger_fail('LE016', 'the redemption code expired', jsonb_build_object('code', p_code,
            'expire_time', to_char(b.code_expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')));
    END IF;
    IF EXISTS (SELECT 1 FROM redemptions WHERE account_id = p_account AND code = p_code) THEN
        PERFORM ledger_fail('LE019', 'this account redeemed the code already',
            jsonb_build_object('code', p_code));
    END IF;
    IF c.redemption_count >= c.max_redemptions THEN
        PERFORM ledger_fail('LE018', 'the redemption code has been used up', jsonb_build_object('code', p_code));
    END IF;
    UPDATE redemption_codes SET redemption_count = redemption_count + 1 WHERE code = p_code;
    l := ledger_grant_lot(p_account, b.amount_micros, 'redemption', 'main', p_now + b.credit_lifetime,
                          p_code, 'redemption code', NULL, p_now);
    INSERT INTO redemptions (account_id, code, lot_id, redeemed_at) VALUES (p_account, p_code, l.lot_id, p_now);
    SELECT * INTO a FROM accounts WHERE account_id = p_account;
    RETURN ledger_idempotent_store(p_account, p_key, 'redeem', p_hash, jsonb_build_object(
        'lot', ledger_lot_json(l), 'balance', ledger_balance_json(a, p_now)), p_now);
END $$;

-- Admin debit -----------------------------------------------------------------------

CREATE OR REPLACE FUNCTION ledger_adjust_balance(
    p_account text, p_key text, p_hash bytea, p_amount bigint, p_reason text, p_actor text,
    p_now timestamptz) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    after accounts;
    a accounts;
    replay jsonb;
    alert bigint;
    txn bigint;
BEGIN
    a := ledger_lock_account(p_account, p_now);
    replay := ledger_idempotent_replay(p_account, p_key, 'adjust_balance', p_hash);
    IF replay IS NOT NULL THEN
        RETURN replay;
    END IF;
    PERFORM ledger_require_available(a, p_amount);
    txn := ledger_new_transaction(p_account, 'adjustment', -p_amount, p_now, NULL, NULL, p_reason, p_actor);
    PERFORM ledger_take_lots(p_account, NULL, p_amount, p_now, txn, 'adjustment');
    UPDATE accounts SET balance_micros = balance_micros - p_amount WHERE account_id = p_account
    RETURNING * INTO after;
    alert := ledger_low_balance_check(after, a.balance_micros, txn, p_now);  -- 0006
    RETURN ledger_idempotent_store(p_account, p_key, 'adjust_balance', p_hash, jsonb_build_object(
        'transaction_id', txn::text, 'low_balance_alert_id', alert,
        'balance', ledger_balance_json(after, p_now)), p_now);
END $$;

-- Paid credits: packs, recharges, subscriptions --------------------------------------

CREATE OR REPLACE FUNCTION ledger_require_unfulfilled(p_account text, p_external_ref text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(p_external_ref, '') <> ''
       AND EXISTS (SELECT 1 FROM purchases WHERE account_id = p_account AND external_ref = p_external_ref) THEN
        PERFORM ledger_fail('LE025', 'this payment was fulfilled already',
            jsonb_build_object('external_ref', p_external_ref));
    END IF;
END $$;

CREATE OR REPLACE FUNCTION ledger_purchase_pack(
    p_account text, p_key text, p_hash bytea, p_pack text, p_external_ref text, p_now timestamptz)
    RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    replay jsonb;
    p credit_packs;
BEGIN
    PERFORM ledger_open_account(p_account, '', p_now);
    a := ledger_lock_account(p_account, p_now);
    replay := ledger_idempotent_replay(p_account, p_key, 'purchase_pack', p_hash);
    IF replay IS NOT NULL THEN
        RETURN replay;
    END IF;
    SELECT * INTO p FROM credit_packs WHERE pack_id = p_pack;
    IF NOT FOUND THEN
        PERFORM ledger_fail('LE021', 'no such credit pack', jsonb_build_object('pack_id', p_pack));
    END IF;
    IF NOT p.active THEN
        PERFORM ledger_fail('LE022', 'the credit pack is not on sale', jsonb_build_object('pack_id', p_pack));
    END IF;
    IF NOT (ledger_setting('purchase.allow_free_users'))::boolean
       AND NOT EXISTS (SELECT 1 FROM subscriptions s
                        WHERE s.account_id = p_account AND ledger_subscribed(s, p_now)) THEN
        PERFORM ledger_fail('LE023', 'only subscribers may buy credit packs',
            jsonb_build_object('setting', 'purchase.allow_free_users'));
    END IF;
    RETURN ledger_idempotent_store(p_account, p_key, 'purchase_pack', p_hash,
        ledger_sell_pack(p_account, p.pack_id, p.credits_micros, p.price_minor, p.currency,
                         p_external_ref, p_now), p_now);
END $$;

-- Grants what a pack sold (its credits, price and currency as sold) and records the
-- purchase, once per payment; the answer of PurchasePack. Call with the account locked.
CREATE OR REPLACE FUNCTION ledger_sell_pack(
    p_account text, p_pack text, p_credits bigint, p_price_minor bigint, p_currency text,
    p_external_ref text, p_now timestamptz) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    l lots;
BEGIN
    PERFORM ledger_require_unfulfilled(p_account, p_external_ref);
    l := ledger_grant_lot(p_account, p_credits, 'purchase', 'main', NULL, p_external_ref,
                          'credit pack ' || p_pack, NULL, p_now);
    INSERT INTO purchases (account_id, kind, pack_id, amount_minor, currency, credits_micros, lot_id,
                           external_ref, created_at)
    VALUES (p_account, 'pack', p_pack, p_price_minor, p_currency, p_credits, l.lot_id,
            nullif(p_external_ref, ''), p_now);
    SELECT * INTO a FROM accounts WHERE account_id = p_account;
    RETURN jsonb_build_object(
        'lot', ledger_lot_json(l),
        'transaction_id', l.grant_transaction_id::text,
        'balance', ledger_balance_json(a, p_now));
END $$;

-- Its first form, which named the fields of Recharge only.
DROP FUNCTION IF EXISTS ledger_recharge_quote(bigint, text);

-- Seed 002: credits for an amount paid, with the highest bonus tier it reaches. The fields
-- are named with p_field_prefix ('recharge.' for a checkout session).
CREATE OR REPLACE FUNCTION ledger_recharge_quote(
    p_amount_minor bigint, p_currency text, p_field_prefix text DEFAULT '') RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    currency text := ledger_setting('recharge.currency') #>> '{}';
    minimum bigint := (ledger_setting('recharge.minimum_minor'))::bigint;
    rate bigint := (ledger_setting('recharge.micros_per_minor_unit'))::bigint;
    -- validation.MAX_AMOUNT_MICROS: the most one request grants (one lot).
    most_micros constant numeric := 1000000000000000;
    bonus bigint;
BEGIN
    IF upper(p_currency) <> currency THEN
        PERFORM ledger_fail('LE010', 'unsupported currency', jsonb_build_object(
            'field', p_field_prefix || 'currency', 'violation', 'recharges are in ' || currency));
    END IF;
    IF p_amount_minor < minimum THEN
        PERFORM ledger_fail('LE010', 'below the minimum recharge', jsonb_build_object(
            'field', p_field_prefix || 'amount_minor',
            'violation', 'must be at least ' || minimum || ' (minor units)'));
    END IF;
    -- In numeric: the product of two bigints may not fit one.
    IF p_amount_minor::numeric * rate > most_micros THEN
        PERFORM ledger_fail('LE010', 'above the largest recharge', jsonb_build_object(
            'field', p_field_prefix || 'amount_minor',
            'violation', 'must be at most ' || floor(most_micros / greatest(rate, 1))
                         || ' (minor units): it would buy more than '
                         || most_micros || ' micro-credits'));
    END IF;
    SELECT t.bonus_micros INTO bonus
      FROM jsonb_to_recordset(ledger_setting('recharge.bonus_tiers')) AS t(min_minor bigint, bonus_micros bigint)
     WHERE t.min_minor <= p_amount_minor
     ORDER BY t.min_minor DESC
     LIMIT 1;
    RETURN jsonb_build_object('credits_micros', p_amount_minor * rate,
                              'bonus_micros', coalesce(bonus, 0),
                              'minimum_minor', minimum);
END $$;

CREATE OR REPLACE FUNCTION ledger_recharge(
    p_account text, p_key text, p_hash bytea, p_amount_minor bigint, p_currency text,
    p_external_ref text, p_now timestamptz) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    replay jsonb;
    quote jsonb;
BEGIN
    PERFORM ledger_open_account(p_account, '', p_now);
    a := ledger_lock_account(p_account, p_now);
    replay := ledger_idempotent_replay(p_account, p_key, 'recharge', p_hash);
    IF replay IS NOT NULL THEN
        RETURN replay;
    END IF;
    quote := ledger_recharge_quote(p_amount_minor, p_currency);
    RETURN ledger_idempotent_store(p_account, p_key, 'recharge', p_hash,
        ledger_sell_recharge(p_account, p_amount_minor, p_currency,
                             (quote ->> 'credits_micros')::bigint,
                             (quote ->> 'bonus_micros')::bigint, p_external_ref, p_now), p_now);
END $$;

-- Grants what a recharge sold (its credits and bonus as quoted) and records the purchase,
-- once per payment; the answer of Recharge. Call with the account locked.
CREATE OR REPLACE FUNCTION ledger_sell_recharge(
    p_account text, p_amount_minor bigint, p_currency text, p_credits bigint, p_bonus bigint,
    p_external_ref text, p_now timestamptz) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    txn bigint;
    l lots;
    bl lots;
BEGIN
    PERFORM ledger_require_unfulfilled(p_account, p_external_ref);
    txn := ledger_new_transaction(p_account, 'grant', p_credits + p_bonus, p_now, NULL, NULL,
                                  'recharge ' || p_amount_minor || ' ' || upper(p_currency), NULL,
                                  p_external_ref);
    l := ledger_add_lot(p_account, txn, 0, p_credits, 'recharge', 'main', NULL, p_external_ref, NULL, p_now);
    PERFORM ledger_post(p_account, txn, 1, 'issuance:recharge', NULL, 'recharge', -p_credits);
    IF p_bonus > 0 THEN
        bl := ledger_add_lot(p_account, txn, 2, p_bonus, 'recharge_bonus', 'main', NULL, p_external_ref,
                             l.lot_id, p_now);
        PERFORM ledger_post(p_account, txn, 3, 'issuance:recharge_bonus', NULL, 'recharge_bonus', -p_bonus);
    END IF;
    INSERT INTO purchases (account_id, kind, amount_minor, currency, credits_micros, bonus_micros,
                           lot_id, bonus_lot_id, external_ref, created_at)
    VALUES (p_account, 'recharge', p_amount_minor, upper(p_currency), p_credits, p_bonus, l.lot_id,
            bl.lot_id, nullif(p_external_ref, ''), p_now);
    SELECT * INTO a FROM accounts WHERE account_id = p_account;
    RETURN jsonb_build_object(
        'lot', ledger_lot_json(l),
        'bonus_lot', CASE WHEN bl.lot_id IS NULL THEN 'null'::jsonb ELSE ledger_lot_json(bl) END,
        'transaction_id', txn::text,
        'balance', ledger_balance_json(a, p_now));
END $$;

CREATE OR REPLACE FUNCTION ledger_subscription_json(p_account text, p_now timestamptz) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT ledger_account_json(p_account, p_now) -> 'subscription'
$$;

-- Records the period and grants the plan's credits for it, expiring at its end. A period
-- paid for but applied only after it ended (an invoice paid late, on terms or after the
-- provider's retries, or a worker outage) grants its credits for as long as the period
-- lasted, from now: the payment is never refused for good, and the customer gets what was
-- paid for (helper-85: such an invoice.paid failed and was retried for ever).
CREATE OR REPLACE FUNCTION ledger_grant_subscription_period(
    p_account text, p_plan subscription_plans, p_start timestamptz, p_end timestamptz,
    p_external_ref text, p_subscription_ref text, p_now timestamptz) RETURNS lots
LANGUAGE plpgsql AS $$
DECLARE
    l lots;
    credits_end timestamptz := CASE WHEN p_end <= p_now THEN p_now + (p_end - p_start)
                                    ELSE p_end END;
BEGIN
    PERFORM ledger_require_unfulfilled(p_account, p_external_ref);
    -- The account's subscription is its latest period's: a late paid invoice of an older
    -- period (of an ended subscription, say) grants its credits and leaves the row alone.
    INSERT INTO subscriptions (account_id, plan_id, current_period_start, current_period_end,
                               external_ref, updated_at)
    VALUES (p_account, p_plan.plan_id, p_start, p_end, nullif(p_subscription_ref, ''), p_now)
    ON CONFLICT (account_id) DO UPDATE
        SET plan_id = excluded.plan_id, current_period_start = excluded.current_period_start,
            current_period_end = excluded.current_period_end,
            external_ref = coalesce(excluded.external_ref, subscriptions.external_ref),
            -- Another subscription of the account has not ended; the same one stays ended.
            ended_at = CASE WHEN excluded.external_ref IS DISTINCT FROM subscriptions.external_ref
                            THEN NULL ELSE subscriptions.ended_at END,
            updated_at = excluded.updated_at
        WHERE excluded.current_period_start >= subscriptions.current_period_start;
    IF p_plan.credits_micros > 0 THEN
        l := ledger_grant_lot(p_account, p_plan.credits_micros, 'subscription', 'main', credits_end,
                              p_external_ref, 'subscription ' || p_plan.plan_id, NULL, p_now);
        INSERT INTO purchases (account_id, kind, plan_id, amount_minor, currency, credits_micros,
                               lot_id, external_ref, created_at, period_start)
        VALUES (p_account, 'subscription', p_plan.plan_id, p_plan.price_minor, p_plan.currency,
                p_plan.credits_micros, l.lot_id, nullif(p_external_ref, ''), p_now, p_start);
    END IF;
    RETURN l;
END $$;

CREATE OR REPLACE FUNCTION ledger_find_plan(p_plan text) RETURNS subscription_plans
LANGUAGE plpgsql STABLE AS $$
DECLARE
    p subscription_plans;
BEGIN
    SELECT * INTO p FROM subscription_plans WHERE plan_id = p_plan;
    IF NOT FOUND THEN
        PERFORM ledger_fail('LE024', 'no such subscription plan', jsonb_build_object('plan_id', p_plan));
    END IF;
    RETURN p;
END $$;

CREATE OR REPLACE FUNCTION ledger_start_subscription_period(
    p_account text, p_key text, p_hash bytea, p_plan text, p_start timestamptz, p_end timestamptz,
    p_external_ref text, p_subscription_ref text, p_now timestamptz) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    replay jsonb;
    plan subscription_plans;
    l lots;
BEGIN
    PERFORM ledger_open_account(p_account, '', p_now);
    a := ledger_lock_account(p_account, p_now);
    replay := ledger_idempotent_replay(p_account, p_key, 'start_subscription_period', p_hash);
    IF replay IS NOT NULL THEN
        RETURN replay;
    END IF;
    plan := ledger_find_plan(p_plan);
    l := ledger_grant_subscription_period(p_account, plan, p_start, p_end, p_external_ref,
                                          p_subscription_ref, p_now);
    SELECT * INTO a FROM accounts WHERE account_id = p_account;
    RETURN ledger_idempotent_store(p_account, p_key, 'start_subscription_period', p_hash, jsonb_build_object(
        'lot', CASE WHEN l.lot_id IS NULL THEN 'null'::jsonb ELSE ledger_lot_json(l) END,
        'subscription', ledger_subscription_json(p_account, p_now),
        'balance', ledger_balance_json(a, p_now)), p_now);
END $$;

-- A plan change within the period whose credits an earlier change granted (A to B, back
-- to A, then B again: the worker's reference for B was fulfilled already): the plan is B
-- again, nothing more is granted. Under the account lock, the first lock of every change.
-- Also the move within the period that ledger_change_subscription_plan grants nothing for.
CREATE OR REPLACE FUNCTION ledger_record_subscription_plan(
    p_account text, p_plan text, p_start timestamptz, p_now timestamptz,
    p_subscription_ref text DEFAULT '') RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM ledger_lock_account(p_account, p_now);
    UPDATE subscriptions
       SET plan_id = (ledger_find_plan(p_plan)).plan_id, updated_at = p_now,
           external_ref = coalesce(nullif(p_subscription_ref, ''), external_ref)
     WHERE account_id = p_account AND current_period_start = p_start;
END $$;

-- A subscription ended (customer.subscription.deleted: cancelled at once, at the end of its
-- period, or for want of payment): the account is a subscriber no longer from p_ended_at,
-- whatever period it had paid for. The credits that period granted stay: they were paid
-- for, and a refund of the payment takes back what is unspent. Only the subscription that
-- ended: a newer one of the account (another subscription id) is left alone. Returns
-- whether it ended a period early.
CREATE OR REPLACE FUNCTION ledger_end_subscription(
    p_account text, p_subscription_ref text, p_ended_at timestamptz, p_now timestamptz)
    RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    shortened boolean;
BEGIN
    IF NOT EXISTS (SELECT FROM accounts WHERE account_id = p_account) THEN
        RETURN false;
    END IF;
    -- The account first, then its subscription: a period an invoice's job is granting (its
    -- row not committed yet) is waited for and then ended, not missed (helper-49's review).
    PERFORM ledger_lock_account(p_account, p_now);
    UPDATE subscriptions
       -- A period ends after it starts (subscriptions_period_ordered): one that ended as it
       -- began lasts a microsecond.
       SET current_period_end = greatest(p_ended_at, current_period_start + interval '1 microsecond'),
           updated_at = p_now
     WHERE account_id = p_account AND external_ref = p_subscription_ref
       AND current_period_end > greatest(p_ended_at, current_period_start + interval '1 microsecond');
    shortened := FOUND;
    -- Ended after its period (unpaid after the provider's retries): no grace any more.
    UPDATE subscriptions SET ended_at = p_ended_at, updated_at = p_now
     WHERE account_id = p_account AND external_ref = p_subscription_ref AND ended_at IS NULL;
    RETURN shortened OR FOUND;
END $$;

-- Seed 001: on an upgrade, the unused credits of the current subscription lots
-- move (one TRANSFER) into a carry-over lot that lasts the new period; then the new
-- plan's credits are granted. A downgrade or a move to an equal rank carries nothing; made
-- within the current period it grants nothing either (that period's credits were granted
-- already, and nothing more was paid): the new plan is recorded and its credits come with
-- the next period's paid invoice. So does a move back up to a plan no higher than one this
-- period was granted already (pro, basic, pro again: pro's credits once).
CREATE OR REPLACE FUNCTION ledger_change_subscription_plan(
    p_account text, p_key text, p_hash bytea, p_plan text, p_start timestamptz, p_end timestamptz,
    p_external_ref text, p_subscription_ref text, p_now timestamptz) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    replay jsonb;
    plan subscription_plans;
    old_rank int;
    old_start timestamptz;
    old_end timestamptz;
    granted_rank int;
    carried bigint := 0;
    take bigint;
    txn bigint;
    n int := 1;
    r record;
    carry lots;
    l lots;
BEGIN
    PERFORM ledger_open_account(p_account, '', p_now);
    a := ledger_lock_account(p_account, p_now);
    replay := ledger_idempotent_replay(p_account, p_key, 'change_subscription_plan', p_hash);
    IF replay IS NOT NULL THEN
        RETURN replay;
    END IF;
    plan := ledger_find_plan(p_plan);
    SELECT sp.rank, s.current_period_start, s.current_period_end INTO old_rank, old_start, old_end
      FROM subscriptions s JOIN subscription_plans sp ON sp.plan_id = s.plan_id
     WHERE s.account_id = p_account;
    -- The highest plan whose credits this period got: a move back up to it, or to anything
    -- below it, grants nothing again. By the period each payment recorded, not by its lots'
    -- expiry: a period applied after it ended granted lots that last its length from then
    -- (ledger_grant_subscription_period). Payments recorded before migration 0040 are found
    -- by their lots lasting to the period's end.
    SELECT max(sp.rank) INTO granted_rank
      FROM purchases pu
      JOIN subscription_plans sp ON sp.plan_id = pu.plan_id
      JOIN lots granted ON granted.account_id = pu.account_id AND granted.lot_id = pu.lot_id
     WHERE pu.account_id = p_account AND pu.kind = 'subscription'
       AND (pu.period_start = old_start
            OR (pu.period_start IS NULL AND granted.expires_at = old_end));
    IF old_rank IS NOT NULL AND p_start = old_start
       AND plan.rank <= greatest(old_rank, granted_rank) THEN
        -- A payment reference used before is refused as anywhere else.
        PERFORM ledger_require_unfulfilled(p_account, p_external_ref);
        PERFORM ledger_record_subscription_plan(p_account, plan.plan_id, p_start, p_now,
                                                p_subscription_ref);
    ELSE
        -- A change paid for but applied after its period ended (paid late, a worker outage)
        -- grants the period as any late period (ledger_grant_subscription_period) and carries
        -- nothing over: the unused credits it would have moved expired with their period
        -- (helper-92: such an invoice failed and was retried for ever).
        IF old_rank IS NOT NULL AND plan.rank > old_rank AND p_end > p_now THEN
            SELECT coalesce(sum(remaining_micros - held_micros), 0) INTO carried
              FROM lots
             WHERE account_id = p_account AND balance_kind = 'main'
               AND source IN ('subscription', 'subscription_carry_over')
               AND remaining_micros > held_micros AND (expires_at IS NULL OR expires_at > p_now);
        END IF;
        IF carried > 0 THEN
            txn := ledger_new_transaction(p_account, 'transfer', carried, p_now,
                                          p_comment => 'plan upgrade to ' || plan.plan_id
                                                       || ': unused subscription credits carried over');
            -- The old lots are emptied before the new one is added: adding a lot may pay an
            -- overdraft debt from the spendable credits (ledger_settle_overdraft), which must
            -- not reach the credits being moved.
            FOR r IN
                SELECT lot_id, source, remaining_micros - held_micros AS unused FROM lots
                 WHERE account_id = p_account AND balance_kind = 'main'
                   AND source IN ('subscription', 'subscription_carry_over')
                   AND remaining_micros > held_micros AND (expires_at IS NULL OR expires_at > p_now)
                 ORDER BY lot_id
                   FOR UPDATE
            LOOP
                UPDATE lots SET remaining_micros = remaining_micros - r.unused
                 WHERE account_id = p_account AND lot_id = r.lot_id;
                PERFORM ledger_post(p_account, txn, n, 'account:main', r.lot_id, r.source, -r.unused,
                                    'carried over to the new period');
                n := n + 1;
            END LOOP;
            UPDATE accounts SET balance_micros = balance_micros - carried WHERE account_id = p_account;
            carry := ledger_add_lot(p_account, txn, 0, carried, 'subscription_carry_over', 'main', p_end,
                                    p_external_ref, NULL, p_now);
        END IF;
        l := ledger_grant_subscription_period(p_account, plan, p_start, p_end, p_external_ref,
                                              p_subscription_ref, p_now);
    END IF;
    SELECT * INTO a FROM accounts WHERE account_id = p_account;
    RETURN ledger_idempotent_store(p_account, p_key, 'change_subscription_plan', p_hash, jsonb_build_object(
        'lot', CASE WHEN l.lot_id IS NULL THEN 'null'::jsonb ELSE ledger_lot_json(l) END,
        'carry_over_lot', CASE WHEN carry.lot_id IS NULL THEN 'null'::jsonb ELSE ledger_lot_json(carry) END,
        'carried_over_micros', carried,
        'subscription', ledger_subscription_json(p_account, p_now),
        'balance', ledger_balance_json(a, p_now)), p_now);
END $$;
