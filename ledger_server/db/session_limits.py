"""What every connection of the server and the workers sets for its session.

A transaction whose client stopped talking (its host vanished, its process hung between
two statements) keeps its locks: an event row, an account, so every call on that account
waits and times out. PostgreSQL notices a vanished host only when TCP keepalive gives up,
two hours by default. No transaction of the ledger waits for anything but PostgreSQL between
its statements (the workers send email and call Stripe outside any transaction), so one idle
for a minute has lost its client: PostgreSQL ends that session and its locks go.

A session whose client died while a statement of it waits (for an account's lock held by a
long transaction, say: a worker killed mid-job) went on waiting, holding what it had locked
(the payment event's row), then ran the statement to its end before it noticed; the event's
rerun and the sweeper waited for it (helper-154's review). Such a session checks every
CLIENT_CONNECTION_CHECK_INTERVAL that its client is still there while a statement runs,
and ends if not (PostgreSQL 14 and later; a poll of the socket each time).

The session's TimeZone is UTC whatever the server's or the database's default: PostgreSQL
adds the days of an interval to a timestamptz as calendar days of the session's zone, so a
30-day expiry (sign-up bonus, daily reward, a redemption code's credit lifetime) that spans
a daylight-saving change elsewhere would be 29 days 23 hours or 30 days 1 hour. In UTC a
day is always 24 hours. What must follow a local calendar (the day of a daily reward, the
month of an allowance or a report) names ledger.timezone explicitly (AT TIME ZONE
ledger_timezone()), never the session's zone."""

from __future__ import annotations

IDLE_IN_TRANSACTION_TIMEOUT = "60s"
CLIENT_CONNECTION_CHECK_INTERVAL = "2s"
SESSION_TIMEZONE = "UTC"

SET_SESSION_LIMITS = (
    "SELECT set_config('idle_in_transaction_session_timeout', "
    f"'{IDLE_IN_TRANSACTION_TIMEOUT}', false), "
    # PostgreSQL 13 and older have no such setting (an error would fail every session).
    "CASE WHEN current_setting('server_version_num')::int >= 140000 THEN "
    "set_config('client_connection_check_interval', "
    f"'{CLIENT_CONNECTION_CHECK_INTERVAL}', false) END, "
    f"set_config('TimeZone', '{SESSION_TIMEZONE}', false)"
).encode()
