"""`python -m workers worker [--burst]` runs an RQ worker on the ledger's queues;
`python -m workers scheduler` runs the cron scheduler (workers/schedule.py).
Both read REDIS_URL and DATABASE_URL; `make run` starts one of each."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from types import FrameType

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.cron import CronScheduler
from rq.exceptions import StopRequested

from ledger_server.config import ConfigError
from ledger_server.observability.logging import setup_logging
from workers import db
from workers.observability import LedgerWorker
from workers.queues import DEFAULT_QUEUE, PAYMENTS_QUEUE
from workers.settings import SmtpSettings

log = logging.getLogger("workers.scheduler")

# Waits between starts of a scheduler that lost Redis: doubling, at most this long.
RESTART_DELAY_MAX_SECONDS = 30.0
# A scheduler that ran this long before it lost Redis starts again at once.
HEALTHY_RUN_SECONDS = 60.0


def _redis() -> Redis:
    url = os.environ.get("REDIS_URL", "")
    if not url:
        raise ConfigError("REDIS_URL is not set (make run starts an embedded Redis)")
    return Redis.from_url(url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="workers", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker", help="run an RQ worker on the payments and default queues")
    worker.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    sub.add_parser("scheduler", help="run the cron scheduler")
    args = parser.parse_args(argv)
    try:
        setup_logging()  # JSON lines on stderr (LEDGER_LOG_FORMAT, LEDGER_LOG_LEVEL)
        connection = _redis()
        if args.command == "worker":
            # Read by each alert email's job: a wrong one stops the worker here rather than
            # failing every email for good (helper-155's review).
            SmtpSettings.from_env()
    except (ConfigError, ValueError) as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "worker":
        db.init()  # once, before RQ forks a work horse per job
        queues = [Queue(name, connection=connection) for name in (PAYMENTS_QUEUE, DEFAULT_QUEUE)]
        # with_scheduler: RQ's retries with backoff are scheduled jobs; without a scheduler
        # a failed job would never run again.
        LedgerWorker(queues, connection=connection).work(burst=args.burst, with_scheduler=True)
        return 0
    return run_scheduler(connection)


class _Scheduler(CronScheduler):
    """RQ's cron scheduler, remembering a stop signal. RQ handles the StopRequested its
    handler raises, then registers the scheduler's death in Redis: with Redis gone that
    raises a RedisError, which alone was taken for a lost Redis, and the scheduler started
    again at every SIGTERM until SIGKILLed."""

    stop_requested = False

    def _request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requested = True
        super()._request_stop(signum, frame)  # type: ignore[no-untyped-call]


def run_scheduler(connection: Redis) -> int:
    """RQ's cron scheduler, started again whenever it loses Redis (RQ's own loop stops at
    the first Redis error). The sweepers find their work in PostgreSQL, so an outage costs
    the ticks it lasted; exiting would stop every sweeper, and the stored payment events
    with them, until someone restarted the process (helper-50's review). Returns 0 once
    stopped by a signal."""
    from workers.schedule import register_jobs  # the scheduler alone needs every job module

    delay = 1.0
    while True:
        scheduler = _Scheduler(connection=connection)
        register_jobs(scheduler)
        started = time.monotonic()
        try:
            scheduler.start()  # type: ignore[no-untyped-call]
            return 0  # RQ caught the stop signal
        except RedisError as exc:
            if scheduler.stop_requested:
                return 0  # RQ's goodbye to the Redis that is gone failed; the stop stands
            if time.monotonic() - started > HEALTHY_RUN_SECONDS:
                delay = 1.0
            log.warning("the scheduler lost Redis (%s); starting it again in %.0f s", exc, delay)
        except (KeyboardInterrupt, StopRequested):
            return 0  # a signal while RQ was registering or leaving
        try:
            time.sleep(delay)  # RQ's signal handlers stay installed: a stop raises here
        except (KeyboardInterrupt, StopRequested):
            return 0
        delay = min(delay * 2, RESTART_DELAY_MAX_SECONDS)


if __name__ == "__main__":
    sys.exit(main())
