"""The ledger server as a real process (`python -m ledger_server serve`), for tests that
kill it and start it again. It uses the system clock, not the tests' OffsetClock."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_LISTENING = re.compile(r"listening on \S+ \(port (\d+)\)")
_METRICS = re.compile(r"metrics on http://\S+:(\d+)/metrics")


class ServerProcess:
    def __init__(
        self, database_url: str, port: int = 0, env: Mapping[str, str] | None = None
    ) -> None:
        self.database_url = database_url
        self.port = port
        self.extra_env = dict(env or {})
        self.log: list[str] = []
        self.metrics_port: int | None = None
        self._listening = threading.Event()
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> ServerProcess:
        env = {
            **os.environ,
            "DATABASE_URL": self.database_url,
            "LEDGER_GRPC_ADDR": f"127.0.0.1:{self.port}",
            "LEDGER_MIGRATE_ON_START": "false",
            "LEDGER_DB_POOL_MIN": "1",
            "LEDGER_DB_POOL_MAX": "4",
            "LEDGER_SHUTDOWN_GRACE_SECONDS": "1",
            "LEDGER_METRICS_ADDR": "",  # no /metrics unless a test asks (port 0: any port)
            **self.extra_env,
        }
        self._process = subprocess.Popen(
            [sys.executable, "-m", "ledger_server", "serve"],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while not self._listening.wait(0.05):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("the ledger server did not start:\n" + "".join(self.log))
        return self

    def _read_log(self) -> None:
        assert self._process is not None and self._process.stderr is not None
        for line in self._process.stderr:
            self.log.append(line)
            metrics = _METRICS.search(line)
            if metrics:
                self.metrics_port = int(metrics.group(1))
            match = _LISTENING.search(line)
            if match and not self._listening.is_set():
                self.port = int(match.group(1))
                self._listening.set()

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, like a crash or an OOM kill."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
        self._reap()

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
        self._reap()

    def _reap(self) -> None:
        if self._process is None:
            return
        self._process.wait(timeout=30)
        if self._reader is not None:
            self._reader.join(timeout=10)
        if self._process.stderr is not None:
            self._process.stderr.close()
