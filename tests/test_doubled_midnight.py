"""Days and months where local midnight happens twice (helper-85): in America/Havana the
clocks go back from 01:00 to 00:00 on 2026-11-01, so 00:00-00:59 come at 04:00Z and again at
05:00Z. November begins at the first midnight, as `(now AT TIME ZONE tz)::date` says: the
month's allowance, the daily reward, the automatic daily run and the reports all end October
at 04:00Z (a bare `AT TIME ZONE` put the end at 05:00Z, and October's allowance lived on for
an hour beside November's). The ledger runs on a fresh database and its own clock, set back
to that night; the past is written through the real server, SQL functions and sweepers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import grpc
import psycopg
import pytest
from rq import Queue

from ledger.v1 import ledger_service_pb2 as pb
from ledger.v1 import ledger_service_pb2_grpc, report_service_pb2_grpc, types_pb2
from ledger.v1 import report_service_pb2 as report_pb
from ledger_server.audit import audit_database
from ledger_server.config import Settings
from ledger_server.db.migrate import migrate
from ledger_server.runtime_settings import environment_defaults, sync_environment_defaults
from support.ledger import CREDIT, Ledger, expect_error, new_key
from support.server import ServerThread
from support.set_clock import SetClock
from support.sources import dt
from workers import db as worker_db
from workers import sweepers
from workers.queues import DEFAULT_QUEUE, redis_connection

ZONE = "America/Havana"
FIRST_MIDNIGHT = datetime(2026, 11, 1, 4, 0, tzinfo=UTC)  # 00:00 CDT (UTC-4)
SECOND_MIDNIGHT = datetime(2026, 11, 1, 5, 0, tzinfo=UTC)  # 00:00 CST (UTC-5), an hour on
NOVEMBER_2 = datetime(2026, 11, 2, 5, 0, tzinfo=UTC)  # 00:00 CST, once
DECEMBER = datetime(2026, 12, 1, 5, 0, tzinfo=UTC)
OCTOBER_31, NOVEMBER_1 = date(2026, 10, 31), date(2026, 11, 1)
HOUR = timedelta(hours=1)


@dataclass
class Havana:
    url: str
    clock: SetClock
    ledger: Ledger
    reports: report_service_pb2_grpc.ReportServiceStub

    def sql(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            return conn.execute(statement, params).fetchall()

    def open_account(self, account: str, at: datetime) -> None:
        self.sql("SELECT ledger_open_account(%s, '', %s)", (account, at))


@pytest.fixture
def havana(fresh_database_url: str, redis_url: str, monkeypatch: Any) -> Iterator[Havana]:
    """A fresh ledger in America/Havana with the monthly allowance and the automatic daily
    reward on, its server's clock at 2026-10-01."""
    migrate(fresh_database_url)
    monkeypatch.setenv("DATABASE_URL", fresh_database_url)
    monkeypatch.setenv("REDIS_URL", redis_url)
    since = datetime(2026, 10, 1, tzinfo=UTC)
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        sync_environment_defaults(conn, environment_defaults(), since)
        for key, value in (
            ("ledger.timezone", ZONE),
            ("signup.enabled", False),  # exact balances
            ("monthly_free.enabled", True),
            ("daily.automatic", True),
        ):
            conn.execute(
                "SELECT ledger_put_setting(%s, %s, 'admin', 'test', 'doubled midnight', %s, true)",
                (key, json.dumps(value), since),
            )
    queue_redis = redis_connection()
    clock = SetClock(since)
    server = ServerThread(Settings(database_url=fresh_database_url), clock).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            yield Havana(
                fresh_database_url,
                clock,
                Ledger(ledger_service_pb2_grpc.LedgerServiceStub(channel)),
                report_service_pb2_grpc.ReportServiceStub(channel),
            )
    finally:
        server.stop()
        worker_db.close()
        Queue(DEFAULT_QUEUE, connection=queue_redis).empty()
    assert audit_database(fresh_database_url) == []


def _monthly_lots(ledger: Ledger, account: str) -> list[types_pb2.Lot]:
    lots = ledger.lots(account, include_inactive=True)
    return sorted(
        (lot for lot in lots if lot.source == types_pb2.CREDIT_SOURCE_MONTHLY_FREE),
        key=lambda lot: dt(lot.created_at),
    )


def test_the_helper_takes_the_first_of_a_doubled_local_time(havana: Havana) -> None:
    """ledger_local_instant: the earlier instant of a doubled local time (a shift of an hour
    in Havana, of half an hour at Lord Howe), PostgreSQL's answer elsewhere: once-only times,
    and a local time the clocks jump over (the instant they jump to)."""
    cases = [
        ("2026-11-01 00:00", ZONE, FIRST_MIDNIGHT),
        ("2026-11-01 00:59", ZONE, datetime(2026, 11, 1, 4, 59, tzinfo=UTC)),
        ("2026-11-01 01:00", ZONE, datetime(2026, 11, 1, 6, 0, tzinfo=UTC)),
        ("2026-03-08 00:00", ZONE, datetime(2026, 3, 8, 5, 0, tzinfo=UTC)),  # 00:00 -> 01:00
        ("2026-04-05 01:30", "Australia/Lord_Howe", datetime(2026, 4, 4, 14, 30, tzinfo=UTC)),
        ("2026-04-05 01:45", "Australia/Lord_Howe", datetime(2026, 4, 4, 14, 45, tzinfo=UTC)),
        ("2026-04-05 02:00", "Australia/Lord_Howe", datetime(2026, 4, 4, 15, 30, tzinfo=UTC)),
        ("2026-10-04 02:15", "Australia/Lord_Howe", datetime(2026, 10, 3, 15, 45, tzinfo=UTC)),
        ("2026-11-01 01:30", "America/New_York", datetime(2026, 11, 1, 5, 30, tzinfo=UTC)),
        ("2026-01-01 00:00", "Asia/Shanghai", datetime(2025, 12, 31, 16, 0, tzinfo=UTC)),
    ]
    for local, zone, expected in cases:
        ((got,),) = havana.sql("SELECT ledger_local_instant(%s::timestamp, %s)", (local, zone))
        assert (local, zone, got) == (local, zone, expected)


def test_octobers_allowance_ends_at_the_first_midnight(havana: Havana) -> None:
    """Granted in October, the allowance expires when November begins, at 04:00Z; the run at
    04:01Z grants November's, and at 04:30Z only that one is live (helper-85: October's
    expired at 05:00Z, and for an hour the account had 3,000 credits instead of 1,500)."""
    account = "allowance"
    havana.open_account(account, datetime(2026, 10, 15, 12, 0, tzinfo=UTC))
    (october,) = _monthly_lots(havana.ledger, account)
    assert dt(october.expires_at) == FIRST_MIDNIGHT

    sweepers.grant_monthly_allowances((FIRST_MIDNIGHT + timedelta(minutes=1)).isoformat())
    havana.clock.at = FIRST_MIDNIGHT + HOUR / 2
    balance = havana.ledger.balance(account)
    assert balance.balance_micros == balance.available_micros == 1_500 * CREDIT
    old, new = _monthly_lots(havana.ledger, account)
    assert old.lot_id == october.lot_id
    assert (old.remaining_micros, old.expired_micros) == (0, 1_500 * CREDIT)
    assert new.remaining_micros == 1_500 * CREDIT
    assert dt(new.expires_at) == DECEMBER
    # Still November's only in the repeated hour and after it.
    havana.clock.at = SECOND_MIDNIGHT + HOUR / 2
    assert havana.ledger.balance(account).balance_micros == 1_500 * CREDIT
    assert len(_monthly_lots(havana.ledger, account)) == 2


def test_the_daily_reward_turns_to_november_1_at_the_first_midnight(havana: Havana) -> None:
    """A claim late on October 31 may claim again from 04:00Z; a claim at 04:30Z is
    November 1's, and the next opens at the first (only) midnight of November 2. An account
    opened at 04:30Z did not exist on October 31."""
    account = "daily"
    havana.open_account(account, datetime(2026, 10, 31, 12, 0, tzinfo=UTC))
    havana.clock.at = FIRST_MIDNIGHT - HOUR / 2  # 23:30 on October 31
    claim = pb.ClaimDailyRewardRequest(account_id=account, idempotency_key=new_key("day"))
    october = havana.ledger.stub.ClaimDailyReward(claim)
    assert dt(october.next_claim_time) == FIRST_MIDNIGHT

    havana.clock.at = FIRST_MIDNIGHT + HOUR / 2  # 00:30 CDT on November 1
    claim = pb.ClaimDailyRewardRequest(account_id=account, idempotency_key=new_key("day"))
    november = havana.ledger.stub.ClaimDailyReward(claim)
    assert dt(november.next_claim_time) == NOVEMBER_2
    assert november.balance.balance_micros == (1_500 + 10 + 10) * CREDIT  # and the allowance
    havana.clock.at = SECOND_MIDNIGHT + HOUR / 2  # 00:30 CST, still November 1
    info = expect_error(
        lambda: havana.ledger.stub.ClaimDailyReward(
            pb.ClaimDailyRewardRequest(account_id=account, idempotency_key=new_key("day"))
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "DAILY_REWARD_ALREADY_CLAIMED",
    )
    assert datetime.fromisoformat(info.metadata["next_claim_time"]) == NOVEMBER_2
    assert havana.sql(
        "SELECT claim_date FROM daily_claims WHERE account_id = %s ORDER BY claim_date",
        (account,),
    ) == [(OCTOBER_31,), (NOVEMBER_1,)]

    # A claim of October 31 by name (the automatic run's) for an account opened in November.
    late = "daily-late"
    havana.open_account(late, FIRST_MIDNIGHT + HOUR / 2)
    with pytest.raises(psycopg.Error) as refused:
        havana.sql(
            "SELECT ledger_claim_daily_reward_of_day(%s, %s, %s, %s, %s)",
            (late, new_key("day"), b"h", OCTOBER_31, FIRST_MIDNIGHT + HOUR),
        )
    assert refused.value.sqlstate == "LE010"


def test_the_automatic_run_after_the_first_midnight_ends_october_31(havana: Havana) -> None:
    """The first run of November 1 (at 00:40 CDT) grants October 31 only to the accounts
    opened by 04:00Z and finishes it (helper-85: an account opened at 04:30Z got October 31
    too, and the day stayed open until 05:00Z)."""
    early, late = "run-early", "run-late"
    havana.open_account(early, datetime(2026, 10, 31, 14, 0, tzinfo=UTC))
    assert sweepers.grant_daily_rewards(datetime(2026, 11, 1, 3, 2, tzinfo=UTC).isoformat()) == 1
    havana.open_account(late, FIRST_MIDNIGHT + HOUR / 2)
    assert sweepers.grant_daily_rewards((FIRST_MIDNIGHT + 40 * HOUR / 60).isoformat()) == 2
    claims = havana.sql("SELECT account_id, claim_date FROM daily_claims ORDER BY 1, 2")
    assert claims == [(early, OCTOBER_31), (early, NOVEMBER_1), (late, NOVEMBER_1)]
    runs = havana.sql("SELECT day, finished_at IS NOT NULL FROM daily_reward_runs ORDER BY 1")
    assert runs == [(OCTOBER_31, True), (NOVEMBER_1, False)]


def test_reports_of_october_end_at_the_first_midnight(havana: Havana) -> None:
    """October (and its last day) end at 04:00Z, where November (and its first day) begin:
    November's allowance, granted at 04:01Z, is not in October's report (helper-85: it was,
    October ending at 05:00Z)."""
    account = "report"
    havana.open_account(account, datetime(2026, 10, 15, 12, 0, tzinfo=UTC))
    sweepers.grant_monthly_allowances((FIRST_MIDNIGHT + timedelta(minutes=1)).isoformat())
    havana.clock.at = NOVEMBER_2

    def summary(**period: str) -> report_pb.GetSummaryResponse:
        request = report_pb.GetSummaryRequest(account_id=account, **period)
        response: report_pb.GetSummaryResponse = havana.reports.GetSummary(request)
        assert response.time_zone == ZONE
        return response

    october = summary(month="2026-10")
    assert dt(october.end_time) == FIRST_MIDNIGHT
    assert october.free.allocated_micros == 1_500 * CREDIT
    assert october.free.expired_micros == october.free.allocated_micros
    assert october.free.remaining_micros == 0
    last_day = summary(day="2026-10-31")
    assert dt(last_day.end_time) == FIRST_MIDNIGHT
    assert last_day.free.allocated_micros == 0
    november = summary(month="2026-11")
    assert (dt(november.start_time), dt(november.end_time)) == (FIRST_MIDNIGHT, DECEMBER)
    assert november.free.allocated_micros == november.free.remaining_micros == 1_500 * CREDIT
    first_day = summary(day="2026-11-01")
    assert (dt(first_day.start_time), dt(first_day.end_time)) == (FIRST_MIDNIGHT, NOVEMBER_2)
    assert first_day.free.opening_micros == 0
