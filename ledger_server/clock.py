"""The ledger's notion of now, passed into every SQL operation so tests can move time."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


class OffsetClock:
    """Real time plus an offset that only grows: lets tests jump ahead (expiry,
    time-to-live) while time keeps moving forward for everything else."""

    def __init__(self) -> None:
        self._offset = timedelta()
        self._lock = threading.Lock()

    def advance(self, delta: timedelta) -> None:
        if delta < timedelta():
            raise ValueError("time only moves forward")
        with self._lock:
            self._offset += delta

    def now(self) -> datetime:
        with self._lock:
            offset = self._offset
        return datetime.now(UTC) + offset
