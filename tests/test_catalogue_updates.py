"""Pack and plan updates change the fields their update_mask names and keep the others as
they are (AIP-134), and an etag refuses to overwrite a change made since the record was
read (AIP-154): an administrator's price change was undone by another's rename sent whole
from an older copy."""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from ledger.v1 import admin_service_pb2 as admin_pb
from ledger.v1 import billing_service_pb2 as billing_pb
from support.ledger import CREDIT, expect_error, new_key
from support.sources import Sources

INVALID = grpc.StatusCode.INVALID_ARGUMENT
REPLAYED = ("ledger-idempotent-replay", "true")


@pytest.fixture
def sources(stub: Any, admin: Any, billing: Any) -> Sources:
    return Sources(stub, admin, billing)


def _edited(pack: billing_pb.CreditPack, **changes: Any) -> billing_pb.CreditPack:
    out = billing_pb.CreditPack()
    out.CopyFrom(pack)
    for field, value in changes.items():
        setattr(out, field, value)
    return out


def _update_pack(
    admin: Any, pack: billing_pb.CreditPack, paths: list[str] | None = None, **extra: Any
) -> billing_pb.CreditPack:
    request = admin_pb.UpdateCreditPackRequest(pack=pack, idempotency_key=new_key(), **extra)
    if paths is not None:
        request.update_mask.paths.extend(paths)
    return admin.UpdateCreditPack(request).pack  # type: ignore[no-any-return]


def _stored(admin: Any, pack_id: str) -> billing_pb.CreditPack:
    packs = admin.ListAllCreditPacks(admin_pb.ListAllCreditPacksRequest()).packs
    return next(pack for pack in packs if pack.pack_id == pack_id)  # type: ignore[no-any-return]


def test_two_admins_changing_other_fields_from_stale_copies_both_keep_their_change(
    sources: Sources, admin: Any
) -> None:
    pack = sources.create_pack(100 * CREDIT, price_minor=990)
    _update_pack(admin, _edited(pack, price_minor=1190), ["price_minor"])
    _update_pack(admin, _edited(pack, translation_key="renamed"), ["translation_key"])
    stored = _stored(admin, pack.pack_id)
    assert (stored.price_minor, stored.translation_key) == (1190, "renamed")
    assert stored.credits_micros == 100 * CREDIT

    # A field named but unset is cleared; the unnamed ones need not be sent, nor valid.
    partial = billing_pb.CreditPack(pack_id=pack.pack_id, price_minor=1290)
    assert _update_pack(admin, partial, ["active", "price_minor"]).active is False
    stored = _stored(admin, pack.pack_id)
    assert (stored.price_minor, stored.translation_key, stored.active) == (1290, "renamed", False)

    # Without a mask (or with "*") the whole pack is replaced, as before the mask existed.
    assert _update_pack(admin, _edited(pack, currency="EUR")).price_minor == 990
    stored = _stored(admin, pack.pack_id)
    assert (stored.translation_key, stored.currency, stored.active) == (
        pack.translation_key,
        "EUR",
        True,
    )
    assert _update_pack(admin, _edited(pack, price_minor=5), ["*"]).currency == "USD"


def test_a_plan_update_keeps_the_fields_its_mask_does_not_name(
    sources: Sources, admin: Any
) -> None:
    plan = sources.create_plan(100 * CREDIT, rank=1)

    def update(paths: list[str] | None, **changes: Any) -> billing_pb.SubscriptionPlan:
        changed = billing_pb.SubscriptionPlan()
        changed.CopyFrom(plan)
        for field, value in changes.items():
            setattr(changed, field, value)
        request = admin_pb.UpdateSubscriptionPlanRequest(plan=changed, idempotency_key=new_key())
        if paths is not None:
            request.update_mask.paths.extend(paths)
        return admin.UpdateSubscriptionPlan(request).plan  # type: ignore[no-any-return]

    update(["rank"], rank=3)
    changed = update(
        ["credits_micros", "period_count"], credits_micros=120 * CREDIT, period_count=3
    )
    assert (changed.rank, changed.credits_micros, changed.period_count) == (3, 120 * CREDIT, 3)
    assert update(None, translation_key="whole").rank == 1
    expect_error(lambda: update(["plan_id"]), INVALID, "INVALID_FIELD", "update_mask")
    expect_error(lambda: update(["etag"]), INVALID, "INVALID_FIELD", "update_mask")
    stale = plan.etag
    assert update(["rank"], rank=2).etag != stale
    info = expect_error(
        lambda: admin.UpdateSubscriptionPlan(
            admin_pb.UpdateSubscriptionPlanRequest(plan=plan, idempotency_key=new_key(), etag=stale)
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ETAG_MISMATCH",
    )
    assert info.metadata["plan_id"] == plan.plan_id

    # An inactive plan, which BillingService no longer lists, is read with its etag here:
    # a conditional reactivation needs it (helper-126).
    retired = update(["active"], active=False)
    on_sale = admin.ListAllSubscriptionPlans(admin_pb.ListAllSubscriptionPlansRequest()).plans
    [listed] = [p for p in on_sale if p.plan_id == plan.plan_id]
    assert listed == retired and not listed.active
    reactivated = admin.UpdateSubscriptionPlan(
        admin_pb.UpdateSubscriptionPlanRequest(
            plan=billing_pb.SubscriptionPlan(plan_id=plan.plan_id, active=True),
            update_mask=FieldMask(paths=["active"]),
            etag=listed.etag,
            idempotency_key=new_key(),
        )
    ).plan
    assert reactivated.active and reactivated.rank == retired.rank


@pytest.mark.parametrize(
    "paths",
    [
        ["pack_id"],
        ["create_time"],
        ["update_time"],
        ["etag"],
        ["no_such_field"],
        ["pack.price_minor"],
        ["*", "price_minor"],
        [],
    ],
)
def test_a_mask_naming_a_field_an_update_cannot_change_is_refused(
    sources: Sources, admin: Any, paths: list[str]
) -> None:
    pack = sources.create_pack(100 * CREDIT)
    request = admin_pb.UpdateCreditPackRequest(
        pack=_edited(pack, price_minor=1), idempotency_key=new_key(), update_mask=FieldMask()
    )
    request.update_mask.paths.extend(paths)
    expect_error(lambda: admin.UpdateCreditPack(request), INVALID, "INVALID_FIELD", "update_mask")
    assert _stored(admin, pack.pack_id) == pack
    # A named field is checked as on creation.
    expect_error(
        lambda: _update_pack(admin, _edited(pack, credits_micros=0), ["credits_micros"]),
        INVALID,
        "INVALID_FIELD",
        "pack.credits_micros",
    )


def test_an_update_with_the_etag_of_an_older_version_is_refused(
    sources: Sources, admin: Any
) -> None:
    pack = sources.create_pack(100 * CREDIT, price_minor=990)
    assert pack.etag == _stored(admin, pack.pack_id).etag
    raised = _update_pack(admin, _edited(pack, price_minor=1190), ["price_minor"], etag=pack.etag)
    assert raised.etag != pack.etag
    info = expect_error(
        lambda: _update_pack(
            admin, _edited(pack, price_minor=1090), ["price_minor"], etag=pack.etag
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ETAG_MISMATCH",
    )
    assert info.metadata["pack_id"] == pack.pack_id
    assert _stored(admin, pack.pack_id) == raised
    # The pack's own etag is output only: a copy sent back carries it, and is not checked.
    assert _update_pack(admin, _edited(pack, active=False), ["active"]).price_minor == 1190


def test_a_retry_is_the_same_request_only_with_the_same_mask(sources: Sources, admin: Any) -> None:
    pack = sources.create_pack(100 * CREDIT)
    key = new_key()

    def update(paths: list[str], **changes: Any) -> Any:
        request = admin_pb.UpdateCreditPackRequest(
            pack=_edited(pack, **changes), idempotency_key=key
        )
        request.update_mask.paths.extend(paths)
        return admin.UpdateCreditPack.with_call(request)

    first, _ = update(["price_minor"], price_minor=1190)
    # A field the mask does not name is not read: a retry from a fresher copy is the same.
    again, call = update(["price_minor"], price_minor=1190, translation_key="fresher")
    assert again == first and REPLAYED in call.trailing_metadata()
    expect_error(
        lambda: update(["price_minor", "active"], price_minor=1190),
        grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_KEY_REUSED",
    )


def test_concurrent_updates_of_other_fields_both_land(
    sources: Sources, admin: Any, ledger_db_url: str
) -> None:
    """The fields an update does not name are read under the pack's lock: two updates
    that both read them before either wrote would write back the other's field as it was."""
    pack = sources.create_pack(100 * CREDIT, price_minor=990)
    updates = [
        (_edited(pack, price_minor=1190), ["price_minor"]),
        (_edited(pack, translation_key="renamed"), ["translation_key"]),
    ]
    with (
        psycopg.connect(ledger_db_url) as holder,
        psycopg.connect(ledger_db_url, autocommit=True) as prober,
    ):
        holder.execute("SELECT 1 FROM credit_packs WHERE pack_id = %s FOR UPDATE", (pack.pack_id,))
        threads = [
            threading.Thread(target=_update_pack, args=(admin, *update)) for update in updates
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 5
        while _waiting_on_a_lock(prober) < 2:
            assert time.monotonic() < deadline, "the updates never waited for the pack"
            time.sleep(0.01)
        holder.rollback()
    for thread in threads:
        thread.join(timeout=10)
    stored = _stored(admin, pack.pack_id)
    assert (stored.price_minor, stored.translation_key) == (1190, "renamed")


def _waiting_on_a_lock(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        " AND query LIKE '%%credit_packs%%'"
    ).fetchone()
    assert row is not None
    return int(row[0])
