"""Pricing by the rate card (issue 4): callers describe usage, the ledger prices it."""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
import uuid
from fractions import Fraction
from typing import Any

import grpc
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.types.json import Jsonb

from ledger.v1 import admin_service_pb2 as admin_pb
from ledger.v1 import admin_service_pb2_grpc, ledger_service_pb2_grpc
from ledger.v1 import ledger_service_pb2 as pb
from ledger.v1 import types_pb2 as t
from ledger_server.demo.__main__ import load as load_demo
from ledger_server.ledger.validation import MAX_QUANTITY
from support.ledger import CREDIT, Ledger, expect_error, new_account, new_key

NOT_FOUND = grpc.StatusCode.NOT_FOUND


def _feature(name: str) -> str:
    """Feature codes of their own: the test database is shared."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


def _usage(feature: str, model: str = "", **quantities: int) -> t.Usage:
    return t.Usage(
        feature=feature,
        model=model,
        quantities=[
            t.UsageQuantity(unit=t.UsageUnit.Value(f"USAGE_UNIT_{unit.upper()}"), quantity=q)
            for unit, q in quantities.items()
        ],
    )


def _set_price(
    admin: admin_service_pb2_grpc.AdminServiceStub,
    feature: str,
    unit: str,
    micros: int,
    model: str = "",
    unit_size: int = 1,
) -> admin_pb.Price:
    return admin.SetPrice(
        admin_pb.SetPriceRequest(
            price=admin_pb.Price(
                feature=feature,
                model=model,
                unit=t.UsageUnit.Value(f"USAGE_UNIT_{unit.upper()}"),
                unit_size=unit_size,
                unit_price_micros=micros,
            ),
            idempotency_key=new_key(),
        )
    ).price


def _consume(ledger: Ledger, account: str, usage: t.Usage) -> pb.ConsumeResponse:
    return ledger.stub.Consume(
        pb.ConsumeRequest(account_id=account, idempotency_key=new_key(), usage=usage)
    )


def test_seed_004_action_matrix(ledger: Ledger, admin: Any, assert_audit_clean: Any) -> None:
    text_to_image, erase, upscale = _feature("t2i"), _feature("erase"), _feature("upscale")
    _set_price(admin, text_to_image, "generations", 8 * CREDIT)
    _set_price(admin, erase, "generations", 7 * CREDIT)
    _set_price(admin, upscale, "generations", 0)
    account = new_account()
    ledger.grant(account, 1500)

    assert _consume(
        ledger, account, _usage(text_to_image, generations=1)
    ).balance.balance_micros == (1492 * CREDIT)
    assert _consume(ledger, account, _usage(erase, generations=1)).balance.balance_micros == (
        1485 * CREDIT
    )
    free = _consume(ledger, account, _usage(upscale, generations=1))
    assert free.balance.balance_micros == 1485 * CREDIT
    assert free.reservation.committed_micros == 0

    log = ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_CHARGE])
    assert [(e.feature, e.amount_micros) for e in log] == [
        (upscale, 0),
        (erase, -7 * CREDIT),
        (text_to_image, -8 * CREDIT),
    ]
    assert log[0].status == pb.TRANSACTION_STATUS_SUCCEEDED
    assert log[0].usage.lines[0].unit_price_micros == 0
    assert_audit_clean()


def test_a_zero_priced_action_runs_even_at_zero_balance(ledger: Ledger, admin: Any) -> None:
    upscale = _feature("upscale")
    _set_price(admin, upscale, "generations", 0)
    account = new_account()
    ledger.grant(account, 1)
    ledger.consume(account, CREDIT)
    assert _consume(ledger, account, _usage(upscale, generations=3)).balance.balance_micros == 0


def _hand_priced(input_tokens: int, output_tokens: int) -> int:
    """0.5 credit per 1K input tokens, 1.5 per 1K output tokens, model x2.5, rounded up
    once per call to a whole micro-credit."""
    exact = (
        Fraction(input_tokens * 500_000, 1000) + Fraction(output_tokens * 1_500_000, 1000)
    ) * Fraction(5, 2)
    return math.ceil(exact)


@pytest.mark.slow
def test_token_pricing_is_exact_over_ten_thousand_calls(
    ledger: Ledger, admin: Any, server_address: str, assert_audit_clean: Any
) -> None:
    chat, model = _feature("chat"), f"pro-{uuid.uuid4().hex[:8]}"
    _set_price(admin, chat, "input_tokens", 500_000, unit_size=1000)
    _set_price(admin, chat, "output_tokens", 1_500_000, unit_size=1000)
    admin.SetModelMultiplier(
        admin_pb.SetModelMultiplierRequest(
            multiplier=admin_pb.ModelMultiplier(model=model, multiplier_ppm=2_500_000),
            idempotency_key=new_key(),
        )
    )
    # One call, checked by hand: 1234 in, 567 out -> (617 000 + 850 500) x 2.5 = 3 668 750.
    assert _hand_priced(1234, 567) == 3_668_750
    estimate = ledger.stub.Estimate(
        pb.EstimateRequest(usage=_usage(chat, model, input_tokens=1234, output_tokens=567))
    ).usage
    assert estimate.cost_micros == 3_668_750
    assert [line.multiplier_ppm for line in estimate.lines] == [2_500_000, 2_500_000]

    rng = random.Random(4)
    calls = [(rng.randint(0, 9999), rng.randint(0, 4999)) for _ in range(10_000)]
    expected = [_hand_priced(i, o) for i, o in calls]
    assert len({cost % 1000 for cost in expected}) > 1  # the calls do round differently
    accounts = [new_account("tokens") for _ in range(8)]
    for account in accounts:
        ledger.grant(account, 1_000_000)

    async def run() -> list[int]:
        async with grpc.aio.insecure_channel(server_address) as channel:
            stub = ledger_service_pb2_grpc.LedgerServiceStub(channel)
            semaphore = asyncio.Semaphore(32)

            async def one(n: int, tokens: tuple[int, int]) -> int:
                async with semaphore:
                    response = await stub.Consume(
                        pb.ConsumeRequest(
                            account_id=accounts[n % len(accounts)],
                            idempotency_key=f"tokens-{n}",
                            usage=_usage(
                                chat, model, input_tokens=tokens[0], output_tokens=tokens[1]
                            ),
                        )
                    )
                    return int(response.reservation.committed_micros)

            return await asyncio.gather(*(one(n, tokens) for n, tokens in enumerate(calls)))

    charged = asyncio.run(run())
    assert charged == expected
    spent = sum(1_000_000 * CREDIT - ledger.balance(a).balance_micros for a in accounts)
    assert spent == sum(expected)
    assert_audit_clean()


def test_seed_002_image_model_per_generation(ledger: Ledger, admin: Any) -> None:
    images = _feature("image.generate")
    _set_price(admin, images, "generations", 500_000, model="gpt-image-1.5-all")
    account = new_account()
    ledger.grant(account, 30)
    charge = _consume(ledger, account, _usage(images, "gpt-image-1.5-all", generations=3))
    assert charge.reservation.committed_micros == 1_500_000
    assert charge.balance.balance_micros == 28_500_000
    [entry] = ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_CHARGE])
    assert (entry.feature, entry.model) == (images, "gpt-image-1.5-all")
    [line] = entry.usage.lines
    assert (line.unit, line.quantity, line.unit_price_micros) == (
        t.USAGE_UNIT_GENERATIONS,
        3,
        500_000,
    )
    assert line.price_version


def test_seed_002_workflow_debited_at_start_and_refunded_in_full_on_failure(
    ledger: Ledger, admin: Any, assert_audit_clean: Any
) -> None:
    workflow = _feature("workflow")
    _set_price(admin, workflow, "workflow_runs", 20 * CREDIT, model="creator-video")
    account = new_account()
    ledger.grant(account, 50)
    started = _consume(ledger, account, _usage(workflow, "creator-video", workflow_runs=1))
    assert started.balance.balance_micros == 30 * CREDIT
    failed = ledger.refund(account, started.reservation.reservation_id)
    assert failed.refunded_micros == 20 * CREDIT
    assert failed.balance.balance_micros == 50 * CREDIT
    [charge] = ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_CHARGE])
    assert charge.status == pb.TRANSACTION_STATUS_REFUNDED
    assert_audit_clean()


def test_a_price_change_between_reserve_and_commit_does_not_change_that_reservation(
    ledger: Ledger, admin: Any, assert_audit_clean: Any
) -> None:
    chat = _feature("chat")
    old = _set_price(admin, chat, "output_tokens", 2 * CREDIT, unit_size=1000)
    account = new_account()
    ledger.grant(account, 100)
    reserved = ledger.stub.Reserve(
        pb.ReserveRequest(
            account_id=account,
            idempotency_key=new_key(),
            usage=_usage(chat, output_tokens=4000),  # at most 4000 tokens: 8 credits held
        )
    ).reservation
    assert reserved.held_micros == 8 * CREDIT
    assert reserved.usage.lines[0].price_version == old.price_version

    new = _set_price(admin, chat, "output_tokens", 5 * CREDIT, unit_size=1000)
    assert new.price_version != old.price_version
    committed = ledger.stub.Commit(
        pb.CommitRequest(
            account_id=account,
            reservation_id=reserved.reservation_id,
            idempotency_key=new_key(),
            usage=_usage("", output_tokens=2500),
        )
    )
    assert committed.reservation.committed_micros == 5 * CREDIT  # 2.5K tokens at the old 2/1K
    assert committed.balance.balance_micros == 95 * CREDIT
    [charge] = ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_CHARGE])
    assert charge.usage.lines[0].price_version == old.price_version
    assert charge.usage.lines[0].quantity == 2500
    # A new call pays the new price.
    assert _consume(
        ledger, account, _usage(chat, output_tokens=1000)
    ).reservation.committed_micros == (5 * CREDIT)
    assert_audit_clean()


def test_a_hold_of_an_amount_settled_by_usage_is_priced_as_the_holds_feature(
    ledger: Ledger, admin: Any, assert_audit_clean: Any
) -> None:
    chat = _feature("chat")
    _set_price(admin, chat, "tokens", 2 * CREDIT, unit_size=1000)
    account = new_account()
    ledger.grant(account, 100)
    held = ledger.reserve(account, 10 * CREDIT, feature=chat).reservation
    committed = ledger.stub.Commit(
        pb.CommitRequest(
            account_id=account,
            reservation_id=held.reservation_id,
            idempotency_key=new_key(),
            usage=_usage("", tokens=1500),  # the feature is the hold's
        )
    )
    assert committed.reservation.committed_micros == 3 * CREDIT
    [charge] = ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_CHARGE])
    assert charge.feature == chat
    assert_audit_clean()


def _commit_usage(ledger: Ledger, account: str, reservation_id: str, usage: t.Usage) -> Any:
    return ledger.stub.Commit(
        pb.CommitRequest(
            account_id=account,
            reservation_id=reservation_id,
            idempotency_key=new_key(),
            usage=usage,
        )
    )


def _refused_field(call: Any) -> str:
    info = expect_error(call, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD")
    return str(info.metadata["field"])


def _commit_usage_beside_a_consume(
    url: str, account: str, reservation_id: str, feature: str, model: str, units: dict[str, int]
) -> list[dict[str, Any]]:
    """A Commit of a usage and a Consume of one credit in one group-commit batch
    (ledger_consume_batch, 0007_coalesced.sql): each call's result."""
    usage = {
        "feature": feature,
        "model": model,
        "quantities": [{"unit": unit, "quantity": n} for unit, n in units.items()],
    }
    batch = [
        {"op": "commit", "account": account, "key": new_key(), "hash": "00",
         "reservation_id": reservation_id, "amount": None, "comment": "", "usage": usage},
        {"op": "consume", "account": account, "key": new_key(), "hash": "00",
         "amount": CREDIT, "usage": None, "feature": "", "comment": ""},
    ]  # fmt: skip
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT ledger_consume_batch(%s, now())", (Jsonb(batch),)).fetchone()
    assert row is not None
    return list(row[0])


def test_a_usage_naming_another_feature_or_model_than_the_hold_is_refused(
    ledger: Ledger, admin: Any, ledger_db_url: str, assert_audit_clean: Any
) -> None:
    """A Commit's usage naming another feature than the hold's was priced as that one and
    rewrote the reservation's feature, the hold's entry staying under the first: filtering
    by either listed half of the reservation. It is refused by field, nothing changed, on
    the call-by-call path and in a group-commit batch alike; a usage naming the hold's
    feature, or none, settles it."""
    chat, other = _feature("chat"), _feature("other")
    _set_price(admin, chat, "tokens", 2 * CREDIT, unit_size=1000)
    _set_price(admin, other, "tokens", CREDIT, unit_size=1000)
    account = new_account()
    ledger.grant(account, 100)
    of_amount = ledger.reserve(account, 10 * CREDIT, feature=chat).reservation
    by_usage = ledger.stub.Reserve(
        pb.ReserveRequest(
            account_id=account, idempotency_key=new_key(), usage=_usage(chat, tokens=2000)
        )
    ).reservation
    refusals = [
        (of_amount, _usage(other, tokens=1500), "usage.feature"),
        (by_usage, _usage(other, tokens=1500), "usage.feature"),
        # Priced for no model: another model's prices are not the hold's.
        (by_usage, _usage("", "m1", tokens=1500), "usage.model"),
    ]
    for held, usage, field in refusals:
        refused = _refused_field(
            lambda held=held, usage=usage: _commit_usage(
                ledger, account, held.reservation_id, usage
            )
        )
        assert refused == field, (held.reservation_id, usage)
    # In a batch (the group commit: 0007_coalesced.sql), the same call is refused alone.
    in_batch, consumed = _commit_usage_beside_a_consume(
        ledger_db_url, account, of_amount.reservation_id, other, "", {"tokens": 1500}
    )
    assert in_batch.get("error", {}).get("sqlstate") == "LE010", in_batch
    assert "usage.feature" in str(in_batch["error"]["detail"])
    assert "ok" in consumed

    balance = ledger.balance(account)
    assert (balance.balance_micros, balance.held_micros) == (99 * CREDIT, 14 * CREDIT)
    assert ledger.transactions(account, feature=other) == []
    for held in (of_amount, by_usage):
        reservation = ledger.stub.GetReservation(
            pb.GetReservationRequest(account_id=account, reservation_id=held.reservation_id)
        ).reservation
        assert (reservation.status, reservation.feature) == (pb.RESERVATION_STATUS_PENDING, chat)

    # The hold's own feature named is no other: each settles as the hold's.
    named = _commit_usage(ledger, account, of_amount.reservation_id, _usage(chat, tokens=1500))
    assert named.reservation.committed_micros == 3 * CREDIT
    named = _commit_usage(ledger, account, by_usage.reservation_id, _usage(chat, tokens=1000))
    assert named.reservation.committed_micros == 2 * CREDIT
    listed = ledger.transactions(account, feature=chat)
    assert sorted(pb.TransactionKind.Name(e.kind) for e in listed) == [
        "TRANSACTION_KIND_CHARGE",
        "TRANSACTION_KIND_CHARGE",
        "TRANSACTION_KIND_HOLD",
        "TRANSACTION_KIND_HOLD",
    ]
    assert_audit_clean()


def test_a_consume_or_reserve_naming_another_feature_than_its_usage_is_refused(
    ledger: Ledger, admin: Any
) -> None:
    """A Consume or Reserve whose feature contradicted its usage's was priced and filed under
    the usage's feature and the other dropped without a word (the client refuses it). It is
    refused naming feature, nothing charged; the usage's own feature, or none, is taken."""
    chat = _feature("chat")
    _set_price(admin, chat, "tokens", 2 * CREDIT, unit_size=1000)
    account = new_account()
    ledger.grant(account, 100)
    usage = _usage(chat, tokens=1000)

    def consume(feature: str) -> Any:
        return ledger.stub.Consume(
            pb.ConsumeRequest(
                account_id=account, idempotency_key=new_key(), usage=usage, feature=feature
            )
        )

    def reserve(feature: str) -> Any:
        return ledger.stub.Reserve(
            pb.ReserveRequest(
                account_id=account, idempotency_key=new_key(), usage=usage, feature=feature
            )
        )

    for call in (consume, reserve):
        assert _refused_field(lambda call=call: call(_feature("image"))) == "feature"
        # Refused as too long, not echoed into a status larger than gRPC's metadata limit.
        assert _refused_field(lambda call=call: call("f" * 20_000)) == "feature"
    balance = ledger.balance(account)
    assert (balance.balance_micros, balance.held_micros) == (100 * CREDIT, 0)

    for feature in ("", chat):
        assert consume(feature).reservation.feature == chat
        assert reserve(feature).reservation.feature == chat
    balance = ledger.balance(account)
    assert (balance.balance_micros, balance.held_micros) == (96 * CREDIT, 4 * CREDIT)


@pytest.mark.parametrize("first", ["spelled", "left empty"])
def test_a_retry_spelling_out_or_leaving_out_the_usages_feature_is_the_same_request(
    ledger: Ledger, admin: Any, first: str
) -> None:
    """With a usage, feature is empty or the usage's own: the same request either way. The
    client's consume(feature=F, usage=...) spells it and consume(usage=Usage(feature=F))
    does not; a retry in the other form was refused IDEMPOTENCY_KEY_REUSED (helper-164)."""
    chat = _feature("chat")
    _set_price(admin, chat, "tokens", 2 * CREDIT, unit_size=1000)
    account = new_account()
    ledger.grant(account, 100)
    usage = _usage(chat, tokens=1000)
    forms = ["", chat] if first == "left empty" else [chat, ""]
    consume_key, reserve_key = new_key(), new_key()
    answers = [
        (
            ledger.stub.Consume(
                pb.ConsumeRequest(
                    account_id=account, idempotency_key=consume_key, usage=usage, feature=feature
                )
            ),
            ledger.stub.Reserve(
                pb.ReserveRequest(
                    account_id=account, idempotency_key=reserve_key, usage=usage, feature=feature
                )
            ),
        )
        for feature in forms
    ]
    (consumed, reserved), (consumed_again, reserved_again) = answers
    assert consumed_again.transaction_id == consumed.transaction_id
    assert reserved_again.reservation.reservation_id == reserved.reservation.reservation_id
    balance = ledger.balance(account)
    assert (balance.balance_micros, balance.held_micros) == (98 * CREDIT, 2 * CREDIT)


def test_a_hold_naming_no_feature_settled_by_a_usage_naming_one_is_listed_whole_under_it(
    ledger: Ledger, admin: Any, ledger_db_url: str, assert_audit_clean: Any
) -> None:
    """The charge, the reservation and its refunds take the usage's feature and model; the
    hold's entry, written before, named none and was listed under neither filter. It is
    listed (and filtered) under them, through the group commit's batch path too."""
    images, premium = _feature("image.generate"), f"premium-{uuid.uuid4().hex[:8]}"
    _set_price(admin, images, "generations", CREDIT)
    _set_multiplier(admin, premium, 2_000_000)
    account = new_account()
    ledger.grant(account, 100)
    alone = ledger.reserve(account, 10 * CREDIT).reservation  # no feature
    batched = ledger.reserve(account, 10 * CREDIT).reservation
    unsettled = ledger.reserve(account, CREDIT).reservation  # stays under no feature

    committed = _commit_usage(
        ledger, account, alone.reservation_id, _usage(images, premium, generations=2)
    )
    assert committed.reservation.committed_micros == 4 * CREDIT
    assert (committed.reservation.feature, committed.reservation.model) == (images, premium)
    ledger.refund(account, alone.reservation_id, CREDIT)
    results = _commit_usage_beside_a_consume(
        ledger_db_url, account, batched.reservation_id, images, premium, {"generations": 1}
    )
    assert all("ok" in result for result in results), results

    expected = [
        (batched.reservation_id, "TRANSACTION_KIND_CHARGE"),
        (alone.reservation_id, "TRANSACTION_KIND_REFUND"),
        (alone.reservation_id, "TRANSACTION_KIND_CHARGE"),
        (batched.reservation_id, "TRANSACTION_KIND_HOLD"),
        (alone.reservation_id, "TRANSACTION_KIND_HOLD"),
    ]
    for listed in (
        ledger.transactions(account, feature=images),
        ledger.transactions(account, model=premium),
    ):
        assert [(e.reservation_id, pb.TransactionKind.Name(e.kind)) for e in listed] == expected
        assert {(e.feature, e.model) for e in listed} == {(images, premium)}
    # The whole log shows the hold's entries so too, and the unsettled hold as it was.
    entries = {
        (e.reservation_id, e.kind): e
        for e in ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_HOLD])
    }
    hold = entries[(alone.reservation_id, pb.TRANSACTION_KIND_HOLD)]
    assert (hold.feature, hold.model) == (images, premium)
    other = entries[(unsettled.reservation_id, pb.TRANSACTION_KIND_HOLD)]
    assert (other.feature, other.model) == ("", "")
    assert_audit_clean()


def test_a_price_change_waits_for_one_in_flight_so_the_last_committed_is_in_force(
    ledger_db_url: str, admin: Any
) -> None:
    """Versions were drawn at insert: a change that drew its version first but committed
    last was not in force (helper-55). A change now waits for one in flight of the same
    price (lock_rate_card_entry), and so draws its version after that one's commit."""
    chat = _feature("chat")
    _set_price(admin, chat, "tokens", 1 * CREDIT)
    with psycopg.connect(ledger_db_url) as in_flight:
        in_flight.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
            (f"rate-card:price:{chat}//tokens",),
        )
        in_flight.execute(
            "INSERT INTO prices (feature, model, unit, unit_size, unit_price_micros, active,"
            " created_by, created_at) VALUES (%s, '', 'tokens', 1, %s, true, 'other', now())",
            (chat, 2 * CREDIT),
        )
        later = threading.Thread(target=lambda: _set_price(admin, chat, "tokens", 3 * CREDIT))
        later.start()
        try:
            with psycopg.connect(ledger_db_url, autocommit=True) as watcher:
                for _ in range(400):
                    row = watcher.execute(
                        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
                        " WHERE l.locktype = 'advisory' AND NOT l.granted"
                        " AND a.query LIKE '%rate-card%'"
                    ).fetchone()
                    if row and row[0]:
                        break
                    time.sleep(0.025)
                else:
                    pytest.fail("the change did not wait for the one in flight")
            in_flight.commit()
        finally:
            later.join(30)
    prices = admin.ListPrices(admin_pb.ListPricesRequest(feature=chat)).prices
    assert [p.unit_price_micros for p in prices] == [3 * CREDIT]


def test_usage_naming_no_feature_on_a_hold_naming_none_is_refused_by_field(
    ledger: Ledger, assert_audit_clean: Any
) -> None:
    """Bad input, not a rate card lacking a feature named '' (helper-55: it answered
    NOT_FOUND FEATURE_NOT_FOUND); the hold stays as it was."""
    account = new_account()
    ledger.grant(account, 100)
    held = ledger.reserve(account, 10 * CREDIT).reservation  # no feature
    info = expect_error(
        lambda: ledger.stub.Commit(
            pb.CommitRequest(
                account_id=account,
                reservation_id=held.reservation_id,
                idempotency_key=new_key(),
                usage=_usage("", tokens=1500),
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FIELD",
    )
    assert info.metadata["field"] == "usage.feature"
    balance = ledger.balance(account)
    assert (balance.balance_micros, balance.held_micros) == (100 * CREDIT, 10 * CREDIT)
    assert_audit_clean()


def test_a_charge_records_the_usage_it_was_priced_from_and_none_when_of_an_amount(
    ledger: Ledger, admin: Any, assert_audit_clean: Any
) -> None:
    """Transaction.usage is for a charge priced by the rate card: a usage-priced hold
    settled by an amount was not, so its charge shows no usage (helper-55: it showed the
    hold's estimate, 4000 tokens costing 8 credits, on a charge of 1 credit)."""
    chat = _feature("chat")
    _set_price(admin, chat, "output_tokens", 2 * CREDIT, unit_size=1000)
    account = new_account()
    ledger.grant(account, 100)

    def reserve() -> pb.Reservation:
        return ledger.stub.Reserve(
            pb.ReserveRequest(
                account_id=account,
                idempotency_key=new_key(),
                usage=_usage(chat, output_tokens=4000),  # 8 credits held
            )
        ).reservation

    by_amount, by_usage = reserve(), reserve()
    ledger.stub.Commit(
        pb.CommitRequest(
            account_id=account,
            reservation_id=by_amount.reservation_id,
            idempotency_key=new_key(),
            amount_micros=CREDIT,
        )
    )
    ledger.stub.Commit(
        pb.CommitRequest(
            account_id=account,
            reservation_id=by_usage.reservation_id,
            idempotency_key=new_key(),
            usage=_usage("", output_tokens=2500),
        )
    )
    charges = {
        entry.reservation_id: entry
        for entry in ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_CHARGE])
    }
    of_amount, of_usage = charges[by_amount.reservation_id], charges[by_usage.reservation_id]
    assert (of_amount.amount_micros, of_amount.feature) == (-CREDIT, chat)
    assert not of_amount.HasField("usage")
    assert of_usage.amount_micros == -5 * CREDIT
    assert of_usage.usage.cost_micros == 5 * CREDIT
    assert [
        (line.unit, line.quantity, line.unit_price_micros) for line in of_usage.usage.lines
    ] == [(t.USAGE_UNIT_OUTPUT_TOKENS, 2500, 2 * CREDIT)]
    # The hold's entry and the reservation keep the estimate the hold was priced from.
    holds = ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_HOLD])
    [hold] = [entry for entry in holds if entry.reservation_id == by_amount.reservation_id]
    assert hold.usage.cost_micros == 8 * CREDIT
    settled = ledger.stub.GetReservation(
        pb.GetReservationRequest(account_id=account, reservation_id=by_amount.reservation_id)
    ).reservation
    assert (settled.committed_micros, settled.usage.cost_micros) == (CREDIT, 8 * CREDIT)
    assert_audit_clean()


def test_usage_that_prices_past_any_amount_is_refused_by_field(ledger: Ledger, admin: Any) -> None:
    dear = _feature("dear")
    _set_price(admin, dear, "tokens", 10**15)  # the most a unit may cost
    account = new_account()
    ledger.grant(account, 1)
    for call in (
        lambda: ledger.stub.Estimate(pb.EstimateRequest(usage=_usage(dear, tokens=10**12))),
        lambda: _consume(ledger, account, _usage(dear, tokens=10**12)),
    ):
        expect_error(call, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD", "usage.quantities")
    assert ledger.balance(account).balance_micros == CREDIT


def test_commit_above_the_held_usage_is_refused(ledger: Ledger, admin: Any) -> None:
    chat = _feature("chat")
    _set_price(admin, chat, "tokens", 1 * CREDIT, unit_size=1000)
    account = new_account()
    ledger.grant(account, 100)
    reserved = ledger.stub.Reserve(
        pb.ReserveRequest(
            account_id=account, idempotency_key=new_key(), usage=_usage(chat, tokens=1000)
        )
    ).reservation
    expect_error(
        lambda: ledger.stub.Commit(
            pb.CommitRequest(
                account_id=account,
                reservation_id=reserved.reservation_id,
                idempotency_key=new_key(),
                usage=_usage("", tokens=1001),
            )
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "AMOUNT_EXCEEDS_HOLD",
    )


def test_estimate_equals_what_consume_charges(ledger: Ledger, admin: Any) -> None:
    chat, model = _feature("chat"), f"basic-{uuid.uuid4().hex[:8]}"
    _set_price(admin, chat, "input_tokens", 333, unit_size=7)
    _set_price(admin, chat, "output_tokens", 1_000_001, unit_size=1000)
    admin.SetModelMultiplier(
        admin_pb.SetModelMultiplierRequest(
            multiplier=admin_pb.ModelMultiplier(model=model, multiplier_ppm=1_333_333),
            idempotency_key=new_key(),
        )
    )
    account = new_account()
    ledger.grant(account, 1000)
    for tokens in [(1, 1), (777, 12_345), (99_999, 3)]:
        usage = _usage(chat, model, input_tokens=tokens[0], output_tokens=tokens[1])
        estimate = ledger.stub.Estimate(pb.EstimateRequest(usage=usage)).usage
        charged = _consume(ledger, account, usage).reservation
        assert charged.committed_micros == estimate.cost_micros
        assert charged.usage == estimate


@pytest.mark.parametrize(
    ("unit_price", "unit_size", "quantity", "exact"),
    [
        (2, 3, 1, 2),  # 2/3 micro a line: three make exactly 2
        (CREDIT, 60, 40, 2 * CREDIT),  # 666 666.67 micros a line: three make exactly 2 credits
    ],
)
def test_lines_that_each_leave_a_fraction_add_up_exactly_before_the_one_rounding(
    ledger: Ledger, admin: Any, unit_price: int, unit_size: int, quantity: int, exact: int
) -> None:
    chat = _feature("chat")
    units = ("input_tokens", "output_tokens", "tokens")
    for unit in units:
        _set_price(admin, chat, unit, unit_price, unit_size=unit_size)
    usage = _usage(chat, **dict.fromkeys(units, quantity))
    assert ledger.stub.Estimate(pb.EstimateRequest(usage=usage)).usage.cost_micros == exact
    account = new_account()
    ledger.grant(account, 10)
    charged = _consume(ledger, account, usage)
    assert charged.reservation.committed_micros == exact
    assert charged.balance.balance_micros == 10 * CREDIT - exact


_UNITS = ("tokens", "input_tokens", "output_tokens", "images", "generations", "video_seconds")
_BIGINT_MAX = 2**63 - 1


def _snapshot_line(unit: str, price: int, size: int, multiplier: int) -> dict[str, object]:
    return {
        "unit": unit,
        "unit_price_micros": price,
        "unit_size": size,
        "multiplier_ppm": multiplier,
        "price_version": "1",
        "multiplier_version": None,
    }


def test_the_cost_is_the_exact_sum_rounded_up_once(ledger_db_url: str) -> None:
    """ledger_price_usage against fractions.Fraction, with the prices given as a snapshot
    (the path a Commit of a usage-priced hold takes; the rate card's differs only in where
    the prices come from)."""
    sizes = st.one_of(st.sampled_from([1, 3, 7, 60, 1000, 999_983]), st.integers(1, 10**9))
    prices = st.one_of(st.integers(0, 1000), st.integers(0, 10**15))
    multipliers = st.one_of(
        st.sampled_from([0, 1_000_000, 333_333, 2_500_000]), st.integers(0, 10**8)
    )
    quantities = st.one_of(st.integers(0, 100), st.integers(0, MAX_QUANTITY))
    lines = st.lists(
        st.tuples(prices, sizes, multipliers, quantities), min_size=1, max_size=len(_UNITS)
    )
    with psycopg.connect(ledger_db_url, autocommit=True) as conn:

        def priced(lines: list[tuple[int, int, int, int]]) -> int:
            snapshot = {
                "lines": [
                    _snapshot_line(_UNITS[i], price, size, multiplier)
                    for i, (price, size, multiplier, _) in enumerate(lines)
                ]
            }
            quantities = [{"unit": _UNITS[i], "quantity": line[3]} for i, line in enumerate(lines)]
            row = conn.execute(
                "SELECT ledger_price_usage('chat', '', %s::jsonb, %s::jsonb) ->> 'cost_micros'",
                (Jsonb(quantities), Jsonb(snapshot)),
            ).fetchone()
            assert row is not None
            return int(row[0])

        @settings(
            max_examples=1000,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(lines=lines)
        def check(lines: list[tuple[int, int, int, int]]) -> None:
            exact = sum(
                (Fraction(quantity * price * multiplier, size * 1_000_000))
                for price, size, multiplier, quantity in lines
            )
            if math.ceil(exact) > _BIGINT_MAX:
                with pytest.raises(psycopg.Error) as raised:
                    priced(lines)
                assert raised.value.sqlstate == "LE010"
            else:
                assert priced(lines) == math.ceil(exact), lines

        check()
        # At the edge of an amount: exactly the largest bigint is a cost, one more is not.
        assert priced([(1, 1, 1_000_000, _BIGINT_MAX)]) == _BIGINT_MAX
        assert priced([(1, 3, 1_000_000, 1), (1, 3, 1_000_000, 2), (1, 1, 1_000_000, 2**62)]) == (
            2**62 + 1
        )
        with pytest.raises(psycopg.Error) as raised:
            priced([(1, 1, 1_000_000, _BIGINT_MAX), (1, 3, 1_000_000, 1)])
        assert raised.value.sqlstate == "LE010"


def test_unknown_feature_or_model_is_not_found_and_charges_nothing(
    ledger: Ledger, admin: Any
) -> None:
    images = _feature("image.generate")
    _set_price(admin, images, "generations", 500_000, model="known-model")
    account = new_account()
    ledger.grant(account, 10)
    before = (ledger.balance(account).balance_micros, len(ledger.transactions(account)))

    missing = _feature("no-such-feature")
    info = expect_error(
        lambda: _consume(ledger, account, _usage(missing, generations=1)),
        NOT_FOUND,
        "FEATURE_NOT_FOUND",
    )
    assert info.metadata["feature"] == missing
    info = expect_error(
        lambda: _consume(ledger, account, _usage(images, "no-such-model", generations=1)),
        NOT_FOUND,
        "MODEL_NOT_FOUND",
    )
    assert info.metadata["model"] == "no-such-model"
    info = expect_error(
        lambda: _consume(ledger, account, _usage(images, "known-model", images=1)),
        NOT_FOUND,
        "PRICE_NOT_FOUND",
    )
    assert info.metadata["unit"] == "images"
    expect_error(
        lambda: ledger.stub.Estimate(pb.EstimateRequest(usage=_usage(missing, generations=1))),
        NOT_FOUND,
        "FEATURE_NOT_FOUND",
    )
    assert (ledger.balance(account).balance_micros, len(ledger.transactions(account))) == before


def test_usage_and_amount_are_exclusive(ledger: Ledger) -> None:
    account = new_account()
    ledger.grant(account, 10)
    for request in (
        pb.ConsumeRequest(account_id=account, idempotency_key=new_key()),
        pb.ConsumeRequest(
            account_id=account,
            idempotency_key=new_key(),
            amount_micros=CREDIT,
            usage=_usage("chat", tokens=1),
        ),
    ):
        expect_error(
            lambda request=request: ledger.stub.Consume(request),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_FIELD",
            "amount_micros",
        )
    expect_error(
        lambda: ledger.stub.Consume(
            pb.ConsumeRequest(
                account_id=account, idempotency_key=new_key(), usage=t.Usage(feature="chat")
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FIELD",
        "usage.quantities",
    )


def test_a_removed_price_is_gone_and_versions_stay(ledger: Ledger, admin: Any) -> None:
    feature = _feature("erase")
    first = _set_price(admin, feature, "generations", 7 * CREDIT)
    listed = admin.ListPrices(admin_pb.ListPricesRequest(feature=feature)).prices
    assert [(p.unit_price_micros, p.price_version, p.updated_by) for p in listed] == [
        (7 * CREDIT, first.price_version, "test-admin")
    ]
    admin.RemovePrice(
        admin_pb.RemovePriceRequest(
            feature=feature, unit=t.USAGE_UNIT_GENERATIONS, idempotency_key=new_key()
        )
    )
    assert list(admin.ListPrices(admin_pb.ListPricesRequest(feature=feature)).prices) == []
    expect_error(
        lambda: ledger.stub.Estimate(pb.EstimateRequest(usage=_usage(feature, generations=1))),
        NOT_FOUND,
        "FEATURE_NOT_FOUND",
    )


def test_rate_card_keys_are_checked_by_field(admin: Any) -> None:
    feature = _feature("keys")
    _set_price(admin, feature, "generations", CREDIT)
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    for call, field in [
        (lambda: _set_price(admin, "chat\n", "generations", CREDIT), "price.feature"),
        (lambda: _set_price(admin, feature, "generations", CREDIT, model="m\n"), "price.model"),
        (
            lambda: admin.SetModelMultiplier(
                admin_pb.SetModelMultiplierRequest(
                    multiplier=admin_pb.ModelMultiplier(model="m\n", multiplier_ppm=1_000_000),
                    idempotency_key=new_key(),
                )
            ),
            "multiplier.model",
        ),
        (
            lambda: admin.RemovePrice(
                admin_pb.RemovePriceRequest(feature=feature, idempotency_key=new_key())
            ),
            "unit",
        ),
        (
            lambda: admin.RemovePrice(
                admin_pb.RemovePriceRequest(
                    feature="", unit=t.USAGE_UNIT_GENERATIONS, idempotency_key=new_key()
                )
            ),
            "feature",
        ),
    ]:
        expect_error(call, invalid, "INVALID_FIELD", field)
    # Of this feature: a page of the whole rate card need not reach it.
    assert len(admin.ListPrices(admin_pb.ListPricesRequest(feature=feature)).prices) == 1


def test_the_demo_catalogue_loads_and_prices_the_seeds(
    admin_channel: grpc.Channel, ledger: Ledger
) -> None:
    load_demo(admin_channel)
    assert load_demo(admin_channel)["prices"] == 0  # loading again writes no new versions

    def cost(usage: t.Usage) -> int:
        return int(ledger.stub.Estimate(pb.EstimateRequest(usage=usage)).usage.cost_micros)

    assert cost(_usage("text-to-image", generations=1)) == 8 * CREDIT
    assert cost(_usage("erase", generations=1)) == 7 * CREDIT
    assert cost(_usage("upscale", generations=1)) == 0
    assert cost(_usage("image.generate", "grok-imagine-image", generations=1)) == CREDIT // 2
    assert cost(_usage("video.generate", "grok-video-3", generations=2)) == CREDIT
    assert cost(_usage("workflow", "creator-video", workflow_runs=1)) == 20 * CREDIT
    assert cost(_usage("chat", "pro", input_tokens=1000, output_tokens=1000)) == 5 * CREDIT


def test_transactions_filter_by_model(ledger: Ledger, admin: Any) -> None:
    images = _feature("image.generate")
    _set_price(admin, images, "generations", 500_000, model="model-a")
    _set_price(admin, images, "generations", 700_000, model="model-b")
    account = new_account()
    ledger.grant(account, 10)
    _consume(ledger, account, _usage(images, "model-a", generations=1))
    _consume(ledger, account, _usage(images, "model-b", generations=2))
    only_b = ledger.transactions(account, model="model-b")
    assert [(e.model, e.amount_micros) for e in only_b] == [("model-b", -1_400_000)]


def _set_multiplier(admin: Any, model: str, ppm: int) -> admin_pb.ModelMultiplier:
    return admin.SetModelMultiplier(
        admin_pb.SetModelMultiplierRequest(
            multiplier=admin_pb.ModelMultiplier(model=model, multiplier_ppm=ppm),
            idempotency_key=new_key(),
        )
    ).multiplier


def test_a_model_multiplier_can_be_withdrawn_and_its_model_then_has_no_price(
    ledger: Ledger, admin: Any, assert_audit_clean: Any
) -> None:
    """A multiplier could only be changed, never withdrawn: after RemovePrice of a model's
    own price the model was still charged the feature-wide price times its multiplier, for
    good (helper-88)."""
    images, premium = _feature("image.generate"), f"premium-{uuid.uuid4().hex[:8]}"
    _set_price(admin, images, "generations", 100_000)
    first = _set_multiplier(admin, premium, 1_000_000)
    _set_price(admin, images, "generations", 5 * CREDIT, model=premium)

    def estimate() -> int:
        usage = _usage(images, premium, generations=1)
        return int(ledger.stub.Estimate(pb.EstimateRequest(usage=usage)).usage.cost_micros)

    assert estimate() == 5 * CREDIT
    admin.RemovePrice(
        admin_pb.RemovePriceRequest(
            feature=images, model=premium, unit=t.USAGE_UNIT_GENERATIONS, idempotency_key=new_key()
        )
    )
    assert estimate() == 100_000  # the feature-wide price x its multiplier, as documented
    account = new_account()
    ledger.grant(account, 10)
    held = ledger.stub.Reserve(
        pb.ReserveRequest(
            account_id=account,
            idempotency_key=new_key(),
            usage=_usage(images, premium, generations=1),
        )
    ).reservation

    key = new_key()
    request = admin_pb.RemoveModelMultiplierRequest(model=premium, idempotency_key=key)
    assert admin.RemoveModelMultiplier(request) == admin_pb.RemoveModelMultiplierResponse()
    listed = admin.ListModelMultipliers(admin_pb.ListModelMultipliersRequest()).multipliers
    assert premium not in [m.model for m in listed]
    info = expect_error(estimate, NOT_FOUND, "MODEL_NOT_FOUND")
    assert (info.metadata["feature"], info.metadata["model"]) == (images, premium)
    # A retry answers the first response; another removal finds nothing to withdraw.
    assert admin.RemoveModelMultiplier(request) == admin_pb.RemoveModelMultiplierResponse()
    info = expect_error(
        lambda: admin.RemoveModelMultiplier(
            admin_pb.RemoveModelMultiplierRequest(model=premium, idempotency_key=new_key())
        ),
        NOT_FOUND,
        "MULTIPLIER_NOT_FOUND",
    )
    assert info.metadata["model"] == premium
    expect_error(
        lambda: admin.RemoveModelMultiplier(
            admin_pb.RemoveModelMultiplierRequest(idempotency_key=new_key())
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FIELD",
        "model",
    )

    # The reservation made with the multiplier settles at the version it was priced with.
    committed = ledger.stub.Commit(
        pb.CommitRequest(
            account_id=account,
            reservation_id=held.reservation_id,
            idempotency_key=new_key(),
            usage=_usage("", generations=1),
        )
    ).reservation
    assert committed.committed_micros == 100_000
    assert committed.usage.lines[0].multiplier_version == first.multiplier_version

    # Set again, the multiplier is in force again, as a new version.
    again = _set_multiplier(admin, premium, 3_000_000)
    assert again.multiplier_version != first.multiplier_version
    assert estimate() == 300_000
    listed = admin.ListModelMultipliers(admin_pb.ListModelMultipliersRequest()).multipliers
    assert [m.multiplier_ppm for m in listed if m.model == premium] == [3_000_000]
    assert_audit_clean()


def test_a_model_with_prices_of_the_feature_but_not_per_a_unit_misses_that_price(
    ledger: Ledger, admin: Any
) -> None:
    """It was MODEL_NOT_FOUND when the feature had a feature-wide price per the unit: the
    model has prices, it misses one, per a unit to name (helper-88)."""
    chat, vision = _feature("chat"), f"vision-{uuid.uuid4().hex[:8]}"
    _set_price(admin, chat, "input_tokens", 1000, unit_size=1000)
    _set_price(admin, chat, "output_tokens", 2000, unit_size=1000)
    _set_price(admin, chat, "input_tokens", 3000, unit_size=1000, model=vision)

    def estimate(**quantities: int) -> int:
        usage = _usage(chat, vision, **quantities)
        return int(ledger.stub.Estimate(pb.EstimateRequest(usage=usage)).usage.cost_micros)

    assert estimate(input_tokens=1000) == 3000
    info = expect_error(
        lambda: estimate(input_tokens=1000, output_tokens=1000), NOT_FOUND, "PRICE_NOT_FOUND"
    )
    assert dict(info.metadata) == {"feature": chat, "model": vision, "unit": "output_tokens"}
    # With a multiplier the feature-wide price is the model's too.
    _set_multiplier(admin, vision, 2_000_000)
    assert estimate(input_tokens=1000, output_tokens=1000) == 3000 + 4000


def test_the_rate_card_is_listed_a_page_at_a_time(admin: Any, ledger_db_url: str) -> None:
    """All of it in one answer: 40,000 prices outgrew a gRPC message, RESOURCE_EXHAUSTED
    with no ErrorInfo (helper-88)."""
    chat = _feature("chat")
    with psycopg.connect(ledger_db_url) as conn:
        conn.execute(
            "INSERT INTO prices (feature, model, unit, unit_size, unit_price_micros, active,"
            " created_by, created_at)"
            " SELECT %s, 'model-' || lpad(g::text, 3, '0'), u, 1000, g, true, 'test', now()"
            "   FROM generate_series(1, 125) g, unnest(ARRAY['input_tokens', 'output_tokens']) u",
            (chat,),
        )
    first = admin.ListPrices(admin_pb.ListPricesRequest(feature=chat))
    assert len(first.prices) == 100 and first.next_page_token  # the default page size
    walked, token, pages = [], "", 0
    while True:
        page = admin.ListPrices(
            admin_pb.ListPricesRequest(feature=chat, page_size=60, page_token=token)
        )
        walked += [(p.model, p.unit) for p in page.prices]
        pages += 1
        if not (token := page.next_page_token):
            break
    assert pages == 5
    units = (t.USAGE_UNIT_INPUT_TOKENS, t.USAGE_UNIT_OUTPUT_TOKENS)
    assert walked == [(f"model-{g:03}", u) for g in range(1, 126) for u in units]
    whole = admin.ListPrices(admin_pb.ListPricesRequest(feature=chat, page_size=1000))
    assert len(whole.prices) == 250 and not whole.next_page_token
    expect_error(
        lambda: admin.ListPrices(
            admin_pb.ListPricesRequest(feature=_feature("other"), page_token=first.next_page_token)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FIELD",
        "page_token",
    )

    prefix = f"paged-{uuid.uuid4().hex[:8]}"
    models = [f"{prefix}-{n}" for n in range(3)]
    for model in models:
        _set_multiplier(admin, model, 1_000_000)
    listed, token = [], ""
    while True:
        multipliers = admin.ListModelMultipliers(
            admin_pb.ListModelMultipliersRequest(page_size=2, page_token=token)
        )
        assert len(multipliers.multipliers) <= 2
        listed += [m.model for m in multipliers.multipliers]
        if not (token := multipliers.next_page_token):
            break
    # Every multiplier once (the shared database holds other tests' too), ours in order.
    assert len(listed) == len(set(listed))
    assert [m for m in listed if m in models] == models
