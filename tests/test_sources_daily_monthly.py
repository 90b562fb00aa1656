"""The daily reward (seed 000) and the monthly free allowance (seed 004).

The clock is shared by the whole session and only moves forward, so every target time is
computed from ``clock.now()`` or from times the server returned."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from ledger.v1 import ledger_service_pb2 as pb
from ledger.v1 import ledger_service_pb2_grpc, types_pb2
from support.ledger import CREDIT, Ledger, expect_error, new_account, new_key
from support.sources import DAY, Sources, dt, next_day_start, next_month_start

AuditCheck = Callable[[], None]
MINUTE = timedelta(minutes=1)


@pytest.fixture
def sources(stub: Any, admin: Any, billing: Any) -> Sources:
    return Sources(stub, admin, billing)


def _advance_to(clock: Any, target: datetime) -> None:
    """Moves the shared clock to just after ``target`` (never backwards)."""
    delta = target - clock.now() + MINUTE
    if delta > timedelta():
        clock.advance(delta)


# --- daily reward -----------------------------------------------------------------------------


def test_seed_000_daily_reward_is_10_credits_once_per_day(
    sources: Sources, ledger: Ledger, clock: Any, assert_audit_clean: AuditCheck
) -> None:
    account = sources.create_account().account.account_id
    key = new_key("day")
    claimed = sources.claim_daily(account, key=key)

    lot = claimed.lot
    assert lot.source == types_pb2.CREDIT_SOURCE_DAILY
    assert lot.balance_kind == types_pb2.BALANCE_KIND_MAIN
    assert lot.amount_micros == lot.remaining_micros == 10 * CREDIT
    assert lot.priority == 0
    assert not lot.HasField("expires_at")
    assert claimed.balance.available_micros == 10 * CREDIT
    next_claim = dt(claimed.next_claim_time)
    assert next_claim == next_day_start(dt(lot.created_at))

    # The same key replays the claim.
    replay = sources.claim_daily(account, key=key)
    assert replay.lot.lot_id == lot.lot_id
    assert dt(replay.next_claim_time) == next_claim

    # Another claim the same day says so and grants nothing.
    info = expect_error(
        lambda: sources.claim_daily(account),
        grpc.StatusCode.FAILED_PRECONDITION,
        "DAILY_REWARD_ALREADY_CLAIMED",
    )
    assert datetime.fromisoformat(info.metadata["next_claim_time"]) == next_claim
    assert ledger.balance(account).balance_micros == 10 * CREDIT
    assert len(ledger.lots(account, include_inactive=True)) == 1

    # The next day the claim opens again; the balance accumulates.
    _advance_to(clock, next_claim)
    second = sources.claim_daily(account)
    assert second.lot.lot_id != lot.lot_id
    assert second.lot.amount_micros == 10 * CREDIT
    assert second.balance.balance_micros == 20 * CREDIT
    assert dt(second.next_claim_time) == next_day_start(dt(second.lot.created_at))
    assert dt(second.next_claim_time) > next_claim
    expect_error(
        lambda: sources.claim_daily(account),
        grpc.StatusCode.FAILED_PRECONDITION,
        "DAILY_REWARD_ALREADY_CLAIMED",
    )
    grants = ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_GRANT])
    assert [t.amount_micros for t in grants] == [10 * CREDIT, 10 * CREDIT]
    assert_audit_clean()


def test_daily_amount_is_configurable(
    sources: Sources, configure: Any, assert_audit_clean: AuditCheck
) -> None:
    configure("daily.amount_micros", 3 * CREDIT)
    claimed = sources.claim_daily(sources.create_account().account.account_id)
    assert claimed.lot.amount_micros == 3 * CREDIT
    assert claimed.balance.balance_micros == 3 * CREDIT
    assert_audit_clean()


def test_daily_reward_switched_off_is_refused(
    sources: Sources, ledger: Ledger, configure: Any, assert_audit_clean: AuditCheck
) -> None:
    account = sources.create_account().account.account_id
    configure("daily.enabled", False)
    info = expect_error(
        lambda: sources.claim_daily(account),
        grpc.StatusCode.FAILED_PRECONDITION,
        "SOURCE_DISABLED",
    )
    assert info.metadata["setting"] == "daily.enabled"
    assert ledger.lots(account, include_inactive=True) == []

    configure("daily.enabled", True)  # takes effect on the next call
    assert sources.claim_daily(account).lot.amount_micros == 10 * CREDIT
    assert_audit_clean()


def test_a_paused_daily_reward_names_the_amount_as_what_refuses_it(
    sources: Sources, ledger: Ledger, configure: Any, assert_audit_clean: AuditCheck
) -> None:
    """An amount of 0 pauses the reward while daily.enabled stays true: the refusal names
    daily.amount_micros (it named daily.enabled, which the operator found true)."""
    account = sources.create_account().account.account_id
    configure("daily.amount_micros", 0)
    info = expect_error(
        lambda: sources.claim_daily(account),
        grpc.StatusCode.FAILED_PRECONDITION,
        "SOURCE_DISABLED",
    )
    assert info.metadata["setting"] == "daily.amount_micros"
    assert ledger.lots(account, include_inactive=True) == []
    configure("daily.enabled", False)  # both: the switch is named first
    info = expect_error(
        lambda: sources.claim_daily(account),
        grpc.StatusCode.FAILED_PRECONDITION,
        "SOURCE_DISABLED",
    )
    assert info.metadata["setting"] == "daily.enabled"
    assert_audit_clean()


@pytest.mark.parametrize(
    ("before", "after"),
    [
        # 20:00Z is the next day at UTC+14: its date had no claim.
        ("UTC", "Pacific/Kiritimati"),
        # 20:00Z, the next day in Kiritimati, is the day before at UTC-11: no claim either.
        ("Pacific/Kiritimati", "Pacific/Pago_Pago"),
    ],
)
def test_a_change_of_time_zone_opens_no_second_claim_in_a_local_day(
    sources: Sources,
    ledger: Ledger,
    configure: Any,
    clock: Any,
    assert_audit_clean: AuditCheck,
    before: str,
    after: str,
) -> None:
    """An account claims, ledger.timezone changes, and the same instant falls on another date
    of the new zone: the account had claimed in that local day already (a claim at 20:00Z
    under UTC, the zone set to Pacific/Kiritimati, and it claimed again at 20:02Z)."""
    now = clock.now()
    target = now.replace(hour=20, minute=0, second=0, microsecond=0)
    if target <= now:
        target += DAY
    _advance_to(clock, target)
    configure("ledger.timezone", before)
    account = sources.create_account().account.account_id
    first = sources.claim_daily(account)
    claimed_at = dt(first.lot.created_at)
    configure("ledger.timezone", after)
    assert (
        claimed_at.astimezone(ZoneInfo(after)).date()
        != claimed_at.astimezone(ZoneInfo(before)).date()
    )  # a date of the new zone the account has no claim of
    info = expect_error(
        lambda: sources.claim_daily(account),
        grpc.StatusCode.FAILED_PRECONDITION,
        "DAILY_REWARD_ALREADY_CLAIMED",
    )
    next_claim = next_day_start(clock.now(), after)
    assert datetime.fromisoformat(info.metadata["next_claim_time"]) == next_claim
    assert ledger.balance(account).balance_micros == 10 * CREDIT

    if after == "Pacific/Kiritimati":
        # The next day of the new zone: claimed once more. (Westward, that next date is the
        # date the account claimed under the old zone, whose row still refuses it.)
        _advance_to(clock, next_claim)
        assert sources.claim_daily(account).balance.balance_micros == 20 * CREDIT
    assert_audit_clean()


def test_the_day_follows_the_configured_time_zone(
    sources: Sources, ledger: Ledger, configure: Any, clock: Any, assert_audit_clean: AuditCheck
) -> None:
    configure("ledger.timezone", "Asia/Shanghai")
    account = sources.create_account().account.account_id
    claimed = sources.claim_daily(account)
    next_claim = dt(claimed.next_claim_time)
    assert next_claim == next_day_start(dt(claimed.lot.created_at), "Asia/Shanghai")
    assert (next_claim.hour, next_claim.minute) == (16, 0)  # midnight in UTC+8

    expect_error(
        lambda: sources.claim_daily(account),
        grpc.StatusCode.FAILED_PRECONDITION,
        "DAILY_REWARD_ALREADY_CLAIMED",
    )
    _advance_to(clock, next_claim)
    assert sources.claim_daily(account).balance.balance_micros == 20 * CREDIT
    assert len(ledger.lots(account)) == 2
    assert_audit_clean()


def test_seed_000_consumption_order_daily_then_nearest_expiry_then_permanent(
    sources: Sources, ledger: Ledger, configure: Any, assert_audit_clean: AuditCheck
) -> None:
    configure.reset("signup.enabled")
    account = new_account()
    signup = sources.create_account(account).signup_lot  # 100, expires in 30 days
    permanent = ledger.grant(account, 40, source=types_pb2.CREDIT_SOURCE_PURCHASE).lot
    soon = ledger.grant(
        account,
        20,
        source=types_pb2.CREDIT_SOURCE_PROMOTION,
        expires_in=Duration(seconds=int((2 * DAY).total_seconds())),
    ).lot
    daily = sources.claim_daily(account).lot  # claimed last, consumed first
    assert ledger.balance(account).available_micros == 170 * CREDIT
    assert [lot.lot_id for lot in ledger.lots(account)] == [
        daily.lot_id,
        soon.lot_id,
        signup.lot_id,
        permanent.lot_id,
    ]

    first = ledger.consume(account, 25 * CREDIT).reservation.lots
    assert [(p.lot_id, p.committed_micros) for p in first] == [
        (daily.lot_id, 10 * CREDIT),
        (soon.lot_id, 15 * CREDIT),
    ]
    second = ledger.consume(account, 110 * CREDIT).reservation.lots
    assert [(p.lot_id, p.committed_micros) for p in second] == [
        (soon.lot_id, 5 * CREDIT),
        (signup.lot_id, 100 * CREDIT),
        (permanent.lot_id, 5 * CREDIT),
    ]
    assert {lot.lot_id: lot.remaining_micros for lot in ledger.lots(account)} == {
        permanent.lot_id: 35 * CREDIT
    }
    assert_audit_clean()


# --- monthly free allowance (seed 004) --------------------------------------------------------


def _monthly_lots(ledger: Ledger, account: str) -> list[types_pb2.Lot]:
    lots = ledger.lots(account, include_inactive=True)
    return sorted(
        (lot for lot in lots if lot.source == types_pb2.CREDIT_SOURCE_MONTHLY_FREE),
        key=lambda lot: dt(lot.created_at),
    )


def test_seed_004_monthly_allowance_expires_at_month_end_and_renews(
    sources: Sources,
    ledger: Ledger,
    configure: Any,
    clock: Any,
    assert_audit_clean: AuditCheck,
) -> None:
    configure("monthly_free.enabled", True)
    configure("purchase.allow_free_users", True)
    account = new_account()
    sources.create_account(account)

    (first,) = _monthly_lots(ledger, account)
    assert first.amount_micros == first.remaining_micros == 1_500 * CREDIT
    month_end = next_month_start(dt(first.created_at))
    assert dt(first.expires_at) == month_end
    assert ledger.balance(account).available_micros == 1_500 * CREDIT

    # Seed 004: a pack of 2,500 purchased credits, which never expire.
    pack = sources.create_pack(2_500 * CREDIT, price_minor=2500, currency="USD")
    purchased = sources.purchase(account, pack.pack_id).lot
    assert not purchased.HasField("expires_at")
    assert ledger.balance(account).available_micros == 4_000 * CREDIT

    # Spending takes the expiring allowance before the permanent pack.
    spent = ledger.consume(account, 1_000 * CREDIT).reservation.lots
    assert [(p.lot_id, p.committed_micros) for p in spent] == [(first.lot_id, 1_000 * CREDIT)]

    # Into the next month: the 500 left expire, a fresh 1,500 arrives, nothing carried over.
    _advance_to(clock, month_end)
    for _ in range(3):
        balance = ledger.balance(account)
        assert balance.balance_micros == balance.available_micros == 4_000 * CREDIT

    old, new = _monthly_lots(ledger, account)
    assert old.lot_id == first.lot_id
    assert (old.remaining_micros, old.expired_micros) == (0, 500 * CREDIT)
    assert new.amount_micros == new.remaining_micros == 1_500 * CREDIT
    assert dt(new.created_at) >= month_end
    assert dt(new.expires_at) == next_month_start(month_end + MINUTE)

    lots = {lot.lot_id: lot for lot in ledger.lots(account, include_inactive=True)}
    assert lots[purchased.lot_id].remaining_micros == 2_500 * CREDIT
    assert lots[purchased.lot_id].expired_micros == 0
    expiries = ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_EXPIRY])
    assert [t.amount_micros for t in expiries] == [-500 * CREDIT]
    assert {p.lot_id for t in expiries for p in t.postings if p.lot_id} == {first.lot_id}
    assert_audit_clean()


def test_the_monthly_allowance_is_never_granted_twice_for_a_month(
    sources: Sources,
    ledger: Ledger,
    server_address: str,
    configure: Any,
    clock: Any,
    assert_audit_clean: AuditCheck,
) -> None:
    configure("monthly_free.enabled", True)
    account = new_account()
    sources.create_account(account)
    (first,) = _monthly_lots(ledger, account)
    ledger.consume(account, 200 * CREDIT)

    _advance_to(clock, dt(first.expires_at))

    # Many first calls of the month at once: one allowance.
    def read_balance(_: int) -> int:
        with grpc.insecure_channel(server_address) as channel:
            stub = ledger_service_pb2_grpc.LedgerServiceStub(channel)
            return stub.Balance(pb.BalanceRequest(account_id=account)).balance_micros

    with ThreadPoolExecutor(max_workers=10) as pool:
        seen = list(pool.map(read_balance, range(10)))
    assert seen == [1_500 * CREDIT] * 10
    ledger.lots(account)
    ledger.transactions(account)
    assert ledger.balance(account).balance_micros == 1_500 * CREDIT

    lots = _monthly_lots(ledger, account)
    assert len(lots) == 2
    assert lots[0].expired_micros == 1_300 * CREDIT
    grants = ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_GRANT])
    assert [t.amount_micros for t in grants] == [1_500 * CREDIT, 1_500 * CREDIT]
    assert_audit_clean()


def test_monthly_allowance_amount_is_configurable_and_off_by_default(
    sources: Sources, ledger: Ledger, configure: Any, assert_audit_clean: AuditCheck
) -> None:
    plain = sources.create_account()
    assert _monthly_lots(ledger, plain.account.account_id) == []

    configure("monthly_free.enabled", True)
    configure("monthly_free.amount_micros", 700 * CREDIT)
    account = sources.create_account().account.account_id
    (lot,) = _monthly_lots(ledger, account)
    assert lot.amount_micros == 700 * CREDIT
    assert ledger.balance(account).balance_micros == 700 * CREDIT
    assert_audit_clean()


def test_a_spend_as_the_first_call_of_the_month_can_use_the_new_allowance(
    sources: Sources, ledger: Ledger, configure: Any, clock: Any, assert_audit_clean: AuditCheck
) -> None:
    configure("monthly_free.enabled", True)
    account = new_account()
    granted = ledger.grant(account, 1, source=types_pb2.CREDIT_SOURCE_PURCHASE)  # opens it
    assert granted.balance.balance_micros == 1_501 * CREDIT
    (first,) = _monthly_lots(ledger, account)
    ledger.consume(account, 1_500 * CREDIT)

    _advance_to(clock, dt(first.expires_at))
    spent = ledger.consume(account, 1_501 * CREDIT)
    assert spent.balance.balance_micros == 0
    assert len(_monthly_lots(ledger, account)) == 2
    assert_audit_clean()


def test_the_month_follows_the_configured_time_zone(
    sources: Sources, ledger: Ledger, configure: Any, assert_audit_clean: AuditCheck
) -> None:
    configure("monthly_free.enabled", True)
    configure("ledger.timezone", "Asia/Shanghai")
    account = sources.create_account().account.account_id
    (lot,) = _monthly_lots(ledger, account)
    expected = next_month_start(dt(lot.created_at), "Asia/Shanghai")
    assert dt(lot.expires_at) == expected
    assert expected.hour == 16  # midnight in UTC+8
    assert_audit_clean()


def test_a_skipped_month_grants_only_the_current_month(
    sources: Sources, ledger: Ledger, configure: Any, clock: Any, assert_audit_clean: AuditCheck
) -> None:
    configure("monthly_free.enabled", True)
    account = new_account()
    sources.create_account(account)
    (first,) = _monthly_lots(ledger, account)

    # No call at all during the following month; the next call comes a month later.
    skipped = dt(first.expires_at)
    _advance_to(clock, next_month_start(skipped + MINUTE))
    assert ledger.balance(account).balance_micros == 1_500 * CREDIT
    old, new = _monthly_lots(ledger, account)
    assert old.expired_micros == 1_500 * CREDIT
    assert dt(new.expires_at) == next_month_start(dt(new.created_at))
    assert dt(new.expires_at) > next_month_start(skipped + MINUTE)
    assert_audit_clean()


def test_a_claim_retried_with_its_key_the_next_day_is_still_a_replay(
    sources: Sources, ledger: Ledger, clock: Any, assert_audit_clean: AuditCheck
) -> None:
    account = sources.create_account().account.account_id
    key = new_key("day")
    claimed = sources.claim_daily(account, key=key)
    _advance_to(clock, dt(claimed.next_claim_time))
    replay = sources.claim_daily(account, key=key)
    assert replay.lot.lot_id == claimed.lot.lot_id
    assert ledger.balance(account).balance_micros == 10 * CREDIT
    assert sources.claim_daily(account).balance.balance_micros == 20 * CREDIT
    assert_audit_clean()
