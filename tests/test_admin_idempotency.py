"""Every mutating RPC takes an idempotency key (DESIGN.md section 4), the administrators'
changes that move no credits too: catalogue, rate card, settings, redemption batches and
alert thresholds. A retry answers the first response and changes nothing; the same key with
another request is refused; a change that failed keeps no key."""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf import struct_pb2

from ledger.v1 import admin_service_pb2 as admin_pb
from ledger.v1 import admin_service_pb2_grpc
from ledger.v1 import billing_service_pb2 as billing_pb
from ledger.v1 import types_pb2 as t
from support.ledger import CREDIT, Ledger, expect_error, new_account, new_key

AdminStub = admin_service_pb2_grpc.AdminServiceStub
REPLAYED = ("ledger-idempotent-replay", "true")


def _pack(pack_id: str, credits: int = 10) -> billing_pb.CreditPack:
    return billing_pb.CreditPack(
        pack_id=pack_id,
        translation_key=f"credit_{pack_id}",
        credits_micros=credits * CREDIT,
        price_minor=500,
        currency="USD",
        provider_price_id=f"price_{pack_id}",
        active=True,
    )


_PLAN = billing_pb.SubscriptionPlan(
    plan_id="plan-no-key",
    translation_key="plan_no_key",
    credits_micros=CREDIT,
    period_unit=billing_pb.BILLING_PERIOD_UNIT_MONTH,
    period_count=1,
    rank=1,
    price_minor=100,
    currency="USD",
)


def _price(feature: str, micros: int) -> admin_pb.Price:
    return admin_pb.Price(
        feature=feature, unit=t.USAGE_UNIT_IMAGES, unit_size=1, unit_price_micros=micros
    )


def test_a_retried_create_answers_the_first_response_and_creates_nothing(admin: AdminStub) -> None:
    pack_id = f"pack-{uuid.uuid4().hex[:10]}"
    request = admin_pb.CreateCreditPackRequest(pack=_pack(pack_id), idempotency_key=new_key())
    first = admin.CreateCreditPack(request)
    again, call = admin.CreateCreditPack.with_call(request)  # its answer was lost: no error
    assert again == first
    assert REPLAYED in (call.trailing_metadata() or ())

    other = admin_pb.CreateCreditPackRequest(
        pack=_pack(pack_id, credits=20), idempotency_key=request.idempotency_key
    )
    info = expect_error(
        lambda: admin.CreateCreditPack(other),
        grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_KEY_REUSED",
    )
    assert info.metadata["original_operation"] == "create_credit_pack"
    packs = admin.ListAllCreditPacks(admin_pb.ListAllCreditPacksRequest()).packs
    assert [p.credits_micros for p in packs if p.pack_id == pack_id] == [10 * CREDIT]


def test_a_retried_price_adds_no_version_and_a_late_retry_undoes_nothing(
    admin: AdminStub, ledger_db_url: str
) -> None:
    feature = f"feature-{uuid.uuid4().hex[:8]}"
    first = admin_pb.SetPriceRequest(price=_price(feature, 100), idempotency_key=new_key())
    answered = admin.SetPrice(first)
    admin.SetPrice(admin_pb.SetPriceRequest(price=_price(feature, 200), idempotency_key=new_key()))
    late, call = admin.SetPrice.with_call(first)
    assert late == answered and REPLAYED in (call.trailing_metadata() or ())
    [current] = admin.ListPrices(admin_pb.ListPricesRequest(feature=feature)).prices
    assert current.unit_price_micros == 200
    with psycopg.connect(ledger_db_url) as conn:
        versions = conn.execute("SELECT count(*) FROM prices WHERE feature = %s", (feature,))
        assert versions.fetchone() == (2,)


def test_a_late_retry_of_a_setting_change_does_not_undo_a_newer_one(
    admin: AdminStub, configure: Any
) -> None:
    configure("daily.amount_micros", 10 * CREDIT)  # put back when the test ends

    def change(amount: int, key: str) -> admin_pb.UpdateSettingResponse:
        return admin.UpdateSetting(
            admin_pb.UpdateSettingRequest(
                key="daily.amount_micros",
                value=struct_pb2.Value(number_value=amount),
                reason="tuning",
                idempotency_key=key,
            )
        )

    first = change(11 * CREDIT, "tune-1")
    change(12 * CREDIT, "tune-2")
    assert change(11 * CREDIT, "tune-1") == first
    settings = {s.key: s for s in admin.ListSettings(admin_pb.ListSettingsRequest()).settings}
    assert settings["daily.amount_micros"].value.number_value == 12 * CREDIT
    history = admin.ListSettingChanges(
        admin_pb.ListSettingChangesRequest(key="daily.amount_micros", page_size=2)
    ).changes
    assert [c.new_value.number_value for c in history] == [12 * CREDIT, 11 * CREDIT]


def test_a_change_that_failed_keeps_no_key(admin: AdminStub) -> None:
    pack_id = f"pack-{uuid.uuid4().hex[:10]}"
    admin.CreateCreditPack(
        admin_pb.CreateCreditPackRequest(pack=_pack(pack_id), idempotency_key=new_key())
    )
    key = new_key()
    expect_error(
        lambda: admin.CreateCreditPack(
            admin_pb.CreateCreditPackRequest(pack=_pack(pack_id), idempotency_key=key)
        ),
        grpc.StatusCode.ALREADY_EXISTS,
        "ALREADY_EXISTS",
    )
    fresh = f"pack-{uuid.uuid4().hex[:10]}"
    created = admin.CreateCreditPack(
        admin_pb.CreateCreditPackRequest(pack=_pack(fresh), idempotency_key=key)
    )
    assert created.pack.pack_id == fresh


def test_one_key_serves_one_kind_of_change(admin: AdminStub, ledger: Ledger) -> None:
    key = new_key()
    account = new_account()
    ledger.grant(account, 1)
    admin.SetLowBalanceAlert(
        admin_pb.SetLowBalanceAlertRequest(
            account_id=account, threshold_micros=CREDIT, idempotency_key=key
        )
    )
    info = expect_error(
        lambda: admin.SetPrice(
            admin_pb.SetPriceRequest(price=_price("elsewhere", 1), idempotency_key=key)
        ),
        grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_KEY_REUSED",
    )
    assert info.metadata["original_operation"] == "set_low_balance_alert"


def test_an_alert_retried_with_its_address_typed_with_spaces_is_a_replay(
    admin: AdminStub, ledger: Ledger
) -> None:
    """The address is used trimmed, so it is fingerprinted trimmed (helper-63: the retry
    was refused as another request)."""
    key, account = new_key(), new_account()
    ledger.grant(account, 1)

    def alert(email: str) -> Any:
        return admin.SetLowBalanceAlert.with_call(
            admin_pb.SetLowBalanceAlertRequest(
                account_id=account, threshold_micros=CREDIT, email=email, idempotency_key=key
            )
        )

    first, _ = alert("ops@example.com")
    again, call = alert(" ops@example.com ")
    assert again == first
    assert REPLAYED in (call.trailing_metadata() or ())
    expect_error(
        lambda: alert("other@example.com"),
        grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_KEY_REUSED",
    )


def test_a_retry_that_differs_only_in_what_the_ledger_ignores_is_a_replay(
    admin: AdminStub,
) -> None:
    """A reset ignores a value sent with it, and a price's unit size 1 is the unset one:
    retries differing only so are the same request (helper-99: refused as another)."""
    key = new_key()

    def reset(value: struct_pb2.Value | None) -> Any:
        return admin.UpdateSetting.with_call(
            admin_pb.UpdateSettingRequest(
                key="daily.expire_days",
                reset=True,
                value=value,
                reason="back to the default",
                idempotency_key=key,
            )
        )

    first, _ = reset(None)
    again, call = reset(struct_pb2.Value(number_value=3))
    assert again == first and REPLAYED in (call.trailing_metadata() or ())

    price_key, feature = new_key(), f"f-{uuid.uuid4().hex[:8]}"

    def set_price(unit_size: int) -> Any:
        price = _price(feature, CREDIT)
        price.unit_size = unit_size
        return admin.SetPrice.with_call(
            admin_pb.SetPriceRequest(price=price, idempotency_key=price_key)
        )

    priced, _ = set_price(0)
    again_priced, call = set_price(1)
    assert again_priced == priced and REPLAYED in (call.trailing_metadata() or ())
    expect_error(lambda: set_price(2), grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")


def _batch(key: str) -> admin_pb.CreateRedemptionBatchRequest:
    return admin_pb.CreateRedemptionBatchRequest(
        amount_micros=CREDIT, code_count=2, idempotency_key=key
    )


def test_a_redemption_batch_shares_the_key_namespace_of_the_other_changes(
    admin: AdminStub, ledger_db_url: str
) -> None:
    """Its keys were kept apart (idempotency_keys, under a pseudo-account) until this
    release: a SetPrice and a batch under one key both succeeded, either way round."""

    def batches() -> int:
        with psycopg.connect(ledger_db_url) as conn:
            row = conn.execute("SELECT count(*) FROM redemption_batches").fetchone()
            assert row is not None
            return int(row[0])

    price_key = new_key()
    admin.SetPrice(
        admin_pb.SetPriceRequest(price=_price("batch-keys", 1), idempotency_key=price_key)
    )
    before = batches()
    info = expect_error(
        lambda: admin.CreateRedemptionBatch(_batch(price_key)),
        grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_KEY_REUSED",
    )
    assert info.metadata["original_operation"] == "set_price"
    assert batches() == before

    batch_key = new_key()
    admin.CreateRedemptionBatch(_batch(batch_key))
    info = expect_error(
        lambda: admin.SetPrice(
            admin_pb.SetPriceRequest(price=_price("batch-keys", 2), idempotency_key=batch_key)
        ),
        grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_KEY_REUSED",
    )
    assert info.metadata["original_operation"] == "create_redemption_batch"
    [price] = admin.ListPrices(admin_pb.ListPricesRequest(feature="batch-keys")).prices
    assert price.unit_price_micros == 1
    assert batches() == before + 1


@pytest.mark.parametrize(
    ("method", "request_"),
    [
        ("CreateCreditPack", admin_pb.CreateCreditPackRequest(pack=_pack("pack-no-key"))),
        ("UpdateCreditPack", admin_pb.UpdateCreditPackRequest(pack=_pack("pack-no-key"))),
        (
            "CreateSubscriptionPlan",
            admin_pb.CreateSubscriptionPlanRequest(plan=_PLAN),
        ),
        (
            "UpdateSubscriptionPlan",
            admin_pb.UpdateSubscriptionPlanRequest(plan=_PLAN),
        ),
        (
            "DisableRedemptionBatch",
            admin_pb.DisableRedemptionBatchRequest(batch_id=str(uuid.uuid4()), reason="leaked"),
        ),
        (
            "UpdateSetting",
            admin_pb.UpdateSettingRequest(key="daily.enabled", reset=True, reason="r"),
        ),
        ("SetPrice", admin_pb.SetPriceRequest(price=_price("no-key", 1))),
        ("RemovePrice", admin_pb.RemovePriceRequest(feature="no-key", unit=t.USAGE_UNIT_IMAGES)),
        (
            "SetModelMultiplier",
            admin_pb.SetModelMultiplierRequest(
                multiplier=admin_pb.ModelMultiplier(model="no-key", multiplier_ppm=1)
            ),
        ),
        ("RemoveModelMultiplier", admin_pb.RemoveModelMultiplierRequest(model="no-key")),
        (
            "SetLowBalanceAlert",
            admin_pb.SetLowBalanceAlertRequest(account_id="no-key", threshold_micros=1),
        ),
    ],
)
def test_a_change_without_a_key_is_refused_by_field(
    admin: AdminStub, method: str, request_: Any
) -> None:
    expect_error(
        lambda: getattr(admin, method)(request_),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FIELD",
        field="idempotency_key",
    )
