"""`ledger.timezone` changed at run time while monthly allowances are live. An allowance
keeps the expiry of the zone it was granted in (its month's end there); moved east, the new
zone's next month begins before the old zone's ends, and that month's grant ends the old
allowance at once (reviewers' tz_change_monthly.py: UTC -> Asia/Shanghai, April's came at
16:01Z on March 31 while March's lived till 00:00Z, and for 8 hours an account spent 3,000
credits of a 1,500 allowance). The ledger runs on a fresh database and its own clock, set
back to those days; the past is written through the real server, SQL functions and the
scheduler's job; the audit is clean after each test."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf.duration_pb2 import Duration
from rq import Queue

from ledger.v1 import ledger_service_pb2 as pb
from ledger.v1 import ledger_service_pb2_grpc, report_service_pb2_grpc, types_pb2
from ledger.v1 import report_service_pb2 as report_pb
from ledger_server.audit import audit_database
from ledger_server.config import Settings
from ledger_server.db.migrate import migrate
from ledger_server.runtime_settings import environment_defaults, sync_environment_defaults
from support.ledger import CREDIT, Ledger, expect_error
from support.server import ServerThread
from support.set_clock import SetClock
from support.sources import dt
from workers import db as worker_db
from workers import sweepers
from workers.queues import DEFAULT_QUEUE, redis_connection

SINCE = datetime(2026, 3, 1, tzinfo=UTC)


@dataclass
class Zoned:
    url: str
    clock: SetClock
    ledger: Ledger
    reports: report_service_pb2_grpc.ReportServiceStub

    def sql(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            return conn.execute(statement, params).fetchall()

    def put(self, key: str, value: Any, at: datetime) -> None:
        self.sql(
            "SELECT ledger_put_setting(%s, %s, 'admin', 'test', 'time zone change', %s, true)",
            (key, json.dumps(value), at),
        )


@pytest.fixture
def zoned(fresh_database_url: str, redis_url: str, monkeypatch: Any) -> Iterator[Zoned]:
    """A fresh ledger in UTC with the monthly allowance on (no sign-up bonus: exact
    balances), its server's clock at 2026-03-01."""
    migrate(fresh_database_url)
    monkeypatch.setenv("DATABASE_URL", fresh_database_url)
    monkeypatch.setenv("REDIS_URL", redis_url)
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        sync_environment_defaults(conn, environment_defaults(), SINCE)
    queue_redis = redis_connection()
    clock = SetClock(SINCE)
    server = ServerThread(Settings(database_url=fresh_database_url), clock).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            z = Zoned(
                fresh_database_url,
                clock,
                Ledger(ledger_service_pb2_grpc.LedgerServiceStub(channel)),
                report_service_pb2_grpc.ReportServiceStub(channel),
            )
            z.put("signup.enabled", False, SINCE)
            z.put("monthly_free.enabled", True, SINCE)
            yield z
    finally:
        server.stop()
        worker_db.close()
        Queue(DEFAULT_QUEUE, connection=queue_redis).empty()
    assert audit_database(fresh_database_url) == []


def _monthly_lots(ledger: Ledger, account: str) -> list[types_pb2.Lot]:
    lots = ledger.lots(account, include_inactive=True)
    return sorted(
        (lot for lot in lots if lot.source == types_pb2.CREDIT_SOURCE_MONTHLY_FREE),
        key=lambda lot: lot.lot_id,
    )


def test_moving_east_the_next_months_grant_ends_the_old_allowance(zoned: Zoned) -> None:
    """UTC -> Asia/Shanghai on March 20: April (Shanghai) begins at 16:00Z on March 31, eight
    hours before March (UTC) ends. The scheduler's run at 16:01Z grants April's allowance and
    ends March's then, in an EXPIRY entry: never both spendable. What a hold kept of March's
    expires when the hold is released."""
    account = "east"
    zoned.sql(
        "SELECT ledger_open_account(%s, '', %s)", (account, datetime(2026, 3, 10, 12, tzinfo=UTC))
    )
    zoned.clock.at = datetime(2026, 3, 15, tzinfo=UTC)
    zoned.ledger.consume(account, 200 * CREDIT)
    zoned.clock.at = datetime(2026, 3, 31, 15, tzinfo=UTC)
    held = zoned.ledger.reserve(account, 300 * CREDIT, ttl=Duration(seconds=86_400)).reservation
    zoned.put("ledger.timezone", "Asia/Shanghai", datetime(2026, 3, 20, 12, tzinfo=UTC))
    (march,) = _monthly_lots(zoned.ledger, account)
    assert dt(march.expires_at) == datetime(2026, 4, 1, tzinfo=UTC)  # the zone it was granted in

    grant_at = datetime(2026, 3, 31, 16, 1, tzinfo=UTC)
    assert sweepers.grant_monthly_allowances(grant_at.isoformat()) == 1

    zoned.clock.at = datetime(2026, 3, 31, 20, tzinfo=UTC)
    balance = zoned.ledger.balance(account)
    assert (balance.balance_micros, balance.available_micros) == (1_800 * CREDIT, 1_500 * CREDIT)
    expect_error(
        lambda: zoned.ledger.consume(account, 1_501 * CREDIT),
        grpc.StatusCode.FAILED_PRECONDITION,
        "INSUFFICIENT_CREDITS",
    )
    old, april = _monthly_lots(zoned.ledger, account)
    assert old.lot_id == march.lot_id
    assert dt(old.expires_at) == grant_at
    assert (old.remaining_micros, old.held_micros, old.expired_micros) == (
        300 * CREDIT,
        300 * CREDIT,
        1_000 * CREDIT,
    )
    assert dt(april.expires_at) == datetime(2026, 4, 30, 16, tzinfo=UTC)
    assert april.remaining_micros == 1_500 * CREDIT

    zoned.ledger.release(account, held.reservation_id)
    assert zoned.ledger.balance(account).balance_micros == 1_500 * CREDIT
    old, _ = _monthly_lots(zoned.ledger, account)
    assert (old.remaining_micros, old.expired_micros) == (0, 1_300 * CREDIT)
    expiries = zoned.ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_EXPIRY])
    assert sorted(t.amount_micros for t in expiries) == [-1_000 * CREDIT, -300 * CREDIT]
    assert {dt(t.create_time) for t in expiries if t.amount_micros == -1_000 * CREDIT} == {grant_at}


def test_moving_east_over_the_year_end_through_the_sql_functions(zoned: Zoned) -> None:
    """The reviewers' p2_month.sql: opened at 10:00Z on December 31 (UTC), the zone set to
    Pacific/Kiritimati (UTC+14) at 11:00Z, already January 1 there: the schedule and the
    sweep at 11:00Z grant January's allowance and end December's, which lived till 00:00Z."""
    account = "kiritimati"
    zoned.put("monthly_free.enabled", True, datetime(2026, 12, 31, 9, tzinfo=UTC))
    zoned.sql(
        "SELECT ledger_open_account(%s, '', %s)", (account, datetime(2026, 12, 31, 10, tzinfo=UTC))
    )
    now = datetime(2026, 12, 31, 11, tzinfo=UTC)
    zoned.put("ledger.timezone", "Pacific/Kiritimati", now)
    assert zoned.sql(
        "SELECT marked FROM ledger_schedule_monthly_allowances(%s, '', 500, 20)", (now,)
    ) == [(1,)]
    zoned.sql("SELECT ledger_sweep(%s, 20)", (now,))
    rows = zoned.sql(
        "SELECT remaining_micros, expired_micros, expires_at FROM lots"
        " WHERE account_id = %s ORDER BY lot_id",
        (account,),
    )
    assert rows == [
        (0, 1_500 * CREDIT, now),
        (1_500 * CREDIT, 0, datetime(2027, 1, 31, 10, tzinfo=UTC)),
    ]
    assert zoned.sql("SELECT balance_micros FROM accounts WHERE account_id = %s", (account,)) == [
        (1_500 * CREDIT,)
    ]


def test_moving_west_in_a_months_first_hours_grants_no_earlier_month_beside_it(
    zoned: Zoned,
) -> None:
    """helper-156's west_open.py: opened at 02:00Z on April 1 (UTC), so April's allowance;
    the zone set to America/Los_Angeles at 03:00Z, where it is still March 31. The hourly
    run granted March's too (no row for March) and ended only earlier months: 3,000 credits
    spendable of a 1,500 allowance, April's spent before April began. A later month's
    allowance now counts as this month's."""
    account = "west-open"
    zoned.sql(
        "SELECT ledger_open_account(%s, '', %s)", (account, datetime(2026, 4, 1, 2, tzinfo=UTC))
    )
    zoned.put("ledger.timezone", "America/Los_Angeles", datetime(2026, 4, 1, 3, tzinfo=UTC))
    run_at = datetime(2026, 4, 1, 4, tzinfo=UTC)
    zoned.sql("SELECT ledger_schedule_monthly_allowances(%s, '', 500, 20)", (run_at,))
    zoned.sql("SELECT ledger_sweep(%s, 20)", (run_at,))
    # As the scheduler of a release without its own rule would: the allowance is due now.
    zoned.sql(
        "UPDATE accounts SET monthly_free_next_at = %s, next_maintenance_at = %s"
        " WHERE account_id = %s RETURNING 1",
        (run_at, run_at, account),
    )
    zoned.clock.at = datetime(2026, 4, 1, 4, 30, tzinfo=UTC)
    assert zoned.ledger.balance(account).available_micros == 1_500 * CREDIT
    expect_error(
        lambda: zoned.ledger.consume(account, 1_501 * CREDIT),
        grpc.StatusCode.FAILED_PRECONDITION,
        "INSUFFICIENT_CREDITS",
    )
    (april,) = _monthly_lots(zoned.ledger, account)
    assert dt(april.expires_at) == datetime(2026, 5, 1, tzinfo=UTC)  # UTC's April
    # April in Los Angeles (from 07:00Z) has its allowance already: none granted again.
    run_at = datetime(2026, 4, 1, 8, tzinfo=UTC)
    zoned.sql("SELECT ledger_schedule_monthly_allowances(%s, '', 500, 20)", (run_at,))
    zoned.sql("SELECT ledger_sweep(%s, 20)", (run_at,))
    zoned.clock.at = run_at
    assert [lot.lot_id for lot in _monthly_lots(zoned.ledger, account)] == [april.lot_id]
    assert zoned.ledger.balance(account).available_micros == 1_500 * CREDIT


def _spent_1000_of_march_then_moved_west(zoned: Zoned, account: str) -> None:
    """Opened on March 10 (UTC: March's allowance, expiring at 00:00Z on April 1), 1,000 of
    its 1,500 spent, the zone moved to America/Los_Angeles on March 20."""
    zoned.sql(
        "SELECT ledger_open_account(%s, '', %s)", (account, datetime(2026, 3, 10, 12, tzinfo=UTC))
    )
    zoned.clock.at = datetime(2026, 3, 15, tzinfo=UTC)
    zoned.ledger.consume(account, 1_000 * CREDIT)
    zoned.put("ledger.timezone", "America/Los_Angeles", datetime(2026, 3, 20, 12, tzinfo=UTC))


def test_moving_west_the_allowance_lasts_to_the_new_zones_month_end(zoned: Zoned) -> None:
    """helper-156's west.py: UTC -> America/Los_Angeles on March 20. March's allowance
    (granted in UTC) expired at 00:00Z on April 1, seven hours before Los Angeles' March
    ended, and for those hours the account had no allowance: what was left of it expired
    and what it spent came out of paid credits. Its expiry now moves out to the new zone's
    month end when it comes, and April's allowance follows then."""
    account = "west"
    _spent_1000_of_march_then_moved_west(zoned, account)
    (march,) = _monthly_lots(zoned.ledger, account)
    assert dt(march.expires_at) == datetime(2026, 4, 1, tzinfo=UTC)  # the zone it was granted in

    zoned.clock.at = datetime(2026, 4, 1, 0, 30, tzinfo=UTC)  # 17:30 on March 31 there
    assert zoned.ledger.balance(account).available_micros == 500 * CREDIT
    zoned.ledger.consume(account, 40 * CREDIT)
    (march,) = _monthly_lots(zoned.ledger, account)
    los_angeles_april = datetime(2026, 4, 1, 7, tzinfo=UTC)
    assert dt(march.expires_at) == los_angeles_april
    assert (march.remaining_micros, march.expired_micros) == (460 * CREDIT, 0)

    zoned.clock.at = datetime(2026, 4, 1, 7, 30, tzinfo=UTC)
    assert zoned.ledger.balance(account).available_micros == 1_500 * CREDIT
    march, april = _monthly_lots(zoned.ledger, account)
    assert (march.remaining_micros, march.expired_micros) == (0, 460 * CREDIT)
    assert dt(april.expires_at) == datetime(2026, 5, 1, 7, tzinfo=UTC)
    expiries = zoned.ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_EXPIRY])
    assert [(t.amount_micros, dt(t.create_time)) for t in expiries] == [
        (-460 * CREDIT, zoned.clock.at)
    ]


@pytest.mark.parametrize("hold_ends", ["released", "timed out"])
def test_an_allowance_that_ended_under_the_old_zone_stays_ended_after_a_move_west(
    zoned: Zoned, hold_ends: str
) -> None:
    """helper-161's review: March's allowance, all of it held, reached its end at 00:00Z on
    April 1 in UTC (nothing expired: the credits were held; no April grant, the allowance
    turned off). The zone moved west at 00:30Z, where March still runs, and when the hold
    ended after its time-to-live the allowance was stretched back to life: 1,500 credits."""
    account = f"ended-{hold_ends.replace(' ', '-')}"
    zoned.sql(
        "SELECT ledger_open_account(%s, '', %s)", (account, datetime(2026, 3, 10, 12, tzinfo=UTC))
    )
    zoned.put("monthly_free.enabled", False, datetime(2026, 3, 20, tzinfo=UTC))
    zoned.clock.at = datetime(2026, 3, 31, 23, tzinfo=UTC)
    held = zoned.ledger.reserve(account, 1_500 * CREDIT, ttl=Duration(seconds=7_200)).reservation
    zoned.clock.at = datetime(2026, 4, 1, 0, 10, tzinfo=UTC)
    assert zoned.ledger.balance(account).available_micros == 0
    zoned.put("ledger.timezone", "America/Los_Angeles", datetime(2026, 4, 1, 0, 30, tzinfo=UTC))
    if hold_ends == "released":
        zoned.clock.at = datetime(2026, 4, 1, 1, 5, tzinfo=UTC)
        zoned.ledger.release(account, held.reservation_id)
    else:
        zoned.clock.at = datetime(2026, 4, 1, 1, 2, tzinfo=UTC)  # past its time-to-live's grace
    balance = zoned.ledger.balance(account)
    assert (balance.balance_micros, balance.available_micros) == (0, 0)
    (march,) = _monthly_lots(zoned.ledger, account)
    assert dt(march.expires_at) == datetime(2026, 4, 1, tzinfo=UTC)
    assert (march.remaining_micros, march.expired_micros) == (0, 1_500 * CREDIT)


def test_moving_west_twice_before_the_old_expiry_is_reached_still_stretches(
    zoned: Zoned,
) -> None:
    """helper-162's review: UTC -> America/Los_Angeles on March 20, then America/Vancouver
    (the same offsets) at 00:20Z on April 1, before the account's next call. At its old
    expiry (00:00Z) March had not ended in the zone then in force, so the allowance lasts
    to March's end in the zone now in force."""
    account = "west-twice"
    _spent_1000_of_march_then_moved_west(zoned, account)
    zoned.put("ledger.timezone", "America/Vancouver", datetime(2026, 4, 1, 0, 20, tzinfo=UTC))
    zoned.clock.at = datetime(2026, 4, 1, 0, 30, tzinfo=UTC)
    assert zoned.ledger.balance(account).available_micros == 500 * CREDIT
    (march,) = _monthly_lots(zoned.ledger, account)
    assert dt(march.expires_at) == datetime(2026, 4, 1, 7, tzinfo=UTC)


def test_a_summary_before_the_stretch_counts_the_allowance_as_the_ledger_will_spend_it(
    zoned: Zoned,
) -> None:
    """helper-163's review: moved west, between the allowance's old expiry (00:00Z) and the
    account's next call or sweep, a summary counted it expired (the lot's stored expiry),
    then, once the next call stretched it, remaining: a period already closed changed, and
    the open month's remaining read 0 while Balance said 1,500. The summary follows the
    stretch's own rule (ledger_allowance_stretch)."""
    account = "west-report"
    zoned.sql(
        "SELECT ledger_open_account(%s, '', %s)", (account, datetime(2026, 4, 10, 12, tzinfo=UTC))
    )
    zoned.put("ledger.timezone", "America/Los_Angeles", datetime(2026, 4, 20, tzinfo=UTC))
    closed = report_pb.TimeRange()
    closed.start_time.FromDatetime(datetime(2026, 4, 30, tzinfo=UTC))
    closed.end_time.FromDatetime(datetime(2026, 5, 1, tzinfo=UTC))

    def summaries() -> list[tuple[int, int]]:
        return [
            (summary.total.expired_micros, summary.total.remaining_micros)
            for summary in (
                zoned.reports.GetSummary(
                    report_pb.GetSummaryRequest(account_id=account, range=closed)
                ),
                zoned.reports.GetSummary(
                    report_pb.GetSummaryRequest(account_id=account, month="2026-04")
                ),
            )
        ]

    zoned.clock.at = datetime(2026, 5, 1, 0, 5, tzinfo=UTC)  # before any call or sweep
    before = summaries()
    assert zoned.ledger.balance(account).available_micros == 1_500 * CREDIT  # the stretch
    assert summaries() == before == [(0, 1_500 * CREDIT), (0, 1_500 * CREDIT)]
