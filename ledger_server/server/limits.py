"""Per-call limits: a token-bucket rate limit per caller, and the call's deadline handed to
the database (db/deadlines.py turns it into statement and lock time-outs).

The rate limit is in-process: each server process keeps its own buckets, so N servers
behind a load balancer let a caller make up to N times the configured rate. Callers are the
authenticated principals (ledger_server/server/auth.py); without tokens configured every
(loopback) caller shares one bucket. Both steps run after authentication, inside the call's
composed behaviour (server/pipeline.py); health and reflection skip them (never limited)."""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from ledger_server.db.deadlines import reset_call_deadline, set_call_deadline
from ledger_server.errors import LedgerError
from ledger_server.security import current_principal
from ledger_server.server.error_boundary import to_status

Context = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[[Any, Context], Awaitable[Any]]

UNAUTHENTICATED_BUCKET = ""


class RateLimiter:
    """Token buckets: each caller may make ``burst`` calls at once, refilled at ``rate`` calls
    per second. ``rate`` 0 switches the limit off."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst if burst > 0 else max(1, math.ceil(rate))
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, updated)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, caller: str) -> float:
        """Takes one token; returns 0 when granted, else the seconds until one is free."""
        now = self._clock()
        tokens, updated = self._buckets.get(caller, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - updated) * self.rate)
        if tokens >= 1:
            self._buckets[caller] = (tokens - 1, now)
            return 0.0
        self._buckets[caller] = (tokens, now)
        return (1 - tokens) / self.rate


def limited(limiter: RateLimiter, inner: Handler) -> Handler:
    """``inner`` behind the caller's rate limit (when on), with the call's deadline recorded
    for the database (db/deadlines.py) while it runs."""

    async def within_limits(request: Any, context: Context) -> Any:
        if limiter.enabled:
            principal = current_principal()
            wait = limiter.take(principal.name if principal else UNAUTHENTICATED_BUCKET)
            if wait > 0:
                await context.abort_with_status(
                    to_status(
                        LedgerError(
                            grpc.StatusCode.RESOURCE_EXHAUSTED,
                            "RATE_LIMITED",
                            "too many calls from this caller; retry later",
                            {"retry_after_ms": str(math.ceil(wait * 1000))},
                        )
                    )
                )
        token = set_call_deadline(context.time_remaining())
        try:
            return await inner(request, context)
        finally:
            reset_call_deadline(token)

    return within_limits
