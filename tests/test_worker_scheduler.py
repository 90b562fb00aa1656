"""The worker restarts RQ's scheduler soon after it died: it runs the retries of failed
jobs (payments' included), a Redis restart kills it, and RQ alone starts it again only at
its maintenance pass, every 10 minutes (helper-100)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import redis
from rq import Queue

from workers.observability import SCHEDULER_CHECK_SECONDS, LedgerWorker


class _Process:
    def __init__(self, alive: bool) -> None:
        self.alive = alive

    def is_alive(self) -> bool:
        return self.alive


class _Scheduler:
    """RQ's scheduler as the worker sees it: its process, and the restart RQ calls."""

    def __init__(self, process: _Process | None) -> None:
        self._process = process
        self.restarts = 0

    def acquire_locks(self, auto_start: bool = False) -> set[str]:
        self.restarts += int(auto_start)
        return set()


def _worker(redis_url: str) -> Any:
    connection = redis.Redis.from_url(redis_url)
    worker = LedgerWorker([Queue("scheduler-check", connection=connection)], connection=connection)
    worker.last_cleaned_at = datetime.now(UTC)  # RQ's own maintenance ran a moment ago
    return worker


def test_a_dead_scheduler_is_started_again_at_the_next_check(redis_url: str) -> None:
    worker = _worker(redis_url)
    # An idle worker wakes every SCHEDULER_CHECK_SECONDS (RQ waits worker_ttl - 15 s).
    assert worker.dequeue_timeout == SCHEDULER_CHECK_SECONDS
    process = _Process(alive=True)
    worker.scheduler = scheduler = _Scheduler(process)
    worker._scheduler_checked_at = time.monotonic() - SCHEDULER_CHECK_SECONDS - 1
    assert not worker.should_run_maintenance_tasks  # alive: RQ's 10 minutes stand

    process.alive = False  # Redis restarted, the scheduler raised and exited
    assert not worker.should_run_maintenance_tasks  # checked a moment ago
    worker._scheduler_checked_at = time.monotonic() - SCHEDULER_CHECK_SECONDS - 1
    assert worker.should_run_maintenance_tasks
    worker.run_maintenance_tasks()  # what the worker's loop then does
    assert scheduler.restarts == 1


def test_without_a_scheduler_only_rqs_own_maintenance_runs(redis_url: str) -> None:
    worker = _worker(redis_url)
    worker._scheduler_checked_at = time.monotonic() - SCHEDULER_CHECK_SECONDS - 1
    assert worker.scheduler is None
    assert not worker.should_run_maintenance_tasks
