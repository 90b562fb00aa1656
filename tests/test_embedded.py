"""The embedded PostgreSQL's stop survives a pg_ctl child that died by a signal before it
could run (ledger_server/devstack/embedded.py). Plain unit test: subprocess is replaced."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ledger_server.devstack import embedded


def _stop_with(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, return_codes: list[int]
) -> list[list[str]]:
    """Runs _pg_ctl_stop with pg_ctl answering return_codes in turn; the server is up
    until a pg_ctl returns 0. Returns the commands run."""
    commands: list[list[str]] = []
    running = [True]

    def fake_run(command: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        commands.append(command)
        code = return_codes[len(commands) - 1]
        if code == 0:
            running[0] = False
        return subprocess.CompletedProcess(command, code, "", "")

    monkeypatch.setattr(embedded.subprocess, "run", fake_run)
    monkeypatch.setattr(embedded, "_postmaster_pid", lambda _: 4242 if running[0] else None)
    monkeypatch.setattr(embedded, "pg_system_user", lambda: "postgres")
    embedded._pg_ctl_stop(tmp_path)
    return commands


def test_a_pg_ctl_killed_by_a_signal_before_it_ran_is_run_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    commands = _stop_with(monkeypatch, tmp_path, [-signal.SIGSEGV, -signal.SIGBUS, 0])
    assert len(commands) == 3 and all("stop" in command for command in commands)


def test_a_pg_ctl_that_fails_is_not_run_again_and_the_error_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(RuntimeError, match="pg_ctl stop failed"):
        _stop_with(monkeypatch, tmp_path, [1, 0])


def test_a_pg_ctl_that_keeps_dying_gives_up(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(RuntimeError, match=r"exit -11"):
        _stop_with(monkeypatch, tmp_path, [-signal.SIGSEGV] * 3 + [0])
