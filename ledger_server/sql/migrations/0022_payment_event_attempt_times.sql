-- When a payment event's job last started. The sweeper retries an event whose attempts are
-- spent (RQ's retries ran out, or Redis lost them with its failed registry) once its last
-- attempt is an hour old, from PostgreSQL alone: a paid event whose cause of failure was
-- fixed (a plan's provider price added, say) is then applied without anyone requeueing it.
-- NULL for events stored before this release (their receipt time stands in).
ALTER TABLE payment_events ADD COLUMN last_attempt_at timestamptz;
