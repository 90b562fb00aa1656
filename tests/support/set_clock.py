"""A clock for tests that write the past: the ledger's now is what the test sets."""

from __future__ import annotations

from datetime import datetime


class SetClock:
    """The ledger's now, set by the test (to days before today's real time)."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def now(self) -> datetime:
        return self.at
