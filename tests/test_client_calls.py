"""The typed Python client's coverage of LedgerService beyond the basics of test_client.py:
accounts, the daily reward, redemption codes, reward transfers, estimates, commits by usage,
the journal's model and status filters, through the sync and the asyncio client against the
real server; writes retried after a lost response replay instead of granting twice; and a
reservation's commit or release retried after an unknown outcome replays the first attempt,
and a block whose own commit timed out never gives its hold away.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from datetime import date, timedelta
from typing import Any

import psycopg
import pytest

from ledger.v1 import admin_service_pb2 as admin_pb
from ledger.v1 import ledger_service_pb2 as pb
from ledger.v1 import types_pb2
from ledger_client import (
    AccountNotFound,
    AlreadyExists,
    AsyncLedgerClient,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    LedgerClient,
    LedgerError,
)
from ledger_client._hold import REFUSED_RELEASE_REASON
from ledger_server.server import journal_pages
from support.client import FAST_RETRY
from support.ledger import CREDIT, Ledger, new_account, new_key
from support.proxy import DropProxy
from support.settings import SettingsChanger

DAILY = 3 * CREDIT
REFERRAL = 10 * CREDIT


@pytest.fixture
def rewards(configure: SettingsChanger) -> None:
    """Known reward amounts for this test (put back afterwards)."""
    configure("daily.enabled", True)
    configure("daily.amount_micros", DAILY)
    configure("referral.reward_micros", REFERRAL)


def feature(name: str) -> str:
    """A feature code of its own: the rate card is shared by the session."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


def set_price(
    admin: Any, feature: str, unit: types_pb2.UsageUnit.ValueType, micros: int, model: str = ""
) -> None:
    admin.SetPrice(
        admin_pb.SetPriceRequest(
            price=admin_pb.Price(feature=feature, model=model, unit=unit, unit_price_micros=micros),
            idempotency_key=new_key("price"),
        )
    )


def redemption_code(admin: Any, amount_micros: int) -> str:
    created = admin.CreateRedemptionBatch(
        admin_pb.CreateRedemptionBatchRequest(
            idempotency_key=new_key("batch"), amount_micros=amount_micros, code_count=1
        )
    )
    (code,) = created.codes
    return str(code)


def lot_sources(ledger: Ledger, account: str) -> list[int]:
    return sorted(lot.source for lot in ledger.lots(account, include_inactive=True))


# --- the new calls, sync ----------------------------------------------------------------------


@pytest.mark.usefixtures("rewards")
def test_accounts_and_referrals(client: LedgerClient) -> None:
    inviter, invitee = new_account("inviter"), new_account("invitee")
    created = client.create_account(inviter)
    assert created.account.account_id == inviter
    code = created.account.referral_code
    assert code
    assert not created.HasField("signup_lot")  # the session's baseline: no sign-up bonus

    fetched = client.get_account(inviter).account
    assert (fetched.account_id, fetched.referral_code) == (inviter, code)

    key = new_key("create")
    joined = client.create_account(invitee, referral_code=code, idempotency_key=key)
    assert joined.account.referred_by_account_id == inviter
    assert client.get_account(invitee).account.referred_by_account_id == inviter
    assert client.balance(inviter).reward_balance_micros == REFERRAL

    # The same key replays the creation: the inviter is not rewarded twice.
    replay = client.create_account(invitee, referral_code=code, idempotency_key=key)
    assert replay.account.referral_code == joined.account.referral_code
    # Another key is a second creation, refused.
    with pytest.raises(AlreadyExists) as again:
        client.create_account(invitee, referral_code=code)
    assert again.value.reason == "ACCOUNT_EXISTS"
    assert client.balance(inviter).reward_balance_micros == REFERRAL

    with pytest.raises(AccountNotFound):
        client.get_account(new_account("nobody"))


@pytest.mark.usefixtures("rewards")
def test_daily_reward_redeem_and_transfer(client: LedgerClient, ledger: Ledger, admin: Any) -> None:
    account = new_account("daily")
    key = new_key("day")
    claimed = client.claim_daily_reward(account, idempotency_key=key)
    assert claimed.lot.source == types_pb2.CREDIT_SOURCE_DAILY
    assert claimed.lot.amount_micros == DAILY
    assert claimed.next_claim_time.seconds > claimed.lot.created_at.seconds
    assert client.claim_daily_reward(account, idempotency_key=key).lot.lot_id == claimed.lot.lot_id
    with pytest.raises(FailedPrecondition) as twice:
        client.claim_daily_reward(account)
    assert twice.value.reason == "DAILY_REWARD_ALREADY_CLAIMED"

    code = redemption_code(admin, 7 * CREDIT)
    key = new_key("redeem")
    redeemed = client.redeem(account, code.lower(), idempotency_key=key)  # case does not matter
    assert redeemed.lot.source == types_pb2.CREDIT_SOURCE_REDEMPTION
    assert redeemed.lot.amount_micros == 7 * CREDIT
    assert redeemed.balance.balance_micros == DAILY + 7 * CREDIT
    assert client.redeem(account, code.lower(), idempotency_key=key).lot.lot_id == (
        redeemed.lot.lot_id
    )
    with pytest.raises(AlreadyExists) as redeemed_twice:
        client.redeem(account, code)
    assert redeemed_twice.value.reason == "REDEMPTION_CODE_ALREADY_REDEEMED"
    assert ledger.balance(account).balance_micros == DAILY + 7 * CREDIT

    inviter = new_account("inviter")
    referral_code = client.create_account(inviter).account.referral_code
    client.create_account(new_account("invitee"), referral_code=referral_code)
    key = new_key("transfer")
    moved = client.transfer_reward(inviter, 4 * CREDIT, idempotency_key=key)
    assert moved.transferred_micros == 4 * CREDIT
    assert moved.lot.source == types_pb2.CREDIT_SOURCE_REWARD_TRANSFER
    replay = client.transfer_reward(inviter, 4 * CREDIT, idempotency_key=key)
    assert replay.transaction_id == moved.transaction_id
    rest = client.transfer_reward(inviter)  # no amount: the whole reward balance
    assert rest.transferred_micros == REFERRAL - 4 * CREDIT
    balance = client.balance(inviter)
    assert (balance.balance_micros, balance.reward_balance_micros) == (REFERRAL, 0)
    assert len(ledger.transactions(inviter, kinds=[pb.TRANSACTION_KIND_TRANSFER])) == 2


def test_estimate_and_commit_by_usage(client: LedgerClient, ledger: Ledger, admin: Any) -> None:
    image, model = feature("image"), f"m-{uuid.uuid4().hex[:8]}"
    set_price(admin, image, types_pb2.USAGE_UNIT_GENERATIONS, 1_500_000)
    set_price(admin, image, types_pb2.USAGE_UNIT_GENERATIONS, 2 * CREDIT, model=model)

    estimate = client.estimate(image, {"generations": 2}).usage
    assert estimate.cost_micros == 3 * CREDIT
    [line] = estimate.lines
    assert (line.unit, line.quantity, line.unit_price_micros) == (
        types_pb2.USAGE_UNIT_GENERATIONS,
        2,
        1_500_000,
    )
    by_model = client.estimate(image, {types_pb2.USAGE_UNIT_GENERATIONS: 2}, model=model)
    assert (by_model.usage.model, by_model.usage.cost_micros) == (model, 4 * CREDIT)

    account = new_account("usage")
    ledger.grant(account, 20)
    held = client.reserve(account, 5 * CREDIT, feature=image).reservation
    committed = client.commit(account, held.reservation_id, usage={"generations": 2})
    assert committed.reservation.status == pb.RESERVATION_STATUS_COMMITTED
    assert committed.reservation.committed_micros == 3 * CREDIT
    assert committed.balance.balance_micros == 17 * CREDIT
    [charge] = ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_CHARGE])
    assert (charge.feature, charge.usage.cost_micros) == (image, 3 * CREDIT)

    # A Usage message names the model too: priced at that model's price.
    held = client.reserve(account, 5 * CREDIT, feature=image).reservation
    usage = types_pb2.Usage(
        model=model,
        quantities=[types_pb2.UsageQuantity(unit=types_pb2.USAGE_UNIT_GENERATIONS, quantity=2)],
    )
    key = new_key("commit")
    by_usage = client.commit(account, held.reservation_id, usage=usage, idempotency_key=key)
    assert by_usage.reservation.committed_micros == 4 * CREDIT
    replay = client.commit(account, held.reservation_id, usage=usage, idempotency_key=key)
    assert replay.transaction_id == by_usage.transaction_id
    # Listed under the model with its hold, which named none (README: either filter lists
    # a reservation's entries).
    by_model_entries = list(client.iter_transactions(account, model=model))
    assert [t.transaction_id for t in by_model_entries][:1] == [by_usage.transaction_id]
    assert [(t.kind, t.reservation_id) for t in by_model_entries] == [
        (pb.TRANSACTION_KIND_CHARGE, held.reservation_id),
        (pb.TRANSACTION_KIND_HOLD, held.reservation_id),
    ]
    assert ledger.balance(account).balance_micros == 13 * CREDIT


def test_reserve_consume_and_holds_by_usage(
    client: LedgerClient, ledger: Ledger, admin: Any
) -> None:
    """A usage (quantities by unit, feature and model) is priced by the rate card: held by
    reserve and reservation, charged by consume, committed by a hold at its reservation's
    prices."""
    chat, model = feature("chat"), f"m-{uuid.uuid4().hex[:8]}"
    set_price(admin, chat, types_pb2.USAGE_UNIT_OUTPUT_TOKENS, 1_000)  # 1 credit per 1,000
    set_price(admin, chat, types_pb2.USAGE_UNIT_OUTPUT_TOKENS, 2_000, model=model)
    account = new_account("by-usage")
    ledger.grant(account, 100)

    held = client.reserve(account, usage={"output_tokens": 4000}, feature=chat, model=model)
    assert held.reservation.held_micros == 8 * CREDIT
    assert (held.reservation.feature, held.reservation.model) == (chat, model)
    client.release(account, held.reservation.reservation_id)

    key = new_key("consume")
    consumed = client.consume(
        account, usage={"output_tokens": 3000}, feature=chat, idempotency_key=key
    )
    assert consumed.reservation.committed_micros == 3 * CREDIT
    again = client.consume(
        account, usage={"output_tokens": 3000}, feature=chat, idempotency_key=key
    )
    assert again.transaction_id == consumed.transaction_id

    with client.reservation(
        account, usage={"output_tokens": 5000}, feature=chat, model=model
    ) as hold:
        assert hold.held_micros == 10 * CREDIT
        hold.set_actual_usage({"output_tokens": 1500})
    assert hold.commit_response is not None
    assert hold.commit_response.reservation.committed_micros == 3 * CREDIT  # the model's price

    with client.reservation(account, 4 * CREDIT, feature=chat) as hold:
        hold.commit(usage={"output_tokens": 2500})
    assert hold.reservation.committed_micros == 2_500_000

    with client.reservation(account, 4 * CREDIT, feature=chat) as hold:
        hold.set_actual_usage({"output_tokens": 2500})
        hold.set_actual(CREDIT)  # the last one given is committed
    assert hold.reservation.committed_micros == CREDIT

    assert ledger.balance(account).balance_micros == (100 - 3 - 3 - 1) * CREDIT - 2_500_000

    with pytest.raises(ValueError, match="model applies to a usage"):
        client.consume(account, CREDIT, model=model)
    with pytest.raises(ValueError, match="exactly one of amount_micros and usage"):
        client.reserve(account)
    with pytest.raises(ValueError, match="exactly one of amount_micros and usage"):
        client.consume(account, CREDIT, usage={"output_tokens": 1})


def test_async_reserve_consume_and_holds_by_usage(
    server_address: str, ledger: Ledger, admin: Any
) -> None:
    image = feature("aimage-usage")
    set_price(admin, image, types_pb2.USAGE_UNIT_IMAGES, 2 * CREDIT)
    account = new_account("ausage")
    ledger.grant(account, 20)

    async def scenario() -> None:
        async with AsyncLedgerClient(server_address, retry=FAST_RETRY) as aclient:
            held = await aclient.reserve(account, usage={"images": 3}, feature=image)
            assert held.reservation.held_micros == 6 * CREDIT
            await aclient.release(account, held.reservation.reservation_id)
            consumed = await aclient.consume(account, usage={"images": 1}, feature=image)
            assert consumed.reservation.committed_micros == 2 * CREDIT
            async with aclient.reservation(account, usage={"images": 4}, feature=image) as hold:
                hold.set_actual_usage({"images": 2})
            assert hold.reservation.committed_micros == 4 * CREDIT

    asyncio.run(scenario())
    assert ledger.balance(account).balance_micros == 14 * CREDIT


def test_arguments_of_the_new_calls_are_checked_before_any_call(client: LedgerClient) -> None:
    account = new_account("args")
    with pytest.raises(ValueError, match="exactly one of amount_micros and usage"):
        client.commit(account, str(uuid.uuid4()))
    with pytest.raises(ValueError, match="exactly one of amount_micros and usage"):
        client.commit(account, str(uuid.uuid4()), CREDIT, usage={"images": 1})
    with pytest.raises(ValueError, match="unknown usage unit"):
        client.estimate("chat", {"furlongs": 3})
    with pytest.raises(ValueError, match="unknown transaction status"):
        client.list_transactions(account, statuses=["lost"])
    with pytest.raises(TypeError):
        client.commit(account, str(uuid.uuid4()), usage=[("images", 1)])  # type: ignore[arg-type]


def test_journal_filters_by_model_and_status(
    client: LedgerClient, ledger: Ledger, admin: Any
) -> None:
    chat, model = feature("chat"), f"m-{uuid.uuid4().hex[:8]}"
    set_price(admin, chat, types_pb2.USAGE_UNIT_OUTPUT_TOKENS, 1_000, model=model)
    account = new_account("filters")
    ledger.grant(account, 20)
    pending = client.reserve(account, CREDIT).reservation.reservation_id
    settled = client.reserve(account, 2 * CREDIT).reservation.reservation_id
    client.commit(account, settled, CREDIT)
    by_model = ledger.stub.Consume(
        pb.ConsumeRequest(
            account_id=account,
            idempotency_key=new_key("consume"),
            usage=types_pb2.Usage(
                feature=chat,
                model=model,
                quantities=[
                    types_pb2.UsageQuantity(unit=types_pb2.USAGE_UNIT_OUTPUT_TOKENS, quantity=500)
                ],
            ),
        )
    )
    everything = ledger.transactions(account)

    pending_only = client.list_transactions(account, statuses=["pending"]).transactions
    assert [(t.kind, t.reservation_id) for t in pending_only] == [
        (pb.TRANSACTION_KIND_HOLD, pending)
    ]
    committed_holds = client.list_transactions(
        account, kinds=["hold"], statuses=[pb.TRANSACTION_STATUS_COMMITTED]
    ).transactions
    assert settled in {t.reservation_id for t in committed_holds}
    assert pending not in {t.reservation_id for t in committed_holds}
    assert all(t.status == pb.TRANSACTION_STATUS_COMMITTED for t in committed_holds)

    of_model = client.list_transactions(account, model=model).transactions
    assert of_model and all(t.model == model for t in of_model)
    assert len(of_model) < len(everything)
    walked = client.iter_transactions(
        account, kinds=["charge"], model=model, statuses=["succeeded"], page_size=1
    )
    assert [t.transaction_id for t in walked] == [by_model.transaction_id]
    # Unfiltered, every entry is there.
    assert len(list(client.iter_transactions(account, page_size=2))) == len(everything)


# --- writes retried after a lost response replay --------------------------------------------


@pytest.mark.usefixtures("rewards")
def test_new_writes_retried_after_a_lost_response_apply_once(
    proxy: DropProxy, ledger: Ledger, admin: Any
) -> None:
    inviter, invitee = new_account("inviter"), new_account("invitee")
    code = redemption_code(admin, 7 * CREDIT)
    with LedgerClient(proxy.address, retry=FAST_RETRY, timeout=30) as client:
        proxy.drop_next_response()
        referral_code = client.create_account(inviter).account.referral_code
        proxy.drop_next_response()
        joined = client.create_account(invitee, referral_code=referral_code)
        proxy.drop_next_response()
        claimed = client.claim_daily_reward(invitee)
        proxy.drop_next_response()
        redeemed = client.redeem(invitee, code)
        proxy.drop_next_response()
        moved = client.transfer_reward(inviter, 3 * CREDIT)
    assert proxy.responses_dropped == 5
    assert proxy.connections >= 6  # every retry came in on a new connection

    assert joined.account.referred_by_account_id == inviter
    assert lot_sources(ledger, invitee) == sorted(
        [types_pb2.CREDIT_SOURCE_DAILY, types_pb2.CREDIT_SOURCE_REDEMPTION]
    )
    assert claimed.lot.amount_micros == DAILY and redeemed.lot.amount_micros == 7 * CREDIT
    assert ledger.balance(invitee).balance_micros == DAILY + 7 * CREDIT
    assert moved.transferred_micros == 3 * CREDIT
    balance = ledger.balance(inviter)
    assert (balance.balance_micros, balance.reward_balance_micros) == (
        3 * CREDIT,
        REFERRAL - 3 * CREDIT,
    )
    assert len(ledger.transactions(inviter, kinds=[pb.TRANSACTION_KIND_TRANSFER])) == 1


# --- the asyncio client -------------------------------------------------------------------------


@pytest.mark.usefixtures("rewards")
def test_async_client_new_calls(server_address: str, ledger: Ledger, admin: Any) -> None:
    image, model = feature("aimage"), f"m-{uuid.uuid4().hex[:8]}"
    set_price(admin, image, types_pb2.USAGE_UNIT_IMAGES, CREDIT)
    set_price(admin, image, types_pb2.USAGE_UNIT_IMAGES, 3 * CREDIT, model=model)
    code = redemption_code(admin, 5 * CREDIT)
    inviter, account = new_account("ainviter"), new_account("aclient")

    async def scenario() -> None:
        async with AsyncLedgerClient(server_address, retry=FAST_RETRY) as aclient:
            referral_code = (await aclient.create_account(inviter)).account.referral_code
            key = new_key("create")
            joined = await aclient.create_account(
                account, referral_code=referral_code, idempotency_key=key
            )
            again = await aclient.create_account(
                account, referral_code=referral_code, idempotency_key=key
            )
            assert again.account.referral_code == joined.account.referral_code
            assert (await aclient.get_account(account)).account.referred_by_account_id == inviter
            with pytest.raises(AccountNotFound):
                await aclient.get_account(new_account("nobody"))

            claimed = await aclient.claim_daily_reward(account)
            assert claimed.lot.amount_micros == DAILY
            with pytest.raises(FailedPrecondition):
                await aclient.claim_daily_reward(account)
            redeemed = await aclient.redeem(account, code)
            assert redeemed.balance.balance_micros == DAILY + 5 * CREDIT
            moved = await aclient.transfer_reward(inviter)
            assert moved.transferred_micros == REFERRAL

            estimate = await aclient.estimate(image, {"images": 2}, model=model)
            assert estimate.usage.cost_micros == 6 * CREDIT
            held = await aclient.reserve(account, 2 * CREDIT, feature=image)
            committed = await aclient.commit(
                account, held.reservation.reservation_id, usage={"images": 1}
            )
            assert committed.reservation.committed_micros == CREDIT

            pending = await aclient.reserve(account, CREDIT)
            listed = await aclient.list_transactions(account, statuses=["pending"])
            assert [t.reservation_id for t in listed.transactions] == [
                pending.reservation.reservation_id
            ]
            charges = [
                t
                async for t in aclient.iter_transactions(
                    account, kinds=["charge"], statuses=["succeeded"], page_size=1
                )
            ]
            assert [t.transaction_id for t in charges] == [committed.transaction_id]
            assert not (await aclient.list_transactions(account, model=model)).transactions

    asyncio.run(scenario())
    assert ledger.balance(account).balance_micros == DAILY + 4 * CREDIT
    assert ledger.balance(inviter).balance_micros == REFERRAL


@pytest.mark.usefixtures("rewards")
def test_async_new_writes_retried_after_a_lost_response_apply_once(
    proxy: DropProxy, ledger: Ledger, admin: Any
) -> None:
    inviter, invitee = new_account("ainviter"), new_account("ainvitee")
    code = redemption_code(admin, 7 * CREDIT)

    async def scenario() -> None:
        async with AsyncLedgerClient(proxy.address, retry=FAST_RETRY, timeout=30) as aclient:
            proxy.drop_next_response()
            referral_code = (await aclient.create_account(inviter)).account.referral_code
            proxy.drop_next_response()
            await aclient.create_account(invitee, referral_code=referral_code)
            proxy.drop_next_response()
            await aclient.claim_daily_reward(invitee)
            proxy.drop_next_response()
            await aclient.redeem(invitee, code)
            proxy.drop_next_response()
            await aclient.transfer_reward(inviter, 3 * CREDIT)

    asyncio.run(scenario())
    assert proxy.responses_dropped == 5
    assert lot_sources(ledger, invitee) == sorted(
        [types_pb2.CREDIT_SOURCE_DAILY, types_pb2.CREDIT_SOURCE_REDEMPTION]
    )
    assert ledger.balance(invitee).balance_micros == DAILY + 7 * CREDIT
    balance = ledger.balance(inviter)
    assert (balance.balance_micros, balance.reward_balance_micros) == (
        3 * CREDIT,
        REFERRAL - 3 * CREDIT,
    )


# --- a reservation's commit or release after an unknown outcome -----------------------------


def test_hold_commit_after_an_unknown_outcome_replays(proxy: DropProxy, ledger: Ledger) -> None:
    account = new_account("hold-unknown")
    ledger.grant(account, 10)
    with LedgerClient(proxy.address, retry=FAST_RETRY, timeout=1.0) as client:
        with pytest.raises(DeadlineExceeded), client.reservation(account, 4 * CREDIT) as hold:
            hold.set_actual(3 * CREDIT)
            proxy.hold_next_response()  # the commit at the end of the block is applied...
        proxy.drop_held()  # ...but its answer never arrives
        [charge] = ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_CHARGE])
        assert not hold.finished
        first_key = hold.commit_idempotency_key
        assert first_key

        again = hold.commit()  # the same request, the same key: the original answer
    assert again.transaction_id == charge.transaction_id
    assert hold.commit_idempotency_key == first_key
    assert hold.finished and hold.reservation.committed_micros == 3 * CREDIT
    assert ledger.balance(account).balance_micros == 7 * CREDIT
    assert len(ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_CHARGE])) == 1


def test_hold_release_after_an_unknown_outcome_replays(proxy: DropProxy, ledger: Ledger) -> None:
    account = new_account("hold-unknown")
    ledger.grant(account, 10)
    with LedgerClient(proxy.address, retry=FAST_RETRY, timeout=1.0) as client:
        with pytest.raises(KeyError), client.reservation(account, 4 * CREDIT) as hold:
            proxy.hold_next_response()  # the release after the exception is applied...
            raise KeyError("the job failed")
        proxy.drop_held()  # ...its DeadlineExceeded was logged, the KeyError propagated
        assert not hold.finished
        assert hold.release_idempotency_key

        # The first attempt's key, reason and job_failed: a replay, not
        # ReservationNotPending (nor IdempotencyKeyReused for another request).
        again = hold.release()
    assert again.reservation.status == pb.RESERVATION_STATUS_FAILED
    assert hold.finished
    balance = ledger.balance(account)
    assert (balance.balance_micros, balance.held_micros) == (10 * CREDIT, 0)
    assert len(ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_RELEASE])) == 1


def test_a_block_that_raises_releases_its_hold_as_a_failed_job(
    client: LedgerClient, ledger: Ledger
) -> None:
    """An exception in the block means the job failed (the journal says FAILED); an
    interrupt means it did not run to the end (RELEASED). Nothing is charged either way."""
    account = new_account("hold-failed")
    ledger.grant(account, 10)
    with pytest.raises(RuntimeError), client.reservation(account, 4 * CREDIT) as failed:
        raise RuntimeError("the model crashed")
    assert failed.reservation.status == pb.RESERVATION_STATUS_FAILED
    with pytest.raises(KeyboardInterrupt), client.reservation(account, 3 * CREDIT) as stopped:
        raise KeyboardInterrupt
    assert stopped.reservation.status == pb.RESERVATION_STATUS_RELEASED

    held = client.reserve(account, 2 * CREDIT).reservation.reservation_id
    released = client.release(account, held, reason="upstream error", job_failed=True)
    assert released.reservation.status == pb.RESERVATION_STATUS_FAILED

    statuses = {
        t.reservation_id: t.status
        for t in client.list_transactions(account, kinds=["hold"]).transactions
    }
    assert statuses == {
        failed.reservation_id: pb.TRANSACTION_STATUS_FAILED,
        stopped.reservation_id: pb.TRANSACTION_STATUS_RELEASED,
        held: pb.TRANSACTION_STATUS_FAILED,
    }
    balance = ledger.balance(account)
    assert (balance.balance_micros, balance.held_micros) == (10 * CREDIT, 0)


def test_a_block_that_tried_a_release_ends_by_replaying_it_not_by_committing(
    proxy: DropProxy, ledger: Ledger
) -> None:
    """The block released the hold itself, got an unknown outcome and went on: its end
    replays that release (same key, same reason) instead of charging the hold."""
    account = new_account("hold-released")
    ledger.grant(account, 10)
    with (
        LedgerClient(proxy.address, retry=FAST_RETRY, timeout=1.0) as client,
        client.reservation(account, 4 * CREDIT) as hold,
    ):
        proxy.hold_next_response()  # the release is applied, its answer lost
        with pytest.raises(DeadlineExceeded):
            hold.release(reason="the user cancelled")
        proxy.drop_held()
    assert hold.release_response is not None
    assert hold.release_response.reservation.status == pb.RESERVATION_STATUS_RELEASED
    assert hold.commit_response is None
    balance = ledger.balance(account)
    assert (balance.balance_micros, balance.held_micros) == (10 * CREDIT, 0)
    assert not ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_CHARGE])
    [release] = ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_RELEASE])
    assert release.comment == "the user cancelled"


def test_a_release_the_block_tried_that_was_refused_is_not_sent_again(
    client: LedgerClient, ledger: Ledger
) -> None:
    """The server refused the block's own release for good (a reason too long: nothing was
    released). The block's end does not send that refusal again (nor raise it once more
    when the block caught it), nor commit: it releases the hold with the client's reason,
    a new key, as a failed job when the block raised."""
    account = new_account("hold-release-refused")
    ledger.grant(account, 10)
    with client.reservation(account, 4 * CREDIT) as caught:
        with pytest.raises(InvalidArgument) as refused:
            caught.release(reason="r" * 5000, idempotency_key=new_key("refused"))
        assert refused.value.field == "reason"
    with (
        pytest.raises(InvalidArgument),
        client.reservation(account, 3 * CREDIT) as raised,
    ):
        raised.release(reason="r" * 5000)

    assert caught.reservation.status == pb.RESERVATION_STATUS_RELEASED
    assert raised.reservation.status == pb.RESERVATION_STATUS_FAILED
    assert not ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_CHARGE])
    releases = ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_RELEASE])
    assert [r.comment for r in releases] == [REFUSED_RELEASE_REASON] * 2
    balance = ledger.balance(account)
    assert (balance.balance_micros, balance.held_micros) == (10 * CREDIT, 0)


def test_a_commit_refused_at_the_end_of_the_block_gives_the_hold_back(
    client: LedgerClient, ledger: Ledger
) -> None:
    """A usage nobody priced cannot be committed: the error propagates and the hold is
    released at once, not left until its time-to-live."""
    account = new_account("hold-refused")
    ledger.grant(account, 10)
    unpriced = feature("unpriced")
    with (
        pytest.raises(LedgerError),
        client.reservation(account, 4 * CREDIT, feature=unpriced) as hold,
    ):
        hold.set_actual_usage({"images": 1})
    assert hold.release_response is not None
    balance = ledger.balance(account)
    assert (balance.balance_micros, balance.held_micros) == (10 * CREDIT, 0)

    refusal = ""
    with client.reservation(account, 4 * CREDIT) as hold:
        try:
            hold.set_actual(5 * CREDIT)
        except ValueError as error:  # refused: the block goes on and commits all
            refusal = str(error)
    assert "more than the 4000000 held" in refusal
    assert hold.reservation.committed_micros == 4 * CREDIT


def test_async_block_end_releases_a_refused_commit_and_replays_a_tried_release(
    server_address: str, ledger: Ledger
) -> None:
    account = new_account("ahold-exit")
    ledger.grant(account, 10)
    unpriced = feature("aunpriced")

    async def scenario() -> None:
        async with AsyncLedgerClient(server_address, retry=FAST_RETRY) as aclient:
            with pytest.raises(LedgerError):
                async with aclient.reservation(account, 4 * CREDIT, feature=unpriced) as hold:
                    hold.set_actual_usage({"images": 1})
            assert hold.release_response is not None
            async with aclient.reservation(account, 2 * CREDIT) as released:
                await released.release(reason="cancelled")
                released.release_response = None  # as if its answer had been lost
            assert released.release_response is not None  # replayed at the end, not committed
            assert released.commit_response is None
            async with aclient.reservation(account, 3 * CREDIT) as refused:
                with pytest.raises(InvalidArgument):  # caught: the block ends normally
                    await refused.release(reason="r" * 5000)
            # Not sent again, nor committed: released by the client.
            assert refused.reservation.status == pb.RESERVATION_STATUS_RELEASED

    asyncio.run(scenario())
    balance = ledger.balance(account)
    assert (balance.balance_micros, balance.held_micros) == (10 * CREDIT, 0)
    assert not ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_CHARGE])


def test_arguments_that_name_no_enum_value_or_repeat_a_unit_are_refused(
    client: LedgerClient,
) -> None:
    account = new_account("enum-args")
    with pytest.raises(TypeError):
        client.grant(account, CREDIT, True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown credit source"):
        client.grant(account, CREDIT, 999)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown credit source"):
        client.grant(account, CREDIT, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="appears twice"):
        client.estimate("chat", {"tokens": 1, types_pb2.USAGE_UNIT_TOKENS: 2})
    usage = types_pb2.Usage(
        feature="chat",
        quantities=[types_pb2.UsageQuantity(unit=types_pb2.USAGE_UNIT_TOKENS, quantity=1)],
    )
    with pytest.raises(ValueError, match="contradicts"):
        client.consume(account, usage=usage, feature="image")


def test_hold_takes_an_explicit_commit_key(client: LedgerClient, ledger: Ledger) -> None:
    account = new_account("hold-key")
    ledger.grant(account, 10)
    key = new_key("hold-commit")
    with client.reservation(account, 4 * CREDIT) as hold:
        committed = hold.commit(2 * CREDIT, comment="done", idempotency_key=key)
    assert hold.commit_idempotency_key == key
    # The commit was sent with that key: the same request with it is a replay.
    replay = client.commit(
        account, hold.reservation_id, 2 * CREDIT, comment="done", idempotency_key=key
    )
    assert replay.transaction_id == committed.transaction_id
    assert ledger.balance(account).balance_micros == 8 * CREDIT


def test_async_hold_commit_and_release_after_an_unknown_outcome_replay(
    proxy: DropProxy, ledger: Ledger
) -> None:
    account = new_account("ahold-unknown")
    ledger.grant(account, 10)

    async def scenario() -> tuple[pb.CommitResponse, pb.ReleaseResponse]:
        async with AsyncLedgerClient(proxy.address, retry=FAST_RETRY, timeout=1.0) as aclient:
            with pytest.raises(DeadlineExceeded):
                async with aclient.reservation(account, 4 * CREDIT) as committing:
                    committing.set_actual(CREDIT)
                    proxy.hold_next_response()
            proxy.drop_held()
            committed = await committing.commit()

            with pytest.raises(KeyError):
                async with aclient.reservation(account, 2 * CREDIT) as releasing:
                    proxy.hold_next_response()
                    raise KeyError("the job failed")
            proxy.drop_held()
            released = await releasing.release()
            return committed, released

    committed, released = asyncio.run(scenario())
    [charge] = ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_CHARGE])
    assert committed.transaction_id == charge.transaction_id
    assert released.reservation.status == pb.RESERVATION_STATUS_FAILED
    balance = ledger.balance(account)
    assert (balance.balance_micros, balance.held_micros) == (9 * CREDIT, 0)


# --- a commit made inside the block that times out ------------------------------------------

# The commit's time-out: the account row stays locked (FOR UPDATE, another connection) past it.
SHORT_TIMEOUT = 0.5
LOCK_THE_ACCOUNT = "SELECT 1 FROM accounts WHERE account_id = %s FOR UPDATE"


def assert_the_block_gave_nothing_away(
    ledger: Ledger, account: str, reservation_id: str, settled: bool
) -> None:
    """Settled or not, the hold was never released: no FAILED reservation, no release in the
    journal, and the work is billed once when settled."""
    request = pb.GetReservationRequest(account_id=account, reservation_id=reservation_id)
    reservation = ledger.stub.GetReservation(request).reservation
    assert not ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_RELEASE])
    if settled:
        assert reservation.status == pb.RESERVATION_STATUS_COMMITTED
        assert reservation.committed_micros == 3 * CREDIT
        assert len(ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_CHARGE])) == 1
        balance = ledger.balance(account)
        assert (balance.balance_micros, balance.held_micros) == (7 * CREDIT, 0)
    else:
        assert reservation.status == pb.RESERVATION_STATUS_PENDING
        assert not ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_CHARGE])
        assert ledger.balance(account).held_micros == 4 * CREDIT


@pytest.mark.parametrize("unlocked_before_the_end", [True, False])
def test_a_commit_in_the_block_that_timed_out_is_retried_never_released(
    client: LedgerClient, ledger: Ledger, ledger_db_url: str, unlocked_before_the_end: bool
) -> None:
    """The job ran, the block's own hold.commit() timed out and the error left the block:
    the end of the block commits again with the same key (the lock gone, that bills the
    work) or leaves the hold pending for hold.commit() (the lock still held); releasing it
    as a failed job gave the work away and made a later hold.commit() raise."""
    account = new_account("hold-own-commit")
    ledger.grant(account, 10)
    with psycopg.connect(ledger_db_url) as locker:
        with (
            pytest.raises(DeadlineExceeded),
            client.reservation(account, 4 * CREDIT, timeout=SHORT_TIMEOUT) as hold,
        ):
            locker.execute(LOCK_THE_ACCOUNT, (account,))
            try:
                hold.commit(3 * CREDIT)  # the job is done: bill it
            finally:
                if unlocked_before_the_end:
                    locker.rollback()
        assert hold.release_idempotency_key is None  # no release was even tried
        assert hold.finished == unlocked_before_the_end
        locker.rollback()
    assert_the_block_gave_nothing_away(
        ledger, account, hold.reservation_id, settled=unlocked_before_the_end
    )
    if not unlocked_before_the_end:
        hold.commit()  # the same request, the same key
    assert_the_block_gave_nothing_away(ledger, account, hold.reservation_id, settled=True)


@pytest.mark.parametrize("unlocked_before_the_end", [True, False])
def test_async_a_commit_in_the_block_that_timed_out_is_retried_never_released(
    server_address: str, ledger: Ledger, ledger_db_url: str, unlocked_before_the_end: bool
) -> None:
    account = new_account("ahold-own-commit")
    ledger.grant(account, 10)

    async def scenario() -> str:
        async with AsyncLedgerClient(server_address, retry=FAST_RETRY) as aclient:
            with psycopg.connect(ledger_db_url) as locker:
                with pytest.raises(DeadlineExceeded):
                    async with aclient.reservation(
                        account, 4 * CREDIT, timeout=SHORT_TIMEOUT
                    ) as hold:
                        locker.execute(LOCK_THE_ACCOUNT, (account,))
                        try:
                            await hold.commit(3 * CREDIT)
                        finally:
                            if unlocked_before_the_end:
                                locker.rollback()
                assert hold.release_idempotency_key is None
                assert hold.finished == unlocked_before_the_end
                locker.rollback()
            assert_the_block_gave_nothing_away(
                ledger, account, hold.reservation_id, settled=unlocked_before_the_end
            )
            if not unlocked_before_the_end:
                await hold.commit()
            return hold.reservation_id

    reservation_id = asyncio.run(scenario())
    assert_the_block_gave_nothing_away(ledger, account, reservation_id, settled=True)


def test_summary_and_the_platform_log(
    client: LedgerClient,
    server_address: str,
    ledger: Ledger,
    clock: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ReportService through the client: an account's summary over a period, and the
    platform-wide log walked to its end across short and empty pages."""
    name = feature("report")
    account, busy = new_account("report"), new_account("report-busy")
    ledger.grant(account, 10)
    older = client.consume(account, 3 * CREDIT, feature=name).transaction_id
    for _ in range(12):
        ledger.grant(busy, 1)  # entries of another account in between
    newer = client.consume(account, CREDIT, feature=name).transaction_id

    now = clock.now()
    summary = client.summary(
        account, start_time=now - timedelta(hours=1), end_time=now + timedelta(hours=1)
    )
    total = summary.total
    assert (total.allocated_micros, total.consumed_micros, total.remaining_micros) == (
        10 * CREDIT,
        4 * CREDIT,
        6 * CREDIT,
    )
    assert [(u.feature, u.consumed_micros) for u in summary.usage] == [(name, 4 * CREDIT)]
    assert client.summary(account, day=now.date()).account_id == account
    with pytest.raises(ValueError, match="exactly one period"):
        client.summary(account, day="2026-01-01", month="2026-01")
    far_back = client.summary(account, month=date(999, 3, 1))  # "0999-03", no activity
    assert far_back.total.allocated_micros == 0
    assert client.list_transactions(account, feature=None, model=None).transactions  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not a datetime"):
        client.summary(account, day=now)  # its day depends on the ledger's time zone

    monkeypatch.setattr(journal_pages, "SCAN_ENTRIES", 5)  # pages read 5 entries
    first = client.list_journal(feature=name, page_size=10)
    assert [t.transaction_id for t in first.transactions] == [newer] and first.next_page_token
    # The first two entries, across the short and empty pages between them (the walk would
    # go on through the whole suite's journal, five entries a page).
    walked = itertools.islice(client.iter_journal(feature=name), 2)
    assert [t.transaction_id for t in walked] == [newer, older]

    async def walk() -> list[str]:
        async with AsyncLedgerClient(server_address, retry=FAST_RETRY) as aclient:
            summary = await aclient.summary(account, month=now.date())
            assert summary.account_id == account
            walked = []
            async for entry in aclient.iter_journal(feature=name):
                walked.append(entry.transaction_id)
                if len(walked) == 2:
                    break
            return walked

    assert asyncio.run(walk()) == [newer, older]
