"""`make run` from nothing: embedded PostgreSQL and Redis, migrations, the server with
reflection and health; the README's buf curl walk-through works as printed; Ctrl-C stops
everything; a second run finds the same data. Also: the README's configuration table
names every setting the server reads."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ledger.v1 import ledger_service_pb2 as pb
from ledger.v1 import ledger_service_pb2_grpc
from ledger_server import runtime_settings

REPO = Path(__file__).resolve().parent.parent
BUF = REPO / "node_modules" / ".bin" / "buf"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Stack:
    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.output: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            if "credit-ledger is up" in line:
                self.ready.set()

    def text(self) -> str:
        return "".join(self.output)


@contextmanager
def make_run(
    data_dir: Path, port: int, webhook_port: int, stop_with: int = signal.SIGINT
) -> Iterator[Stack]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(
        LEDGER_DATA_DIR=str(data_dir),
        LEDGER_GRPC_ADDR=f"localhost:{port}",
        LEDGER_WEBHOOK_ADDR=f"127.0.0.1:{webhook_port}",
        # Its own metrics port too: make run refuses to start on a taken one.
        LEDGER_METRICS_ADDR=f"127.0.0.1:{_free_port()}",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "ledger_server.devstack", "run"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal gives `make run`
    )
    stack = Stack(process)
    try:
        assert stack.ready.wait(timeout=120), stack.text()
        yield stack
    finally:
        if process.poll() is None:
            # SIGINT: what Ctrl-C sends to the foreground group; SIGHUP: its terminal closed.
            os.killpg(process.pid, stop_with)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                raise


def _walkthrough() -> str:
    readme = (REPO / "README.md").read_text()
    match = re.search(
        r"<!-- walkthrough:start -->\n```bash\n(.*?)```\n<!-- walkthrough:end -->", readme, re.S
    )
    assert match, "README has no walk-through block"
    return match.group(1)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for_port(port: int, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _port_open(port):
            return True
        time.sleep(0.1)
    return False


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_make_run_serves_the_readme_walkthrough_and_stops_cleanly(tmp_path: Path) -> None:
    assert BUF.exists(), "make installs buf into node_modules; run the suite through make test"
    data_dir = tmp_path / "data"
    port, webhook_port = _free_port(), _free_port()
    with make_run(data_dir, port, webhook_port) as stack:
        banner = stack.text()
        assert f"gRPC on localhost:{port}" in banner
        printed = [
            line.split(":", 1)[1].strip()
            for line in banner.splitlines()
            if line.strip().startswith(("try:", "then:"))
        ]
        assert len(printed) == 2 and all("buf curl" in cmd for cmd in printed)
        redis_port = int(re.search(r"REDIS_URL=redis://127.0.0.1:(\d+)", banner).group(1))  # type: ignore[union-attr]
        assert _port_open(redis_port)
        assert (data_dir / "pg" / "postmaster.pid").exists()

        with grpc.insecure_channel(f"localhost:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        # The worker, the scheduler and the webhook receiver run beside the server.
        assert _wait_for_port(webhook_port), stack.text()
        assert f"Stripe webhooks: http://127.0.0.1:{webhook_port}/stripe/webhook" in banner

        listed = subprocess.run(
            [
                str(BUF),
                "curl",
                "--list-services",
                "--protocol",
                "grpc",
                "--http2-prior-knowledge",
                f"http://localhost:{port}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listed.returncode == 0, listed.stderr
        assert {"ledger.v1.LedgerService", "grpc.health.v1.Health"} <= set(listed.stdout.split())

        # The banner's own first call, pasted as printed.
        for command in printed:
            pasted = subprocess.run(
                command, shell=True, cwd=REPO, capture_output=True, text=True, timeout=60
            )
            assert pasted.returncode == 0, pasted.stderr

        script = _walkthrough().replace("localhost:50051", f"localhost:{port}")
        for _ in range(2):  # idempotency keys make the walk-through safe to run twice
            walked = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", script],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert walked.returncode == 0, walked.stdout + walked.stderr
            assert '"balanceMicros": "96500000"' in walked.stdout, walked.stdout
    assert stack.process.returncode == 0, stack.text()
    for name in ("server", "worker", "scheduler", "webhooks"):
        stopped = re.search(rf"stopping {name} \(pid (\d+)\)", stack.text())
        assert stopped, f"{name} was not started and stopped:\n{stack.text()}"
        assert not _pid_alive(int(stopped.group(1))), f"{name} still running"
    assert not _port_open(port)
    assert not _port_open(webhook_port)
    assert not _port_open(redis_port)
    assert not (data_dir / "pg" / "postmaster.pid").exists(), "PostgreSQL still running"

    # Its terminal closed (helper-64: SIGHUP left the embedded PostgreSQL running).
    with make_run(data_dir, port, webhook_port, stop_with=signal.SIGHUP) as again:
        assert "credit-ledger is up" in again.text()
        with grpc.insecure_channel(f"localhost:{port}") as channel:
            balance = ledger_service_pb2_grpc.LedgerServiceStub(channel).Balance(
                pb.BalanceRequest(account_id="alice")
            )
        assert balance.balance_micros == 96_500_000
    assert again.process.returncode == 0, again.text()
    assert not (data_dir / "pg" / "postmaster.pid").exists(), "PostgreSQL still running"


def test_readme_configuration_table_names_every_setting() -> None:
    readme = (REPO / "README.md").read_text()
    documented = set(re.findall(r"^\|.*?`([A-Z][A-Z0-9_]+)` \|", readme, re.M))
    read = set()
    for path in [*(REPO / "ledger_server").rglob("*.py"), *(REPO / "workers").rglob("*.py")]:
        read |= set(
            re.findall(
                r"""(?:env|environ)(?:\.get)?\(\s*["']([A-Z][A-Z0-9_]+)["']""", path.read_text()
            )
        )
        read |= set(re.findall(r"""_(?:int|bool)\(env, "([A-Z_]+)\"""", path.read_text()))
    read |= {definition.env_var for definition in runtime_settings.DEFINITIONS}
    assert read, "found no settings in the code"
    assert read - documented == set(), f"settings missing from README: {read - documented}"


def test_the_banner_says_how_to_get_buf_where_there_is_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a fresh machine `buf` is neither on PATH nor in node_modules yet: the first call
    the banner prints would fail as pasted (helper-64)."""
    from ledger_server.devstack import __main__ as devstack

    env = {"DATABASE_URL": "postgresql://x", "REDIS_URL": "redis://x"}
    monkeypatch.setattr(devstack, "_buf_command", lambda: None)
    assert "`make node_modules` installs it" in devstack.ready_banner("localhost", 50051, env)
    monkeypatch.setattr(devstack, "_buf_command", lambda: "buf")
    assert "make node_modules" not in devstack.ready_banner("localhost", 50051, env)


def test_the_banner_names_the_metrics_endpoint_and_the_clis_address() -> None:
    """The banner left out /metrics, and on another port than the default the `ledger`
    CLI (which reads LEDGER_ADDRESS, not LEDGER_GRPC_ADDR) called the wrong server."""
    from ledger_server.devstack import __main__ as devstack

    env = {"DATABASE_URL": "postgresql://x", "REDIS_URL": "redis://x"}
    banner = devstack.ready_banner("localhost", 50051, env)
    assert "  metrics: http://localhost:9464/metrics\n" in banner
    assert "LEDGER_ADDRESS" not in banner  # the CLI's default

    env["LEDGER_METRICS_ADDR"] = "127.0.0.1:53464"
    banner = devstack.ready_banner("localhost", 53051, env)
    assert "  metrics: http://127.0.0.1:53464/metrics\n" in banner
    assert "  ledger CLI: export LEDGER_ADDRESS=localhost:53051\n" in banner

    env["LEDGER_METRICS_ADDR"] = ""
    assert "  metrics: not served" in devstack.ready_banner("localhost", 50051, env)
