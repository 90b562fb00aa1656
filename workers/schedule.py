"""What the scheduler runs and when (RQ's cron scheduler, `rq.cron`). The jobs are
idempotent, so a tick run twice (two schedulers, a retry) changes nothing twice."""

from __future__ import annotations

from rq.cron import CronScheduler

from workers import payments, sweepers
from workers.queues import DEFAULT_QUEUE, PAYMENTS_QUEUE
from workers.settings import sweep_interval_seconds


def register_jobs(scheduler: CronScheduler, interval_seconds: int | None = None) -> None:
    interval = interval_seconds or sweep_interval_seconds()
    scheduler.register(sweepers.sweep_due_accounts, DEFAULT_QUEUE, interval=interval)
    scheduler.register(sweepers.requeue_pending_alert_emails, DEFAULT_QUEUE, interval=interval)
    # Every hour: the month starts at midnight in the configured time zone, which is
    # not midnight UTC everywhere; a run that finds nothing due grants nothing.
    scheduler.register(sweepers.grant_monthly_allowances, DEFAULT_QUEUE, cron="1 * * * *")
    # A long run queues its rest as jobs of its own (sweepers.DAILY_BUDGET_SECONDS).
    scheduler.register(sweepers.grant_daily_rewards, DEFAULT_QUEUE, cron="2 * * * *")
    scheduler.register(payments.requeue_stalled_payment_events, PAYMENTS_QUEUE, interval=interval)
