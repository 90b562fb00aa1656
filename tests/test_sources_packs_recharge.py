"""Credit packs (seed 000) and custom-amount recharges with bonus tiers (seed 002)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import grpc
import pytest

from ledger.v1 import admin_service_pb2 as admin_pb
from ledger.v1 import billing_service_pb2 as billing_pb
from ledger.v1 import types_pb2
from support.ledger import CREDIT, Ledger, expect_error, new_account, new_key
from support.sources import DAY, Sources, whole_seconds

AuditCheck = Callable[[], None]


@pytest.fixture
def sources(stub: Any, admin: Any, billing: Any) -> Sources:
    return Sources(stub, admin, billing)


def _active_pack_ids(sources: Sources) -> set[str]:
    listed = sources.billing.ListCreditPacks(billing_pb.ListCreditPacksRequest()).packs
    return {pack.pack_id for pack in listed}


def _all_packs(sources: Sources) -> dict[str, billing_pb.CreditPack]:
    listed = sources.admin.ListAllCreditPacks(admin_pb.ListAllCreditPacksRequest()).packs
    return {pack.pack_id: pack for pack in listed}


# --- the pack catalogue -------------------------------------------------------------------------


def test_admins_manage_the_pack_catalogue(sources: Sources) -> None:
    pack = sources.create_pack(100 * CREDIT, price_minor=990, currency="USD")
    assert pack.credits_micros == 100 * CREDIT
    assert (pack.price_minor, pack.currency) == (990, "USD")
    assert pack.translation_key == f"credit_{pack.pack_id}"
    assert pack.provider_price_id == f"price_{pack.pack_id}"
    assert pack.active
    assert pack.HasField("create_time")

    hidden = sources.create_pack(50 * CREDIT, active=False)
    assert pack.pack_id in _active_pack_ids(sources)
    assert hidden.pack_id not in _active_pack_ids(sources)
    listed = _all_packs(sources)
    assert listed[pack.pack_id].credits_micros == 100 * CREDIT
    assert not listed[hidden.pack_id].active

    # Update replaces the fields.
    changed = billing_pb.CreditPack()
    changed.CopyFrom(pack)
    changed.credits_micros = 120 * CREDIT
    changed.price_minor = 1190
    changed.translation_key = "credit_120"
    changed.active = False
    updated = sources.admin.UpdateCreditPack(
        admin_pb.UpdateCreditPackRequest(pack=changed, idempotency_key=new_key())
    ).pack
    assert (updated.credits_micros, updated.price_minor, updated.translation_key) == (
        120 * CREDIT,
        1190,
        "credit_120",
    )
    assert not updated.active
    assert pack.pack_id not in _active_pack_ids(sources)
    assert _all_packs(sources)[pack.pack_id].credits_micros == 120 * CREDIT


def test_a_pack_id_is_unique(sources: Sources) -> None:
    pack = sources.create_pack(10 * CREDIT)
    expect_error(
        lambda: sources.create_pack(20 * CREDIT, pack_id=pack.pack_id),
        grpc.StatusCode.ALREADY_EXISTS,
        "ALREADY_EXISTS",
    )
    assert _all_packs(sources)[pack.pack_id].credits_micros == 10 * CREDIT


# --- buying packs -------------------------------------------------------------------------------


def test_free_users_may_not_buy_packs_by_default(
    sources: Sources, ledger: Ledger, assert_audit_clean: AuditCheck
) -> None:
    pack = sources.create_pack(100 * CREDIT)
    account = sources.create_account().account.account_id
    expect_error(
        lambda: sources.purchase(account, pack.pack_id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PURCHASE_REQUIRES_SUBSCRIPTION",
    )
    assert ledger.lots(account, include_inactive=True) == []
    assert_audit_clean()


def test_a_purchased_pack_never_expires_and_is_fulfilled_once(
    sources: Sources, ledger: Ledger, configure: Any, assert_audit_clean: AuditCheck
) -> None:
    configure("purchase.allow_free_users", True)
    pack = sources.create_pack(100 * CREDIT)
    account = sources.create_account().account.account_id
    key = new_key("purchase")
    bought = sources.purchase(account, pack.pack_id, key=key, external_ref="pi_seed000_1")

    lot = bought.lot
    assert lot.source == types_pb2.CREDIT_SOURCE_PURCHASE
    assert lot.balance_kind == types_pb2.BALANCE_KIND_MAIN
    assert lot.amount_micros == lot.remaining_micros == 100 * CREDIT
    assert not lot.HasField("expires_at")
    assert lot.external_ref == "pi_seed000_1"
    assert bought.balance.available_micros == 100 * CREDIT
    assert bought.transaction_id

    replay = sources.purchase(account, pack.pack_id, key=key, external_ref="pi_seed000_1")
    assert replay.lot.lot_id == lot.lot_id
    info = expect_error(
        lambda: sources.purchase(account, pack.pack_id, external_ref="pi_seed000_1"),
        grpc.StatusCode.ALREADY_EXISTS,
        "ALREADY_FULFILLED",
    )
    assert info.metadata["external_ref"] == "pi_seed000_1"
    assert ledger.balance(account).balance_micros == 100 * CREDIT
    assert len(ledger.lots(account)) == 1
    assert_audit_clean()


def test_a_purchase_opens_an_unknown_account(
    sources: Sources, ledger: Ledger, configure: Any, assert_audit_clean: AuditCheck
) -> None:
    configure("purchase.allow_free_users", True)
    configure.reset("signup.enabled")
    pack = sources.create_pack(100 * CREDIT)
    account = new_account()
    bought = sources.purchase(account, pack.pack_id)
    assert bought.balance.balance_micros == 200 * CREDIT  # pack + sign-up bonus
    assert sources.get_account(account).referral_code
    assert_audit_clean()


def test_unknown_and_inactive_packs_are_refused(
    sources: Sources, ledger: Ledger, configure: Any, assert_audit_clean: AuditCheck
) -> None:
    configure("purchase.allow_free_users", True)
    account = sources.create_account().account.account_id
    info = expect_error(
        lambda: sources.purchase(account, "no-such-pack"),
        grpc.StatusCode.NOT_FOUND,
        "PACK_NOT_FOUND",
    )
    assert info.metadata["pack_id"] == "no-such-pack"
    inactive = sources.create_pack(10 * CREDIT, active=False)
    info = expect_error(
        lambda: sources.purchase(account, inactive.pack_id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PACK_INACTIVE",
    )
    assert info.metadata["pack_id"] == inactive.pack_id
    assert ledger.balance(account).balance_micros == 0
    assert_audit_clean()


def test_subscribers_may_buy_packs_while_their_period_lasts(
    sources: Sources, ledger: Ledger, clock: Any, assert_audit_clean: AuditCheck
) -> None:
    pack = sources.create_pack(100 * CREDIT)
    plan = sources.create_plan(30 * CREDIT, rank=1)
    account = sources.create_account().account.account_id
    start = whole_seconds(clock.now()) - timedelta(minutes=1)
    end = start + 2 * DAY
    sources.start_period(account, plan.plan_id, start, end)

    bought = sources.purchase(account, pack.pack_id)
    assert bought.lot.amount_micros == 100 * CREDIT
    assert bought.balance.balance_micros == 130 * CREDIT

    # Past the period's end, while its renewal is being paid, the account is a subscriber.
    clock.advance(end - clock.now() + timedelta(hours=2))
    assert sources.purchase(account, pack.pack_id).lot.amount_micros == 100 * CREDIT
    # Once the renewal's grace (subscription.renewal_grace_days) is over, a free user again.
    clock.advance(timedelta(days=14))
    expect_error(
        lambda: sources.purchase(account, pack.pack_id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PURCHASE_REQUIRES_SUBSCRIPTION",
    )
    assert ledger.balance(account).balance_micros == 200 * CREDIT  # the packs never expire
    assert_audit_clean()


# --- recharge (seed 002) ------------------------------------------------------------------------

# amount paid in fen -> (credits, bonus credits); 1 credit = 1 RMB, minimum 30 RMB.
RECHARGE_TABLE = [
    (3000, 30 * CREDIT, 0),
    (29999, 299_990_000, 0),
    (30000, 300 * CREDIT, 30 * CREDIT),
    (99999, 999_990_000, 30 * CREDIT),
    (100000, 1000 * CREDIT, 150 * CREDIT),
    (250000, 2500 * CREDIT, 150 * CREDIT),
]


def test_seed_002_recharge_below_the_minimum_is_refused(
    sources: Sources, ledger: Ledger, assert_audit_clean: AuditCheck
) -> None:
    account = sources.create_account().account.account_id
    info = expect_error(
        lambda: sources.recharge(account, 2900),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FIELD",
        field="amount_minor",
    )
    assert info.metadata["field"] == "amount_minor"
    assert ledger.lots(account, include_inactive=True) == []
    assert_audit_clean()


@pytest.mark.parametrize(("amount_minor", "credits", "bonus"), RECHARGE_TABLE)
def test_seed_002_recharge_table(
    sources: Sources,
    ledger: Ledger,
    amount_minor: int,
    credits: int,
    bonus: int,
    assert_audit_clean: AuditCheck,
) -> None:
    quote = sources.quote(amount_minor)
    assert (quote.credits_micros, quote.bonus_micros, quote.minimum_minor) == (
        credits,
        bonus,
        3000,
    )

    account = sources.create_account().account.account_id
    paid = sources.recharge(account, amount_minor, external_ref=f"pay-{new_key()}")
    lot = paid.lot
    assert lot.source == types_pb2.CREDIT_SOURCE_RECHARGE
    assert lot.amount_micros == lot.remaining_micros == credits
    assert not lot.HasField("expires_at")
    if bonus:
        assert paid.HasField("bonus_lot")
        assert paid.bonus_lot.source == types_pb2.CREDIT_SOURCE_RECHARGE_BONUS
        assert paid.bonus_lot.amount_micros == paid.bonus_lot.remaining_micros == bonus
        assert paid.bonus_lot.parent_lot_id == lot.lot_id
        assert not paid.bonus_lot.HasField("expires_at")
    else:
        assert not paid.HasField("bonus_lot")
    assert paid.balance.balance_micros == paid.balance.available_micros == credits + bonus
    assert ledger.balance(account).available_micros == credits + bonus
    lots = ledger.lots(account)
    assert sum(lot.remaining_micros for lot in lots) == credits + bonus
    assert len(lots) == (2 if bonus else 1)
    assert_audit_clean()


def test_seed_002_headline_amounts(sources: Sources, assert_audit_clean: AuditCheck) -> None:
    """30 RMB -> 30 credits, 300 RMB -> 330 credits, 1000 RMB -> 1150 credits."""
    for amount_minor, total in ((3000, 30), (30000, 330), (100000, 1150)):
        account = sources.create_account().account.account_id
        assert sources.recharge(account, amount_minor).balance.balance_micros == total * CREDIT
    assert_audit_clean()


def test_recharge_in_another_currency_is_refused(
    sources: Sources, ledger: Ledger, assert_audit_clean: AuditCheck
) -> None:
    account = sources.create_account().account.account_id
    expect_error(
        lambda: sources.recharge(account, 30000, currency="USD"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FIELD",
        field="currency",
    )
    assert ledger.lots(account, include_inactive=True) == []
    assert_audit_clean()


def test_a_recharge_payment_is_fulfilled_once(
    sources: Sources, ledger: Ledger, assert_audit_clean: AuditCheck
) -> None:
    account = sources.create_account().account.account_id
    key = new_key("recharge")
    first = sources.recharge(account, 30000, key=key, external_ref="alipay-42")
    replay = sources.recharge(account, 30000, key=key, external_ref="alipay-42")
    assert replay.lot.lot_id == first.lot.lot_id
    assert replay.bonus_lot.lot_id == first.bonus_lot.lot_id
    expect_error(
        lambda: sources.recharge(account, 30000, external_ref="alipay-42"),
        grpc.StatusCode.ALREADY_EXISTS,
        "ALREADY_FULFILLED",
    )
    assert ledger.balance(account).balance_micros == 330 * CREDIT
    assert_audit_clean()


def test_recharge_rules_are_configurable(
    sources: Sources, configure: Any, assert_audit_clean: AuditCheck
) -> None:
    configure("recharge.minimum_minor", 1000)
    configure("recharge.micros_per_minor_unit", 20_000)  # 2 credits per RMB
    configure("recharge.bonus_tiers", [{"min_minor": 5000, "bonus_micros": 7 * CREDIT}])
    quote = sources.quote(5000)
    assert (quote.credits_micros, quote.bonus_micros, quote.minimum_minor) == (
        100 * CREDIT,
        7 * CREDIT,
        1000,
    )
    account = sources.create_account().account.account_id
    assert sources.recharge(account, 1000).balance.balance_micros == 20 * CREDIT
    assert sources.recharge(account, 5000).balance.balance_micros == 127 * CREDIT
    assert_audit_clean()


@pytest.mark.parametrize("amount_minor", [0, -3000])
def test_a_recharge_amount_must_be_positive(
    sources: Sources, ledger: Ledger, amount_minor: int
) -> None:
    account = sources.create_account().account.account_id
    expect_error(
        lambda: sources.recharge(account, amount_minor),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FIELD",
        field="amount_minor",
    )
    assert ledger.lots(account, include_inactive=True) == []


def test_a_quote_in_another_currency_is_refused(sources: Sources) -> None:
    expect_error(
        lambda: sources.quote(30000, "EUR"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FIELD",
        field="currency",
    )


def test_a_recharge_too_large_for_one_lot_is_refused_by_field(sources: Sources) -> None:
    """10**15 fen at 10,000 micros each would be 10**19 micro-credits: past a bigint, the
    quote used to fail INTERNAL."""
    for call in (
        lambda: sources.quote(10**15, "CNY"),
        lambda: sources.recharge(sources.create_account().account.account_id, 10**15),
    ):
        info = expect_error(call, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD", "amount_minor")
        assert "at most 100000000000" in info.metadata["violation"]
    assert sources.quote(10**11, "CNY").credits_micros == 10**15  # the largest is allowed


def test_a_recharge_key_reused_for_another_amount_is_refused(
    sources: Sources, ledger: Ledger
) -> None:
    account = sources.create_account().account.account_id
    key = new_key("recharge")
    sources.recharge(account, 3000, key=key, external_ref="wx-1")
    expect_error(
        lambda: sources.recharge(account, 30000, key=key, external_ref="wx-1"),
        grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_KEY_REUSED",
    )
    assert ledger.balance(account).balance_micros == 30 * CREDIT


def test_a_recharge_retried_with_the_currency_in_another_case_is_the_same_recharge(
    sources: Sources, ledger: Ledger
) -> None:
    """The ledger compares currencies upper-cased, so the request it answered is the same
    (helper-56): the retry used to be refused as another request."""
    account = sources.create_account().account.account_id
    key = new_key("recharge")
    first = sources.recharge(account, 3000, currency="cny", key=key, external_ref="wx-2")
    for currency in ("CNY", "Cny"):
        replay, call = sources.billing.Recharge.with_call(
            billing_pb.RechargeRequest(
                account_id=account,
                idempotency_key=key,
                amount_minor=3000,
                currency=currency,
                external_ref="wx-2",
            )
        )
        assert ("ledger-idempotent-replay", "true") in call.trailing_metadata()
        assert replay.lot.lot_id == first.lot.lot_id
    expect_error(
        lambda: sources.recharge(account, 3001, currency="CNY", key=key, external_ref="wx-2"),
        grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_KEY_REUSED",
    )
    assert ledger.balance(account).balance_micros == 30 * CREDIT


@pytest.mark.parametrize(
    ("pack_id", "currency", "field"),
    [
        ("Upper-Case", "USD", "pack.pack_id"),
        ("has space", "USD", "pack.pack_id"),
        ("", "USD", "pack.pack_id"),
        ("pack-1\n", "USD", "pack.pack_id"),  # a final newline once passed `$`
        ("pack-1", "ÅÅÅ", "pack.currency"),  # upper-case letters, but not ISO 4217's A-Z
        ("pack-1", "usd", "pack.currency"),
    ],
)
def test_a_pack_id_must_be_lower_case_letters_digits_and_dashes(
    sources: Sources, pack_id: str, currency: str, field: str
) -> None:
    expect_error(
        lambda: sources.admin.CreateCreditPack(
            admin_pb.CreateCreditPackRequest(
                pack=billing_pb.CreditPack(
                    pack_id=pack_id,
                    translation_key="credit_100",
                    credits_micros=100 * CREDIT,
                    price_minor=990,
                    currency=currency,
                    provider_price_id="price_x",
                    active=True,
                ),
                idempotency_key=new_key(),
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FIELD",
        field,
    )


def test_the_highest_tier_reached_applies_whatever_the_order_of_the_tiers(
    sources: Sources, configure: Any
) -> None:
    configure(
        "recharge.bonus_tiers",
        [
            {"min_minor": 100000, "bonus_micros": 150 * CREDIT},
            {"min_minor": 30000, "bonus_micros": 30 * CREDIT},
        ],
    )
    assert sources.quote(50000).bonus_micros == 30 * CREDIT
    assert sources.quote(100000).bonus_micros == 150 * CREDIT
    assert sources.quote(29999).bonus_micros == 0


def test_updating_an_unknown_pack_is_not_found(sources: Sources) -> None:
    expect_error(
        lambda: sources.admin.UpdateCreditPack(
            admin_pb.UpdateCreditPackRequest(
                pack=billing_pb.CreditPack(
                    pack_id=new_key("pack").lower(),
                    translation_key="credit_1",
                    credits_micros=CREDIT,
                    price_minor=100,
                    currency="USD",
                    provider_price_id="price_1",
                    active=True,
                ),
                idempotency_key=new_key(),
            )
        ),
        grpc.StatusCode.NOT_FOUND,
        "PACK_NOT_FOUND",
    )


def test_a_purchase_retried_after_the_pack_is_retired_is_still_a_replay(
    sources: Sources, ledger: Ledger, configure: Any
) -> None:
    configure("purchase.allow_free_users", True)
    pack = sources.create_pack(100 * CREDIT)
    account = sources.create_account().account.account_id
    key = new_key("purchase")
    bought = sources.purchase(account, pack.pack_id, key=key, external_ref="pi_retry")
    retired = billing_pb.CreditPack()
    retired.CopyFrom(pack)
    retired.active = False
    sources.admin.UpdateCreditPack(
        admin_pb.UpdateCreditPackRequest(pack=retired, idempotency_key=new_key())
    )
    replay = sources.purchase(account, pack.pack_id, key=key, external_ref="pi_retry")
    assert replay.lot.lot_id == bought.lot.lot_id
    assert ledger.balance(account).balance_micros == 100 * CREDIT
