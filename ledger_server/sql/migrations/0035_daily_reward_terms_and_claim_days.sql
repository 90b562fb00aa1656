-- The automatic daily rewards finished an earlier day (accounts opened after its last run,
-- finished by the first run after midnight; a run that stopped part-way, finished by the next
-- days' runs) at daily.amount_micros and daily.expire_days as they were when the catch-up
-- ran: after a change at midnight the late accounts got the day at the new amount while the
-- others had the old. Each scheduled run now records the terms it grants its day at, and
-- every later grant of that day takes them. NULL in the previous release's runs: their
-- grants take the terms in force at the day's end (setting_changes).
ALTER TABLE daily_reward_runs
    ADD COLUMN amount_micros bigint,
    ADD COLUMN expire_days   bigint,
    ADD CONSTRAINT daily_reward_runs_terms_together
        CHECK ((amount_micros IS NULL) = (expire_days IS NULL));

-- When the claim's day ended in the ledger.timezone of its claim. A claim is one of its own
-- day when made before then (an automatic grant of an earlier day is made after), and such a
-- claim counts for the local day it was made in even after ledger.timezone changed: a claim
-- made at 20:00Z of a day in UTC is made in the next day of Pacific/Kiritimati, which must
-- not be claimed again (its date had no row, so it was). NULL in the previous release's
-- claims: their day's end is computed in the time zone of the check.
ALTER TABLE daily_claims ADD COLUMN day_ends_at timestamptz;
