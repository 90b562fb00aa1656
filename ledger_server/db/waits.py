"""How long a received call may wait in the server before its transaction has ended.

A call is judged at the time the server received it (its ``now``), and other calls'
maintenance and the sweeper leave a hold pending only ``ledger_hold_grace()`` past its
expiry (sql/functions/0001_ledger.sql): a Commit received in time that reached the account
after that found its hold already returned and was refused RESERVATION_EXPIRED, and the
finished job went unbilled. Nothing bounded the wait of a call without a deadline (or with
a long one) in the group-commit queue, nor its lock wait under
LEDGER_STATEMENT_TIMEOUT_MS=0.

So the calls judged at their received time (group commit's, server/group_commit.py) record
it here while they wait; a call that has waited MAX_WAIT by the ledger's clock before its
statement starts is refused WAITED_TOO_LONG (ABORTED: nothing was changed, retry with the
same idempotency key, which is judged at the retry's own time), its connection wait is
bounded by the time it has left, and so is its statement, lock waits included
(db/deadlines.py, DeadlinePool). Measured on the ledger's clock, the one the grace is
counted on (and the one tests move)."""

from __future__ import annotations

from contextvars import ContextVar, Token
from datetime import datetime, timedelta

import grpc

from ledger_server.clock import Clock
from ledger_server.errors import LedgerError

# ledger_hold_grace() (sql/functions/0001_ledger.sql), the one source: the server checks at
# start-up that the database's is this one (check_hold_grace).
HOLD_GRACE = timedelta(minutes=1)
# The rest of the grace (15 s) is for the clocks of the servers and workers whose
# maintenance times holds out, which may run ahead of this server's.
MAX_WAIT = HOLD_GRACE * 3 / 4
# A queued call with less than this left is refused rather than sent: a batch's statement
# runs only for what its oldest call has left, and timing out it would refuse them all.
MIN_LEFT_TO_RUN = timedelta(milliseconds=500)

_received: ContextVar[tuple[Clock, datetime] | None] = ContextVar(
    "ledger_call_received", default=None
)


def set_received(clock: Clock, received: datetime) -> Token[tuple[Clock, datetime] | None]:
    """Records when the current call (a batch: its oldest) was received, on ``clock``."""
    return _received.set((clock, received))


def reset_received(token: Token[tuple[Clock, datetime] | None]) -> None:
    _received.reset(token)


def waited(clock: Clock, received: datetime) -> timedelta:
    return clock.now() - received


def seconds_left() -> float | None:
    """Seconds until the current call has waited MAX_WAIT (None: not a call judged at its
    received time)."""
    recorded = _received.get()
    if recorded is None:
        return None
    clock, received = recorded
    return (MAX_WAIT - waited(clock, received)).total_seconds()


def waited_too_long() -> LedgerError:
    return LedgerError(
        grpc.StatusCode.ABORTED,
        "WAITED_TOO_LONG",
        "the call waited in the server longer than it may before its transaction ends (the"
        " server is overloaded); nothing was changed: retry with the same idempotency key",
        {"max_wait_ms": str(int(MAX_WAIT.total_seconds() * 1000))},
    )


def check_hold_grace(database_grace: timedelta) -> None:
    """Refuses to serve when the database's ledger_hold_grace() is not HOLD_GRACE: the
    bound on a call's wait would no longer fit in it."""
    if database_grace != HOLD_GRACE:
        raise RuntimeError(
            f"ledger_hold_grace() in the database is {database_grace}, the server's"
            f" HOLD_GRACE (ledger_server/db/waits.py) {HOLD_GRACE}: change both together"
        )
