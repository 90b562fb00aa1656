"""The workers' side of observability: the RQ worker class of `python -m workers worker`.

- Each job runs with the request id of the call that enqueued it (``job.meta["request_id"]``,
  put there by ``workers.queues.enqueue``; a job enqueued by the scheduler has none and uses
  its job id), so every log line of the job carries it, and so do jobs it enqueues.
- Each failed run (an exception, a time-out, a killed work horse) adds one to a Redis hash
  that the server's ``/metrics`` reports as ``ledger_job_failures_total{queue,job}``.
  In Redis rather than in this process because RQ runs jobs in forked work horses."""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

from redis.exceptions import RedisError
from rq import Queue, Worker
from rq.defaults import DEFAULT_LOGGING_DATE_FORMAT, DEFAULT_LOGGING_FORMAT
from rq.executions import Execution
from rq.job import Job
from rq.scheduler import RQScheduler

from ledger_server.observability import request_id
from ledger_server.observability.metrics import JOB_FAILURES_KEY
from ledger_server.pdeathsig import signal_when_parent_dies

log = logging.getLogger("workers.jobs")


def job_request_id(job: Job) -> str:
    meta = job.meta or {}
    return request_id.accept(meta.get(request_id.JOB_META_KEY)) or f"job:{job.id}"


def count_failure(job: Job, queue_name: str) -> None:
    try:
        job.connection.hincrby(JOB_FAILURES_KEY, f"{queue_name}|{job.func_name}", 1)
    except (RedisError, OSError) as error:  # the count is best effort; the job's fate is not
        log.warning("could not count the failure of job %s: %s", job.id, error)


# How often an idle worker wakes (RQ waits for a job up to worker_ttl - 15 s) and checks
# that RQ's scheduler process, which runs the retries of failed jobs, is alive.
SCHEDULER_CHECK_SECONDS = 30


class LedgerScheduler(RQScheduler):
    """RQ's scheduler process (the retries of failed jobs), stopped when its worker dies: a
    worker killed outright left it running, re-parented to init, holding the queues'
    scheduler lock, so a restarted worker could not start its own (helper-154's review).
    SIGTERM, which RQ's scheduler takes as a request to stop and release its locks."""

    def start(self) -> Any:
        self._parent_pid = os.getpid()  # the worker, which forks it
        return super().start()  # type: ignore[no-untyped-call]

    def work(self) -> None:
        if not signal_when_parent_dies(signal.SIGTERM, self._parent_pid):
            return  # the worker is gone already
        super().work()  # type: ignore[no-untyped-call]


class LedgerWorker(Worker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("worker_ttl", SCHEDULER_CHECK_SECONDS + 15)
        super().__init__(*args, **kwargs)
        self._scheduler_checked_at = time.monotonic()
        self._worker_pid = os.getpid()  # the parent of the work horses it forks

    @property
    def should_run_maintenance_tasks(self) -> bool:
        """RQ's own rule (every 10 minutes), or RQ's scheduler process has died: a Redis
        restart kills it, and RQ starts it again only at its next maintenance, so for up to
        10 minutes no failed job (a payment's included) was retried (helper-100)."""
        if super().should_run_maintenance_tasks:
            return True
        if self.scheduler is None or self.last_cleaned_at is None:
            return False  # no scheduler wanted, or the first maintenance has not run yet
        if time.monotonic() - self._scheduler_checked_at < SCHEDULER_CHECK_SECONDS:
            return False
        self._scheduler_checked_at = time.monotonic()
        process = self.scheduler._process  # None where another worker holds the scheduler
        return process is None or not process.is_alive()

    def _start_scheduler(
        self,
        burst: bool = False,
        logging_level: str | None = "INFO",
        date_format: str = DEFAULT_LOGGING_DATE_FORMAT,
        log_format: str = DEFAULT_LOGGING_FORMAT,
    ) -> None:
        """RQ's own (rq/worker/base.py), with a scheduler that dies with the worker."""
        self.scheduler = LedgerScheduler(
            self.queues,
            connection=self.connection,
            logging_level=logging_level if logging_level is not None else self.log.level,
            date_format=date_format,
            log_format=log_format,
            serializer=self.serializer,
        )
        self.scheduler.acquire_locks()  # type: ignore[no-untyped-call]
        if not self.scheduler.acquired_locks:
            return
        if not burst:
            self.scheduler.start()
            return
        try:
            self.scheduler.register_birth()
            self.scheduler.enqueue_scheduled_jobs()  # type: ignore[no-untyped-call]
        finally:
            self.scheduler.release_locks()  # type: ignore[no-untyped-call]
            self.scheduler.register_death()

    def main_work_horse(self, job: Job, queue: Queue) -> None:
        """The forked horse dies with its worker. RQ gives it its own process group, which
        a stop aimed at the worker's (make run's SIGKILL after its grace period) misses: the
        horse ran its job on, unsupervised, and committed it after make run had exited. Its
        transaction dies with it: the job is done or not applied, as when a worker crashes."""
        if not signal_when_parent_dies(signal.SIGKILL, self._worker_pid):
            os._exit(1)  # the worker is already gone
        super().main_work_horse(job, queue)

    def perform_job(self, job: Job, queue: Queue, execution: Execution) -> bool:
        with request_id.bound(job_request_id(job)):
            fields = {"job_id": job.id, "job": job.func_name, "queue": queue.name}
            log.info("job %s started", job.func_name, extra=fields)
            ok: bool = super().perform_job(job, queue, execution)
            log.info("job %s %s", job.func_name, "done" if ok else "failed", extra=fields)
            return ok

    def handle_job_failure(
        self,
        job: Job,
        queue: Queue,
        started_job_registry: Any = None,
        exc_string: str = "",
        execution: Execution | None = None,
    ) -> None:
        count_failure(job, queue.name)
        with request_id.bound(job_request_id(job)):
            super().handle_job_failure(
                job,
                queue,
                started_job_registry=started_job_registry,
                exc_string=exc_string,
                execution=execution,
            )
