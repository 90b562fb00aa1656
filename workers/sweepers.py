"""Time-based rules, run on a schedule (workers/schedule.py) and safe to run any
number of times at once: expired lots into breakage, timed-out reservations released,
monthly allowances granted, automatic daily rewards, re-queueing what stalled, and deleting
the checkout attempt rows no checkout needs any more.

Each takes `as_of` (an ISO 8601 time; now when None) so tests and back-fills can say
what "now" is."""

from __future__ import annotations

import hashlib
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from ledger_server.db.errors import translate
from ledger_server.db.queries import query
from ledger_server.ledger.reserved_keys import AUTO_DAILY_KEY_PREFIX
from workers import alerts
from workers.db import connection
from workers.queues import DEFAULT_QUEUE, enqueue, requeue

SWEEP_BATCH = 500
# The due accounts one sweep transaction maintains at most, and how long it goes on taking
# more: each stays locked until it commits, and a call on one waits till then, as does a
# group-commit batch with that call among others' (500 accounts in one transaction were
# held 2.6 s, and batched calls on any of them gave up as busy).
SWEEP_CHUNK = 20
SWEEP_CHUNK_MS = 100
ALERT_SWEEP_BATCH = 1000
# Checkout attempt rows deleted per statement (each its own transaction, so a checkout that
# writes one waits for few), and how long after Stripe's last answer (migration 0038): a day
# once the checkout is settled, Stripe's idempotency keys being pruned after 24 hours, and
# 30 days while it is not.
CHECKOUT_ATTEMPTS_BATCH = 1000
CHECKOUT_ATTEMPTS_SETTLED_KEEP = timedelta(hours=24)
CHECKOUT_ATTEMPTS_UNSETTLED_KEEP = timedelta(days=30)
# How long one part of the daily rewards runs before it queues the rest (RQ's default job
# time-out is 180 s).
DAILY_BUDGET_SECONDS = 120.0
# How many days before today a scheduled run still finishes (daily_reward_runs): an older
# unfinished day is left as it is, so an old record never grants a stale day.
DAILY_CATCH_UP_DAYS = 7

log = logging.getLogger(__name__)


def _now(as_of: str | None) -> datetime:
    return datetime.fromisoformat(as_of) if as_of else datetime.now(UTC)


class SweepIncomplete(RuntimeError):
    """Some accounts' maintenance failed; every other due account was swept. The failed
    ones stay due (each call on one maintains it first, and fails as loudly), and the job
    fails so that it shows; the next run tries them again."""


def sweep_due_accounts(as_of: str | None = None, batch: int = SWEEP_CHUNK) -> int:
    """Applies due expiries, time-outs and allowances, a chunk per transaction (at most
    `batch` accounts or SWEEP_CHUNK_MS), until no account it can lock is due. Returns how
    many accounts it swept."""
    now = _now(as_of)
    swept = 0
    failed: list[str] = []
    with connection() as conn:
        while True:
            try:
                row = conn.execute(
                    query("sweep"),
                    {"now": now, "limit": batch, "skip": failed, "max_ms": SWEEP_CHUNK_MS},
                ).fetchone()
                done = int(row[0]) if row else 0
                swept += done
            except psycopg.Error as exc:
                # One account whose maintenance raises fails its whole batch, and it stays
                # due and first in line: without this, no account would be swept again.
                log.warning("a sweep batch failed (%s): sweeping it account by account", exc)
                maintained, failures = _sweep_one_by_one(conn, now, batch, failed)
                swept += maintained
                if maintained + failures == 0:
                    break  # only accounts others hold: they are theirs to maintain
                continue  # the failed ones are passed over from now on
            if done == 0:
                break  # a chunk cut short by time says nothing of what is left
    if failed:
        raise SweepIncomplete(
            f"maintenance failed on {len(failed)} account(s), first {failed[0]!r}; {swept} swept"
        )
    return swept


def _sweep_one_by_one(
    conn: psycopg.Connection[Any], now: datetime, batch: int, failed: list[str]
) -> tuple[int, int]:
    """Sweeps the next batch of due accounts one transaction each; one that fails joins
    `failed`, which the rest of the run passes over. Returns how many were maintained and
    how many failed; accounts held by a call or another sweeper count as neither."""
    due = [
        r[0]
        for r in conn.execute(query("due_accounts"), {"now": now, "limit": batch, "skip": failed})
    ]
    maintained = failures = 0
    for account_id in due:
        try:
            rows = conn.execute(
                query("sweep_account"), {"account_id": account_id, "now": now}
            ).fetchall()
        except psycopg.Error as exc:
            log.error("maintenance of account %s failed: %s", account_id, exc)
            failed.append(account_id)
            failures += 1
        else:
            maintained += len(rows)
    return maintained, failures


def grant_monthly_allowances(as_of: str | None = None, batch: int = SWEEP_BATCH) -> int:
    """Grants this month's allowance to every account that lacks it (run twice in a
    month, it grants once), looking at `batch` accounts per statement and marking at most
    SWEEP_CHUNK of them per transaction, so that a call on one waits for few others.
    Returns how many accounts were due."""
    now = _now(as_of)
    marked = 0
    after: str | None = ""
    with connection() as conn:
        while after is not None:
            row = conn.execute(
                query("schedule_monthly_allowances"),
                {"now": now, "after": after, "limit": batch, "lock_limit": SWEEP_CHUNK},
            ).fetchone()
            assert row is not None
            marked += int(row[0])
            after = row[1]
    sweep_due_accounts(now.isoformat())
    return marked


def _digest(text: str) -> str:
    """A job-id-safe stand-in for an account id (any text)."""
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class DailyRewardsIncomplete(RuntimeError):
    """Some accounts' daily rewards failed; every other account got its reward. The job
    fails so that the failure shows (RQ's failed registry, its retries); a re-run grants
    nobody twice."""


def grant_daily_rewards(
    as_of: str | None = None,
    batch: int = SWEEP_BATCH,
    after: str = "",
    budget_seconds: float = DAILY_BUDGET_SECONDS,
    day: str | None = None,
) -> int:
    """When daily.automatic is on: claims the day's daily reward for every account (after
    `after`) that lacks it, one idempotency key per account and day of ledger.timezone (the
    day the claim counts in), so a re-run, or two runs at once, grant nothing twice.

    A scheduled run (no `day`) records in daily_reward_runs that it set out to grant today,
    and first finishes the days of the last DAILY_CATCH_UP_DAYS that a run set out to grant
    but none finished (one died part-way, its rest was lost with Redis, an account's claim
    failed, or accounts were opened after its last run), oldest first, then grants today. A
    day is finished once it has ended in ledger.timezone and a run then found no account
    left without its reward and none failed: the first run after midnight grants it to the
    accounts opened late in it. A day no run set out to grant (daily.automatic was off, the
    reward paused by an amount of 0, or no scheduler ran all day) is never granted later:
    the operator did not mean it to be; nor is a day older than the catch-up window, nor the
    rest of a day on which the reward was switched off or paused (a run that finds it so
    ends the day it is for). A scheduled run records the amount and expiry it grants today
    at, and every later grant of the day takes them (ledger_claim_daily_reward_of_day): a
    day finished after midnight is not granted at the next day's amount.

    Past `budget_seconds` it queues the rest as a job of its own (and each day it has not
    begun as one more), so one run never holds a worker for long nor meets RQ's job
    time-out on a large ledger. The rest names its `day` (an ISO date): run after midnight,
    it still grants the day its first part set out to. An account whose claim fails is
    logged and passed over; the job then fails at the end, after every other account.
    Returns how many rewards this part granted."""
    started = time.monotonic()
    now = _now(as_of)
    with connection() as conn:
        if not _daily_rewards_on(conn):
            # A day that is not meant to be granted is not recorded, nor caught up; the days
            # runs set out to grant and did not finish end here, today's and the ones before
            # (a day stays open until the first run after it, so yesterday's rest would
            # otherwise be granted at the amount in force once the reward is back: helper-92).
            if day is not None:
                _end_day(conn, day, now)
            else:
                conn.execute(
                    query("end_open_daily_reward_runs"),
                    {"today": _ledger_day(conn, now), "now": now},
                )
            return 0
        days = [day] if day is not None else _days_to_grant(conn, now)
        run = _DailyRewardsRun(conn, as_of, now, batch, budget_seconds, started)
        for index, run_day in enumerate(days):
            start_after = after if run_day == days[-1] else ""
            if index and run.out_of_time():
                run.queue_rest(run_day, start_after)
            else:
                run.grant_day(run_day, start_after)
    if run.failed:
        raise DailyRewardsIncomplete(
            f"{len(run.failed)} accounts got no daily reward ({run.granted} did), "
            f"first {run.failed[0]!r}"
        )
    return run.granted


def _daily_rewards_on(conn: psycopg.Connection[Any]) -> bool:
    """daily.automatic and daily.enabled on, and an amount to grant (0 pauses the reward:
    every claim would be refused as switched off)."""
    values = {}
    for key in ("daily.automatic", "daily.enabled", "daily.amount_micros"):
        row = conn.execute(query("setting_value"), {"key": key}).fetchone()
        values[key] = row[0] if row else None
    amount = values["daily.amount_micros"]
    return (
        values["daily.automatic"] is True
        and values["daily.enabled"] is True
        and isinstance(amount, int)
        and amount > 0
    )


def _ledger_day(conn: psycopg.Connection[Any], now: datetime) -> str:
    """The day of ledger.timezone `now` falls on (an ISO date)."""
    row = conn.execute(query("ledger_day"), {"now": now}).fetchone()
    assert row is not None
    return str(row[0].isoformat())


def _end_day(conn: psycopg.Connection[Any], day: str, now: datetime) -> None:
    """Finishes the day's run (if one set out to grant it) before the day has ended: the
    reward was switched off or paused, and the rest of the day is not meant to be granted."""
    conn.execute(query("finish_daily_reward_run"), {"day": day, "now": now, "ended": True})


def _days_to_grant(conn: psycopg.Connection[Any], now: datetime) -> list[str]:
    """Records that a run set out to grant today; returns the unfinished days of the
    catch-up window, oldest first, then today (ISO dates)."""
    today = _ledger_day(conn, now)
    unfinished = conn.execute(
        query("start_daily_reward_run"),
        {"day": today, "now": now, "catch_up_days": DAILY_CATCH_UP_DAYS},
    ).fetchall()
    return [*(r[0].isoformat() for r in unfinished), today]


class _DailyRewardsRun:
    """One part of grant_daily_rewards: what it granted, which accounts failed, its time."""

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        as_of: str | None,
        now: datetime,
        batch: int,
        budget_seconds: float,
        started: float,
    ) -> None:
        self.conn, self.as_of, self.now = conn, as_of, now
        self.batch, self.budget_seconds, self.started = batch, budget_seconds, started
        self.granted = 0
        self.failed: list[str] = []
        self.refused = 0  # claims refused as the reward was switched off or paused meanwhile

    def out_of_time(self) -> bool:
        return time.monotonic() - self.started >= self.budget_seconds

    def queue_rest(self, day: str, after: str) -> None:
        # The rest queues behind the payments and sweeps that came meanwhile.
        enqueue(
            DEFAULT_QUEUE,
            "workers.sweepers.grant_daily_rewards",
            self.as_of,
            self.batch,
            after,
            self.budget_seconds,
            day,
            job_id=f"daily-rewards-{day}-{_digest(after)}",
        )

    def grant_day(self, day: str, after: str) -> None:
        """Claims `day` for the accounts after `after` that lack it; marks the day finished
        when none is left and it has ended (or the reward was switched off meanwhile), or
        queues the rest when out of time."""
        key = f"{AUTO_DAILY_KEY_PREFIX}{day}"
        key_hash = hashlib.sha256(key.encode()).digest()
        walked_from_start = after == ""
        failed_before, refused_before = len(self.failed), self.refused
        while True:
            accounts = [
                r[0]
                for r in self.conn.execute(
                    query("accounts_without_daily_claim"),
                    {"after": after, "day": day, "limit": self.batch},
                ).fetchall()
            ]
            for account_id in accounts:
                self._claim(account_id, day, key, key_hash)
            if len(accounts) < self.batch:
                break
            after = accounts[-1]
            if self.out_of_time():
                self.queue_rest(day, after)
                return
        if self.refused > refused_before:
            _end_day(self.conn, day, self.now)  # switched off during the run: it ends here
            return
        # A walk that began part-way did not see the accounts before it: an earlier part
        # may have failed on some.
        every_claim_made = len(self.failed) == failed_before
        if every_claim_made and (walked_from_start or not self._anyone_left(day)):
            # Marks it only once the day has ended: accounts opened later in it are owed it.
            self.conn.execute(
                query("finish_daily_reward_run"), {"day": day, "now": self.now, "ended": False}
            )

    def _claim(self, account_id: str, day: str, key: str, key_hash: bytes) -> None:
        """Claims the day for one account; one left without it joins `failed`."""
        try:
            result = self.conn.execute(
                query("claim_daily_reward_of_day"),
                {
                    "account_id": account_id,
                    "key": key,
                    "hash": key_hash,
                    "day": day,
                    "now": self.now,
                },
            ).fetchone()
        except psycopg.Error as exc:
            error = translate(exc)
            reason = error.reason if error is not None else None
            # Switched off meanwhile: the day is not meant to be granted any more (done, not
            # caught up later at whatever amount the reward has then).
            if reason == "SOURCE_DISABLED":
                self.refused += 1
            elif reason != "DAILY_REWARD_ALREADY_CLAIMED":
                log.error("daily reward of account %s failed: %s", account_id, exc)
                self.failed.append(account_id)
            return
        if result and not result[0].get("replayed"):
            self.granted += 1

    def _anyone_left(self, day: str) -> bool:
        row = self.conn.execute(
            query("accounts_without_daily_claim"), {"after": "", "day": day, "limit": 1}
        ).fetchone()
        return row is not None


def requeue_pending_alert_emails(
    older_than_seconds: int = 60, as_of: str | None = None, batch: int = ALERT_SWEEP_BATCH
) -> int:
    """Re-queues alert emails still pending after a while (their job was lost), and parked
    ones (alerts.FAST_ATTEMPTS spent on transient failures) once their last attempt is
    alerts.PARKED_RETRY_SECONDS old: one attempt each time, without RQ's fast retries."""
    now = _now(as_of)
    with connection() as conn:
        rows = conn.execute(
            query("pending_alert_emails"),
            {
                "now": now,
                "older_than": older_than_seconds,
                "fast_attempts": alerts.FAST_ATTEMPTS,
                "parked_before": now - timedelta(seconds=alerts.PARKED_RETRY_SECONDS),
                "limit": batch,
            },
        ).fetchall()
    stale_before = now - timedelta(seconds=older_than_seconds)
    return sum(
        requeue(
            DEFAULT_QUEUE,
            "workers.alerts.send_low_balance_email",
            account_id,
            alert_id,
            job_id=f"alert-email-{alert_id}",
            stale_before=stale_before,
            retry=attempts < alerts.FAST_ATTEMPTS,
        )
        for account_id, alert_id, attempts in rows
    )


def prune_checkout_stripe_attempts(
    as_of: str | None = None, batch: int = CHECKOUT_ATTEMPTS_BATCH
) -> int:
    """Deletes the checkout_stripe_attempts rows no checkout needs any more (migration
    0038), `batch` at a time, oldest first; returns how many."""
    now = _now(as_of)
    params = {
        "settled_before": now - CHECKOUT_ATTEMPTS_SETTLED_KEEP,
        "unsettled_before": now - CHECKOUT_ATTEMPTS_UNSETTLED_KEEP,
        "limit": batch,
    }
    deleted = 0
    with connection() as conn:
        while True:
            done = conn.execute(query("prune_checkout_stripe_attempts"), params).rowcount
            deleted += done
            if done < batch:
                break
    if deleted:
        log.info("deleted %d checkout attempt rows no checkout needs", deleted)
    return deleted
