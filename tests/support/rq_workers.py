"""Real RQ workers for tests on the test database and Redis: `rq worker` subprocesses, and
RQ's own SimpleWorker in this process for a single burst run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


# Redis's default number of databases (0-15).
_REDIS_DATABASES = 16


def session_index() -> int:
    """This test process's number under pytest-xdist (gw0, gw1, ...); 0 alone."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(worker.removeprefix("gw") or 0)


def redis_db_url(url: str, db: int) -> str:
    """``url`` with another database number: the payment tests flush theirs at will. Each
    test process of one run takes its own numbers (``db`` + its index), so processes
    sharing one Redis (REDIS_URL) never flush each other's queues."""
    number = db + session_index()
    if number >= _REDIS_DATABASES:
        raise RuntimeError(
            f"Redis database {number} (database {db} of test process {session_index()}) is"
            f" past Redis's {_REDIS_DATABASES}: use a REDIS_URL with a lower database number"
            " or fewer processes (PYTEST_WORKERS)"
        )
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{number}"))


def session_redis_url(url: str) -> str:
    """REDIS_URL's database for this test process (its own, as :func:`redis_db_url`)."""
    path = urllib.parse.urlsplit(url).path.strip("/")
    return redis_db_url(url, int(path) if path.isdigit() else 0)


def worker_env(database_url: str, redis_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(DATABASE_URL=database_url, REDIS_URL=redis_url, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")) if p
    )
    return env


def _command(redis_url: str, queues: Sequence[str], burst: bool, simple: bool) -> list[str]:
    rq = Path(sys.executable).with_name("rq")
    command = [str(rq), "worker", "--url", redis_url, "--logging_level", "WARNING"]
    if burst:
        command.append("--burst")
    if simple:
        command += ["--worker-class", "rq.worker.SimpleWorker"]
    return [*command, *queues]


def start_worker(
    database_url: str,
    redis_url: str,
    queues: Sequence[str] = ("payments",),
    *,
    burst: bool = True,
    simple: bool = False,
) -> subprocess.Popen[bytes]:
    """An `rq worker` in its own process group (so a SIGKILL takes its work horse too)."""
    return subprocess.Popen(
        _command(redis_url, queues, burst, simple),
        cwd=REPO,
        env=worker_env(database_url, redis_url),
        start_new_session=True,
    )


def run_burst_workers(
    database_url: str, redis_url: str, count: int = 1, queues: Sequence[str] = ("payments",)
) -> None:
    """Runs `count` burst workers side by side (no fork per job) until the queues are empty.

    One worker runs in this process when it can (the main thread: RQ sets signal handlers):
    a new `rq worker` process spent 0.3 s starting for each of the suite's hundreds of runs.
    The jobs, queues and worker class are the same; `start_worker` still gives a process."""
    if count == 1 and threading.current_thread() is threading.main_thread():
        _work_here(database_url, redis_url, queues)
        return
    workers = [start_worker(database_url, redis_url, queues, simple=True) for _ in range(count)]
    codes = [w.wait(timeout=300) for w in workers]
    assert codes == [0] * count, f"rq workers exited with {codes}"


def run_sweeper(database_url: str, redis_url: str, older_than_seconds: int = 0) -> int:
    """Runs workers.payments.requeue_stalled_payment_events in a process of its own (as the
    scheduler would) and returns how many events it re-queued."""
    code = (
        "from workers.payments import requeue_stalled_payment_events as sweep; "
        f"print(sweep(older_than_seconds={older_than_seconds}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=worker_env(database_url, redis_url),
        check=True,
        capture_output=True,
        timeout=120,
    )
    return int(out.stdout.decode().strip().splitlines()[-1])


def _work_here(database_url: str, redis_url: str, queues: Sequence[str]) -> None:
    from redis import Redis
    from rq import Queue, SimpleWorker

    import workers.db

    names = ("DATABASE_URL", "REDIS_URL")
    saved_env = {name: os.environ.get(name) for name in names}
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    connection = Redis.from_url(redis_url)
    os.environ.update(DATABASE_URL=database_url, REDIS_URL=redis_url)
    try:
        worker = SimpleWorker(
            [Queue(q, connection=connection) for q in queues], connection=connection
        )
        worker.work(burst=True, logging_level="WARNING")
    finally:
        workers.db.close()  # its connections would keep a scratch database from being dropped
        connection.close()
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for signum, handler in saved_signals.items():
            signal.signal(signum, handler)
