"""ReportService.GetSummary (issue 6, must-show 2): a month with sign-up, daily,
purchased and monthly-free credits, some consumed and some expired, against totals
computed by hand, free and purchased apart; a day; every account of a fresh database."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
import psycopg
import pytest
from google.protobuf import struct_pb2
from google.protobuf.duration_pb2 import Duration

from ledger.v1 import admin_service_pb2 as admin_pb
from ledger.v1 import (
    admin_service_pb2_grpc,
    ledger_service_pb2_grpc,
    report_service_pb2_grpc,
    types_pb2,
)
from ledger.v1 import ledger_service_pb2 as pb
from ledger.v1 import report_service_pb2 as report_pb
from ledger_server.clock import OffsetClock
from ledger_server.config import Settings
from ledger_server.db.migrate import migrate
from ledger_server.server.identity import ACTOR_METADATA_KEY
from ledger_server.server.report_service import USAGE_ROWS
from support.ledger import CREDIT, Ledger, expect_error, new_account, new_key
from support.server import ServerThread

SOURCE = types_pb2.CreditSource


@pytest.fixture(scope="module")
def reports(server_address: str) -> Iterator[report_service_pb2_grpc.ReportServiceStub]:
    with grpc.insecure_channel(server_address) as channel:
        yield report_service_pb2_grpc.ReportServiceStub(channel)


@dataclass(frozen=True)
class Amounts:
    """SummaryAmounts in whole credits, for readable expectations."""

    opening: float = 0
    allocated: float = 0
    consumed: float = 0
    adjusted: float = 0
    refunded: float = 0
    expired: float = 0
    transferred: float = 0
    remaining: float = 0

    @staticmethod
    def of(message: report_pb.SummaryAmounts) -> Amounts:
        return Amounts(
            *(getattr(message, f"{name}_micros") / CREDIT for name in Amounts.__dataclass_fields__)
        )

    def add_up(self) -> bool:
        return (
            self.opening
            + self.allocated
            - self.consumed
            - self.adjusted
            + self.refunded
            - self.expired
            + self.transferred
            == self.remaining
        )


def _month_start(moment: datetime, months_ahead: int) -> datetime:
    index = moment.year * 12 + moment.month - 1 + months_ahead
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def _advance_to(clock: OffsetClock, moment: datetime) -> None:
    clock.advance(moment - clock.now())


def _summary(
    reports: report_service_pb2_grpc.ReportServiceStub, account_id: str = "", **period: object
) -> report_pb.GetSummaryResponse:
    return reports.GetSummary(report_pb.GetSummaryRequest(account_id=account_id, **period))  # type: ignore[arg-type]


def _by_source(response: report_pb.GetSummaryResponse) -> dict[int, Amounts]:
    return {s.source: Amounts.of(s.amounts) for s in response.sources}


def test_month_summary_matches_hand_computed_totals_free_and_purchased_apart(
    ledger: Ledger,
    admin: admin_service_pb2_grpc.AdminServiceStub,
    reports: report_service_pb2_grpc.ReportServiceStub,
    configure: object,
    clock: OffsetClock,
) -> None:
    for key, value in {
        "ledger.timezone": "UTC",
        "signup.enabled": True,
        "signup.amount_micros": 100 * CREDIT,
        "signup.expire_days": 10,
        "daily.enabled": True,
        "daily.amount_micros": 10 * CREDIT,
        "daily.expire_days": 0,
        "monthly_free.enabled": True,
        "monthly_free.amount_micros": 1500 * CREDIT,
    }.items():
        configure(key, value)  # type: ignore[operator]
    month = _month_start(clock.now(), 1)  # a month no other test has reached yet
    next_month = _month_start(month, 1)
    account = new_account("report")

    # Day 2: the account opens (sign-up 100, expiring day 12; monthly 1500, expiring at
    # the month's end), claims the daily reward (10) and buys 2500.
    _advance_to(clock, month + timedelta(days=1, hours=10))
    ledger.stub.CreateAccount(pb.CreateAccountRequest(account_id=account, idempotency_key="open"))
    ledger.stub.ClaimDailyReward(
        pb.ClaimDailyRewardRequest(account_id=account, idempotency_key="day-2")
    )
    ledger.grant(account, 2500, source=SOURCE.CREDIT_SOURCE_PURCHASE)
    # 30 for an image: daily 10 first, then sign-up 20.
    ledger.consume(account, 30 * CREDIT, feature="image.generate")

    # Day 13: the sign-up lot expired on day 12 with 80 left (journaled only now).
    # 1600 for chat: monthly 1500, then purchased 100; 300 of it is refunded,
    # last-charged lot first: purchased 100, then monthly 200.
    _advance_to(clock, month + timedelta(days=12, hours=10))
    chat = ledger.consume(account, 1600 * CREDIT, feature="chat")
    assert [(lot.source, lot.committed_micros) for lot in chat.reservation.lots] == [
        (SOURCE.CREDIT_SOURCE_MONTHLY_FREE, 1500 * CREDIT),
        (SOURCE.CREDIT_SOURCE_PURCHASE, 100 * CREDIT),
    ]
    ledger.refund(account, chat.reservation.reservation_id, 300 * CREDIT)

    # Day 14: another daily reward, of which an administrator debits 5.
    _advance_to(clock, month + timedelta(days=13, hours=10))
    ledger.stub.ClaimDailyReward(
        pb.ClaimDailyRewardRequest(account_id=account, idempotency_key="day-14")
    )
    admin.AdjustBalance(
        admin_pb.AdjustBalanceRequest(
            account_id=account, idempotency_key="adjust", amount_micros=5 * CREDIT, reason="test"
        )
    )

    # The month is over: the 200 monthly credits left expired at its end. Nothing has
    # touched the account since, so the expiry is not journaled yet; the report counts it.
    _advance_to(clock, next_month + timedelta(hours=3))
    expected_free = Amounts(
        allocated=100 + 1500 + 10 + 10,
        consumed=30 + 1500,
        adjusted=5,
        refunded=200,
        expired=80 + 200,
        remaining=5,
    )
    expected_purchased = Amounts(allocated=2500, consumed=100, refunded=100, remaining=2500)
    expected_total = Amounts(
        allocated=4120, consumed=1630, adjusted=5, refunded=300, expired=280, remaining=2505
    )
    expected_sources = {
        SOURCE.CREDIT_SOURCE_SIGNUP: Amounts(allocated=100, consumed=20, expired=80),
        SOURCE.CREDIT_SOURCE_DAILY: Amounts(allocated=20, consumed=10, adjusted=5, remaining=5),
        SOURCE.CREDIT_SOURCE_MONTHLY_FREE: Amounts(
            allocated=1500, consumed=1500, refunded=200, expired=200
        ),
        SOURCE.CREDIT_SOURCE_PURCHASE: expected_purchased,
    }

    def check_month(summary: report_pb.GetSummaryResponse) -> None:
        assert summary.start_time.ToDatetime(UTC) == month
        assert summary.end_time.ToDatetime(UTC) == next_month
        assert summary.time_zone == "UTC"
        assert Amounts.of(summary.free) == expected_free
        assert Amounts.of(summary.purchased) == expected_purchased
        assert Amounts.of(summary.total) == expected_total
        assert _by_source(summary) == expected_sources
        assert [
            (u.feature, u.model, u.charges, u.consumed_micros, u.refunded_micros)
            for u in summary.usage
        ] == [
            ("chat", "", 1, 1600 * CREDIT, 300 * CREDIT),
            ("image.generate", "", 1, 30 * CREDIT, 0),
        ]
        for amounts in (summary.free, summary.purchased, summary.total):
            assert Amounts.of(amounts).add_up()

    month_name = month.strftime("%Y-%m")
    check_month(_summary(reports, account, month=month_name))

    # The first call of the new month journals the expiry (and grants the new month's
    # allowance): the past month's summary does not change.
    balance = ledger.balance(account)
    assert balance.balance_micros == (2505 + 1500) * CREDIT
    check_month(_summary(reports, account, month=month_name))

    # The next month starts with what this one carried forward.
    following = _summary(reports, account, month=next_month.strftime("%Y-%m"))
    assert Amounts.of(following.total) == Amounts(
        opening=2505, allocated=1500, remaining=2505 + 1500
    )
    assert Amounts.of(following.purchased) == Amounts(opening=2500, remaining=2500)
    assert list(following.usage) == []

    # Days: the sign-up lot's expiry belongs to day 12, when the lot expired, although
    # the journal recorded it on day 13.
    day_12 = _summary(reports, account, day=(month + timedelta(days=11)).strftime("%Y-%m-%d"))
    assert Amounts.of(day_12.total) == Amounts(opening=4080, expired=80, remaining=4000)
    day_13 = _summary(reports, account, day=(month + timedelta(days=12)).strftime("%Y-%m-%d"))
    assert Amounts.of(day_13.free) == Amounts(
        opening=1500, consumed=1500, refunded=200, remaining=200
    )
    assert Amounts.of(day_13.purchased) == Amounts(
        opening=2500, consumed=100, refunded=100, remaining=2500
    )
    assert day_13.start_time.ToDatetime(UTC) == month + timedelta(days=12)
    assert day_13.end_time.ToDatetime(UTC) == month + timedelta(days=13)

    # A custom range is the same arithmetic: day 2 10:00 to day 13 (exclusive).
    custom = report_pb.GetSummaryRequest(account_id=account)
    custom.range.start_time.FromDatetime(month + timedelta(days=1, hours=10))
    custom.range.end_time.FromDatetime(month + timedelta(days=12))
    assert Amounts.of(reports.GetSummary(custom).total) == Amounts(
        allocated=100 + 1500 + 10 + 2500, consumed=30, expired=80, remaining=4000
    )


def test_summary_in_the_ledger_time_zone(
    ledger: Ledger,
    reports: report_service_pb2_grpc.ReportServiceStub,
    configure: object,
    clock: OffsetClock,
) -> None:
    configure("ledger.timezone", "Asia/Shanghai")  # type: ignore[operator]
    account = new_account("report-tz")
    # Local days run from 16:00 UTC of the day before (UTC+8, no daylight saving). Keep
    # clear of a local midnight so the grant and the day asked for are the same day.
    if (clock.now() + timedelta(hours=8)).hour == 23:
        clock.advance(timedelta(hours=1, minutes=1))
    ledger.grant(account, 7)
    now = clock.now()
    local = now + timedelta(hours=8)
    summary = _summary(reports, account, day=local.strftime("%Y-%m-%d"))
    assert summary.time_zone == "Asia/Shanghai"
    start = datetime(local.year, local.month, local.day, tzinfo=UTC) - timedelta(hours=8)
    assert summary.start_time.ToDatetime(UTC) == start
    assert summary.end_time.ToDatetime(UTC) == start + timedelta(days=1)
    assert Amounts.of(summary.purchased) == Amounts(allocated=7, remaining=7)


def test_summary_refuses_bad_requests(
    ledger: Ledger, reports: report_service_pb2_grpc.ReportServiceStub
) -> None:
    account = new_account("report-bad")
    ledger.grant(account, 1)
    for period, field in [
        ({}, "period"),
        ({"day": "2026-02-30"}, "day"),
        ({"day": "yesterday"}, "day"),
        ({"month": "2026-13"}, "month"),
        ({"month": "2026-1"}, "month"),
        ({"month": "2026-01\n"}, "month"),
        ({"day": "2026-01-02\n"}, "day"),
        ({"month": "9999-12"}, "month"),  # its end is past the last year a date can hold
        ({"day": "9999-12-31"}, "day"),
        # East of UTC, a day or month of the year 1 begins in the year 0.
        ({"day": "0001-01-01"}, "day"),
        ({"month": "0001-01"}, "month"),
        ({"range": report_pb.TimeRange()}, "range.start_time"),
    ]:
        expect_error(
            lambda period=period: _summary(reports, account, **period),  # type: ignore[misc]
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_FIELD",
            field,
        )
    backwards = report_pb.GetSummaryRequest(account_id=account)
    backwards.range.start_time.FromSeconds(2_000_000_000)
    backwards.range.end_time.FromSeconds(1_000_000_000)
    expect_error(
        lambda: reports.GetSummary(backwards),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FIELD",
        "range.end_time",
    )
    expect_error(
        lambda: _summary(reports, new_account("nobody"), month="2026-01"),
        grpc.StatusCode.NOT_FOUND,
        "ACCOUNT_NOT_FOUND",
    )


def test_all_accounts_summary_of_a_fresh_database(fresh_database_url: str) -> None:
    """Every account together, on a database holding only what this test wrote, so the
    expectation is exact: the sum of the hand-computed per-account movements."""
    migrate(fresh_database_url)
    clock = OffsetClock()
    server = ServerThread(Settings(database_url=fresh_database_url), clock).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            admin = admin_service_pb2_grpc.AdminServiceStub(channel)
            admin.UpdateSetting(
                admin_pb.UpdateSettingRequest(
                    key="signup.enabled",
                    value=struct_pb2.Value(bool_value=False),
                    reason="exact balances",
                    idempotency_key=new_key(),
                ),
                metadata=((ACTOR_METADATA_KEY, "report-test"),),
            )
            ledger = Ledger(ledger_service_pb2_grpc.LedgerServiceStub(channel))
            reports = report_service_pb2_grpc.ReportServiceStub(channel)
            start = clock.now()

            # a: gets 20 from an admin (free), buys 50; spends 30: permanent lots go in
            # the order they came, so the free 20, then 10 purchased.
            ledger.grant("a", 20, source=SOURCE.CREDIT_SOURCE_ADMIN, comment="welcome back")
            ledger.grant("a", 50, source=SOURCE.CREDIT_SOURCE_PURCHASE)
            ledger.consume("a", 30 * CREDIT, feature="image")
            # b: a redemption code's 5 credits expiring in an hour; a 12-credit recharge
            # refunded in full after being spent on video.
            ledger.grant(
                "b", 5, source=SOURCE.CREDIT_SOURCE_REDEMPTION, expires_in=Duration(seconds=3600)
            )
            ledger.grant("b", 12, source=SOURCE.CREDIT_SOURCE_RECHARGE)
            spent = ledger.consume("b", 12 * CREDIT, feature="video", key=new_key())
            # Consumption order: the expiring free lot first (5), then the recharge (7).
            ledger.refund("b", spent.reservation.reservation_id)
            # c: a referral reward (free, reward balance) moved to main: a transfer.
            ledger.grant(
                "c",
                4,
                source=SOURCE.CREDIT_SOURCE_REFERRAL,
                balance_kind=types_pb2.BALANCE_KIND_REWARD,
            )
            ledger.stub.TransferReward(
                pb.TransferRewardRequest(account_id="c", idempotency_key="move")
            )
            clock.advance(timedelta(hours=2))  # b's 5 free credits expire
            end = clock.now() + timedelta(minutes=1)

            request = report_pb.GetSummaryRequest()
            request.range.start_time.FromDatetime(start - timedelta(minutes=1))
            request.range.end_time.FromDatetime(end)
            everyone = reports.GetSummary(request)
            assert everyone.account_id == ""
            assert Amounts.of(everyone.free) == Amounts(
                allocated=20 + 5 + 4, consumed=20 + 5, refunded=5, expired=5, remaining=4
            )
            assert Amounts.of(everyone.purchased) == Amounts(
                allocated=50 + 12, consumed=10 + 7, refunded=7, remaining=40 + 12
            )
            sources = _by_source(everyone)
            assert sources[SOURCE.CREDIT_SOURCE_REFERRAL] == Amounts(allocated=4, transferred=-4)
            assert sources[SOURCE.CREDIT_SOURCE_REWARD_TRANSFER] == Amounts(
                transferred=4, remaining=4
            )
            assert [
                (u.feature, u.charges, u.consumed_micros, u.refunded_micros) for u in everyone.usage
            ] == [
                ("image", 1, 30 * CREDIT, 0),
                ("video", 1, 12 * CREDIT, 12 * CREDIT),
            ]
            # The parts add up to the whole.
            per_account = [
                reports.GetSummary(
                    report_pb.GetSummaryRequest(account_id=account, range=request.range)
                )
                for account in ("a", "b", "c")
            ]
            for part in ("free", "purchased", "total"):
                field_sums = {
                    name: sum(getattr(getattr(s, part), f"{name}_micros") for s in per_account)
                    for name in Amounts.__dataclass_fields__
                }
                whole = getattr(everyone, part)
                assert field_sums == {
                    name: getattr(whole, f"{name}_micros") for name in Amounts.__dataclass_fields__
                }
        # Independent of the report: the remaining total is what the accounts hold.
        with psycopg.connect(fresh_database_url) as conn:
            held = conn.execute(
                "SELECT sum(balance_micros + reward_balance_micros) FROM accounts"
            ).fetchone()
        assert held is not None
        # b's expired lot is not swept yet (nothing touched b): the accounts row still
        # counts those 5 credits, the report (as of now) does not.
        assert everyone.total.remaining_micros == held[0] - 5 * CREDIT
    finally:
        server.stop()


def test_a_summary_lists_the_most_consumed_features_and_adds_up_the_others(
    fresh_database_url: str,
) -> None:
    """Consume accepts any valid feature code, so a caller can charge under as many features
    as it likes: 60,000 made the summary (the caller's own, and every account's) larger than
    a gRPC message, and it failed to send at all. The summary lists the USAGE_ROWS most
    consumed pairs and adds up the others, so its totals stay exact. The charges are made
    through ledger_consume in one statement, not one RPC each, to keep the test fast."""
    migrate(fresh_database_url)
    clock = OffsetClock()
    server = ServerThread(Settings(database_url=fresh_database_url), clock).start()
    features = USAGE_ROWS + 300
    now = clock.now()
    try:
        with psycopg.connect(fresh_database_url, autocommit=True) as conn:
            conn.execute(
                "SELECT ledger_grant('many', 'g', '\\x01', %s, 'purchase', NULL, 'main', '', '',"
                " NULL, %s)",
                (features * features, now),
            )
            # Charge n micro-credits under the n-th 64-character feature: feature n is the
            # n-th least consumed.
            conn.execute(
                "SELECT ledger_consume('many', 'c' || n, '\\x01', n, NULL,"
                " 'f' || lpad(n::text, 6, '0') || '.' || repeat('x', 56), '', %s)"
                "  FROM generate_series(1, %s) n",
                (now, features),
            )
        with grpc.insecure_channel(server.address) as channel:
            reports = report_service_pb2_grpc.ReportServiceStub(channel)
            period = report_pb.TimeRange()
            period.start_time.FromDatetime(now - timedelta(minutes=1))
            period.end_time.FromDatetime(now + timedelta(minutes=1))
            for account_id in ("", "many"):
                summary = reports.GetSummary(
                    report_pb.GetSummaryRequest(account_id=account_id, range=period)
                )
                assert len(summary.usage) == USAGE_ROWS, (account_id, len(summary.usage))
                listed = [(u.feature[:7], u.charges, u.consumed_micros) for u in summary.usage]
                assert listed == [
                    (f"f{n:06d}", 1, n) for n in range(features, features - USAGE_ROWS, -1)
                ]
                left_out = features - USAGE_ROWS
                assert summary.other_usage_pairs == left_out
                assert summary.other_usage == report_pb.FeatureUsage(
                    charges=left_out, consumed_micros=left_out * (left_out + 1) // 2
                )
                # Exact: the listed pairs and the others add up to the period's consumption.
                charged = sum(u.consumed_micros for u in summary.usage)
                assert (
                    charged + summary.other_usage.consumed_micros == summary.total.consumed_micros
                )
                assert summary.total.consumed_micros == features * (features + 1) // 2
    finally:
        server.stop()


def test_the_longest_usage_list_fits_well_within_a_grpc_message() -> None:
    """The worst case of the listed pairs: 64-character feature and model codes (the most
    validation admits) and amounts that take an int64's ten bytes each."""
    most = 2**63 - 1
    widest = report_pb.FeatureUsage(
        feature="f" * 64, model="m" * 64, charges=most, consumed_micros=most, refunded_micros=most
    )
    summary = report_pb.GetSummaryResponse(
        usage=[widest] * USAGE_ROWS, other_usage=widest, other_usage_pairs=most
    )
    assert summary.ByteSize() < 4 * 2**20 // 16, summary.ByteSize()  # a 16th of gRPC's 4 MiB


def test_held_credits_of_an_expired_lot_expire_when_their_hold_settles_not_before(
    ledger: Ledger,
    reports: report_service_pb2_grpc.ReportServiceStub,
    configure: object,
    clock: OffsetClock,
) -> None:
    """A lot expiring with credits held keeps them until the hold settles; a report of the
    day the lot expired counts them as remaining. The reports dated their later expiry back
    to the lot's expiry, so that closed day changed after the fact (helper-51): expired 90
    and remaining 10 on a day that ended with 30 held. They now count on the settle's day,
    committed or timed out."""
    configure("ledger.timezone", "UTC")  # type: ignore[operator]
    day = _month_start(clock.now(), 1)  # a month no other test has reached yet
    committed, timed_out = new_account("held-expiry-commit"), new_account("held-expiry-ttl")
    _advance_to(clock, day + timedelta(hours=8))
    for account in (committed, timed_out):  # 100 promotional credits expiring at noon
        ledger.grant(
            account,
            100,
            source=SOURCE.CREDIT_SOURCE_PROMOTION,
            expires_in=Duration(seconds=4 * 3600),
        )
    _advance_to(clock, day + timedelta(hours=11))
    hold = ledger.reserve(committed, 30 * CREDIT, ttl=Duration(seconds=2 * 86400))
    ledger.reserve(timed_out, 50 * CREDIT, ttl=Duration(seconds=86400))  # until day 2, 11:00
    _advance_to(clock, day + timedelta(hours=20))
    ledger.balance(committed)  # journals the 70 that expired unheld at noon
    # The other account's 50 that expired unheld are due, not journaled: counted all the same.

    def days(account: str, count: int) -> list[Amounts]:
        return [
            Amounts.of(
                _summary(reports, account, day=(day + timedelta(days=n)).strftime("%Y-%m-%d")).total
            )
            for n in range(count)
        ]

    assert days(committed, 1) == [Amounts(allocated=100, expired=70, remaining=30)]
    assert days(timed_out, 1) == [Amounts(allocated=100, expired=50, remaining=50)]

    # Day 2, 10:00: 10 of the 30 charged, 20 expire. Day 3, 09:00: the other account's
    # next call journals its 50 that expired unheld at noon on day 1, then releases its hold
    # (timed out at day 2, 11:00), the 50 it frees expiring then.
    _advance_to(clock, day + timedelta(days=1, hours=10))
    ledger.commit(committed, hold.reservation.reservation_id, 10 * CREDIT)
    _advance_to(clock, day + timedelta(days=2, hours=9))
    assert ledger.balance(timed_out).balance_micros == 0

    assert days(committed, 2) == [
        Amounts(allocated=100, expired=70, remaining=30),
        Amounts(opening=30, consumed=10, expired=20),
    ]
    assert days(timed_out, 3) == [
        Amounts(allocated=100, expired=50, remaining=50),
        Amounts(opening=50, remaining=50),
        Amounts(opening=50, expired=50),
    ]


def test_a_range_starting_within_a_microsecond_leaves_out_what_came_before_it(
    ledger: Ledger, reports: report_service_pb2_grpc.ReportServiceStub
) -> None:
    """The ledger's times are whole microseconds; a range's nanoseconds were cut off, so a
    range starting 500 ns after a grant counted the grant in it (helper-51)."""
    account = new_account("report-nanos")
    granted = ledger.grant(account, 7).lot.created_at
    request = report_pb.GetSummaryRequest(account_id=account)
    request.range.start_time.seconds = granted.seconds
    request.range.start_time.nanos = granted.nanos + 500
    request.range.end_time.seconds = granted.seconds + 3600
    assert Amounts.of(reports.GetSummary(request).total) == Amounts(opening=7, remaining=7)
    request.range.start_time.nanos = granted.nanos  # the grant's own instant: in the range
    assert Amounts.of(reports.GetSummary(request).total) == Amounts(allocated=7, remaining=7)
    # Within one microsecond a range is empty, not reversed (as rounded, its ends meet).
    request.range.start_time.nanos = granted.nanos + 100
    request.range.end_time.seconds, request.range.end_time.nanos = (
        granted.seconds,
        granted.nanos + 900,
    )
    assert Amounts.of(reports.GetSummary(request).total) == Amounts(opening=7, remaining=7)
