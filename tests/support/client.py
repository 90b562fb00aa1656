"""The typed client as the tests use it: quick retries, against the session's server."""

from __future__ import annotations

from ledger_client import RetryPolicy

FAST_RETRY = RetryPolicy(max_attempts=5, initial_backoff=0.01, max_backoff=0.05)
