"""Children of make run, the bench and the embedded Redis die with the process that started
them, and no Python runs between their fork and exec (ledger_server/devstack/parent_death.py);
make run's supervisor stops the stack when make dies."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ledger_server.devstack.parent_death import dying_with_parent

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG")

SLEEP = shutil.which("sleep") or "/bin/sleep"

# A parent that starts `sleep` as a child dying with it, reports the child's pid, and waits.
PARENT = f"""
import subprocess, sys, time
from ledger_server.devstack.parent_death import dying_with_parent
child = subprocess.Popen(dying_with_parent([{SLEEP!r}, "60"]))
print(child.pid, flush=True)
time.sleep(60)
"""


def _comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        return None


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":  # dead, waiting for init to reap it
            return True
        time.sleep(0.05)
    return False


def _program_started(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _comm(pid) == "sleep":
            return True
        time.sleep(0.02)
    return False


def test_a_child_dies_when_the_process_that_started_it_is_killed() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], stdout=subprocess.PIPE, start_new_session=True
    )
    child_pid = None
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        # The wrapper execs the program in its own place: the pid Popen gave is the program's.
        assert _program_started(child_pid)
        parent.kill()  # SIGKILL: nothing of the parent's own runs
        parent.wait()
        assert _gone(child_pid, timeout=10)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child_pid is not None and _comm(child_pid) == "sleep":
            os.kill(child_pid, signal.SIGKILL)


def test_a_child_whose_parent_died_before_it_asked_does_not_run() -> None:
    """Between the fork and prctl the parent may die; the child then has a new parent and
    would outlive everything: it gives up instead (exit 1, the program never runs)."""
    argv = dying_with_parent([SLEEP, "60"])
    parent_pid = argv.index(str(os.getpid()))
    argv[parent_pid] = str(os.getpid() + 1_000_000)  # not this process: as if it had died
    child = subprocess.run(argv, timeout=30, check=False)
    assert child.returncode == 1


def test_the_child_keeps_its_environment_and_arguments(tmp_path: Path) -> None:
    out = tmp_path / "out"
    script = f"import os, sys; open({str(out)!r}, 'w').write(os.environ['MARK'] + sys.argv[1])"
    subprocess.run(
        dying_with_parent([sys.executable, "-c", script, " and its argument"]),
        env={**os.environ, "MARK": "the environment"},
        check=True,
        timeout=30,
    )
    assert out.read_text() == "the environment and its argument"


# make, running make run's supervisor (its resolution of the servers held up for a minute),
# reporting the supervisor's pid, and waiting.
MAKE = """
import subprocess, sys
supervisor = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=open(sys.argv[2], "w"))
print(supervisor.pid, flush=True)
supervisor.wait()
"""
SUPERVISOR = """
import sys, time
from pathlib import Path
from ledger_server.devstack import __main__ as devstack, embedded
def resolve(*_, **__):
    print("resolving", flush=True)
    time.sleep(60)
embedded.resolve_urls = resolve
sys.exit(devstack.cmd_run(Path("/nonexistent"), ready_timeout=1))
"""


def test_make_runs_supervisor_stops_the_stack_when_make_is_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill -9 of make alone left the supervisor running the whole stack under init, and
    the next make run found the port taken."""
    for name in ("LEDGER_GRPC_ADDR", "LEDGER_WEBHOOK_ADDR"):
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            monkeypatch.setenv(name, f"127.0.0.1:{free.getsockname()[1]}")
    monkeypatch.setenv("LEDGER_METRICS_ADDR", "")
    out = tmp_path / "out"
    make = subprocess.Popen(
        [sys.executable, "-c", MAKE, SUPERVISOR, str(out)],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    supervisor = None
    try:
        assert make.stdout is not None
        supervisor = int(make.stdout.readline())
        deadline = time.monotonic() + 30
        while "resolving" not in out.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        make.kill()
        make.wait()
        assert _gone(supervisor, timeout=10), out.read_text()
        assert "SIGTERM: shutting down" in out.read_text()
        assert "stopped" in out.read_text()
    finally:
        if make.poll() is None:
            make.kill()
            make.wait()
        if supervisor is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(supervisor, signal.SIGKILL)
