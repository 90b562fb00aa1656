"""What every pooled connection of the server and the workers sets for its session.

A transaction whose client stopped talking (its host vanished, its process hung between
two statements) keeps its locks: an event row, an account, so every call on that account
waits and times out. PostgreSQL notices a vanished host only when TCP keepalive gives up,
two hours by default. No transaction of the ledger waits for anything but PostgreSQL between
its statements (the workers send email and call Stripe outside any transaction), so one idle
for a minute has lost its client: PostgreSQL ends that session and its locks go."""

from __future__ import annotations

IDLE_IN_TRANSACTION_TIMEOUT = "60s"

SET_SESSION_LIMITS = (
    "SELECT set_config('idle_in_transaction_session_timeout', "
    f"'{IDLE_IN_TRANSACTION_TIMEOUT}', false)"
).encode()
