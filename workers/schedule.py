"""What the scheduler runs and when (RQ's cron scheduler, `rq.cron`). The jobs are
idempotent, so a tick run twice (two schedulers, a retry) changes nothing twice."""

from __future__ import annotations

from rq.cron import CronScheduler

from workers import payments, sweepers
from workers.queues import DEFAULT_QUEUE, PAYMENTS_QUEUE
from workers.settings import sweep_interval_seconds

# How long Redis keeps a failed run of a scheduled job (RQ's default: a year). A sweep fails
# every minute while one account's maintenance fails, and a PostgreSQL outage fails three
# jobs a minute: kept a year, at ~5 KB each, they filled a Redis that must not evict (README)
# until it refused writes, payments' jobs among them. The logs and metrics keep the failure.
FAILED_RUN_TTL_SECONDS = 24 * 3600


def register_jobs(scheduler: CronScheduler, interval_seconds: int | None = None) -> None:
    interval = interval_seconds or sweep_interval_seconds()
    ttl = FAILED_RUN_TTL_SECONDS
    scheduler.register(
        sweepers.sweep_due_accounts, DEFAULT_QUEUE, interval=interval, failure_ttl=ttl
    )
    scheduler.register(
        sweepers.requeue_pending_alert_emails, DEFAULT_QUEUE, interval=interval, failure_ttl=ttl
    )
    # Every hour: the month starts at midnight in the configured time zone, which is
    # not midnight UTC everywhere; a run that finds nothing due grants nothing.
    scheduler.register(
        sweepers.grant_monthly_allowances, DEFAULT_QUEUE, cron="1 * * * *", failure_ttl=ttl
    )
    # A long run queues its rest as jobs of its own (sweepers.DAILY_BUDGET_SECONDS).
    scheduler.register(
        sweepers.grant_daily_rewards, DEFAULT_QUEUE, cron="2 * * * *", failure_ttl=ttl
    )
    scheduler.register(
        payments.requeue_stalled_payment_events, PAYMENTS_QUEUE, interval=interval, failure_ttl=ttl
    )
    # Hourly: the rows are kept a day or more (migration 0038).
    scheduler.register(
        sweepers.prune_checkout_stripe_attempts, DEFAULT_QUEUE, cron="3 * * * *", failure_ttl=ttl
    )
