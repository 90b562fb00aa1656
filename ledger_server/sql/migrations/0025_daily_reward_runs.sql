-- The days the automatic daily rewards (daily.automatic, workers/sweepers.py) set out to
-- grant, and when a run last found no account left without the day's reward. Redis only
-- carries the jobs: a run that died part-way, or the rest of a run lost with Redis, leaves
-- its day unfinished here, and the next scheduled runs finish it (for a few days at most).
-- A day with no row was never meant to be granted automatically (the setting was off, or
-- no scheduler ran that day): it is not granted later.
CREATE TABLE daily_reward_runs (
    day         date        NOT NULL,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz,
    CONSTRAINT daily_reward_runs_one_per_day PRIMARY KEY (day)
);
