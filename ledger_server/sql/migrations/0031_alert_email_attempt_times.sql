-- When an alert's email was last tried. An alert whose fast attempts were spent on an SMTP
-- server that could not be reached or answered 4xx stays pending and is retried by the
-- sweeper once its last attempt is an hour old (workers/alerts.py), so an outage of any
-- length loses no alert email, and the sweeper passes over alerts not yet due. NULL for
-- attempts recorded before this release (the alert's time stands in).
ALTER TABLE low_balance_alerts ADD COLUMN email_attempted_at timestamptz;
