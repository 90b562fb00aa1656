"""The event loop the server runs on: uvloop (libuv) unless LEDGER_EVENT_LOOP=asyncio.

grpc.aio and psycopg's async connections both run on any asyncio loop; what differs is
what each wakeup costs. Every call registers and drops a database socket with the loop and
grpc's poller thread wakes the loop once per batch of completions, and uvloop does that in
C: BENCHMARKS.md (session 7) measured the server's CPU per call against the standard loop.
`asyncio` stays as the fallback for a platform without uvloop's wheels."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

EVENT_LOOPS = ("uvloop", "asyncio")
# uvloop has no Windows wheels (pyproject installs it elsewhere only).
DEFAULT_EVENT_LOOP = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"


def run(main: Coroutine[Any, Any, T], event_loop: str) -> T:
    """asyncio.run on the chosen loop (one of EVENT_LOOPS)."""
    if event_loop == "uvloop":
        import uvloop  # imported here: `asyncio` must work where uvloop is not installed

        return uvloop.run(main)
    if event_loop == "asyncio":
        return asyncio.run(main)
    raise ValueError(f"unknown event loop {event_loop!r}; one of {', '.join(EVENT_LOOPS)}")
