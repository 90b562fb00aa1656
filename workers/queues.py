"""RQ queue names and the one way jobs are enqueued.

Redis only carries work that PostgreSQL also records (a payment event row, a due lot, a
pending reservation), so a lost job is re-queued by a sweeper, never lost money.

A job enqueued with a `job_id` is unique in Redis (RQ's atomic `unique=True`): while a job of
that id is known (queued, running, scheduled for a retry, or finished or failed and not yet
expired from its registry) a second `enqueue` stores nothing and returns None. Plain RQ would
instead overwrite the job and push its id a second time, so one job would run twice."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from redis import Redis
from rq import Queue, Retry
from rq.exceptions import DuplicateJobError, InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus

from ledger_server.config import ConfigError
from ledger_server.observability import request_id

PAYMENTS_QUEUE = "payments"
DEFAULT_QUEUE = "default"
QUEUES = (PAYMENTS_QUEUE, DEFAULT_QUEUE)

# A failing job runs at most 1 + RETRY_MAX times, backing off between runs (seconds); then
# it stays in RQ's failed registry with its exception. Retries need a scheduler:
# `rq worker --with-scheduler` (the worker entry point starts one).
RETRY_MAX = 5
RETRY_INTERVALS = (10, 30, 120, 600, 1800)
JOB_TIMEOUT_SECONDS = 180

# How long a call may wait on Redis before it fails. A Redis that stops answering must not
# hold the server's post-commit enqueue, the webhook receiver's handler or a sweeper for
# good. REDIS_URL's own `socket_timeout`/`socket_connect_timeout` take precedence. The RQ
# worker's client, which waits in a blocking dequeue for minutes, is made apart
# (workers/__main__.py) and keeps RQ's own time-out.
REDIS_TIMEOUT_SECONDS = 5.0

_lock = threading.Lock()
_connections: dict[tuple[int, str], Redis] = {}


def redis_url() -> str:
    url = os.environ.get("REDIS_URL", "")
    if not url:
        raise ConfigError("REDIS_URL is not set (make run starts an embedded Redis)")
    return url


def redis_connection(url: str | None = None) -> Redis:
    """This process's Redis client for `url` (default REDIS_URL); a forked child gets its own."""
    url = url or redis_url()
    key = (os.getpid(), url)
    with _lock:
        client = _connections.get(key)
        if client is None:
            client = Redis.from_url(
                url,
                socket_timeout=REDIS_TIMEOUT_SECONDS,
                socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
            )
            _connections[key] = client
        return client


def queue(name: str, connection: Redis | None = None) -> Queue:
    return Queue(name, connection=connection or redis_connection())


def retry_policy() -> Retry:
    return Retry(max=RETRY_MAX, interval=list(RETRY_INTERVALS))


def enqueue(
    queue_name: str,
    func: Callable[..., Any] | str,
    *args: Any,
    job_id: str | None = None,
    retry: bool = True,
    connection: Redis | None = None,
) -> Job | None:
    """Enqueues func(*args) on queue_name, with the retry policy unless retry=False.
    With job_id: None when a job of that id is already known (see the module docstring)."""
    q = queue(queue_name, connection)
    target: Any = func  # RQ accepts a callable or its dotted path
    try:
        job: Job = q.enqueue(
            target,
            *args,
            job_id=job_id,
            unique=job_id is not None,
            retry=retry_policy() if retry else None,
            job_timeout=JOB_TIMEOUT_SECONDS,
            # The request id of the call (or job) enqueueing it: the worker logs it.
            meta=request_id.job_meta() or None,
        )
    except DuplicateJobError:
        return None
    return job


_WAITING = (JobStatus.SCHEDULED, JobStatus.DEFERRED)


def _aware(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def requeue(
    queue_name: str,
    func: Callable[..., Any] | str,
    *args: Any,
    job_id: str,
    stale_before: datetime,
    retry: bool = True,
) -> bool:
    """Enqueues func(*args) again under job_id unless its job is still on its way: queued,
    waiting for a retry, or started after stale_before (a live run). A job that Redis lost,
    that finished or failed, or whose worker died is replaced. Returns whether it enqueued.
    For sweepers that re-queue work PostgreSQL still records as pending; retry=False for
    work they retry on a slow schedule of their own."""
    redis = redis_connection()
    try:
        job: Job | None = Job.fetch(job_id, connection=redis)
    except NoSuchJobError:
        job = None
    if job is not None:
        status = job.get_status(refresh=False)
        if (
            status == JobStatus.QUEUED
            and queue(queue_name, redis).get_job_position(job_id) is not None
        ):
            return False
        if status in _WAITING:
            return False
        started_at = _aware(job.started_at)
        if status == JobStatus.STARTED and started_at is not None and started_at > stale_before:
            return False
        # Another sweeper (a second scheduler's) may have deleted it since the fetch: RQ
        # fails on the records already gone ("Execution ... not found in Redis", "Failed
        # to retrieve status"), which aborted this sweep's whole batch (helper-167). The
        # unique enqueue below decides which of the two queues it again.
        with contextlib.suppress(NoSuchJobError, InvalidJobOperation, ValueError):
            job.delete(remove_from_queue=True)
    return enqueue(queue_name, func, *args, job_id=job_id, retry=retry) is not None
