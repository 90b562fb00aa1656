"""The sweepers and schedules (issue 5), run by real RQ workers: expired lots into
breakage, timed-out reservations released, monthly allowances granted; each safe to
run any number of times at once, and never racing a charge into expired credits."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
import redis
from google.protobuf import struct_pb2
from rq import Queue, SimpleWorker
from rq.job import Job, JobStatus

from ledger.v1 import admin_service_pb2 as admin_pb
from ledger.v1 import admin_service_pb2_grpc, ledger_service_pb2_grpc
from ledger.v1 import ledger_service_pb2 as pb
from ledger.v1 import types_pb2 as t
from ledger_server.audit import audit_database
from ledger_server.clock import OffsetClock
from ledger_server.config import Settings
from ledger_server.db.migrate import migrate
from ledger_server.devstack import embedded
from ledger_server.runtime_settings import environment_defaults, sync_environment_defaults
from support.ledger import CREDIT, Ledger, consume_or_error, expect_error, new_account, new_key
from support.rq_workers import start_worker
from support.server import ServerThread
from support.settings import ActorMetadata
from support.workers import assert_finished, run_burst_workers, start_burst_worker
from workers import db as worker_db
from workers import queues, sweepers
from workers.queues import DEFAULT_QUEUE, PAYMENTS_QUEUE, enqueue, redis_connection


def _expiring_account(ledger: Ledger, clock: OffsetClock) -> tuple[str, str, str]:
    """10 credits expiring in a minute (3 of them held by a reservation that also
    times out in a minute) and 5 permanent credits."""
    account = new_account("sweep")
    expiring = ledger.grant(
        account, 10, source=t.CREDIT_SOURCE_SIGNUP, expires_in=_seconds(60)
    ).lot.lot_id
    ledger.grant(account, 5)
    held = ledger.reserve(account, 3 * CREDIT, ttl=_seconds(60)).reservation.reservation_id
    return account, expiring, held


def _seconds(n: int) -> Any:
    from google.protobuf.duration_pb2 import Duration

    return Duration(seconds=n)


def _journal_counts(database_url: str, accounts: list[str]) -> dict[str, tuple[int, int]]:
    """Per account: (EXPIRY transactions, RELEASE transactions), read in SQL so that no
    ledger call applies due expiries on the side."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            """SELECT account_id, count(*) FILTER (WHERE kind = 'expiry'),
                      count(*) FILTER (WHERE kind = 'release')
                 FROM journal_transactions WHERE account_id = ANY(%s) GROUP BY account_id""",
            (accounts,),
        ).fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


def test_sweepers_run_concurrently_twice_apply_each_expiry_and_time_out_once(
    ledger: Ledger,
    clock: OffsetClock,
    ledger_db_url: str,
    redis_url: str,
    assert_audit_clean: Any,
) -> None:
    accounts = [_expiring_account(ledger, clock) for _ in range(40)]
    names = [a for a, _, _ in accounts]
    assert set(_journal_counts(ledger_db_url, names).values()) == {(0, 0)}
    clock.advance(timedelta(minutes=2))
    as_of = clock.now().isoformat()

    connection = redis_connection(redis_url)
    jobs = []
    logs: list[str] = []
    for _round in range(2):
        # Two sweep jobs, run by two workers at the same time (small batches so the two
        # really interleave), then the same again.
        for _ in range(2):
            jobs.append(
                enqueue(DEFAULT_QUEUE, sweepers.sweep_due_accounts, as_of, 3, connection=connection)
            )
        logs += run_burst_workers(ledger_db_url, redis_url, count=2)
    assert_finished(jobs, logs)
    # Other tests' accounts may be due too (the database and clock are shared), so the
    # sweeps cover at least these; the journal below shows each was swept once.
    assert sum(job.return_value() for job in jobs) >= len(accounts)

    # Two expiries each: the 7 credits that expired unheld, then the 3 the time-out freed
    # (held when their lot expired, they expire when released; the reports date them so).
    assert _journal_counts(ledger_db_url, names) == {name: (2, 1) for name in names}
    with psycopg.connect(ledger_db_url) as conn:
        expiries = conn.execute(
            "SELECT DISTINCT array_agg(amount_micros ORDER BY transaction_id)"
            " FROM journal_transactions WHERE account_id = ANY(%s) AND kind = 'expiry'"
            " GROUP BY account_id",
            (names,),
        ).fetchall()
    assert expiries == [([-7 * CREDIT, -3 * CREDIT],)]
    for account, expiring, held in accounts:
        lots = {lot.lot_id: lot for lot in ledger.lots(account, include_inactive=True)}
        assert lots[expiring].remaining_micros == 0
        assert lots[expiring].expired_micros == 10 * CREDIT
        reservation = ledger.stub.GetReservation(
            pb.GetReservationRequest(account_id=account, reservation_id=held)
        ).reservation
        assert reservation.status == pb.RESERVATION_STATUS_EXPIRED
        balance = ledger.balance(account)
        assert (balance.balance_micros, balance.held_micros) == (5 * CREDIT, 0)
    assert_audit_clean()


def test_a_charge_racing_the_expiry_sweep_never_spends_expired_credits(
    ledger: Ledger,
    clock: OffsetClock,
    server_address: str,
    ledger_db_url: str,
    redis_url: str,
    assert_audit_clean: Any,
) -> None:
    accounts = []
    for _ in range(40):
        account = new_account("race")
        ledger.grant(account, 10, source=t.CREDIT_SOURCE_SIGNUP, expires_in=_seconds(60))
        ledger.grant(account, 5)
        accounts.append(account)
    clock.advance(timedelta(minutes=2))
    connection = redis_connection(redis_url)
    jobs = [
        enqueue(
            DEFAULT_QUEUE,
            sweepers.sweep_due_accounts,
            clock.now().isoformat(),
            2,
            connection=connection,
        )
        for _ in range(2)
    ]
    workers = [start_burst_worker(ledger_db_url, redis_url) for _ in range(2)]

    async def charge_all() -> list[pb.ConsumeResponse | grpc.aio.AioRpcError]:
        async with grpc.aio.insecure_channel(server_address) as channel:
            stub = ledger_service_pb2_grpc.LedgerServiceStub(channel)

            def one(account: str, amount: int) -> Any:
                return consume_or_error(stub, account, new_key(), amount)

            # 4 credits fit in the permanent lot; 6 would need expired credits.
            return await asyncio.gather(
                *(one(a, 4 * CREDIT) for a in accounts), *(one(a, 6 * CREDIT) for a in accounts)
            )

    results = asyncio.run(charge_all())
    logs = []
    for worker in workers:
        out, _ = worker.communicate(timeout=180)
        assert worker.returncode == 0, out
        logs.append(out)
    assert_finished(jobs, logs)
    small, large = results[: len(accounts)], results[len(accounts) :]
    for response in small:
        assert isinstance(response, pb.ConsumeResponse), response
        assert [lot.source for lot in response.reservation.lots] == [t.CREDIT_SOURCE_PURCHASE]
    for error in large:
        assert isinstance(error, grpc.aio.AioRpcError)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    for account in accounts:
        assert ledger.balance(account).balance_micros == 1 * CREDIT
    counts = _journal_counts(ledger_db_url, accounts)
    assert {counts[a][0] for a in accounts} == {1}
    assert_audit_clean()


def test_the_monthly_allowance_job_run_twice_grants_once(
    fresh_database_url: str, redis_url: str
) -> None:
    """On a database of its own: the job visits every account, and the shared session
    database holds thousands by now."""
    migrate(fresh_database_url)
    now = datetime.now(UTC)
    accounts = [new_account("monthly") for _ in range(5)]
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        sync_environment_defaults(conn, environment_defaults(), now)
        # Accounts opened while the allowance was off get it from the scheduled job.
        for account in accounts:
            conn.execute(
                "SELECT ledger_grant(%s, 'g', '\\x01', 1000000, 'purchase', NULL, 'main', "
                "'', '', NULL, %s)",
                (account, now),
            )
        conn.execute(
            "SELECT ledger_put_setting('monthly_free.enabled', 'true', 'admin', 'test', "
            "'the job under test', %s, true)",
            (now,),
        )
    connection = redis_connection(redis_url)
    # Two accounts per transaction: the five take three chunks.
    jobs = [
        enqueue(
            DEFAULT_QUEUE,
            sweepers.grant_monthly_allowances,
            now.isoformat(),
            2,
            connection=connection,
        )
        for _ in range(2)
    ]
    logs = run_burst_workers(fresh_database_url, redis_url, count=2)
    jobs.append(
        enqueue(
            DEFAULT_QUEUE,
            sweepers.grant_monthly_allowances,
            now.isoformat(),
            2,
            connection=connection,
        )
    )
    logs += run_burst_workers(fresh_database_url, redis_url)
    assert_finished(jobs, logs)

    with psycopg.connect(fresh_database_url) as conn:
        lots = conn.execute(
            "SELECT account_id, amount_micros FROM lots WHERE source = 'monthly_free' "
            "ORDER BY account_id"
        ).fetchall()
        granted = conn.execute("SELECT count(*) FROM monthly_allowances").fetchone()
    assert lots == [(account, 1500 * CREDIT) for account in sorted(accounts)]
    assert granted == (5,)
    assert audit_database(fresh_database_url) == []


def test_the_monthly_allowance_job_with_an_amount_of_0_marks_no_account(
    fresh_database_url: str, monkeypatch: Any
) -> None:
    """An amount of 0 pauses the allowance as being off does: the hourly job marks no account
    (helper-85: each run made every account due again, then the sweep pushed it back to next
    month, "marked 0, 8, 8 of 8" an hour), and raised again it grants the month's."""
    migrate(fresh_database_url)
    monkeypatch.setenv("DATABASE_URL", fresh_database_url)
    start = datetime(2026, 12, 5, 9, 1, tzinfo=UTC)
    accounts = sorted(new_account("monthly-0") for _ in range(8))

    def put(key: str, value: str, at: datetime) -> None:
        with psycopg.connect(fresh_database_url, autocommit=True) as conn:
            conn.execute(
                "SELECT ledger_put_setting(%s, %s, 'admin', 'test', 'the job under test', %s, "
                "true)",
                (key, value, at),
            )

    def row_versions() -> list[tuple[str, str]]:
        """Each account's row version (xmin): a run that writes the row changes it."""
        with psycopg.connect(fresh_database_url) as conn:
            rows = conn.execute(
                "SELECT account_id, xmin::text FROM accounts ORDER BY account_id"
            ).fetchall()
        return [(r[0], r[1]) for r in rows]

    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        sync_environment_defaults(conn, environment_defaults(), start)
    put("monthly_free.enabled", "true", start)
    put("monthly_free.amount_micros", "0", start)
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        for account in accounts:
            conn.execute("SELECT ledger_open_account(%s, '', %s)", (account, start))
    versions = row_versions()
    try:
        for hour in range(1, 4):  # three hourly runs
            at = start + timedelta(hours=hour)
            assert sweepers.grant_monthly_allowances(at.isoformat(), 3) == 0
        assert row_versions() == versions
        put("monthly_free.amount_micros", str(5 * CREDIT), start + timedelta(hours=4))
        at = start + timedelta(hours=5)
        assert sweepers.grant_monthly_allowances(at.isoformat(), 3) == len(accounts)
        with psycopg.connect(fresh_database_url) as conn:
            lots = conn.execute(
                "SELECT account_id, amount_micros FROM lots WHERE source = 'monthly_free' "
                "ORDER BY account_id"
            ).fetchall()
        assert lots == [(account, 5 * CREDIT) for account in accounts]
    finally:
        worker_db.close()
    assert audit_database(fresh_database_url) == []


def test_the_scheduler_registers_every_sweeper(redis_url: str) -> None:
    from rq.cron import CronScheduler

    from workers.schedule import register_jobs

    scheduler = CronScheduler(connection=redis.Redis.from_url(redis_url))
    register_jobs(scheduler, interval_seconds=30)
    names = {job.func_name for job in scheduler.get_jobs()}
    assert names == {
        "workers.sweepers.sweep_due_accounts",
        "workers.sweepers.requeue_pending_alert_emails",
        "workers.sweepers.grant_monthly_allowances",
        "workers.sweepers.grant_daily_rewards",
        "workers.payments.requeue_stalled_payment_events",
        "workers.sweepers.prune_checkout_stripe_attempts",
    }


def test_failed_runs_of_scheduled_jobs_are_kept_a_day_not_a_year(redis_url: str) -> None:
    """Without a failure_ttl RQ keeps a failed job a year: a sweep failing every minute (one
    account's maintenance failing, a PostgreSQL outage) filled Redis at ~5 KB a run, ~2.9 GB
    a year, and a Redis that must not evict then refuses writes (helper-139). Each run the
    scheduler enqueues, failed by a real worker, is kept a day."""
    from rq.cron import CronScheduler
    from rq.registry import FailedJobRegistry

    from workers.schedule import FAILED_RUN_TTL_SECONDS, register_jobs

    connection = redis.Redis.from_url(redis_url)
    scheduler = CronScheduler(connection=connection)
    register_jobs(scheduler, interval_seconds=30)
    for cron_job in scheduler.get_jobs():
        cron_job.queue_name = "failing-schedule"
        # Runs that fail: the job's function called with an argument it does not take.
        cron_job.args = ("not-an-argument",) * 9
        job = cron_job.enqueue(connection)
        SimpleWorker(
            [Queue("failing-schedule", connection=connection)], connection=connection
        ).work(burst=True)
        assert job.id in FailedJobRegistry("failing-schedule", connection=connection)
        ttl = connection.ttl(job.key)
        assert 0 < ttl <= FAILED_RUN_TTL_SECONDS <= 24 * 3600, (cron_job.func_name, ttl)


def test_the_scheduler_outlives_a_redis_outage_and_schedules_again(
    tmp_path: Path, ledger_db_url: str
) -> None:
    """RQ's cron loop stops at the first Redis error, and the scheduler process exited with
    it: one Redis restart stopped every sweeper, the re-queueing of stored payment events
    too, until someone restarted it (helper-50). It now starts the loop again."""
    server = embedded.start_redis(tmp_path / "redis", persist=False)
    env = {
        **os.environ,
        "REDIS_URL": server.url,
        "DATABASE_URL": ledger_db_url,
        "LEDGER_SWEEP_INTERVAL_SECONDS": "1",
    }
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "workers", "scheduler"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for_payment_sweeps(server.url)
        server.stop()
        time.sleep(4)  # ticks every second, each one refused
        assert scheduler.poll() is None, "the scheduler exited when Redis went away"
        server = embedded.start_redis(tmp_path / "redis", port=server.port, persist=False)
        _wait_for_payment_sweeps(server.url)  # the empty Redis gets its jobs again
        assert scheduler.poll() is None
        scheduler.terminate()
        assert scheduler.wait(30) == 0
        stderr = scheduler.stderr.read().decode() if scheduler.stderr else ""
        assert "the scheduler lost Redis" in stderr
    finally:
        if scheduler.poll() is None:
            scheduler.kill()
            scheduler.wait()
        server.stop()


def _wait_for_payment_sweeps(url: str) -> None:
    connection = redis.Redis.from_url(url)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if Queue(PAYMENTS_QUEUE, connection=connection).count:
            return
        time.sleep(0.1)
    pytest.fail("the scheduler queued no payment sweep")


CLAIM_NAME = "ledger_claim_daily_reward_of_day"
CLAIM = f"{CLAIM_NAME}(text, text, bytea, date, timestamptz)"


def test_automatic_daily_rewards_follow_the_ledger_day_and_pass_over_a_failing_account(
    fresh_database_url: str, monkeypatch: Any
) -> None:
    """The day is ledger.timezone's (a claim counts in it), not UTC's; an account whose
    claim fails leaves every other account its reward, and the job fails at the end."""
    migrate(fresh_database_url)
    monkeypatch.setenv("DATABASE_URL", fresh_database_url)
    start = datetime(2026, 12, 5, 15, 0, tzinfo=UTC)  # 23:00 in Shanghai
    prefix = new_account("auto")
    accounts = [f"{prefix}-{n}" for n in (1, 2, 3)]
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        sync_environment_defaults(conn, environment_defaults(), start)
        for key, value in (("ledger.timezone", '"Asia/Shanghai"'), ("daily.automatic", "true")):
            conn.execute(
                "SELECT ledger_put_setting(%s, %s, 'admin', 'test', 'the job under test', %s, "
                "true)",
                (key, value, start),
            )
        for account in accounts:
            conn.execute("SELECT ledger_open_account(%s, '', %s)", (account, start))
        # A client took the key the job will use on 7 December for a grant of its own (as
        # one could before such keys were refused, tested below).
        conn.execute(
            "SELECT ledger_grant(%s, 'auto-daily:2026-12-07', '\\x01', 1000000, 'purchase', "
            "NULL, 'main', '', '', NULL, %s)",
            (accounts[1], start),
        )

    def daily_lots() -> list[tuple[str, int]]:
        with psycopg.connect(fresh_database_url) as conn:
            return conn.execute(
                "SELECT account_id, count(*)::int FROM lots WHERE source = 'daily' "
                "GROUP BY account_id ORDER BY account_id"
            ).fetchall()

    try:
        assert sweepers.grant_daily_rewards(start.isoformat()) == 3
        assert sweepers.grant_daily_rewards(start.isoformat()) == 0  # the same day: once
        # Two hours later it is still 5 December in UTC, but 6 December in Shanghai.
        assert sweepers.grant_daily_rewards((start + timedelta(hours=2)).isoformat()) == 3
        assert daily_lots() == [(account, 2) for account in accounts]
        # A re-run (after a time-out on a large ledger, say) claims for no account that
        # has the day's reward: with the claim made to fail, it still has nothing to do.
        with psycopg.connect(fresh_database_url, autocommit=True) as conn:
            conn.execute(f"ALTER FUNCTION {CLAIM} RENAME TO claim_broken")
            try:
                assert sweepers.grant_daily_rewards((start + timedelta(hours=2)).isoformat()) == 0
            finally:
                conn.execute(
                    f"ALTER FUNCTION {CLAIM.replace(CLAIM_NAME, 'claim_broken')} "
                    f"RENAME TO {CLAIM_NAME}"
                )

        with pytest.raises(sweepers.DailyRewardsIncomplete, match=accounts[1]):
            sweepers.grant_daily_rewards((start + timedelta(days=1, hours=2)).isoformat())
        assert daily_lots() == [(accounts[0], 3), (accounts[1], 2), (accounts[2], 3)]
    finally:
        worker_db.close()
    assert audit_database(fresh_database_url) == []


def test_a_client_cannot_take_the_daily_jobs_key_and_the_job_still_grants(
    fresh_database_url: str, monkeypatch: Any
) -> None:
    """A Consume under auto-daily:<the day> made the account miss that day's automatic
    reward for good and failed every run of the job that day (helper-56): the key is
    refused, and the job, which calls SQL directly, grants as before."""
    migrate(fresh_database_url)
    monkeypatch.setenv("DATABASE_URL", fresh_database_url)
    clock = OffsetClock()
    server = ServerThread(Settings(database_url=fresh_database_url), clock).start()
    account = new_account("auto")
    try:
        with grpc.insecure_channel(server.address) as channel:
            admin = admin_service_pb2_grpc.AdminServiceStub(
                grpc.intercept_channel(channel, ActorMetadata("test-admin"))
            )
            admin.UpdateSetting(
                admin_pb.UpdateSettingRequest(
                    key="daily.automatic",
                    value=struct_pb2.Value(bool_value=True),
                    reason="the job under test",
                    idempotency_key=new_key(),
                )
            )
            ledger = Ledger(ledger_service_pb2_grpc.LedgerServiceStub(channel))
            ledger.grant(account, 5)
            now = clock.now()
            for day in (now.date(), now.date() + timedelta(days=1)):
                expect_error(
                    lambda day=day: ledger.consume(account, CREDIT, key=f"auto-daily:{day}"),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "INVALID_FIELD",
                    "idempotency_key",
                )
            before = ledger.balance(account).balance_micros
            assert sweepers.grant_daily_rewards(now.isoformat()) == 1
            daily = [lot for lot in ledger.lots(account) if lot.source == t.CREDIT_SOURCE_DAILY]
            assert len(daily) == 1
            assert ledger.balance(account).balance_micros == before + daily[0].amount_micros
    finally:
        worker_db.close()
        server.stop()
    assert audit_database(fresh_database_url) == []


def test_daily_rewards_past_their_time_budget_queue_the_rest_as_a_job(
    fresh_database_url: str, redis_url: str, monkeypatch: Any
) -> None:
    """One part of the job runs for a bounded time (a worker is never held for long, nor
    the job cut short by RQ's time-out on a large ledger); the rest follows as jobs."""
    migrate(fresh_database_url)
    monkeypatch.setenv("DATABASE_URL", fresh_database_url)
    monkeypatch.setenv("REDIS_URL", redis_url)
    start = datetime(2026, 12, 5, 9, 0, tzinfo=UTC)
    prefix = new_account("budget")
    accounts = [f"{prefix}-{n}" for n in range(5)]
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        sync_environment_defaults(conn, environment_defaults(), start)
        conn.execute(
            "SELECT ledger_put_setting('daily.automatic', 'true', 'admin', 'test', "
            "'the job under test', %s, true)",
            (start,),
        )
        for account in accounts:
            conn.execute("SELECT ledger_open_account(%s, '', %s)", (account, start))
    try:
        # No time at all: one batch of two, then the rest is queued.
        assert sweepers.grant_daily_rewards(start.isoformat(), 2, "", 0) == 2
    finally:
        worker_db.close()
    logs = run_burst_workers(fresh_database_url, redis_url)
    with psycopg.connect(fresh_database_url) as conn:
        lots = conn.execute(
            "SELECT account_id, count(*)::int FROM lots WHERE source = 'daily' "
            "GROUP BY account_id ORDER BY account_id"
        ).fetchall()
    assert lots == [(account, 1) for account in accounts], logs
    assert audit_database(fresh_database_url) == []


def test_the_rest_of_the_daily_rewards_grants_the_day_it_set_out_to(
    fresh_database_url: str, redis_url: str, monkeypatch: Any
) -> None:
    """The scheduled run (no as_of) queues its rest with its day: a rest that runs after
    midnight grants the accounts it reaches the day the run set out to. Before, it took the
    new day, and those accounts never got the old one (the new day's runs grant the new)."""
    migrate(fresh_database_url)
    monkeypatch.setenv("DATABASE_URL", fresh_database_url)
    monkeypatch.setenv("REDIS_URL", redis_url)
    opened = datetime.now(UTC) - timedelta(minutes=1)
    prefix = new_account("late")
    accounts = [f"{prefix}-{n}" for n in range(4)]
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        sync_environment_defaults(conn, environment_defaults(), opened)
        conn.execute(
            "SELECT ledger_put_setting('daily.automatic', 'true', 'admin', 'test', "
            "'the job under test', %s, true)",
            (opened,),
        )
        for account in accounts:
            conn.execute("SELECT ledger_open_account(%s, '', %s)", (account, opened))
    queue = Queue(DEFAULT_QUEUE, connection=redis_connection())
    queue.empty()
    try:
        assert sweepers.grant_daily_rewards(None, 2, "", 0) == 2
        (rest,) = queue.get_jobs()
        with psycopg.connect(fresh_database_url) as conn:
            row = conn.execute("SELECT min(claim_date) FROM daily_claims").fetchone()
        assert row is not None
        first_day = row[0]
        after_midnight = datetime.combine(first_day + timedelta(days=1), datetime.min.time(), UTC)
        # An account opened after midnight, its id after the run's: the old day is not its.
        newcomer = f"{prefix}-9"
        with psycopg.connect(fresh_database_url, autocommit=True) as conn:
            conn.execute(
                "SELECT ledger_open_account(%s, '', %s)",
                (newcomer, after_midnight + timedelta(minutes=1)),
            )
        # The rest as the worker would run it, but after midnight (UTC is the ledger's day)
        # and with the time to reach every account.
        as_of, batch, after, _budget, day = rest.args
        assert as_of is None
        late = (after_midnight + timedelta(minutes=5)).isoformat()
        assert sweepers.grant_daily_rewards(late, batch, after, 120, day) == 2
    finally:
        queue.empty()
        worker_db.close()
    with psycopg.connect(fresh_database_url) as conn:
        claims = conn.execute(
            "SELECT account_id, claim_date FROM daily_claims ORDER BY account_id"
        ).fetchall()
        assert claims == [(account, first_day) for account in accounts]
        # Nor can a day that ended before the account was opened (helper-63).
        with pytest.raises(psycopg.Error) as refused:
            conn.execute(
                "SELECT ledger_claim_daily_reward_of_day(%s, 'old', '\\x01', %s, %s)",
                (newcomer, first_day, after_midnight + timedelta(minutes=6)),
            )
        assert refused.value.sqlstate == "LE010"
        conn.rollback()
        # A day that has not begun cannot be claimed.
        with pytest.raises(psycopg.Error) as refused:
            conn.execute(
                "SELECT ledger_claim_daily_reward_of_day(%s, 'early', '\\x01', %s, %s)",
                (accounts[0], first_day + timedelta(days=2), after_midnight),
            )
        assert refused.value.sqlstate == "LE010"
    assert audit_database(fresh_database_url) == []


def test_an_account_whose_maintenance_fails_does_not_stall_the_sweep(
    fresh_database_url: str, monkeypatch: Any, caplog: Any
) -> None:
    """An account whose maintenance raises fails the batch it is in and stays due, first
    in line: the sweep goes on account by account, passes it over for the rest of the run,
    sweeps every other due account it can lock and fails at the end, naming it. The
    account stays due, so a call on it still maintains it first (and fails as loudly)."""
    migrate(fresh_database_url)
    monkeypatch.setenv("DATABASE_URL", fresh_database_url)
    start = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
    prefix = new_account("poison")
    poison, busy, *healthy = [f"{prefix}-{n}" for n in range(5)]
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        sync_environment_defaults(conn, environment_defaults(), start)
        for minutes, account in enumerate([poison, busy, *healthy], start=30):
            conn.execute(
                "SELECT ledger_grant(%s, 'g', '\\x01', 1000000, 'purchase', %s, 'main', "
                "'', '', NULL, %s)",
                (account, start + timedelta(minutes=minutes), start),
            )
        conn.execute(
            "CREATE FUNCTION poisoned() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'poisoned'; END $$"
        )
        conn.execute(
            "CREATE TRIGGER poisoned BEFORE UPDATE ON lots FOR EACH ROW "
            f"WHEN (OLD.account_id = '{poison}') EXECUTE FUNCTION poisoned()"
        )

    def live_lots() -> dict[str, int]:
        with psycopg.connect(fresh_database_url) as conn:
            rows = conn.execute(
                "SELECT account_id, count(*)::int FROM lots WHERE remaining_micros > 0 "
                "AND source = 'purchase' GROUP BY account_id"
            ).fetchall()
        return dict(rows)

    def poison_due() -> Any:
        with psycopg.connect(fresh_database_url) as conn:
            row = conn.execute(
                "SELECT next_maintenance_at FROM accounts WHERE account_id = %s", (poison,)
            ).fetchone()
        return row[0] if row else None

    later = start + timedelta(hours=2)
    try:
        # A call holds one due account all through the first run.
        with psycopg.connect(fresh_database_url) as holder:
            holder.execute("SELECT FROM accounts WHERE account_id = %s FOR UPDATE", (busy,))
            with pytest.raises(sweepers.SweepIncomplete, match=f"{poison}'; 3 swept"):
                sweepers.sweep_due_accounts(later.isoformat(), batch=2)
        # One batch failed: the later ones passed the failed account over.
        assert sum("a sweep batch failed" in r.getMessage() for r in caplog.records) == 1
        assert live_lots() == {poison: 1, busy: 1}
        assert poison_due() == start + timedelta(minutes=30)  # still due

        with pytest.raises(sweepers.SweepIncomplete, match=f"{poison}'; 1 swept"):
            sweepers.sweep_due_accounts(later.isoformat(), batch=2)
        assert live_lots() == {poison: 1}

        with psycopg.connect(fresh_database_url, autocommit=True) as conn:
            conn.execute("DROP TRIGGER poisoned ON lots")
        assert sweepers.sweep_due_accounts(later.isoformat(), batch=2) == 1
        assert live_lots() == {}
    finally:
        worker_db.close()
    assert audit_database(fresh_database_url) == []


def test_sweeps_and_the_monthly_job_lock_few_accounts_per_transaction(
    fresh_database_url: str, monkeypatch: Any
) -> None:
    """Every account a sweep maintains, or the monthly job marks, stays locked until its
    transaction commits, and calls on it wait as long: 500 accounts in one transaction held
    them 2.6 s. At most SWEEP_CHUNK accounts a transaction, or what SWEEP_CHUNK_MS allows."""
    migrate(fresh_database_url)
    monkeypatch.setenv("DATABASE_URL", fresh_database_url)
    start = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
    later = start + timedelta(hours=1)
    count = 2 * sweepers.SWEEP_CHUNK + 5
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        sync_environment_defaults(conn, environment_defaults(), start)
        conn.execute(
            "SELECT ledger_grant('locks-' || lpad(i::text, 3, '0'), 'g', '\\x01', 1000000, "
            "'purchase', %s, 'main', '', '', NULL, %s) FROM generate_series(1, %s) i",
            (start + timedelta(minutes=1), start, count),
        )
        # Which transaction wrote each account row, each write slowed by `delay` seconds.
        conn.execute(
            "CREATE TABLE written (account_id text, txid bigint, PRIMARY KEY (account_id, txid));"
            "CREATE TABLE delay (seconds float8); INSERT INTO delay VALUES (0);"
            "CREATE FUNCTION note_write() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "PERFORM pg_sleep((SELECT seconds FROM delay)); INSERT INTO written "
            "VALUES (NEW.account_id, txid_current()) ON CONFLICT DO NOTHING; RETURN NULL; END $$;"
            "CREATE TRIGGER note_write AFTER UPDATE ON accounts FOR EACH ROW "
            "EXECUTE FUNCTION note_write()"
        )

    def most_per_transaction() -> int:
        with psycopg.connect(fresh_database_url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT max(n)::int FROM (SELECT count(*) AS n FROM written GROUP BY txid) t"
            ).fetchone()
            conn.execute("TRUNCATE written")
        assert row is not None
        return int(row[0])

    try:
        assert sweepers.sweep_due_accounts(later.isoformat()) == count
        assert most_per_transaction() == sweepers.SWEEP_CHUNK
        with psycopg.connect(fresh_database_url, autocommit=True) as conn:
            conn.execute(
                "SELECT ledger_put_setting('monthly_free.enabled', 'true', 'admin', 'test', "
                "'the job under test', %s, true)",
                (later,),
            )
        # Marked and then swept, both a chunk at a time.
        assert sweepers.grant_monthly_allowances(later.isoformat()) == count
        assert most_per_transaction() == sweepers.SWEEP_CHUNK

        # Slow maintenance (40 ms an account): the sweep commits when 100 ms have passed.
        with psycopg.connect(fresh_database_url, autocommit=True) as conn:
            conn.execute("UPDATE delay SET seconds = 0.04")
            conn.execute(
                "UPDATE accounts SET next_maintenance_at = %s WHERE account_id <= 'locks-008'",
                (later,),
            )
            conn.execute("TRUNCATE written")
        assert sweepers.sweep_due_accounts(later.isoformat()) == 8
        assert most_per_transaction() <= 3
    finally:
        worker_db.close()
    assert audit_database(fresh_database_url) == []


def test_many_lots_expiring_at_once_are_journaled_in_entries_of_bounded_size(
    fresh_database_url: str,
) -> None:
    """Each expired lot posts twice and posting numbers are smallint: one entry for 16,384
    lots or more overflowed, and every call on the account (each expires what is due
    first) failed for good (helper-65). One entry per p_lots_per_entry lots, here 3."""
    migrate(fresh_database_url)
    start = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
    account = new_account("many-lots")
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        sync_environment_defaults(conn, environment_defaults(), start)
        for n in range(7):
            conn.execute(
                "SELECT ledger_grant(%s, %s, '\\x01', %s, 'promotion', %s, 'main', '', '',"
                " NULL, %s)",
                (account, f"g{n}", (n + 1) * CREDIT, start + timedelta(hours=1), start),
            )
        expired = conn.execute(
            "SELECT ledger_expire_due_lots(%s, %s, p_lots_per_entry => 3)",
            (account, start + timedelta(hours=2)),
        ).fetchone()
        assert expired == (28 * CREDIT,)
        entries = conn.execute(
            "SELECT t.amount_micros, count(p.*)::int, sum(p.amount_micros)::bigint"
            "  FROM journal_transactions t JOIN postings p USING (account_id, transaction_id)"
            " WHERE t.account_id = %s AND t.kind = 'expiry'"
            " GROUP BY t.transaction_id, t.amount_micros ORDER BY t.transaction_id",
            (account,),
        ).fetchall()
        assert entries == [(-6 * CREDIT, 6, 0), (-15 * CREDIT, 6, 0), (-7 * CREDIT, 2, 0)]
        balance = conn.execute("SELECT balance_micros FROM accounts WHERE account_id = %s",
                               (account,)).fetchone()  # fmt: skip
        assert balance == (100 * CREDIT,)  # the sign-up bonus, not due
        # The default bound keeps an entry's posting numbers (two a lot) within smallint.
        default = conn.execute(
            "SELECT pg_get_function_arguments('ledger_expire_due_lots'::regproc)"
        ).fetchone()
        assert default is not None and "p_lots_per_entry integer DEFAULT 16000" in default[0]
    assert audit_database(fresh_database_url) == []


def test_two_sweepers_requeueing_one_stale_job_queue_it_once_without_failing(
    ledger_db_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two schedulers' sweepers fetched the same stale running job; the one deleting it
    second failed inside RQ ("Execution ... not found in Redis"), which aborted its whole
    sweep (helper-167's review). The interleaving, made exact: a job a real worker is
    running, fetched by this sweeper, deleted by the other; this one still queues it,
    once."""
    monkeypatch.setenv("REDIS_URL", redis_url)
    queue_name, job_id = "requeue-race", f"stale-{uuid.uuid4().hex}"
    connection = redis_connection()
    Queue(queue_name, connection=connection).enqueue("time.sleep", 30, job_id=job_id)
    worker = start_worker(ledger_db_url, redis_url, [queue_name], burst=False, simple=True)
    try:
        for _ in range(100):
            if Job.fetch(job_id, connection=connection).get_status() == JobStatus.STARTED:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the worker did not start the job")
        fetched_here = Job.fetch(job_id, connection=connection)
        Job.fetch(job_id, connection=connection).delete(remove_from_queue=True)  # the other
        with monkeypatch.context() as patched:
            patched.setattr(Job, "fetch", lambda *args, **kwargs: fetched_here)
            assert queues.requeue(
                queue_name, "time.sleep", 30, job_id=job_id, stale_before=datetime.now(UTC)
            )
        # The other sweeper's enqueue comes second: refused, the job is queued once.
        assert queues.enqueue(queue_name, "time.sleep", 30, job_id=job_id) is None
        assert Queue(queue_name, connection=connection).job_ids == [job_id]
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        Queue(queue_name, connection=connection).empty()
