"""Automatic daily rewards catch up from PostgreSQL (daily_reward_runs): a day a run set out
to grant but did not finish (the run died part-way, its rest was lost with Redis, an
account's claim failed) is finished by the next days' runs; a day no run set out to grant
is not granted later; a catch-up run twice, or two at once, grants nobody twice."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from rq import Queue

from ledger_server.audit import audit_database
from ledger_server.db.migrate import migrate
from ledger_server.db.queries import query
from ledger_server.runtime_settings import environment_defaults, sync_environment_defaults
from support.ledger import new_account
from support.workers import assert_finished, run_burst_workers
from workers import db as worker_db
from workers import sweepers
from workers.queues import DEFAULT_QUEUE, enqueue, redis_connection

DAY = date(2026, 12, 5)  # the ledger's time zone is UTC (the default)


def _at(day: date, hour: int, minute: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=UTC)


def _set_automatic(url: str, on: bool, at: datetime) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "SELECT ledger_put_setting('daily.automatic', %s, 'admin', 'test', "
            "'the job under test', %s, true)",
            ("true" if on else "false", at),
        )


def _open_accounts(url: str, accounts: list[str], at: datetime) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for account in accounts:
            conn.execute("SELECT ledger_open_account(%s, '', %s)", (account, at))


def _claimed_days(url: str) -> dict[str, list[date]]:
    """Per account, the days of its daily lots (one lot per claim, read from the lots)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT l.account_id, c.claim_date FROM lots l "
            "LEFT JOIN daily_claims c ON c.account_id = l.account_id AND c.lot_id = l.lot_id "
            "WHERE l.source = 'daily' ORDER BY l.account_id, c.claim_date"
        ).fetchall()
    days: dict[str, list[date]] = {}
    for account, day in rows:
        days.setdefault(account, []).append(day)
    return days


def _runs(url: str) -> list[tuple[date, bool]]:
    """The recorded days, each with whether a run finished it."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT day, finished_at IS NOT NULL FROM daily_reward_runs ORDER BY day"
        ).fetchall()
    return [(r[0], r[1]) for r in rows]


def _refuse_claims_of(url: str, account: str) -> None:
    """Every daily claim of the account fails (an error no rule of the ledger raises)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION refuse_claim() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$"
        )
        conn.execute(
            "CREATE TRIGGER refuse_claim BEFORE INSERT ON daily_claims FOR EACH ROW "
            f"WHEN (NEW.account_id = '{account}') EXECUTE FUNCTION refuse_claim()"
        )


def _accept_claims(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TRIGGER refuse_claim ON daily_claims")
        conn.execute("DROP FUNCTION refuse_claim()")


@pytest.fixture
def ledger_url(fresh_database_url: str, redis_url: str, monkeypatch: Any) -> Iterator[str]:
    """A fresh ledger with automatic daily rewards on since before DAY, for the job run in
    this process; the default queue emptied before and after."""
    migrate(fresh_database_url)
    monkeypatch.setenv("DATABASE_URL", fresh_database_url)
    monkeypatch.setenv("REDIS_URL", redis_url)
    since = _at(DAY - timedelta(days=20), 0)
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        sync_environment_defaults(conn, environment_defaults(), since)
    _set_automatic(fresh_database_url, True, since)
    queue = Queue(DEFAULT_QUEUE, connection=redis_connection())
    queue.empty()
    try:
        yield fresh_database_url
    finally:
        queue.empty()
        worker_db.close()
    assert audit_database(fresh_database_url) == []


def _stop_part_way(url: str, at: datetime) -> int:
    """The day's run as it stops part-way: one account, then its rest queued and lost (Redis
    flushed). Returns how many it granted."""
    granted = sweepers.grant_daily_rewards(at.isoformat(), 1, "", 0)
    queue = Queue(DEFAULT_QUEUE, connection=redis_connection())
    assert len(queue.get_jobs()) == 1, "the run queued no rest"
    queue.empty()
    return granted


def test_a_day_a_run_did_not_finish_is_finished_by_the_next_days_run(ledger_url: str) -> None:
    """The last run of a day died part-way (its rest lost): the accounts it did not reach got
    that day at the next day's first run, and every account the new day. An account whose
    claim failed leaves its day unfinished too, and gets it once its claim works."""
    prefix = new_account("catch-up")
    early = [f"{prefix}-a{n}" for n in range(3)]
    late = [f"{prefix}-b{n}" for n in range(4)]
    _open_accounts(ledger_url, early, _at(DAY - timedelta(days=1), 8))
    assert sweepers.grant_daily_rewards(_at(DAY, 0, 2).isoformat()) == 3
    assert _runs(ledger_url) == [(DAY, False)]  # finished only once it has ended
    # Opened during the day; the day's last run reaches only the first of them.
    _open_accounts(ledger_url, late, _at(DAY, 15))
    assert _stop_part_way(ledger_url, _at(DAY, 23, 2)) == 1
    assert _runs(ledger_url) == [(DAY, False)]

    next_day = DAY + timedelta(days=1)
    assert sweepers.grant_daily_rewards(_at(next_day, 0, 2).isoformat()) == 3 + 7
    assert _claimed_days(ledger_url) == {a: [DAY, next_day] for a in early + late}
    assert _runs(ledger_url) == [(DAY, True), (next_day, False)]

    # An account whose claim fails: every other account gets the day, the day stays open.
    third_day, fourth_day = DAY + timedelta(days=2), DAY + timedelta(days=3)
    refused = late[2]
    _refuse_claims_of(ledger_url, refused)
    with pytest.raises(sweepers.DailyRewardsIncomplete, match=refused):
        sweepers.grant_daily_rewards(_at(third_day, 9).isoformat())
    assert _runs(ledger_url)[-1] == (third_day, False)
    _accept_claims(ledger_url)
    assert sweepers.grant_daily_rewards(_at(fourth_day, 9).isoformat()) == 1 + 7
    assert _claimed_days(ledger_url) == {
        a: [DAY, next_day, third_day, fourth_day] for a in early + late
    }
    assert _runs(ledger_url) == [
        (DAY, True),
        (next_day, True),
        (third_day, True),
        (fourth_day, False),
    ]


@pytest.mark.parametrize("zone", ["UTC", "Asia/Shanghai"])
def test_an_account_opened_after_the_days_last_run_gets_the_day_at_the_first_run_after_midnight(
    ledger_url: str, zone: str
) -> None:
    """A day is finished only once it has ended in ledger.timezone (helper-85: its 23:02 run
    finished it, and an account opened at 23:30 never got it): the first run after midnight
    grants it to the accounts opened late in the day, then finishes it."""
    _set_setting(ledger_url, "ledger.timezone", zone, _at(DAY - timedelta(days=20), 0))
    tz = ZoneInfo(zone)

    def local(day: date, hour: int, minute: int = 0) -> datetime:
        return datetime(day.year, day.month, day.day, hour, minute, tzinfo=tz)

    prefix = new_account("late")
    early, late = f"{prefix}-a", f"{prefix}-b"
    _open_accounts(ledger_url, [early], local(DAY, 10))
    assert sweepers.grant_daily_rewards(local(DAY, 11, 2).isoformat()) == 1
    assert sweepers.grant_daily_rewards(local(DAY, 23, 2).isoformat()) == 0
    _open_accounts(ledger_url, [late], local(DAY, 23, 30))
    next_day = DAY + timedelta(days=1)
    assert sweepers.grant_daily_rewards(local(next_day, 0, 2).isoformat()) == 1 + 2
    assert sweepers.grant_daily_rewards(local(next_day, 1, 2).isoformat()) == 0
    assert _claimed_days(ledger_url) == {early: [DAY, next_day], late: [DAY, next_day]}
    assert _runs(ledger_url) == [(DAY, True), (next_day, False)]  # the next day has not ended


def test_the_rest_of_a_run_leaves_open_a_day_its_first_part_failed_on(
    ledger_url: str, redis_url: str
) -> None:
    """The rest of a run (a job of its own, run by a worker) reaches the last account with
    no failure of its own, but the first part failed on an account before it: the day stays
    open, and the next day's run gives that account the day."""
    prefix = new_account("parts")
    accounts = [f"{prefix}-{n}" for n in range(4)]
    _open_accounts(ledger_url, accounts, _at(DAY, 8))
    _refuse_claims_of(ledger_url, accounts[0])
    with pytest.raises(sweepers.DailyRewardsIncomplete, match=accounts[0]):
        sweepers.grant_daily_rewards(_at(DAY, 23, 2).isoformat(), 2, "", 0)
    (rest,) = Queue(DEFAULT_QUEUE, connection=redis_connection()).get_jobs()
    logs = run_burst_workers(ledger_url, redis_url)
    assert_finished([rest], logs)
    assert _claimed_days(ledger_url) == {a: [DAY] for a in accounts[1:]}
    assert _runs(ledger_url) == [(DAY, False)]
    _accept_claims(ledger_url)
    next_day = DAY + timedelta(days=1)
    assert sweepers.grant_daily_rewards(_at(next_day, 0, 2).isoformat()) == 1 + 4
    assert _claimed_days(ledger_url) == {a: [DAY, next_day] for a in accounts}
    assert _runs(ledger_url) == [(DAY, True), (next_day, False)]


def test_a_day_no_run_set_out_to_grant_is_not_granted_later(ledger_url: str) -> None:
    """Off on one day (the operator did not mean it), no scheduler the next: neither day is
    granted once runs resume. Nor is an unfinished day older than the catch-up window."""
    prefix = new_account("no-run")
    accounts = [f"{prefix}-{n}" for n in range(3)]
    _open_accounts(ledger_url, accounts, _at(DAY - timedelta(days=15), 8))
    _set_automatic(ledger_url, False, _at(DAY, 0))
    assert sweepers.grant_daily_rewards(_at(DAY, 9).isoformat()) == 0
    assert _runs(ledger_url) == []
    _set_automatic(ledger_url, True, _at(DAY, 10))
    # DAY + 1: the scheduler was down all day.
    today = DAY + timedelta(days=2)
    window = sweepers.DAILY_CATCH_UP_DAYS
    oldest_caught_up = today - timedelta(days=window)
    too_old = oldest_caught_up - timedelta(days=1)
    with psycopg.connect(ledger_url, autocommit=True) as conn:
        for day in (too_old, oldest_caught_up):  # runs that died part-way long ago
            conn.execute(
                "INSERT INTO daily_reward_runs (day, started_at) VALUES (%s, %s)",
                (day, _at(day, 9)),
            )
    assert sweepers.grant_daily_rewards(_at(today, 9).isoformat()) == 3 + 3
    assert _claimed_days(ledger_url) == {a: [oldest_caught_up, today] for a in accounts}
    assert _runs(ledger_url) == [(too_old, False), (oldest_caught_up, True), (today, False)]
    assert sweepers.grant_daily_rewards(_at(today, 10).isoformat()) == 0


def _set_setting(url: str, key: str, value: object, at: datetime) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "SELECT ledger_put_setting(%s, %s, 'admin', 'test', 'pause', %s, true)",
            (key, json.dumps(value), at),
        )


def test_days_the_reward_was_paused_or_switched_off_are_not_granted_later(
    ledger_url: str,
) -> None:
    """Paused by an amount of 0, the runs record no day; switched off while a day's run was
    under way, or between two of its runs, the day ends there. Resumed, neither is granted
    at the new amount (helper-81: every paused day of the window was paid once the amount
    came back)."""
    prefix = new_account("paused")
    accounts = [f"{prefix}-{n}" for n in range(3)]
    _open_accounts(ledger_url, accounts, _at(DAY - timedelta(days=2), 8))
    _set_setting(ledger_url, "daily.amount_micros", 0, _at(DAY - timedelta(days=1), 12))
    for day in range(3):  # three days of scheduled runs while paused
        assert sweepers.grant_daily_rewards(_at(DAY + timedelta(days=day), 0, 2).isoformat()) == 0
    assert _runs(ledger_url) == []
    resumed = DAY + timedelta(days=3)
    _set_setting(ledger_url, "daily.amount_micros", 10_000_000, _at(resumed, 0))
    assert sweepers.grant_daily_rewards(_at(resumed, 0, 2).isoformat()) == 3

    # The next day's run, past its check of the settings, finds the reward switched off.
    off_day, next_day = resumed + timedelta(days=1), resumed + timedelta(days=2)
    with psycopg.connect(ledger_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO daily_reward_runs (day, started_at) VALUES (%s, %s)",
            (off_day, _at(off_day, 0, 2)),
        )
    _set_setting(ledger_url, "daily.enabled", False, _at(off_day, 0, 3))
    with worker_db.connection() as conn:
        run = sweepers._DailyRewardsRun(conn, None, _at(off_day, 0, 4), 500, 120, time.monotonic())
        run.grant_day(off_day.isoformat(), "")
        assert (run.granted, run.failed) == (0, [])
    assert _runs(ledger_url)[-1] == (off_day, True)  # ended there: nothing owed for it
    _set_setting(ledger_url, "daily.enabled", True, _at(next_day, 0))
    assert sweepers.grant_daily_rewards(_at(next_day, 0, 2).isoformat()) == 3
    assert _claimed_days(ledger_url) == {a: [resumed, next_day] for a in accounts}

    # Switched off between two runs of a day (not yet ended, so not finished): the run that
    # finds it off ends the day, and an account opened later that day is not given it once
    # the reward is back.
    last_day = next_day + timedelta(days=1)
    opened_while_off = f"{prefix}-off"
    _set_setting(ledger_url, "daily.enabled", False, _at(next_day, 12))
    assert sweepers.grant_daily_rewards(_at(next_day, 12, 2).isoformat()) == 0
    assert _runs(ledger_url)[-1] == (next_day, True)
    _open_accounts(ledger_url, [opened_while_off], _at(next_day, 13))
    _set_setting(ledger_url, "daily.enabled", True, _at(last_day, 0))
    assert sweepers.grant_daily_rewards(_at(last_day, 0, 2).isoformat()) == 4
    assert _claimed_days(ledger_url) == {
        **{a: [resumed, next_day, last_day] for a in accounts},
        opened_while_off: [last_day],
    }


def test_a_day_paused_after_its_last_run_is_not_granted_once_resumed(ledger_url: str) -> None:
    """A day stays open until the first run after it; paused before that run, the run
    that finds the reward paused ends it too, not only its own day (helper-92: the day's
    rest was granted at the new amount once the reward came back)."""
    prefix = new_account("offlate")
    early, late = f"{prefix}-a", f"{prefix}-b"
    _open_accounts(ledger_url, [early], _at(DAY, 10))
    assert sweepers.grant_daily_rewards(_at(DAY, 23, 2).isoformat()) == 1
    _open_accounts(ledger_url, [late], _at(DAY, 23, 20))
    _set_setting(ledger_url, "daily.amount_micros", 0, _at(DAY, 23, 30))
    next_day = DAY + timedelta(days=1)
    assert sweepers.grant_daily_rewards(_at(next_day, 0, 2).isoformat()) == 0
    assert _runs(ledger_url) == [(DAY, True)]
    resumed = DAY + timedelta(days=3)
    _set_setting(ledger_url, "daily.amount_micros", 50_000_000, _at(resumed, 9))
    assert sweepers.grant_daily_rewards(_at(resumed, 9, 2).isoformat()) == 2
    assert _claimed_days(ledger_url) == {early: [DAY, resumed], late: [resumed]}


def test_a_catch_up_run_twice_or_two_at_once_grants_nobody_twice(
    ledger_url: str, redis_url: str
) -> None:
    prefix = new_account("twice")
    accounts = [f"{prefix}-{n:02}" for n in range(30)]
    _open_accounts(ledger_url, accounts, _at(DAY, 8))
    assert _stop_part_way(ledger_url, _at(DAY, 23, 2)) == 1
    next_day = DAY + timedelta(days=1)
    as_of = _at(next_day, 0, 2).isoformat()
    jobs = [
        enqueue(DEFAULT_QUEUE, "workers.sweepers.grant_daily_rewards", as_of, job_id=f"run-{n}")
        for n in range(2)
    ]
    assert all(job is not None for job in jobs)
    logs = run_burst_workers(ledger_url, redis_url, count=2)
    assert_finished([job for job in jobs if job is not None], logs)
    granted = sum(job.return_value(refresh=True) for job in jobs if job is not None)
    assert granted == 29 + 30, logs
    assert _claimed_days(ledger_url) == {a: [DAY, next_day] for a in accounts}
    # Again, as one run and as parts of one account each: nothing left to grant.
    assert sweepers.grant_daily_rewards(as_of) == 0
    assert sweepers.grant_daily_rewards(as_of, 1, "", 0) == 0
    assert Queue(DEFAULT_QUEUE, connection=redis_connection()).is_empty()
    assert _claimed_days(ledger_url) == {a: [DAY, next_day] for a in accounts}
    assert _runs(ledger_url) == [(DAY, True), (next_day, False)]


def _daily_lots(url: str) -> dict[str, list[tuple[date, int, datetime | None]]]:
    """Per account, each claimed day with its lot's amount and expiry."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT c.account_id, c.claim_date, l.amount_micros, l.expires_at "
            "FROM daily_claims c JOIN lots l USING (account_id, lot_id) "
            "ORDER BY c.account_id, c.claim_date"
        ).fetchall()
    lots: dict[str, list[tuple[date, int, datetime | None]]] = {}
    for account, day, amount, expires_at in rows:
        lots.setdefault(account, []).append((day, amount, expires_at))
    return lots


def test_a_day_finished_after_midnight_is_granted_at_its_own_terms(ledger_url: str) -> None:
    """README's promo (`ledger config set daily.amount_micros ...`) set at midnight: an account
    opened after the day's last run got the day at the new amount and expiry, from the first
    run after midnight, while every other account had the old ones."""
    prefix = new_account("terms")
    early, late = f"{prefix}-a", f"{prefix}-b"
    _open_accounts(ledger_url, [early], _at(DAY, 10))
    assert sweepers.grant_daily_rewards(_at(DAY, 23, 2).isoformat()) == 1
    _open_accounts(ledger_url, [late], _at(DAY, 23, 30))
    next_day = DAY + timedelta(days=1)
    _set_setting(ledger_url, "daily.amount_micros", 50_000_000, _at(next_day, 0))
    _set_setting(ledger_url, "daily.expire_days", 3, _at(next_day, 0))
    after_midnight = _at(next_day, 0, 2)
    assert sweepers.grant_daily_rewards(after_midnight.isoformat()) == 1 + 2
    new_terms = (50_000_000, after_midnight + timedelta(days=3))
    assert _daily_lots(ledger_url) == {
        early: [(DAY, 10_000_000, None), (next_day, *new_terms)],
        late: [(DAY, 10_000_000, None), (next_day, *new_terms)],
    }


def test_the_rest_of_a_stopped_run_is_granted_at_its_days_terms(ledger_url: str) -> None:
    """The day's run stopped part-way (its rest lost), the amount was cut the next day: the
    next day's run finishes the day at the day's amount, not the cut one."""
    prefix = new_account("terms-rest")
    accounts = [f"{prefix}-{n}" for n in range(3)]
    _open_accounts(ledger_url, accounts, _at(DAY, 8))
    assert _stop_part_way(ledger_url, _at(DAY, 9, 2)) == 1
    next_day = DAY + timedelta(days=1)
    _set_setting(ledger_url, "daily.amount_micros", 3_000_000, _at(next_day, 0))
    assert sweepers.grant_daily_rewards(_at(next_day, 0, 2).isoformat()) == 2 + 3
    assert _daily_lots(ledger_url) == {
        a: [(DAY, 10_000_000, None), (next_day, 3_000_000, None)] for a in accounts
    }


def test_a_day_the_previous_release_set_out_to_grant_takes_the_terms_at_its_end(
    ledger_url: str,
) -> None:
    """A run of the previous release recorded no terms: its day, finished later, is granted
    at the terms in force when it ended (setting_changes), not at those of the run that
    finishes it; a day paused when it ended is not granted."""
    prefix = new_account("terms-old")
    accounts = [f"{prefix}-{n}" for n in range(2)]
    _open_accounts(ledger_url, accounts, _at(DAY - timedelta(days=1), 8))
    paused_day, next_day = DAY - timedelta(days=1), DAY + timedelta(days=1)
    with psycopg.connect(ledger_url, autocommit=True) as conn:
        for day in (paused_day, DAY):
            conn.execute(
                "INSERT INTO daily_reward_runs (day, started_at) VALUES (%s, %s)",
                (day, _at(day, 9)),
            )
    _set_setting(ledger_url, "daily.amount_micros", 0, _at(paused_day, 12))
    _set_setting(ledger_url, "daily.amount_micros", 20_000_000, _at(DAY, 12))
    _set_setting(ledger_url, "daily.amount_micros", 50_000_000, _at(next_day, 0))
    assert sweepers.grant_daily_rewards(_at(next_day, 0, 2).isoformat()) == 2 + 2
    assert _daily_lots(ledger_url) == {
        a: [(DAY, 20_000_000, None), (next_day, 50_000_000, None)] for a in accounts
    }
    assert _runs(ledger_url) == [(paused_day, True), (DAY, True), (next_day, False)]


def test_a_change_of_time_zone_opens_no_second_automatic_grant_in_a_local_day(
    ledger_url: str,
) -> None:
    """An account claimed at 20:00Z under UTC; ledger.timezone set to Pacific/Kiritimati at
    20:01Z, where it is the next day: the run at 20:02Z grants that day to the accounts that
    had not claimed, not to the one that did."""
    prefix = new_account("tz")
    claimed, other = f"{prefix}-a", f"{prefix}-b"
    _open_accounts(ledger_url, [claimed, other], _at(DAY, 8))
    with psycopg.connect(ledger_url, autocommit=True) as conn:
        conn.execute(
            "SELECT ledger_claim_daily_reward(%s, 'own', '\\x01'::bytea, %s)",
            (claimed, _at(DAY, 20)),
        )
    _set_setting(ledger_url, "ledger.timezone", "Pacific/Kiritimati", _at(DAY, 20, 1))
    kiritimati_day = DAY + timedelta(days=1)
    # The sweeper's walk passes over the account, and the claim itself refuses it.
    with worker_db.connection() as conn:
        lacking = conn.execute(
            query("accounts_without_daily_claim"),
            {"after": prefix, "day": kiritimati_day, "limit": 10},
        ).fetchall()
        assert [r[0] for r in lacking] == [other]
    with (
        psycopg.connect(ledger_url, autocommit=True) as conn,
        pytest.raises(psycopg.Error, match="claimed already"),
    ):
        conn.execute(
            "SELECT ledger_claim_daily_reward_of_day(%s, 'auto', '\\x02'::bytea, %s, %s)",
            (claimed, kiritimati_day, _at(DAY, 20, 2)),
        )
    assert sweepers.grant_daily_rewards(_at(DAY, 20, 2).isoformat()) == 1
    assert _claimed_days(ledger_url) == {claimed: [DAY], other: [kiritimati_day]}
