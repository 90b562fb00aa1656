-- Low-balance alerts (DESIGN.md section 7) and what the sweepers need.

-- One row per crossing of an account's threshold by a charge: kept for dashboards
-- (AdminService.ListLowBalanceAlerts) and the source of truth for its email, which a
-- job sends; the sweeper re-queues emails still pending, so losing Redis loses none.
CREATE TABLE low_balance_alerts (
    account_id       text        NOT NULL CONSTRAINT low_balance_alerts_account_fk
                                 REFERENCES accounts (account_id),
    alert_id         bigint      GENERATED ALWAYS AS IDENTITY,
    threshold_micros bigint      NOT NULL,
    balance_micros   bigint      NOT NULL,
    transaction_id   bigint      NOT NULL,
    created_at       timestamptz NOT NULL,
    email_to         text,
    email_status     text        NOT NULL,
    email_attempts   integer     NOT NULL DEFAULT 0,
    email_error      text,
    email_sent_at    timestamptz,
    PRIMARY KEY (account_id, alert_id),
    CONSTRAINT low_balance_alerts_email_status_known
        CHECK (email_status IN ('pending', 'sent', 'failed', 'skipped')),
    CONSTRAINT low_balance_alerts_below_threshold CHECK (balance_micros < threshold_micros)
);
CREATE INDEX low_balance_alerts_newest ON low_balance_alerts (alert_id DESC);
CREATE INDEX low_balance_alerts_pending_email ON low_balance_alerts (created_at)
    WHERE email_status = 'pending';

-- Where an account's alerts go (else the alerts.email_to setting).
ALTER TABLE accounts ADD COLUMN alert_email text;
ALTER TABLE accounts ADD CONSTRAINT accounts_alert_email_format
    CHECK (alert_email ~ '^[^@\s]+@[^@\s]+$');
-- A crossing is detected from the balance before and after a charge, so no
-- per-account "armed" flag is needed.
ALTER TABLE accounts DROP COLUMN low_balance_alert_armed;

-- The sweeper's work list: accounts whose next expiry, time-out or allowance is due.
CREATE INDEX accounts_maintenance_due ON accounts (next_maintenance_at)
    WHERE next_maintenance_at IS NOT NULL;
