"""Subscription periods (seed 000 and seed 001): a grant per paid period expiring at the
period's end, no rollover on renewal, carry-over of unused credits on upgrade."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import grpc
import psycopg
import pytest

from ledger.v1 import admin_service_pb2 as admin_pb
from ledger.v1 import billing_service_pb2 as billing_pb
from ledger.v1 import ledger_service_pb2 as pb
from ledger.v1 import types_pb2
from ledger_server.db.migrate import migrate
from support.ledger import CREDIT, Ledger, expect_error, new_account, new_key
from support.sources import DAY, Sources, dt, new_id, ts, whole_seconds

AuditCheck = Callable[[], None]
MINUTE = timedelta(minutes=1)
PERIOD = 30 * DAY


@pytest.fixture
def sources(stub: Any, admin: Any, billing: Any) -> Sources:
    return Sources(stub, admin, billing)


def _period_from_now(clock: Any) -> tuple[datetime, datetime]:
    start = whole_seconds(clock.now()) - MINUTE
    return start, start + PERIOD


def _live_by_source(ledger: Ledger, account: str) -> dict[int, int]:
    out: dict[int, int] = {}
    for lot in ledger.lots(account):
        out[lot.source] = out.get(lot.source, 0) + lot.remaining_micros
    return out


# --- catalogue ----------------------------------------------------------------------------------


def test_plans_are_managed_by_admins_and_listed_when_active(sources: Sources) -> None:
    plan = sources.create_plan(100 * CREDIT, rank=1)
    retired = sources.create_plan(50 * CREDIT, rank=1, active=False)
    assert (plan.credits_micros, plan.rank, plan.period_count) == (100 * CREDIT, 1, 1)
    assert plan.period_unit == billing_pb.BILLING_PERIOD_UNIT_MONTH
    listed = {
        p.plan_id: p
        for p in sources.billing.ListSubscriptionPlans(
            billing_pb.ListSubscriptionPlansRequest()
        ).plans
    }
    assert listed[plan.plan_id].credits_micros == 100 * CREDIT
    assert retired.plan_id not in listed
    expect_error(
        lambda: sources.create_plan(1 * CREDIT, rank=1, plan_id=plan.plan_id),
        grpc.StatusCode.ALREADY_EXISTS,
        "ALREADY_EXISTS",
    )


def _update_plan(sources: Sources, plan: billing_pb.SubscriptionPlan, **changes: Any) -> Any:
    changed = billing_pb.SubscriptionPlan()
    changed.CopyFrom(plan)
    for field, value in changes.items():
        setattr(changed, field, value)
    return sources.admin.UpdateSubscriptionPlan(
        admin_pb.UpdateSubscriptionPlanRequest(plan=changed, idempotency_key=new_key())
    ).plan


def test_no_two_active_plans_share_a_provider_price(sources: Sources) -> None:
    """A paid invoice names only its price: with two active plans on it, a renewal could
    grant the other plan's credits and move the subscription to it (helper-99)."""
    price = f"price_{new_id('shared')}"
    pro = sources.create_plan(1000 * CREDIT, rank=2, provider_price_id=price)

    def refused(call: Callable[[], Any]) -> None:
        info = expect_error(call, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD")
        assert info.metadata["field"] == "plan.provider_price_id"

    refused(lambda: sources.create_plan(100 * CREDIT, rank=1, provider_price_id=price))
    basic = sources.create_plan(100 * CREDIT, rank=1)
    refused(lambda: _update_plan(sources, basic, provider_price_id=price))
    # An inactive plan may keep it (a retired plan's subscribers still renew on it), and is
    # not reactivated while another active plan has it.
    retired = sources.create_plan(100 * CREDIT, rank=1, provider_price_id=price, active=False)
    refused(lambda: _update_plan(sources, retired, active=True))
    assert _update_plan(sources, pro, active=False).active is False
    assert _update_plan(sources, retired, active=True).provider_price_id == price
    refused(lambda: _update_plan(sources, pro, active=True))


def test_a_plan_keeps_its_provider_price_while_its_subscribers_may_renew_on_it(
    sources: Sources, clock: Any
) -> None:
    """Their renewals name the old price, which no plan would have: invoice.paid failed
    for ever and the credits paid for were withheld (helper-99). Other fields change."""
    now = whole_seconds(clock.now())
    plan = sources.create_plan(100 * CREDIT, rank=1)
    account = sources.create_account().account.account_id
    # Its period ended two days ago: its renewal is still being paid (renewal grace).
    sources.start_period(account, plan.plan_id, now - PERIOD, now - 2 * DAY)
    info = expect_error(
        lambda: _update_plan(sources, plan, provider_price_id=f"price_{new_id('v2')}"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PLAN_IN_USE",
    )
    assert info.metadata["plan_id"] == plan.plan_id
    changed = _update_plan(sources, plan, credits_micros=120 * CREDIT, active=False)
    assert (changed.credits_micros, changed.active) == (120 * CREDIT, False)
    assert changed.provider_price_id == plan.provider_price_id

    # A plan whose subscribers are gone (past the grace), or that never had any, may.
    lapsed = sources.create_plan(100 * CREDIT, rank=1)
    gone = sources.create_account().account.account_id
    sources.start_period(gone, lapsed.plan_id, now - PERIOD - 30 * DAY, now - 30 * DAY)
    price = f"price_{new_id('v2')}"
    assert _update_plan(sources, lapsed, provider_price_id=price).provider_price_id == price


# --- periods ------------------------------------------------------------------------------------


def test_a_paid_period_grants_the_plan_credits_expiring_at_the_period_end(
    sources: Sources, ledger: Ledger, clock: Any, assert_audit_clean: AuditCheck
) -> None:
    plan = sources.create_plan(100 * CREDIT, rank=1)
    account = sources.create_account().account.account_id
    start, end = _period_from_now(clock)
    key = new_key("period")
    started = sources.start_period(
        account, plan.plan_id, start, end, key=key, external_ref="in_1", subscription_ref="sub_1"
    )

    lot = started.lot
    assert lot.source == types_pb2.CREDIT_SOURCE_SUBSCRIPTION
    assert lot.amount_micros == lot.remaining_micros == 100 * CREDIT
    assert dt(lot.expires_at) == end
    assert lot.external_ref == "in_1"
    sub = started.subscription
    assert sub.plan_id == plan.plan_id
    assert (dt(sub.current_period_start), dt(sub.current_period_end)) == (start, end)
    assert sub.external_ref == "sub_1"
    assert started.balance.balance_micros == 100 * CREDIT
    assert sources.get_account(account).subscription == sub

    # The same invoice is granted once, whatever the key.
    replay = sources.start_period(
        account, plan.plan_id, start, end, key=key, external_ref="in_1", subscription_ref="sub_1"
    )
    assert replay.lot.lot_id == lot.lot_id
    expect_error(
        lambda: sources.start_period(
            account, plan.plan_id, start, end, external_ref="in_1", subscription_ref="sub_1"
        ),
        grpc.StatusCode.ALREADY_EXISTS,
        "ALREADY_FULFILLED",
    )
    assert ledger.balance(account).balance_micros == 100 * CREDIT

    # At the period end the credits expire.
    clock.advance(end - clock.now() - MINUTE)
    assert ledger.balance(account).balance_micros == 100 * CREDIT
    clock.advance(2 * MINUTE)
    assert ledger.balance(account).balance_micros == 0
    # The subscription stays while its renewal may still be paid, then ends.
    assert sources.get_account(account).subscription.plan_id == plan.plan_id
    clock.advance(timedelta(days=14))
    assert not sources.get_account(account).HasField("subscription")
    assert_audit_clean()


def test_renewal_grants_a_fresh_period_with_no_rollover(
    sources: Sources, ledger: Ledger, clock: Any, assert_audit_clean: AuditCheck
) -> None:
    plan = sources.create_plan(100 * CREDIT, rank=1)
    account = sources.create_account().account.account_id
    start, end = _period_from_now(clock)
    first = sources.start_period(account, plan.plan_id, start, end, external_ref=new_id("in"))
    ledger.consume(account, 30 * CREDIT)

    # The renewal invoice is paid just before the first period ends.
    clock.advance(end - clock.now() - 5 * MINUTE)
    renewed = sources.start_period(
        account, plan.plan_id, end, end + PERIOD, external_ref=new_id("in")
    )
    assert renewed.lot.lot_id != first.lot.lot_id
    assert renewed.lot.amount_micros == 100 * CREDIT
    assert dt(renewed.lot.expires_at) == end + PERIOD
    assert dt(renewed.subscription.current_period_start) == end
    assert dt(renewed.subscription.current_period_end) == end + PERIOD
    assert renewed.balance.balance_micros == 170 * CREDIT  # the old period has not ended yet

    # Once the first period is over only the new period's credits remain: exactly 100.
    clock.advance(10 * MINUTE)
    balance = ledger.balance(account)
    assert balance.balance_micros == balance.available_micros == 100 * CREDIT
    lots = {lot.lot_id: lot for lot in ledger.lots(account, include_inactive=True)}
    assert lots[first.lot.lot_id].remaining_micros == 0
    assert lots[first.lot.lot_id].expired_micros == 70 * CREDIT
    assert lots[renewed.lot.lot_id].remaining_micros == 100 * CREDIT
    expiries = ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_EXPIRY])
    assert [t.amount_micros for t in expiries] == [-70 * CREDIT]
    assert dt(sources.get_account(account).subscription.current_period_end) == end + PERIOD
    assert_audit_clean()


def test_seed_001_upgrade_carries_unused_credits_into_the_new_period(
    sources: Sources, ledger: Ledger, clock: Any, assert_audit_clean: AuditCheck
) -> None:
    pro = sources.create_plan(100 * CREDIT, rank=1)
    pro_plus = sources.create_plan(300 * CREDIT, rank=2)
    account = sources.create_account().account.account_id
    start = whole_seconds(clock.now()) - 10 * DAY  # ten days into a monthly period
    end = start + PERIOD
    old = sources.start_period(account, pro.plan_id, start, end).lot
    ledger.consume(account, 30 * CREDIT)

    new_start = whole_seconds(clock.now())
    new_end = new_start + PERIOD
    changed = sources.change_plan(account, pro_plus.plan_id, new_start, new_end)

    assert changed.carried_over_micros == 70 * CREDIT
    carry = changed.carry_over_lot
    assert carry.source == types_pb2.CREDIT_SOURCE_SUBSCRIPTION_CARRY_OVER
    assert carry.amount_micros == carry.remaining_micros == 70 * CREDIT
    assert dt(carry.expires_at) == new_end
    lot = changed.lot
    assert lot.source == types_pb2.CREDIT_SOURCE_SUBSCRIPTION
    assert lot.amount_micros == lot.remaining_micros == 300 * CREDIT
    assert dt(lot.expires_at) == new_end
    assert changed.subscription.plan_id == pro_plus.plan_id
    assert dt(changed.subscription.current_period_end) == new_end
    assert changed.balance.balance_micros == 370 * CREDIT
    assert sources.get_account(account).subscription.plan_id == pro_plus.plan_id

    lots = {lot.lot_id: lot for lot in ledger.lots(account, include_inactive=True)}
    assert lots[old.lot_id].remaining_micros == 0
    assert lots[old.lot_id].expired_micros == 0
    (transfer,) = ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_TRANSFER])
    assert sum(p.amount_micros for p in transfer.postings) == 0
    moved = {p.lot_id: p.amount_micros for p in transfer.postings if p.lot_id}
    assert moved == {old.lot_id: -70 * CREDIT, carry.lot_id: 70 * CREDIT}

    # Past the old period's end nothing else expires: the carried credits live on.
    clock.advance(end - clock.now() + MINUTE)
    assert ledger.balance(account).balance_micros == 370 * CREDIT
    assert ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_EXPIRY]) == []
    # Until the new period ends.
    clock.advance(new_end - clock.now() + MINUTE)
    assert ledger.balance(account).balance_micros == 0
    assert_audit_clean()


def test_a_second_upgrade_carries_both_subscription_and_carried_credits(
    sources: Sources, ledger: Ledger, clock: Any, assert_audit_clean: AuditCheck
) -> None:
    pro = sources.create_plan(100 * CREDIT, rank=1)
    pro_plus = sources.create_plan(300 * CREDIT, rank=2)
    ultra = sources.create_plan(1000 * CREDIT, rank=3)
    account = sources.create_account().account.account_id
    start, end = _period_from_now(clock)
    sources.start_period(account, pro.plan_id, start, end)
    ledger.consume(account, 40 * CREDIT)
    first = sources.change_plan(account, pro_plus.plan_id, start, end)
    assert first.carried_over_micros == 60 * CREDIT
    ledger.consume(account, 100 * CREDIT)  # 360 -> 260 across the carry-over and the new lot

    second = sources.change_plan(account, ultra.plan_id, start, end)
    assert second.carried_over_micros == 260 * CREDIT
    assert second.carry_over_lot.amount_micros == 260 * CREDIT
    assert second.lot.amount_micros == 1000 * CREDIT
    assert second.balance.balance_micros == 1260 * CREDIT
    assert _live_by_source(ledger, account) == {
        types_pb2.CREDIT_SOURCE_SUBSCRIPTION_CARRY_OVER: 260 * CREDIT,
        types_pb2.CREDIT_SOURCE_SUBSCRIPTION: 1000 * CREDIT,
    }
    assert len(ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_TRANSFER])) == 2
    assert_audit_clean()


def test_upgrade_carries_only_credits_not_held(
    sources: Sources, ledger: Ledger, clock: Any, assert_audit_clean: AuditCheck
) -> None:
    pro = sources.create_plan(100 * CREDIT, rank=1)
    pro_plus = sources.create_plan(300 * CREDIT, rank=2)
    account = sources.create_account().account.account_id
    start, end = _period_from_now(clock)
    old = sources.start_period(account, pro.plan_id, start, end).lot
    ledger.consume(account, 30 * CREDIT)
    held = ledger.reserve(account, 20 * CREDIT).reservation

    changed = sources.change_plan(account, pro_plus.plan_id, start, end)
    assert changed.carried_over_micros == 50 * CREDIT
    assert changed.carry_over_lot.amount_micros == 50 * CREDIT
    lots = {lot.lot_id: lot for lot in ledger.lots(account, include_inactive=True)}
    assert (lots[old.lot_id].remaining_micros, lots[old.lot_id].held_micros) == (
        20 * CREDIT,
        20 * CREDIT,
    )
    balance = ledger.balance(account)
    assert (balance.balance_micros, balance.available_micros) == (370 * CREDIT, 350 * CREDIT)

    ledger.commit(account, held.reservation_id, 20 * CREDIT)
    balance = ledger.balance(account)
    assert balance.balance_micros == balance.available_micros == 350 * CREDIT
    assert {lot.lot_id: lot for lot in ledger.lots(account, include_inactive=True)}[
        old.lot_id
    ].remaining_micros == 0
    assert_audit_clean()


def _pro_subscriber_who_spent_30(
    sources: Sources, ledger: Ledger, clock: Any, rank: int
) -> tuple[str, Any, tuple[datetime, datetime]]:
    """A subscriber to a 100-credit plan of rank 1 for the current period, 30 credits
    spent, and a 40-credit plan of ``rank`` to move to."""
    pro = sources.create_plan(100 * CREDIT, rank=1)
    other = sources.create_plan(40 * CREDIT, rank=rank)
    account = sources.create_account().account.account_id
    period = _period_from_now(clock)
    sources.start_period(account, pro.plan_id, *period)
    ledger.consume(account, 30 * CREDIT)
    return account, other, period


@pytest.mark.parametrize("rank", [1, 0])
def test_a_move_to_an_equal_or_lower_rank_carries_nothing(
    sources: Sources, ledger: Ledger, clock: Any, rank: int, assert_audit_clean: AuditCheck
) -> None:
    account, other, _ = _pro_subscriber_who_spent_30(sources, ledger, clock, rank)

    new_start = whole_seconds(clock.now())
    changed = sources.change_plan(account, other.plan_id, new_start, new_start + PERIOD)
    assert changed.carried_over_micros == 0
    assert not changed.HasField("carry_over_lot")
    assert changed.lot.source == types_pb2.CREDIT_SOURCE_SUBSCRIPTION
    assert changed.lot.amount_micros == 40 * CREDIT
    assert dt(changed.lot.expires_at) == new_start + PERIOD
    assert changed.subscription.plan_id == other.plan_id
    assert ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_TRANSFER]) == []
    assert types_pb2.CREDIT_SOURCE_SUBSCRIPTION_CARRY_OVER not in _live_by_source(ledger, account)
    assert_audit_clean()


@pytest.mark.parametrize("rank", [1, 0])
def test_a_move_to_an_equal_or_lower_rank_within_the_period_grants_nothing(
    sources: Sources, ledger: Ledger, clock: Any, rank: int, assert_audit_clean: AuditCheck
) -> None:
    """The period's credits were granted with the first plan, and nothing more was paid:
    the new plan is recorded, its credits come with the next period."""
    account, other, (start, end) = _pro_subscriber_who_spent_30(sources, ledger, clock, rank)

    changed = sources.change_plan(account, other.plan_id, start, end)
    assert not changed.HasField("lot") and not changed.HasField("carry_over_lot")
    assert changed.carried_over_micros == 0
    assert changed.subscription.plan_id == other.plan_id
    assert changed.balance.balance_micros == 70 * CREDIT
    assert ledger.balance(account).balance_micros == 70 * CREDIT
    assert len(ledger.lots(account)) == 1
    assert_audit_clean()


def test_a_move_back_up_within_the_period_grants_no_plan_twice(
    sources: Sources, ledger: Ledger, clock: Any, assert_audit_clean: AuditCheck
) -> None:
    """Pro paid for the period, down to basic, back up to pro (a new payment reference):
    pro's credits once. Basic, pro, basic, then a plan between them: still nothing more."""
    basic = sources.create_plan(100 * CREDIT, rank=1)
    middle = sources.create_plan(200 * CREDIT, rank=2)
    pro = sources.create_plan(300 * CREDIT, rank=3)
    account = sources.create_account().account.account_id
    start, end = _period_from_now(clock)
    sources.start_period(account, pro.plan_id, start, end, external_ref=f"in_{new_key()}")
    sources.change_plan(account, basic.plan_id, start, end, external_ref=f"in_{new_key()}")
    back = sources.change_plan(account, pro.plan_id, start, end, external_ref=f"in_{new_key()}")
    assert not back.HasField("lot") and back.subscription.plan_id == pro.plan_id
    between = sources.change_plan(account, middle.plan_id, start, end)
    assert not between.HasField("lot") and between.subscription.plan_id == middle.plan_id
    assert ledger.balance(account).balance_micros == 300 * CREDIT
    assert_audit_clean()


def test_recording_a_returned_plan_waits_for_the_account_lock_first(
    sources: Sources, ledger: Ledger, clock: Any, ledger_db_url: str
) -> None:
    """The worker records a return to an already-granted plan through
    ledger_record_subscription_plan. It takes the account row first, the one lock order every
    writer keeps (DESIGN.md section 4), so it waits behind a charge holding that account and
    never updates the subscription underneath it."""
    basic = sources.create_plan(100 * CREDIT, rank=1)
    pro = sources.create_plan(300 * CREDIT, rank=3)
    account = sources.create_account().account.account_id
    start, end = _period_from_now(clock)
    sources.start_period(account, pro.plan_id, start, end)
    record = "SELECT ledger_record_subscription_plan(%s, %s, %s, %s)"
    arguments = [account, basic.plan_id, start, clock.now()]
    plan_now = "SELECT plan_id FROM subscriptions WHERE account_id = %s"
    with psycopg.connect(ledger_db_url, autocommit=True) as worker:
        worker.execute("SET lock_timeout = '300ms'")
        with psycopg.connect(ledger_db_url) as charging:
            charging.execute("SELECT 1 FROM accounts WHERE account_id = %s FOR UPDATE", [account])
            with pytest.raises(psycopg.errors.LockNotAvailable):
                worker.execute(record, arguments)
        assert worker.execute(plan_now, [account]).fetchone() == (pro.plan_id,)
        worker.execute(record, arguments)  # the lock released: recorded
        assert worker.execute(plan_now, [account]).fetchone() == (basic.plan_id,)


def test_unknown_plans_and_empty_periods_are_refused(
    sources: Sources, ledger: Ledger, clock: Any, assert_audit_clean: AuditCheck
) -> None:
    plan = sources.create_plan(100 * CREDIT, rank=1)
    account = sources.create_account().account.account_id
    start, end = _period_from_now(clock)
    info = expect_error(
        lambda: sources.start_period(account, "no-such-plan", start, end),
        grpc.StatusCode.NOT_FOUND,
        "PLAN_NOT_FOUND",
    )
    assert info.metadata["plan_id"] == "no-such-plan"
    # Ending where or before it starts; lasting longer than ten years (from the year 1); or
    # ending more than ten years ahead: a period to 9999 made a subscriber for 8,000 years
    # (helper-153's review).
    year_one = datetime(1, 1, 1, tzinfo=start.tzinfo)
    for bad_start, bad_end in (
        (start, start),
        (start, start - MINUTE),
        (year_one, start),
        (start, datetime(9999, 12, 31, tzinfo=start.tzinfo)),
        (start + 3650 * DAY, start + 3660 * DAY),
    ):
        expect_error(
            lambda s=bad_start, e=bad_end: sources.start_period(account, plan.plan_id, s, e),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_FIELD",
            field="period_end",
        )
    sources.start_period(account, plan.plan_id, start, end)
    expect_error(
        lambda: sources.change_plan(account, "no-such-plan", start, end),
        grpc.StatusCode.NOT_FOUND,
        "PLAN_NOT_FOUND",
    )
    assert ledger.balance(account).balance_micros == 100 * CREDIT
    assert_audit_clean()


def test_an_updated_plan_grants_its_new_amount_from_the_next_period(
    sources: Sources, ledger: Ledger, clock: Any, assert_audit_clean: AuditCheck
) -> None:
    plan = sources.create_plan(100 * CREDIT, rank=1)
    changed = billing_pb.SubscriptionPlan()
    changed.CopyFrom(plan)
    changed.credits_micros = 120 * CREDIT
    updated = sources.admin.UpdateSubscriptionPlan(
        admin_pb.UpdateSubscriptionPlanRequest(plan=changed, idempotency_key=new_key())
    ).plan
    assert updated.credits_micros == 120 * CREDIT
    account = sources.create_account().account.account_id
    start, end = _period_from_now(clock)
    assert sources.start_period(account, plan.plan_id, start, end).lot.amount_micros == (
        120 * CREDIT
    )
    assert_audit_clean()


def test_a_plan_change_retried_with_its_key_carries_over_once(
    sources: Sources, ledger: Ledger, clock: Any, assert_audit_clean: AuditCheck
) -> None:
    pro = sources.create_plan(100 * CREDIT, rank=1)
    pro_plus = sources.create_plan(300 * CREDIT, rank=2)
    account = new_account()  # a billing call opens the account
    start, end = _period_from_now(clock)
    sources.start_period(account, pro.plan_id, start, end)
    key = new_key("change")
    first = sources.change_plan(
        account, pro_plus.plan_id, start, end, key=key, external_ref="in_up"
    )
    replay = sources.change_plan(
        account, pro_plus.plan_id, start, end, key=key, external_ref="in_up"
    )
    assert replay.lot.lot_id == first.lot.lot_id
    assert replay.carry_over_lot.lot_id == first.carry_over_lot.lot_id
    assert replay.carried_over_micros == 100 * CREDIT
    expect_error(
        lambda: sources.change_plan(account, pro_plus.plan_id, start, end, external_ref="in_up"),
        grpc.StatusCode.ALREADY_EXISTS,
        "ALREADY_FULFILLED",
    )
    assert ledger.balance(account).balance_micros == 400 * CREDIT
    assert len(ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_TRANSFER])) == 1
    assert_audit_clean()


def _subscribe_checkout(ledger_db_url: str, account: str, plan_id: str, now: datetime) -> Any:
    """What CreateCheckoutSession asks the ledger before it asks Stripe for a plan."""
    with psycopg.connect(ledger_db_url) as conn:
        row = conn.execute(
            "SELECT ledger_checkout_prepare(%s, %s, '\\x00'::bytea, 'subscription', '', 0, '',"
            " %s, %s)",
            (account, new_key("checkout"), plan_id, now),
        ).fetchone()
        assert row is not None
        return row[0]


def test_a_subscription_past_its_period_is_kept_while_its_renewal_is_paid(
    sources: Sources, ledger: Ledger, clock: Any, ledger_db_url: str
) -> None:
    """Stripe charges a renewal about an hour after the period ends and retries a failed
    payment for days: until subscription.renewal_grace_days have passed the account keeps
    its subscription (a second one would be charged beside it), unless it was deleted."""
    plan = sources.create_plan(10 * CREDIT, rank=1)
    other = sources.create_plan(20 * CREDIT, rank=2)
    renewing, cancelled = new_account(), new_account()
    start = whole_seconds(clock.now()) - timedelta(minutes=1)
    end = start + DAY
    renewing_ref = new_id("sub")
    sources.start_period(renewing, plan.plan_id, start, end, subscription_ref=renewing_ref)
    cancelled_ref = new_id("sub")
    sources.start_period(cancelled, plan.plan_id, start, end, subscription_ref=cancelled_ref)

    clock.advance(end - clock.now() + timedelta(hours=2))
    assert sources.get_account(renewing).subscription.plan_id == plan.plan_id
    with pytest.raises(psycopg.DatabaseError) as refused:
        _subscribe_checkout(ledger_db_url, renewing, other.plan_id, clock.now())
    assert refused.value.sqlstate == "LE044"

    # Deleted after its period (unpaid after the retries): it ends then, no grace.
    with psycopg.connect(ledger_db_url) as conn:
        row = conn.execute(
            "SELECT ledger_end_subscription(%s, %s, %s, %s)",
            (cancelled, cancelled_ref, clock.now(), clock.now()),
        ).fetchone()
    assert row == (True,)
    assert not sources.get_account(cancelled).HasField("subscription")
    assert _subscribe_checkout(ledger_db_url, cancelled, other.plan_id, clock.now())["kind"] == (
        "subscription"
    )
    # A new subscription of that account has not ended: it gets the grace again.
    again = whole_seconds(clock.now())
    sources.start_period(cancelled, other.plan_id, again, again + DAY, subscription_ref="sub_new")
    clock.advance(DAY + timedelta(hours=2))
    assert sources.get_account(cancelled).subscription.plan_id == other.plan_id

    # The renewal's paid invoice moves the period on; without one, the grace ends it.
    sources.start_period(renewing, plan.plan_id, end, end + DAY, subscription_ref=renewing_ref)
    assert sources.get_account(renewing).subscription.current_period_end == ts(end + DAY)
    clock.advance(timedelta(days=14))
    assert not sources.get_account(renewing).HasField("subscription")
    assert _subscribe_checkout(ledger_db_url, renewing, other.plan_id, clock.now())["kind"] == (
        "subscription"
    )


def test_a_period_paid_after_it_ended_grants_its_credits_for_its_length(
    sources: Sources, ledger: Ledger, clock: Any, assert_audit_clean: AuditCheck
) -> None:
    """An invoice paid late (on terms, after the provider's retries, or applied after a
    worker outage) is not refused for good: the period's credits last as long as the
    period did, from when it is applied."""
    plan = sources.create_plan(10 * CREDIT, rank=1)
    account = new_account()
    end = whole_seconds(clock.now()) - DAY
    start = end - DAY
    granted = sources.start_period(account, plan.plan_id, start, end)
    assert granted.lot.amount_micros == 10 * CREDIT
    assert dt(granted.lot.expires_at) - dt(granted.lot.created_at) == DAY
    assert ledger.balance(account).balance_micros == 10 * CREDIT
    clock.advance(DAY + timedelta(minutes=1))
    assert ledger.balance(account).balance_micros == 0
    # Paid after its renewal's grace ended too: granted, and the account has no subscription.
    late = whole_seconds(clock.now()) - timedelta(days=30)
    paid = sources.start_period(new_account(), plan.plan_id, late - DAY, late)
    assert not paid.HasField("subscription")
    assert paid.balance.balance_micros == 10 * CREDIT
    assert_audit_clean()


def test_a_plan_change_paid_after_its_period_ended_is_granted_not_refused(
    sources: Sources, ledger: Ledger, clock: Any, assert_audit_clean: AuditCheck
) -> None:
    """An upgrade's invoice (a new period) applied after that period ended grants it as any
    late period, carrying nothing over; a move within an ended period grants nothing. Both
    failed 'the period is over' for ever (helper-92)."""
    basic = sources.create_plan(100 * CREDIT, rank=1)
    pro = sources.create_plan(300 * CREDIT, rank=2)
    account = new_account()
    now = whole_seconds(clock.now())
    sources.start_period(account, basic.plan_id, now - 40 * DAY, now - 10 * DAY)
    assert ledger.balance(account).balance_micros == 100 * CREDIT  # paid late: from now

    changed = sources.change_plan(account, pro.plan_id, now - 35 * DAY, now - 5 * DAY)
    assert changed.carried_over_micros == 0
    assert not changed.HasField("carry_over_lot")
    assert changed.lot.amount_micros == 300 * CREDIT
    assert dt(changed.lot.expires_at) - dt(changed.lot.created_at) == 30 * DAY
    assert changed.balance.balance_micros == 400 * CREDIT

    back = sources.change_plan(account, basic.plan_id, now - 35 * DAY, now - 5 * DAY)
    assert not back.HasField("lot")
    assert back.balance.balance_micros == 400 * CREDIT
    assert_audit_clean()


def test_a_move_back_up_within_a_period_applied_after_it_ended_grants_no_plan_twice(
    sources: Sources, ledger: Ledger, clock: Any, assert_audit_clean: AuditCheck
) -> None:
    """The changes of one period applied after it ended (their events redelivered after an
    outage): premium, basic, then pro grants premium's credits only, as on time. The grants
    of a late period last its length from when they are applied, not to the period's end,
    and were not recognised as the period's: pro's credits were granted too (helper-151)."""
    basic = sources.create_plan(100 * CREDIT, rank=1)
    pro = sources.create_plan(300 * CREDIT, rank=2)
    premium = sources.create_plan(1000 * CREDIT, rank=3)
    account = new_account()
    now = whole_seconds(clock.now())
    start, end = now - 40 * DAY, now - 10 * DAY
    sources.start_period(account, basic.plan_id, start, end)
    up = sources.change_plan(account, premium.plan_id, start, end, external_ref=f"in_{new_key()}")
    assert up.lot.amount_micros == 1000 * CREDIT
    down = sources.change_plan(account, basic.plan_id, start, end, external_ref=f"in_{new_key()}")
    assert not down.HasField("lot")

    back = sources.change_plan(account, pro.plan_id, start, end, external_ref=f"in_{new_key()}")
    assert not back.HasField("lot"), "pro granted again within a period premium was granted"
    assert back.subscription.plan_id == pro.plan_id
    assert ledger.balance(account).balance_micros == 1100 * CREDIT
    assert_audit_clean()


def _change_plan(
    conn: psycopg.Connection[Any], account: str, plan: str, period: tuple[datetime, datetime]
) -> Any:
    """ledger_change_subscription_plan as the payment worker calls it; its answer."""
    row = conn.execute(
        "SELECT ledger_change_subscription_plan(%s, %s, '\\x02', %s, %s, %s, %s, %s, now())",
        (account, new_key(), plan, *period, f"in_{new_key()}", f"sub_{account}"),
    ).fetchone()
    assert row is not None
    return row[0]


def test_migration_0040_records_the_period_of_the_current_periods_payments(
    fresh_database_url: str,
) -> None:
    """Payments recorded before migration 0040 had no period: a period in progress at the
    deploy, its premium granted late, then basic and pro, granted pro's credits again
    (helper-155's review). The migration records the period of each account's current
    period's payments, on-time and late ones."""
    migrate(fresh_database_url)
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        for name, rank, credits in (("basic", 1, 100), ("pro", 2, 300), ("premium", 3, 1000)):
            conn.execute(
                "INSERT INTO subscription_plans (plan_id, translation_key, credits_micros,"
                " period_unit, period_count, rank, price_minor, currency, active, created_at,"
                " updated_at, updated_by)"
                " VALUES (%s, %s, %s, 'month', 1, %s, %s, 'USD', true, now(), now(), 'test')",
                (name, name, credits * CREDIT, rank, rank * 100),
            )
        row = conn.execute("SELECT date_trunc('second', now())").fetchone()
        assert row is not None
        now = row[0]
        periods = {
            "late": (now - 40 * DAY, now - 10 * DAY),  # applied after it ended
            "on-time": (now - DAY, now + 29 * DAY),
        }
        for account, (start, end) in periods.items():
            conn.execute(
                "SELECT ledger_start_subscription_period(%s, %s, '\\x01', 'basic', %s, %s,"
                " %s, %s, now())",
                (account, new_key(), start, end, f"in_{new_key()}", f"sub_{account}"),
            )
            up = _change_plan(conn, account, "premium", (start, end))
            assert int(up["lot"]["amount_micros"]) == 1000 * CREDIT
        # The database as it was before 0040, those payments recorded then.
        conn.execute(
            "ALTER TABLE purchases DROP CONSTRAINT purchases_period_only_of_subscriptions,"
            " DROP COLUMN period_start"
        )
        conn.execute("DELETE FROM schema_migrations WHERE version = 40")
    assert migrate(fresh_database_url) == ["0040_purchases_period_start.sql"]
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        for account, period in periods.items():
            for plan in ("basic", "pro"):
                changed = _change_plan(conn, account, plan, period)
                assert changed["lot"] is None, (account, plan, changed["lot"])
