"""Real RQ workers for tests: `python -m workers worker --burst` subprocesses on the
test database and Redis; each exits once the queues are empty."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from rq.job import Job, JobStatus

REPO = Path(__file__).resolve().parents[2]


def worker_env(
    database_url: str, redis_url: str, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    env = dict(os.environ)
    env.update(DATABASE_URL=database_url, REDIS_URL=redis_url, **(extra or {}))
    return env


def start_burst_worker(
    database_url: str, redis_url: str, extra: Mapping[str, str] | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "workers", "worker", "--burst"],
        cwd=REPO,
        env=worker_env(database_url, redis_url, extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_burst_workers(
    database_url: str, redis_url: str, count: int = 1, extra: Mapping[str, str] | None = None
) -> list[str]:
    """Runs `count` burst workers at once until the queues are empty; returns their logs."""
    workers = [start_burst_worker(database_url, redis_url, extra) for _ in range(count)]
    logs = []
    for worker in workers:
        out, _ = worker.communicate(timeout=180)
        assert worker.returncode == 0, out
        logs.append(out)
    return logs


def assert_finished(jobs: list[Job], logs: Sequence[str] = ()) -> None:
    """Every job ran to the end (a failing job would otherwise just wait for its retry).
    RQ keeps no result for an attempt it retries, so the workers' logs say why."""
    for job in jobs:
        status = job.get_status(refresh=True)
        result = job.latest_result()
        failure = result.exc_string if result is not None else None
        assert status == JobStatus.FINISHED, (job.func_name, status, failure, *logs)
