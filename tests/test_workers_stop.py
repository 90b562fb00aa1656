"""Stopping the workers: make run's stop takes a busy worker's work horse with it (RQ puts
the horse in a process group of its own), a horse dies with its worker, and a scheduler
asked to stop exits even when it has lost Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from rq import Queue
from rq.scheduler import RQScheduler

from ledger_server.devstack import __main__ as devstack
from ledger_server.devstack import embedded
from workers.queues import DEFAULT_QUEUE

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _horse_of(worker_pid: int, timeout: float = 30.0) -> int:
    """The work horse: the worker's child that leads a process group of its own."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
            except OSError:  # gone meanwhile: FileNotFoundError, or ProcessLookupError
                continue
            if int(fields[1]) == worker_pid and int(fields[2]) == int(entry):
                return int(entry)
        time.sleep(0.05)
    raise AssertionError(f"worker {worker_pid} forked no work horse in {timeout:g} s")


@pytest.fixture
def busy_worker(ledger_db_url: str, redis_url: str) -> Iterator[tuple[devstack._Child, int]]:
    """A worker started as make run starts it, running a job that takes a minute; yields
    it and its horse's pid."""
    out = devstack._Prefixer(["devstack", "worker"])
    env = {**os.environ, "DATABASE_URL": ledger_db_url, "REDIS_URL": redis_url}
    spec = devstack.ProcessSpec("worker", [sys.executable, "-m", "workers", "worker"])
    connection = redis.Redis.from_url(redis_url)
    # An earlier test's worker killed outright may have left RQ's scheduler lock behind
    # (held until it expires): this worker takes it, and starts its scheduler process.
    for key in connection.scan_iter(RQScheduler.get_locking_key("*")):
        connection.delete(key)
    worker = devstack._spawn(spec, env, out)
    horse = None
    try:
        Queue(DEFAULT_QUEUE, connection=connection).enqueue("time.sleep", 60)
        connection.close()
        horse = _horse_of(worker.process.pid)
        yield worker, horse
    finally:
        for pid in (worker.process.pid, horse):
            if pid is not None and _alive(pid):
                os.kill(pid, signal.SIGKILL)
        worker.process.wait()


def test_make_runs_stop_takes_the_work_horse_of_a_busy_worker_with_it(
    busy_worker: tuple[devstack._Child, int], capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C of make run left a horse running its job (a payment), committed after make
    had exited: one SIGTERM (RQ's warm shutdown waits for the job), then SIGKILL to the
    worker's process group, which the horse is not in."""
    worker, horse = busy_worker
    devstack._stop_children([worker], devstack._Prefixer(["devstack", "worker"]), timeout=0.3)
    assert worker.process.returncode is not None
    assert not _alive(horse), "the work horse outlived make run"
    assert "cold shut down" in capsys.readouterr().out  # RQ took it down, not SIGKILL


def test_a_work_horse_dies_with_its_worker(busy_worker: tuple[devstack._Child, int]) -> None:
    worker, horse = busy_worker
    worker.process.kill()  # SIGKILL: nothing of the worker's own runs
    worker.process.wait()
    deadline = time.monotonic() + 10
    while _alive(horse) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(horse), "the work horse outlived its worker"


def _children(pid: int) -> set[int]:
    children = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                children.add(int(entry))
    return children


def test_rqs_scheduler_process_dies_with_its_worker(
    busy_worker: tuple[devstack._Child, int],
) -> None:
    """The worker's RQ scheduler (the retries of failed jobs), a child of the worker beside
    its horse, outlived a worker killed outright: re-parented to init, it held the queues'
    scheduler lock, so a restarted worker ran none of its own (helper-154's review)."""
    worker, horse = busy_worker
    deadline = time.monotonic() + 30
    while not (others := _children(worker.process.pid) - {horse}):
        assert time.monotonic() < deadline, "the worker started no scheduler process"
        time.sleep(0.05)
    [scheduler] = others
    worker.process.kill()
    worker.process.wait()
    deadline = time.monotonic() + 10
    try:
        while _alive(scheduler) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(scheduler), "RQ's scheduler outlived its worker"
    finally:
        if _alive(scheduler):
            os.kill(scheduler, signal.SIGKILL)


def test_a_scheduler_that_lost_redis_stops_when_asked(tmp_path: Path) -> None:
    """SIGTERM reached the scheduler with its Redis gone: RQ's goodbye to Redis failed,
    the failure was taken for a lost Redis, and the scheduler started again and again."""
    server = embedded.start_redis(tmp_path / "redis", persist=False)
    env = {**os.environ, "REDIS_URL": server.url, "LEDGER_LOG_LEVEL": "DEBUG"}
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "workers", "scheduler"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert scheduler.stderr is not None
        for line in scheduler.stderr:
            if "Sleeping for" in line:  # RQ's loop, waiting for the next tick
                break
        server.stop()
        scheduler.send_signal(signal.SIGTERM)
        assert scheduler.wait(timeout=10) == 0
    finally:
        if scheduler.poll() is None:
            scheduler.kill()
            scheduler.wait()
        server.stop()
