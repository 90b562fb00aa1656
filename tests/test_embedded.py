"""The embedded servers (ledger_server/devstack/embedded.py): PostgreSQL's stop survives a
pg_ctl child that died by a signal before it could run (subprocess is replaced), a stale
postmaster.pid naming another cluster's postmaster is neither stopped nor attached to, the
embedded Redis keeps off the ports make run's own servers will listen on, a Redis that did
not start says why, and make run's banner shows no passwords."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
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


def test_a_redis_that_did_not_start_says_whether_it_exited_or_hung(tmp_path: Path) -> None:
    """A launch that failed names what happened, its exit status or no answer in time, as
    well as the end of its log: a CI run once failed with an empty log and nothing else
    (session 21)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError) as failed:
            embedded.start_redis(tmp_path / "redis", port, persist=False)
    assert f"did not start on port {port} (it exited with status 1)" in str(failed.value)
    assert "Address already in use" in str(failed.value)


def test_the_embedded_redis_never_takes_a_port_its_stack_will_listen_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """make run starts Redis before its gRPC server: a kernel handing Redis the gRPC port
    (free until the server binds it) left a server that clients reached as Redis."""
    grpc_port, other = embedded._unused_port(), embedded._unused_port()
    offered = iter([grpc_port, other])
    monkeypatch.setattr(embedded, "_unused_port", lambda: next(offered))
    monkeypatch.setenv("DATABASE_URL", "postgresql://elsewhere/ledger")
    monkeypatch.delenv("REDIS_URL", raising=False)
    _, redis_url, started = embedded.resolve_urls(tmp_path, avoid_ports={grpc_port})
    try:
        assert redis_url == f"redis://127.0.0.1:{other}/0"
    finally:
        for server in started:
            server.stop()


def test_make_run_keeps_its_own_ports_from_the_embedded_redis(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from ledger_server.devstack import __main__ as devstack

    avoided: list[object] = []

    def resolve(_data_dir: Path, **kwargs: Any) -> Any:
        avoided.append(kwargs.get("avoid_ports"))
        raise devstack._Interrupted("stop here")

    monkeypatch.setattr(devstack.signal, "signal", lambda *_: None)
    monkeypatch.setattr(devstack, "_accepts", lambda *_: False)
    monkeypatch.setattr(embedded, "resolve_urls", resolve)
    monkeypatch.setenv("LEDGER_GRPC_ADDR", "localhost:41715")
    monkeypatch.setenv("LEDGER_WEBHOOK_ADDR", "127.0.0.1:41716")
    monkeypatch.setenv("LEDGER_METRICS_ADDR", "localhost:41717")
    assert devstack.cmd_run(tmp_path, ready_timeout=1) == 0
    assert avoided == [{41715, 41716, 41717}]


def test_make_run_names_the_setting_of_each_port_already_taken(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only the gRPC port was checked: a taken webhook or metrics port showed after the
    'is up' banner, as a traceback."""
    from ledger_server.devstack import __main__ as devstack

    def resolve(*_: Any, **__: Any) -> Any:
        raise AssertionError("make run started with its webhook port taken")

    monkeypatch.setattr(devstack.signal, "signal", lambda *_: None)
    monkeypatch.setattr(embedded, "resolve_urls", resolve)
    with socket.socket() as taken, socket.socket() as free:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        free.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        monkeypatch.setenv("LEDGER_GRPC_ADDR", f"127.0.0.1:{free.getsockname()[1]}")
        monkeypatch.setenv("LEDGER_WEBHOOK_ADDR", f"127.0.0.1:{port}")
        monkeypatch.setenv("LEDGER_METRICS_ADDR", "")
        assert devstack.cmd_run(tmp_path, ready_timeout=1) == 1
    assert capsys.readouterr().err == (
        f"devstack: something already listens on 127.0.0.1:{port};"
        " stop it or set LEDGER_WEBHOOK_ADDR\n"
    )


def _in_thread(target: Any, *args: Any) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    thread.join(timeout=5)
    return thread


def test_make_stop_takes_an_exited_redis_its_parent_has_not_reaped_for_gone(
    tmp_path: Path,
) -> None:
    """`make stop` while `make run` is up: the embedded Redis, a child of make run's
    supervisor, exits on SIGTERM and stays a zombie until the supervisor reaps it, which
    it never did; `make stop` waited for it for ever (SIGKILL, then no deadline)."""
    server = embedded.start_redis(tmp_path / "redis", persist=False)
    assert server.process is not None  # this process's child, not reaped until the end
    try:
        assert not _in_thread(embedded.stop_all, tmp_path).is_alive(), "make stop hangs"
        assert not embedded._redis_ping(server.port)
    finally:
        server.stop()


def test_make_run_stops_when_its_embedded_redis_is_gone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """make run went on serving without Redis (or PostgreSQL) after `make stop`."""
    from ledger_server.devstack import __main__ as devstack

    server = embedded.start_redis(tmp_path / "redis", persist=False)
    codes: list[int] = []
    try:
        os.kill(server.pid, signal.SIGKILL)
        watching = _in_thread(
            lambda: codes.append(devstack._watch([], [server], devstack._Prefixer(["devstack"])))
        )
        assert not watching.is_alive(), "make run runs on without its Redis"
        assert codes == [1]
        assert "embedded redis stopped" in capsys.readouterr().out
    finally:
        server.stop()


def _data_directory(url: str) -> str:
    with psycopg.connect(url, connect_timeout=5) as conn:
        row = conn.execute("SHOW data_directory").fetchone()
    assert row is not None
    return str(row[0])


def _kill_cluster(pgdata: Path) -> None:
    """SIGKILL the postmaster of ``pgdata`` and wait until its children (which notice its
    death) are gone too, as after a crash: postmaster.pid and the socket files stay."""
    pid = embedded._postmaster_pid(pgdata)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while any(embedded._runs_in(int(p), pgdata) for p in os.listdir("/proc") if p.isdigit()):
        assert time.monotonic() < deadline, f"processes of {pgdata} outlived their postmaster"
        time.sleep(0.1)


def test_a_pid_file_naming_another_live_postgres_is_neither_stopped_nor_attached_to(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """After a crash or a reboot the pid in the devstack's postmaster.pid may belong to
    another cluster's postmaster: `make stop` used to pg_ctl-stop that cluster, and
    `make run` to attach to it and then fail to connect every time."""
    data_dir = tmp_path / "devstack"
    own = embedded.start_postgres(data_dir / "pg")
    other = embedded.start_postgres(tmp_path / "other")
    try:
        _kill_cluster(own.pgdata)
        other_pid = embedded._postmaster_pid(other.pgdata)
        pid_file = own.pgdata / "postmaster.pid"
        lines = pid_file.read_text().splitlines()
        pid_file.write_text("\n".join([str(other_pid), *lines[1:]]) + "\n")

        assert not own.is_running()
        with monkeypatch.context() as no_proc:
            # Where the process's directory cannot be read (macOS: no /proc), the pid is
            # not trusted: only this directory's socket answering counts.
            no_proc.setattr(embedded, "_runs_in", lambda *_: None)
            assert not own.is_running()
            assert other.is_running()
        assert embedded.stop_all(data_dir) == []
        assert other.is_running()
        assert _data_directory(other.url) == str(other.pgdata)

        # make run: its own server, not an attachment to the other one.
        restarted = embedded.start_postgres(own.pgdata)
        assert restarted.started
        assert _data_directory(restarted.url) == str(own.pgdata)
        assert embedded.stop_all(data_dir) == [f"PostgreSQL in {own.pgdata}"]
        assert other.is_running()
        assert _data_directory(other.url) == str(other.pgdata)
    finally:
        embedded.stop_all(data_dir)
        other.stop()


def test_make_run_takes_over_the_postgres_a_killed_make_run_left_running(
    tmp_path: Path,
) -> None:
    """After a kill -9 of make run, the next make run attached to the server it had left
    up and, not having started it, left it running after Ctrl-C. One that `make migrate`
    started (to be left running) stays as it is."""
    pgdata = tmp_path / "pg"
    killed_make_run = (  # it exits without stopping the server it started
        "import sys; from pathlib import Path; from ledger_server.devstack import embedded;"
        "embedded.start_postgres(Path(sys.argv[1]), own=True)"
    )
    try:
        subprocess.run([sys.executable, "-c", killed_make_run, pgdata], check=True, timeout=120)
        embedded.stop_all(tmp_path)  # make stop
        assert embedded.start_postgres(pgdata).started  # make migrate
        embedded._Users(pgdata).remove(os.getpid())  # and it exited
        assert not embedded.start_postgres(pgdata, own=True).started

        embedded.stop_all(tmp_path)
        subprocess.run([sys.executable, "-c", killed_make_run, pgdata], check=True, timeout=120)
        assert embedded.start_postgres(pgdata, own=True).started
    finally:
        embedded.stop_all(tmp_path)


def test_two_sessions_starting_on_a_new_directory_share_one_server_the_last_stops(
    tmp_path: Path,
) -> None:
    """make test's two processes start together on a fresh .data/test-pg: both ran initdb
    and the second failed on the first's files; and the one that had started the server
    left it running when it ended before the other."""
    pgdata = tmp_path / "pg"
    session = (
        "import sys; from pathlib import Path; from ledger_server.devstack import embedded;"
        "server = embedded.start_postgres(Path(sys.argv[1]));"
        "print(server.started, server.url, flush=True); sys.stdin.read();"
        "print(server.release(stop_when_unused=True), flush=True)"
    )
    sessions = [
        subprocess.Popen(
            [sys.executable, "-c", session, pgdata],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        started = []
        for process in sessions:
            line = process.stdout.readline() if process.stdout else ""
            assert line, process.communicate(timeout=60)[1]
            flag, url = line.split()
            started.append(flag == "True")
            assert psycopg.connect(url, connect_timeout=10).execute("SELECT 1").fetchone()
        assert sorted(started) == [False, True]

        first = sessions[started.index(True)]  # the one that started it ends first
        assert first.communicate("", timeout=60)[0].strip() == "False"
        assert embedded._postmaster_pid(pgdata) is not None
        other = sessions[started.index(False)]
        assert other.communicate("", timeout=60)[0].strip() == "True"
        assert embedded._postmaster_pid(pgdata) is None
    finally:
        for process in sessions:
            process.kill()
        embedded.stop_all(tmp_path)


def test_make_run_says_which_embedded_servers_it_leaves_running(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ledger_server.devstack import __main__ as devstack

    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    redis = embedded.EmbeddedRedis(data_dir=Path("/nowhere"), port=1, pid=1, started=True)
    assert devstack._left_running([redis]) == ["postgres"]  # make migrate started it
    monkeypatch.setenv("DATABASE_URL", "postgresql://elsewhere/ledger")
    assert devstack._left_running([]) == ["redis"]


def test_the_ready_banner_masks_the_passwords_in_the_urls() -> None:
    from ledger_server.devstack import __main__ as devstack

    banner = devstack.ready_banner(
        "localhost",
        50051,
        {
            "DATABASE_URL": "postgresql://postgres:S3cretPW@db.example/ledger",
            "REDIS_URL": "redis://:R3disPW@cache:6379/0?password=R3disPW",
            "STRIPE_WEBHOOK_SECRET": "whsec_dev_credit_ledger",
        },
    )
    assert "S3cretPW" not in banner and "R3disPW" not in banner
    assert "DATABASE_URL=postgresql://postgres:***@db.example/ledger\n" in banner
    assert "REDIS_URL=redis://:***@cache:6379/0?password=***\n" in banner


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("postgresql://postgres:@/postgres?host=/x", "postgresql://postgres:@/postgres?host=/x"),
        ("redis://u:p@ss@h:6379/0", "redis://u:***@h:6379/0"),
        ("postgresql://u:p/w@h/db", "postgresql://u:***@h/db"),
        (
            "postgresql://h/db?sslmode=require&password=pw",
            "postgresql://h/db?sslmode=require&password=***",
        ),
        ("host=h password='p w' dbname=db", "host=h password=*** dbname=db"),
    ],
)
def test_passwords_are_masked_in_every_form_of_url(url: str, shown: str) -> None:
    from ledger_server.devstack.__main__ import mask_password

    assert mask_password(url) == shown
