"""Runs the real gRPC server in a background thread (its own event loop) on an
ephemeral port, so tests talk to it over a real channel."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace

from ledger_server.clock import Clock
from ledger_server.config import Settings
from ledger_server.server import event_loop
from ledger_server.server.app import running_server


class ServerThread:
    def __init__(self, settings: Settings, clock: Clock) -> None:
        self._settings = replace(settings, migrate_on_start=False)
        self._clock = clock
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.port = 0
        self._thread = threading.Thread(target=self._run, name="ledger-server", daemon=True)

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(timeout=60):
            raise RuntimeError("the ledger server did not start within 60 s")
        if self._error is not None:
            raise RuntimeError("the ledger server failed to start") from self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        try:
            # The loop `serve` runs on (uvloop by default), so the suite tests that one.
            event_loop.run(self._main(), self._settings.event_loop)
        except BaseException as exc:  # surfaced to start()
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with running_server(self._settings, self._clock, "127.0.0.1:0") as running:
            self.port = running.port
            self._ready.set()
            await self._stop.wait()
