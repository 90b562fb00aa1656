"""Time-based rules, run on a schedule (workers/cron_config.py) and safe to run any
number of times at once: expired lots into breakage, timed-out reservations released,
monthly allowances granted, automatic daily rewards, and re-queueing what stalled.

Each takes `as_of` (an ISO 8601 time; now when None) so tests and back-fills can say
what "now" is."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import psycopg

from ledger_server.db.errors import translate
from ledger_server.db.queries import query
from workers.db import connection
from workers.queues import DEFAULT_QUEUE, requeue

SWEEP_BATCH = 500


def _now(as_of: str | None) -> datetime:
    return datetime.fromisoformat(as_of) if as_of else datetime.now(UTC)


def sweep_due_accounts(as_of: str | None = None, batch: int = SWEEP_BATCH) -> int:
    """Applies due expiries, time-outs and allowances, a batch per transaction, until no
    account is due. Returns how many accounts it swept."""
    now = _now(as_of)
    swept = 0
    with connection() as conn:
        while True:
            row = conn.execute(query("sweep"), {"now": now, "limit": batch}).fetchone()
            done = int(row[0]) if row else 0
            swept += done
            if done < batch:
                return swept


def grant_monthly_allowances(as_of: str | None = None) -> int:
    """Grants this month's allowance to every account that lacks it (run twice in a
    month, it grants once). Returns how many accounts were due."""
    now = _now(as_of)
    with connection() as conn:
        row = conn.execute(query("schedule_monthly_allowances"), {"now": now}).fetchone()
    marked = int(row[0]) if row else 0
    sweep_due_accounts(now.isoformat())
    return marked


def grant_daily_rewards(as_of: str | None = None, batch: int = SWEEP_BATCH) -> int:
    """When daily.automatic is on: claims today's daily reward for every account (one
    idempotency key per account and day, so a re-run grants nothing twice)."""
    now = _now(as_of)
    granted = 0
    with connection() as conn:
        row = conn.execute(query("setting_value"), {"key": "daily.automatic"}).fetchone()
        if not row or row[0] is not True:
            return 0
        after = ""
        while True:
            accounts = [
                r[0]
                for r in conn.execute(
                    query("accounts_after"), {"after": after, "limit": batch}
                ).fetchall()
            ]
            for account_id in accounts:
                key = f"auto-daily:{now.date().isoformat()}"
                try:
                    result = conn.execute(
                        query("claim_daily_reward"),
                        {
                            "account_id": account_id,
                            "key": key,
                            "hash": hashlib.sha256(key.encode()).digest(),
                            "now": now,
                        },
                    ).fetchone()
                except psycopg.Error as exc:
                    error = translate(exc)
                    if error is None or error.reason not in (
                        "DAILY_REWARD_ALREADY_CLAIMED",
                        "SOURCE_DISABLED",
                    ):
                        raise
                    continue
                if result and not result[0].get("replayed"):
                    granted += 1
            if len(accounts) < batch:
                return granted
            after = accounts[-1]


def requeue_pending_alert_emails(older_than_seconds: int = 60, as_of: str | None = None) -> int:
    """Re-queues alert emails still pending after a while (their job was lost)."""
    now = _now(as_of)
    with connection() as conn:
        rows = conn.execute(
            query("pending_alert_emails"), {"now": now, "older_than": older_than_seconds}
        ).fetchall()
    stale_before = now - timedelta(seconds=older_than_seconds)
    return sum(
        requeue(
            DEFAULT_QUEUE,
            "workers.alerts.send_low_balance_email",
            account_id,
            alert_id,
            job_id=f"alert-email-{alert_id}",
            stale_before=stale_before,
        )
        for account_id, alert_id in rows
    )
