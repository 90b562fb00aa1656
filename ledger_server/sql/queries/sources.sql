-- Named queries for the credit sources: LedgerService account calls, BillingService
-- and AdminService. Operations that move credits are one call into a function of
-- sql/functions/0002_sources.sql.

-- name: create_account
SELECT ledger_create_account(%(account_id)s::text, %(key)s::text, %(hash)s::bytea,
                             %(referral_code)s::text, %(now)s::timestamptz)

-- name: get_account
SELECT ledger_get_account(%(account_id)s::text, %(now)s::timestamptz)

-- name: referral_code_owner
SELECT account_id FROM accounts WHERE referral_code = %(code)s

-- name: claim_daily_reward
SELECT ledger_claim_daily_reward(%(account_id)s::text, %(key)s::text, %(hash)s::bytea,
                                 %(now)s::timestamptz)

-- name: claim_daily_reward_of_day
SELECT ledger_claim_daily_reward_of_day(%(account_id)s::text, %(key)s::text, %(hash)s::bytea,
                                        %(day)s::date, %(now)s::timestamptz)

-- name: redeem
SELECT ledger_redeem(%(account_id)s::text, %(key)s::text, %(hash)s::bytea, %(code)s::text,
                     %(now)s::timestamptz)

-- name: transfer_reward
SELECT ledger_transfer_reward(%(account_id)s::text, %(key)s::text, %(hash)s::bytea,
                              %(amount)s::bigint, %(now)s::timestamptz)

-- name: purchase_pack
SELECT ledger_purchase_pack(%(account_id)s::text, %(key)s::text, %(hash)s::bytea,
                            %(pack_id)s::text, %(external_ref)s::text, %(now)s::timestamptz)

-- name: quote_recharge
SELECT ledger_recharge_quote(%(amount_minor)s::bigint, %(currency)s::text)

-- name: recharge
SELECT ledger_recharge(%(account_id)s::text, %(key)s::text, %(hash)s::bytea,
                       %(amount_minor)s::bigint, %(currency)s::text, %(external_ref)s::text,
                       %(now)s::timestamptz)

-- name: start_subscription_period
SELECT ledger_start_subscription_period(%(account_id)s::text, %(key)s::text, %(hash)s::bytea,
                                        %(plan_id)s::text, %(period_start)s::timestamptz,
                                        %(period_end)s::timestamptz, %(external_ref)s::text,
                                        %(subscription_ref)s::text, %(now)s::timestamptz)

-- name: change_subscription_plan
SELECT ledger_change_subscription_plan(%(account_id)s::text, %(key)s::text, %(hash)s::bytea,
                                       %(plan_id)s::text, %(period_start)s::timestamptz,
                                       %(period_end)s::timestamptz, %(external_ref)s::text,
                                       %(subscription_ref)s::text, %(now)s::timestamptz)

-- name: adjust_balance
SELECT ledger_adjust_balance(%(account_id)s::text, %(key)s::text, %(hash)s::bytea,
                             %(amount)s::bigint, %(reason)s::text, %(actor)s::text,
                             %(now)s::timestamptz)

-- name: list_credit_packs
SELECT pack_id, translation_key, credits_micros, price_minor, currency,
       coalesce(provider_price_id, ''), active, ledger_micros(created_at), ledger_micros(updated_at)
  FROM credit_packs
 WHERE active OR %(include_inactive)s::boolean
 ORDER BY price_minor, pack_id

-- name: insert_credit_pack
INSERT INTO credit_packs (pack_id, translation_key, credits_micros, price_minor, currency,
                          provider_price_id, active, created_at, updated_at, updated_by)
VALUES (%(pack_id)s, %(translation_key)s, %(credits_micros)s, %(price_minor)s, %(currency)s,
        nullif(%(provider_price_id)s, ''), %(active)s, %(now)s, %(now)s, %(actor)s)
ON CONFLICT (pack_id) DO NOTHING
RETURNING pack_id, translation_key, credits_micros, price_minor, currency,
          coalesce(provider_price_id, ''), active, ledger_micros(created_at), ledger_micros(updated_at)

-- name: lock_credit_pack
-- Before update_credit_pack: the fields an update does not name keep these values, so no
-- other update may change them until it commits.
SELECT pack_id, translation_key, credits_micros, price_minor, currency,
       coalesce(provider_price_id, ''), active, ledger_micros(created_at), ledger_micros(updated_at)
  FROM credit_packs
 WHERE pack_id = %(pack_id)s
   FOR UPDATE

-- name: update_credit_pack
UPDATE credit_packs
   SET translation_key = %(translation_key)s, credits_micros = %(credits_micros)s,
       price_minor = %(price_minor)s, currency = %(currency)s,
       provider_price_id = nullif(%(provider_price_id)s, ''), active = %(active)s,
       updated_at = %(now)s, updated_by = %(actor)s
 WHERE pack_id = %(pack_id)s
RETURNING pack_id, translation_key, credits_micros, price_minor, currency,
          coalesce(provider_price_id, ''), active, ledger_micros(created_at), ledger_micros(updated_at)

-- name: list_subscription_plans
SELECT plan_id, translation_key, credits_micros, period_unit, period_count, rank, price_minor,
       currency, coalesce(provider_price_id, ''), active
  FROM subscription_plans
 WHERE active OR %(include_inactive)s::boolean
 ORDER BY rank, plan_id

-- name: insert_subscription_plan
INSERT INTO subscription_plans (plan_id, translation_key, credits_micros, period_unit, period_count,
                                rank, price_minor, currency, provider_price_id, active, created_at,
                                updated_at, updated_by)
VALUES (%(plan_id)s, %(translation_key)s, %(credits_micros)s, %(period_unit)s, %(period_count)s,
        %(rank)s, %(price_minor)s, %(currency)s, nullif(%(provider_price_id)s, ''), %(active)s,
        %(now)s, %(now)s, %(actor)s)
ON CONFLICT (plan_id) DO NOTHING
RETURNING plan_id, translation_key, credits_micros, period_unit, period_count, rank, price_minor,
          currency, coalesce(provider_price_id, ''), active

-- name: require_plan_price_change_allowed
SELECT ledger_require_plan_price_change_allowed(%(plan_id)s::text, %(provider_price_id)s::text,
                                                %(now)s::timestamptz)

-- name: lock_subscription_plan
-- Before update_subscription_plan, as lock_credit_pack.
SELECT plan_id, translation_key, credits_micros, period_unit, period_count, rank, price_minor,
       currency, coalesce(provider_price_id, ''), active
  FROM subscription_plans
 WHERE plan_id = %(plan_id)s
   FOR UPDATE

-- name: update_subscription_plan
UPDATE subscription_plans
   SET translation_key = %(translation_key)s, credits_micros = %(credits_micros)s,
       period_unit = %(period_unit)s, period_count = %(period_count)s, rank = %(rank)s,
       price_minor = %(price_minor)s, currency = %(currency)s,
       provider_price_id = nullif(%(provider_price_id)s, ''), active = %(active)s,
       updated_at = %(now)s, updated_by = %(actor)s
 WHERE plan_id = %(plan_id)s
RETURNING plan_id, translation_key, credits_micros, period_unit, period_count, rank, price_minor,
          currency, coalesce(provider_price_id, ''), active

-- name: create_redemption_batch
SELECT ledger_create_redemption_batch_for_admin_request(
    %(key)s::text, %(hash)s::bytea, %(amount)s::bigint, %(count)s::int,
    %(max_redemptions)s::int, %(code_expires_at)s::timestamptz, %(credit_lifetime)s::interval,
    %(note)s::text, %(account_prefix)s::text, %(actor)s::text, %(now)s::timestamptz)

-- name: disable_redemption_batch
SELECT ledger_disable_redemption_batch(%(batch_id)s::uuid, %(actor)s::text, %(reason)s::text,
                                       %(now)s::timestamptz)

-- name: get_redemption_batch
SELECT ledger_redemption_batch_json(%(batch_id)s::uuid)

-- name: put_setting
SELECT ledger_put_setting(%(key)s::text, %(value)s::jsonb, %(source)s::text, %(actor)s::text,
                          %(reason)s::text, %(now)s::timestamptz, %(over_admin)s::boolean)

-- name: add_missing_setting
-- A setting a release added, written when it migrates: the previous release's servers,
-- still serving during a rolling deploy, call the new functions, which read it (helper-93:
-- every former subscriber's GetAccount was INTERNAL until a new server started). Never
-- replaces one that is there: it may be another environment's or an administrator's.
WITH added AS (
    INSERT INTO settings (key, value, source, updated_by, updated_at)
    VALUES (%(key)s, %(value)s, 'environment', 'environment', %(now)s)
    ON CONFLICT (key) DO NOTHING
    RETURNING key, value)
INSERT INTO setting_changes (key, old_value, new_value, source, actor, reason, changed_at)
SELECT key, NULL, value, 'environment', 'environment', %(reason)s, %(now)s
  FROM added

-- name: lock_settings
-- What a server's start replaces, read under the lock its writes take anyway.
SELECT key, value, source FROM settings WHERE key = ANY (%(keys)s::text[]) ORDER BY key FOR UPDATE

-- name: timezone_known
SELECT EXISTS (SELECT 1 FROM pg_timezone_names WHERE name = %(name)s::text),
       ledger_zone_read_as_abbreviation(%(name)s::text, now())

-- name: list_settings
SELECT ledger_setting_json(s) FROM settings s ORDER BY s.key

-- name: list_setting_changes
SELECT change_id, key, old_value, new_value, source, actor, coalesce(reason, ''),
       ledger_micros(changed_at)
  FROM setting_changes
 WHERE (%(key)s::text IS NULL OR key = %(key)s::text)
   AND change_id < coalesce(%(before)s::bigint, 9223372036854775807)
 ORDER BY change_id DESC
 LIMIT %(limit)s::int

-- name: sweep
SELECT ledger_sweep(%(now)s::timestamptz, %(limit)s::int, %(skip)s::text[], %(max_ms)s::int)

-- name: due_accounts
SELECT account_id FROM accounts
 WHERE next_maintenance_at <= %(now)s::timestamptz AND account_id <> ALL (%(skip)s::text[])
 ORDER BY next_maintenance_at
 LIMIT %(limit)s::int

-- name: sweep_account
-- One due account in a transaction of its own; no row when it is no longer due or a call
-- or another sweeper holds it (the call maintains it first).
SELECT ledger_maintain(due.account_id, %(now)s::timestamptz)
  FROM (SELECT account_id FROM accounts
         WHERE account_id = %(account_id)s AND next_maintenance_at <= %(now)s::timestamptz
           FOR UPDATE SKIP LOCKED) due

-- name: schedule_monthly_allowances
SELECT marked, last_account
  FROM ledger_schedule_monthly_allowances(%(now)s::timestamptz, %(after)s::text, %(limit)s::int,
                                          %(lock_limit)s::int)

-- name: setting_value
SELECT value FROM settings WHERE key = %(key)s

-- name: ledger_day
-- The day of ledger.timezone a time falls on: the day a daily reward counts in.
SELECT (%(now)s::timestamptz AT TIME ZONE ledger_timezone())::date

-- name: start_daily_reward_run
-- Records that an automatic run set out to grant the day (a run of a finished day opens it
-- again: it may stop part-way on accounts opened since) and the terms it grants it at, which
-- every later grant of the day takes (the first run after midnight, finishing it for the
-- accounts opened after its last run, and the runs that finish it after one stopped
-- part-way), not the terms in force by then. Each run of the day records them again: a
-- change during the day applies from the next run, as it does to the accounts' own claims.
-- Returns the unfinished days of the few days before it, oldest first: a short range of the
-- primary key, so a run with nothing to finish reads next to nothing.
WITH started AS (
    INSERT INTO daily_reward_runs AS r (day, started_at, amount_micros, expire_days)
    VALUES (%(day)s::date, %(now)s::timestamptz,
            (ledger_setting('daily.amount_micros'))::bigint,
            (ledger_setting('daily.expire_days'))::bigint)
    ON CONFLICT ON CONSTRAINT daily_reward_runs_one_per_day
    DO UPDATE SET finished_at = NULL,
                  amount_micros = excluded.amount_micros, expire_days = excluded.expire_days
     WHERE r.finished_at IS NOT NULL
        OR (r.amount_micros, r.expire_days)
           IS DISTINCT FROM (excluded.amount_micros, excluded.expire_days)
)
SELECT day FROM daily_reward_runs
 WHERE day >= %(day)s::date - %(catch_up_days)s::int AND day < %(day)s::date
   AND finished_at IS NULL
 ORDER BY day

-- name: end_open_daily_reward_runs
-- The reward is off or paused: every day a run set out to grant and did not finish ends, so
-- none of their rest is granted once it is back.
UPDATE daily_reward_runs SET finished_at = %(now)s::timestamptz
 WHERE finished_at IS NULL AND day <= %(today)s::date

-- name: finish_daily_reward_run
-- Only once the day has ended in ledger.timezone: until then accounts are still opened in it
-- and owed it, and the first run after midnight grants them and finishes it (helper-85: a
-- day finished by its 23:02 run was never granted to an account opened at 23:30). A day the
-- reward was switched off or paused on ends at once (`ended`): its rest is not caught up.
UPDATE daily_reward_runs SET finished_at = %(now)s::timestamptz
 WHERE day = %(day)s::date AND finished_at IS NULL
   AND (%(ended)s::boolean
        OR %(now)s::timestamptz
           >= ledger_local_instant((%(day)s::date + 1)::timestamp, ledger_timezone()))

-- name: accounts_without_daily_claim
-- The next accounts that lack the day's reward: a re-run (after a time-out, say) goes
-- straight to those the last run did not reach. "Lack" as the claim decides it: an account
-- that claimed in the day's span before a change of ledger.timezone has it. The test of
-- ledger_daily_claimed (0002_sources.sql), written out: a call of the function would be
-- made once per account, where this is planned as one anti-join.
WITH d AS MATERIALIZED (
    -- the day's span computed once, not once per account
    SELECT tz, ledger_local_instant(%(day)s::date::timestamp, tz) AS starts,
           ledger_local_instant((%(day)s::date + 1)::timestamp, tz) AS ends
      FROM ledger_timezone() AS tz
)
SELECT a.account_id FROM accounts a, d
 WHERE a.account_id > %(after)s
   -- the rest of a run after midnight passes over accounts opened since the day ended
   AND a.created_at < d.ends
   AND NOT EXISTS (
        SELECT 1 FROM daily_claims c
         WHERE c.account_id = a.account_id
           AND c.claim_date BETWEEN %(day)s::date - 2 AND %(day)s::date + 2
           AND (c.claim_date = %(day)s::date
                OR (c.claimed_at >= d.starts AND c.claimed_at < d.ends
                    AND c.claimed_at < coalesce(
                        c.day_ends_at,
                        ledger_local_instant((c.claim_date + 1)::timestamp, d.tz)))))
 ORDER BY a.account_id
 LIMIT %(limit)s

-- name: alert_for_email
SELECT email_to, email_status, threshold_micros, balance_micros, created_at
  FROM low_balance_alerts
 WHERE account_id = %(account_id)s AND alert_id = %(alert_id)s

-- name: claim_alert_email
-- The job that sends an alert's email holds this lock until it has recorded the outcome,
-- so two jobs of one alert (a re-queue beside a slow send) never both send it. A session
-- lock, not a row lock: no transaction stays open while SMTP talks, and a job that dies
-- lets go with its connection.
SELECT pg_try_advisory_lock(hashtextextended('alert-email:' || %(alert_id)s::text, 0))

-- name: release_alert_email
SELECT pg_advisory_unlock(hashtextextended('alert-email:' || %(alert_id)s::text, 0))

-- name: record_alert_email
-- A failure stays pending: the job's RQ retries and the sweeper try it again. Once
-- fast_attempts are spent, a permanent failure (workers/alerts.py: SMTP 5xx, an address the
-- email library cannot write, a misconfiguration) fails it for good; a transient one leaves
-- it pending, parked for the sweeper's hourly retries, until it is sent or its attempts
-- reach max_attempts, which fails it.
UPDATE low_balance_alerts
   SET email_status = CASE WHEN %(status)s = 'pending'
                                AND (NOT %(transient)s AND email_attempts + 1 >= %(fast_attempts)s::int
                                     OR email_attempts + 1 >= %(max_attempts)s::int) THEN 'failed'
                           ELSE %(status)s END,
       email_error = %(error)s, email_attempts = email_attempts + 1,
       email_attempted_at = %(now)s::timestamptz,
       email_sent_at = CASE WHEN %(status)s = 'sent' THEN %(now)s::timestamptz END
 WHERE account_id = %(account_id)s AND alert_id = %(alert_id)s
RETURNING email_status, email_attempts

-- name: pending_alert_emails
-- Pending alerts the sweeper may re-queue: those within their fast attempts, and parked
-- ones (fast attempts spent) once their last attempt is older than parked_before. A parked
-- alert not yet due is passed over and the fresh ones come first, so however many an SMTP
-- outage parked, none holds back a newer alert's place in the batch.
SELECT account_id, alert_id, email_attempts FROM low_balance_alerts
 WHERE email_status = 'pending'
   AND created_at <= %(now)s::timestamptz - make_interval(secs => %(older_than)s)
   AND (email_attempts < %(fast_attempts)s::int
        OR coalesce(email_attempted_at, created_at) < %(parked_before)s::timestamptz)
 ORDER BY email_attempts >= %(fast_attempts)s::int, created_at
 LIMIT %(limit)s::int

-- name: set_low_balance_alert
UPDATE accounts
   SET low_balance_threshold_micros = %(threshold)s, alert_email = %(email)s
 WHERE account_id = %(account_id)s
RETURNING account_id, low_balance_threshold_micros, coalesce(alert_email, '')

-- name: list_low_balance_alerts
SELECT ledger_alert_json(l), l.alert_id
  FROM low_balance_alerts l
 WHERE (%(account_id)s::text IS NULL OR l.account_id = %(account_id)s::text)
   AND l.alert_id < coalesce(%(before)s::bigint, 9223372036854775807)
 ORDER BY l.alert_id DESC
 LIMIT %(limit)s::int

-- name: set_overdraft_limit
SELECT ledger_set_overdraft_limit(%(account_id)s::text, %(key)s::text, %(hash)s::bytea,
                                  %(limit)s::bigint, %(reason)s::text, %(actor)s::text,
                                  %(now)s::timestamptz)
