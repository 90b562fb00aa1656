"""Accounts, the sign-up bonus and referrals (issue 3; seeds 000 and 003).

The session baseline switches the sign-up bonus off so balances elsewhere stay exact; the
tests that want it reset ``signup.enabled`` to its default (true)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf.duration_pb2 import Duration

from ledger.v1 import ledger_service_pb2 as pb
from ledger.v1 import types_pb2
from support.ledger import CREDIT, Ledger, expect_error, new_account, new_key
from support.sources import DAY, Sources, dt

AuditCheck = Callable[[], None]


@pytest.fixture
def sources(stub: Any, admin: Any, billing: Any) -> Sources:
    return Sources(stub, admin, billing)


# --- sign-up bonus ----------------------------------------------------------------------------


def test_seed_000_signup_bonus_is_100_credits_expiring_after_30_days(
    sources: Sources,
    ledger: Ledger,
    configure: Any,
    clock: Any,
    assert_audit_clean: AuditCheck,
) -> None:
    configure.reset("signup.enabled")
    account = new_account()
    created = sources.create_account(account)

    lot = created.signup_lot
    assert created.HasField("signup_lot")
    assert lot.source == types_pb2.CREDIT_SOURCE_SIGNUP
    assert lot.balance_kind == types_pb2.BALANCE_KIND_MAIN
    assert lot.amount_micros == lot.remaining_micros == 100 * CREDIT
    assert lot.HasField("expires_at")
    assert dt(lot.expires_at) == dt(lot.created_at) + 30 * DAY
    create_time = dt(created.account.create_time)
    assert abs(dt(lot.expires_at) - (create_time + 30 * DAY)) < timedelta(seconds=1)
    assert created.balance.balance_micros == created.balance.available_micros == 100 * CREDIT
    assert created.account.account_id == account
    assert created.account.referral_code

    assert ledger.balance(account).available_micros == 100 * CREDIT
    grants = ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_GRANT])
    assert [t.amount_micros for t in grants] == [100 * CREDIT]

    # One minute before the 30 days are up the bonus is still there; just after, it is gone.
    clock.advance(dt(lot.expires_at) - clock.now() - timedelta(minutes=1))
    assert ledger.balance(account).available_micros == 100 * CREDIT
    clock.advance(timedelta(minutes=2))
    assert ledger.balance(account).balance_micros == 0
    (expired,) = ledger.lots(account, include_inactive=True)
    assert (expired.remaining_micros, expired.expired_micros) == (0, 100 * CREDIT)
    expiries = ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_EXPIRY])
    assert [t.amount_micros for t in expiries] == [-100 * CREDIT]
    assert_audit_clean()


def test_signup_bonus_disabled_gives_no_lot(
    sources: Sources, ledger: Ledger, configure: Any, assert_audit_clean: AuditCheck
) -> None:
    configure("signup.enabled", False)
    account = new_account()
    created = sources.create_account(account)
    assert not created.HasField("signup_lot")
    assert created.balance.balance_micros == 0
    assert created.account.referral_code
    assert ledger.lots(account, include_inactive=True) == []
    assert ledger.balance(account).balance_micros == 0
    assert_audit_clean()


def test_signup_amount_and_expiry_are_configurable(
    sources: Sources, configure: Any, assert_audit_clean: AuditCheck
) -> None:
    configure("signup.enabled", True)
    configure("signup.amount_micros", 7 * CREDIT)
    configure("signup.expire_days", 3)
    lot = sources.create_account().signup_lot
    assert lot.amount_micros == 7 * CREDIT
    assert dt(lot.expires_at) == dt(lot.created_at) + 3 * DAY

    configure("signup.expire_days", 0)  # 0 = never
    lot = sources.create_account().signup_lot
    assert lot.amount_micros == 7 * CREDIT
    assert not lot.HasField("expires_at")
    assert_audit_clean()


def test_create_account_is_idempotent_and_refuses_a_second_creation(
    sources: Sources, ledger: Ledger, configure: Any, assert_audit_clean: AuditCheck
) -> None:
    configure.reset("signup.enabled")
    account = new_account()
    key = new_key("create")
    first = sources.create_account(account, key=key)
    replay = sources.create_account(account, key=key)
    assert replay.account.referral_code == first.account.referral_code
    assert replay.signup_lot.lot_id == first.signup_lot.lot_id
    assert replay.balance.balance_micros == 100 * CREDIT

    info = expect_error(
        lambda: sources.create_account(account),
        grpc.StatusCode.ALREADY_EXISTS,
        "ACCOUNT_EXISTS",
    )
    assert info.metadata["account_id"] == account
    assert ledger.balance(account).balance_micros == 100 * CREDIT
    assert len(ledger.lots(account, include_inactive=True)) == 1
    assert_audit_clean()


def test_referral_codes_are_unique(sources: Sources) -> None:
    codes = [sources.create_account().account.referral_code for _ in range(10)]
    assert all(codes)
    assert len(set(codes)) == len(codes)


def test_get_account_returns_the_account(sources: Sources) -> None:
    account = new_account()
    created = sources.create_account(account).account
    read = sources.get_account(account)
    assert read.account_id == account
    assert read.referral_code == created.referral_code
    assert read.referred_by_account_id == ""
    assert read.create_time == created.create_time
    assert not read.HasField("subscription")


def test_a_crediting_call_opens_an_unknown_account_with_the_signup_bonus(
    sources: Sources, ledger: Ledger, configure: Any, assert_audit_clean: AuditCheck
) -> None:
    configure.reset("signup.enabled")
    account = new_account()
    granted = ledger.grant(account, 5, source=types_pb2.CREDIT_SOURCE_PURCHASE)
    assert granted.balance.balance_micros == 105 * CREDIT
    assert sources.get_account(account).referral_code
    sources_of_lots = sorted(lot.source for lot in ledger.lots(account))
    assert sources_of_lots == sorted(
        [types_pb2.CREDIT_SOURCE_SIGNUP, types_pb2.CREDIT_SOURCE_PURCHASE]
    )

    # ... and so does the daily reward: 100 + 10.
    other = new_account()
    claimed = sources.claim_daily(other)
    assert claimed.balance.balance_micros == 110 * CREDIT
    assert sources.get_account(other).account_id == other
    # A second grant to an existing account applies no second bonus.
    assert ledger.grant(account, 1).balance.balance_micros == 106 * CREDIT
    assert_audit_clean()


def test_spending_calls_and_reads_refuse_an_unknown_account(
    sources: Sources, ledger: Ledger
) -> None:
    account = new_account()
    for call in (
        lambda: sources.get_account(account),
        lambda: ledger.balance(account),
        lambda: ledger.consume(account, CREDIT),
        lambda: ledger.reserve(account, CREDIT),
        lambda: sources.transfer_reward(account),
        lambda: sources.adjust(account, CREDIT, "no such account"),
    ):
        info = expect_error(call, grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")
        assert info.metadata["account_id"] == account
    # None of them opened it.
    expect_error(
        lambda: sources.get_account(account), grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND"
    )


# --- referrals (seed 003) ---------------------------------------------------------------------


def test_signup_with_a_referral_code_rewards_the_inviter_once(
    sources: Sources, ledger: Ledger, assert_audit_clean: AuditCheck
) -> None:
    inviter = new_account("inviter")
    code = sources.create_account(inviter).account.referral_code

    invitee = new_account("invitee")
    key = new_key("create")
    created = sources.create_account(invitee, key=key, referral_code=code)
    assert created.account.referred_by_account_id == inviter
    assert sources.get_account(invitee).referred_by_account_id == inviter

    balance = ledger.balance(inviter)
    assert balance.reward_balance_micros == 10 * CREDIT
    assert balance.balance_micros == balance.available_micros == 0  # rewards are not spendable
    (lot,) = ledger.lots(inviter)
    assert lot.source == types_pb2.CREDIT_SOURCE_REFERRAL
    assert lot.balance_kind == types_pb2.BALANCE_KIND_REWARD
    assert lot.amount_micros == lot.remaining_micros == 10 * CREDIT
    (grant,) = ledger.transactions(inviter, kinds=[pb.TRANSACTION_KIND_GRANT])
    assert grant.amount_micros == 10 * CREDIT
    assert sum(p.amount_micros for p in grant.postings) == 0
    assert any(
        p.ledger_account == "account:reward" and p.amount_micros == 10 * CREDIT
        for p in grant.postings
    )
    # The invitee's own balance is untouched (the sign-up bonus is off in this session).
    assert ledger.balance(invitee).reward_balance_micros == 0

    # Replaying the sign-up, or trying it again with another key, rewards nobody again.
    sources.create_account(invitee, key=key, referral_code=code)
    expect_error(
        lambda: sources.create_account(invitee, referral_code=code),
        grpc.StatusCode.ALREADY_EXISTS,
        "ACCOUNT_EXISTS",
    )
    assert ledger.balance(inviter).reward_balance_micros == 10 * CREDIT
    expect_error(
        lambda: ledger.consume(inviter, CREDIT),
        grpc.StatusCode.FAILED_PRECONDITION,
        "INSUFFICIENT_CREDITS",
    )

    # A second invitee is a second reward.
    sources.create_account(new_account("invitee"), referral_code=code)
    assert ledger.balance(inviter).reward_balance_micros == 20 * CREDIT
    assert len(ledger.transactions(inviter, kinds=[pb.TRANSACTION_KIND_GRANT])) == 2
    assert_audit_clean()


def test_a_call_on_an_invitee_never_waits_for_its_inviter(
    sources: Sources, ledger_db_url: str, clock: Any
) -> None:
    """A Consume whose maintenance is due writes the invitee's row twice; with a foreign key
    from referred_by, the second write made PostgreSQL lock the inviter's row too (FOR KEY
    SHARE), so the call waited for any call on the inviter and deadlocked with a batch
    holding the inviter and waiting for the invitee (migration 0034)."""
    inviter = new_account("inviter")
    code = sources.create_account(inviter).account.referral_code
    invitee = new_account("invitee")
    sources.create_account(invitee, referral_code=code)
    now = clock.now()
    with psycopg.connect(ledger_db_url, autocommit=True) as conn:
        conn.execute(
            "SELECT ledger_grant(%s, 'g', '\\x01', 5000000, 'purchase', %s, 'main', '', '', "
            "NULL, %s)",
            (invitee, now - timedelta(minutes=1), now - timedelta(minutes=2)),
        )
        conn.execute(
            "SELECT ledger_grant(%s, 'g2', '\\x02', 5000000, 'purchase', NULL, 'main', '', '', "
            "NULL, %s)",
            (invitee, now - timedelta(minutes=2)),
        )
    with psycopg.connect(ledger_db_url) as holder, psycopg.connect(ledger_db_url) as caller:
        holder.execute("SELECT FROM accounts WHERE account_id = %s FOR UPDATE", (inviter,))
        caller.execute("SET lock_timeout = '2s'")
        caller.execute(
            "SELECT ledger_consume(%s, 'c', '\\x03', 1000000, NULL, '', '', %s)", (invitee, now)
        )
        caller.commit()
        holder.rollback()
        balance = caller.execute(
            "SELECT balance_micros FROM accounts WHERE account_id = %s", (invitee,)
        ).fetchone()
    assert balance == (4 * CREDIT,)  # the expired 5 gone, 1 of the other 5 spent


def test_a_retry_typing_the_referral_code_another_way_is_the_same_sign_up(
    sources: Sources, ledger: Ledger, assert_audit_clean: AuditCheck
) -> None:
    """The ledger looks the code up trimmed and upper-cased, so the request it answered is
    the same whatever the case or spaces (helper-56): the retry of a lost answer typed
    as printed used to be refused as another request."""
    inviter = new_account("inviter")
    code = sources.create_account(inviter).account.referral_code
    invitee, key = new_account("invitee"), new_key("create")
    created = sources.create_account(invitee, key=key, referral_code=code.lower())
    assert created.account.referred_by_account_id == inviter

    for typed in (code, f" {code} ", code.lower() + " "):
        replay, call = sources.stub.CreateAccount.with_call(
            pb.CreateAccountRequest(account_id=invitee, idempotency_key=key, referral_code=typed)
        )
        assert ("ledger-idempotent-replay", "true") in call.trailing_metadata()
        assert replay.account == created.account

    # Another inviter's code under that key is another request.
    other = sources.create_account(new_account("inviter")).account.referral_code
    expect_error(
        lambda: sources.create_account(invitee, key=key, referral_code=other),
        grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_KEY_REUSED",
    )
    assert ledger.balance(inviter).reward_balance_micros == 10 * CREDIT
    assert sources.get_account(invitee).referred_by_account_id == inviter
    assert_audit_clean()


def test_a_referral_code_typed_with_spaces_or_dashes_is_the_code(
    sources: Sources, ledger: Ledger, assert_audit_clean: AuditCheck
) -> None:
    """As a redemption code: a code copied in groups ('3AKJ4 MKEPV', '3akj4-mkepv') is the
    code (it was NOT_FOUND REFERRAL_CODE_NOT_FOUND), and a retry typed another way is the
    same sign-up. Codes have no dash and no space, so none is mistaken for another."""
    inviter = new_account("inviter")
    code = sources.create_account(inviter).account.referral_code
    assert code.isalnum() and code == code.upper() and len(code) == 10
    spaced, dashed = f"{code[:5]} {code[5:]}", f"{code[:5]}-{code[5:]}".lower()
    invitee, key = new_account("invitee"), new_key("create")
    created = sources.create_account(invitee, key=key, referral_code=spaced)
    assert created.account.referred_by_account_id == inviter

    for typed in (dashed, code, f" {code[:3]}-{code[3:6]} {code[6:]}\t"):
        replay, call = sources.stub.CreateAccount.with_call(
            pb.CreateAccountRequest(account_id=invitee, idempotency_key=key, referral_code=typed)
        )
        assert ("ledger-idempotent-replay", "true") in call.trailing_metadata(), typed
        assert replay.account == created.account

    sources.create_account(new_account("invitee"), referral_code=dashed)
    assert ledger.balance(inviter).reward_balance_micros == 20 * CREDIT
    # Dashes alone are no code, not the absence of one.
    expect_error(
        lambda: sources.create_account(new_account("invitee"), referral_code=" -- "),
        grpc.StatusCode.NOT_FOUND,
        "REFERRAL_CODE_NOT_FOUND",
    )
    assert_audit_clean()


def test_referral_reward_amount_is_configurable(
    sources: Sources, ledger: Ledger, configure: Any, assert_audit_clean: AuditCheck
) -> None:
    configure("referral.reward_micros", 25 * CREDIT)
    inviter = new_account("inviter")
    code = sources.create_account(inviter).account.referral_code
    sources.create_account(referral_code=code)
    assert ledger.balance(inviter).reward_balance_micros == 25 * CREDIT
    assert_audit_clean()


def test_an_unknown_referral_code_is_refused_and_creates_nothing(
    sources: Sources, assert_audit_clean: AuditCheck
) -> None:
    account = new_account()
    info = expect_error(
        lambda: sources.create_account(account, referral_code="NO-SUCH-CODE-42"),
        grpc.StatusCode.NOT_FOUND,
        "REFERRAL_CODE_NOT_FOUND",
    )
    assert info.metadata["referral_code"] == "NOSUCHCODE42"  # as read: without its dashes
    expect_error(
        lambda: sources.get_account(account), grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND"
    )
    assert_audit_clean()


def _rewarded_inviter(sources: Sources, invitees: int) -> str:
    inviter = new_account("inviter")
    code = sources.create_account(inviter).account.referral_code
    for _ in range(invitees):
        sources.create_account(new_account("invitee"), referral_code=code)
    return inviter


def test_transfer_reward_moves_an_amount_to_main_and_is_journaled(
    sources: Sources, ledger: Ledger, assert_audit_clean: AuditCheck
) -> None:
    inviter = _rewarded_inviter(sources, 1)
    reward_lot = ledger.lots(inviter)[0].lot_id

    key = new_key("transfer")
    moved = sources.transfer_reward(inviter, 4 * CREDIT, key=key)
    assert moved.transferred_micros == 4 * CREDIT
    assert moved.lot.source == types_pb2.CREDIT_SOURCE_REWARD_TRANSFER
    assert moved.lot.balance_kind == types_pb2.BALANCE_KIND_MAIN
    assert moved.lot.amount_micros == moved.lot.remaining_micros == 4 * CREDIT
    assert not moved.lot.HasField("expires_at")
    assert moved.balance.reward_balance_micros == 6 * CREDIT
    assert moved.balance.balance_micros == moved.balance.available_micros == 4 * CREDIT

    (transfer,) = ledger.transactions(inviter, kinds=[pb.TRANSACTION_KIND_TRANSFER])
    assert transfer.transaction_id == moved.transaction_id
    assert sum(p.amount_micros for p in transfer.postings) == 0
    legs = sorted((p.ledger_account, p.lot_id, p.amount_micros) for p in transfer.postings)
    assert legs == [
        ("account:main", moved.lot.lot_id, 4 * CREDIT),
        ("account:reward", reward_lot, -4 * CREDIT),
    ]

    # A retry with the same key moves nothing more.
    replay = sources.transfer_reward(inviter, 4 * CREDIT, key=key)
    assert replay.transaction_id == moved.transaction_id
    assert ledger.balance(inviter).reward_balance_micros == 6 * CREDIT

    # The moved credits are spendable.
    ledger.consume(inviter, 4 * CREDIT)
    assert ledger.balance(inviter).balance_micros == 0
    assert_audit_clean()


def test_transfer_above_the_reward_balance_is_refused_and_changes_nothing(
    sources: Sources, ledger: Ledger, assert_audit_clean: AuditCheck
) -> None:
    inviter = _rewarded_inviter(sources, 1)
    before = ledger.balance(inviter)
    lots_before = ledger.lots(inviter, include_inactive=True)
    journal_before = ledger.transactions(inviter)

    info = expect_error(
        lambda: sources.transfer_reward(inviter, 10 * CREDIT + 1),
        grpc.StatusCode.FAILED_PRECONDITION,
        "INSUFFICIENT_REWARD_BALANCE",
    )
    assert int(info.metadata["reward_balance_micros"]) == 10 * CREDIT
    assert int(info.metadata["requested_micros"]) == 10 * CREDIT + 1

    after = ledger.balance(inviter)
    assert (after.balance_micros, after.reward_balance_micros) == (
        before.balance_micros,
        before.reward_balance_micros,
    )
    assert ledger.lots(inviter, include_inactive=True) == lots_before
    assert ledger.transactions(inviter) == journal_before
    assert_audit_clean()


def test_transfer_all_takes_every_reward_lot_then_nothing_is_left(
    sources: Sources, ledger: Ledger, assert_audit_clean: AuditCheck
) -> None:
    inviter = _rewarded_inviter(sources, 2)
    reward_lots = {lot.lot_id for lot in ledger.lots(inviter)}
    assert len(reward_lots) == 2

    moved = sources.transfer_reward(inviter)  # amount unset: everything
    assert moved.transferred_micros == 20 * CREDIT
    assert moved.balance.reward_balance_micros == 0
    assert moved.balance.available_micros == 20 * CREDIT
    (transfer,) = ledger.transactions(inviter, kinds=[pb.TRANSACTION_KIND_TRANSFER])
    assert sum(p.amount_micros for p in transfer.postings) == 0
    debits = {
        p.lot_id: p.amount_micros for p in transfer.postings if p.ledger_account == "account:reward"
    }
    assert debits == dict.fromkeys(reward_lots, -10 * CREDIT)
    credits = [
        (p.lot_id, p.amount_micros) for p in transfer.postings if p.ledger_account == "account:main"
    ]
    assert credits == [(moved.lot.lot_id, 20 * CREDIT)]

    lots = {lot.lot_id: lot for lot in ledger.lots(inviter, include_inactive=True)}
    assert all(lots[lot_id].remaining_micros == 0 for lot_id in reward_lots)

    for call in (
        lambda: sources.transfer_reward(inviter),
        lambda: sources.transfer_reward(inviter, CREDIT),
    ):
        expect_error(call, grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_REWARD_BALANCE")
    assert ledger.balance(inviter).available_micros == 20 * CREDIT
    assert_audit_clean()


def test_a_partial_transfer_takes_reward_lots_in_order(
    sources: Sources, ledger: Ledger, assert_audit_clean: AuditCheck
) -> None:
    inviter = _rewarded_inviter(sources, 2)
    moved = sources.transfer_reward(inviter, 15 * CREDIT)
    assert moved.transferred_micros == 15 * CREDIT
    assert moved.balance.reward_balance_micros == 5 * CREDIT
    (transfer,) = ledger.transactions(inviter, kinds=[pb.TRANSACTION_KIND_TRANSFER])
    debits = sorted(
        p.amount_micros for p in transfer.postings if p.ledger_account == "account:reward"
    )
    assert debits == [-10 * CREDIT, -5 * CREDIT]
    reward_left = [
        lot.remaining_micros
        for lot in ledger.lots(inviter)
        if lot.balance_kind == types_pb2.BALANCE_KIND_REWARD
    ]
    assert reward_left == [5 * CREDIT]
    assert_audit_clean()


def test_a_transfer_keeps_the_expiry_of_the_reward_credits_it_moves(
    sources: Sources, ledger: Ledger, assert_audit_clean: AuditCheck
) -> None:
    """Reward credits that lapse still lapse once on the main balance: one main lot per
    expiry among the credits taken (before, one lot that never expired)."""
    inviter = _rewarded_inviter(sources, 1)  # 10 credits that never expire
    reward = types_pb2.BALANCE_KIND_REWARD
    promotion = types_pb2.CREDIT_SOURCE_PROMOTION
    soon = ledger.grant(
        inviter, 5, source=promotion, balance_kind=reward, expires_in=Duration(seconds=86400)
    ).lot
    later = ledger.grant(
        inviter, 3, source=promotion, balance_kind=reward, expires_in=Duration(seconds=2 * 86400)
    ).lot

    moved = sources.transfer_reward(inviter)
    assert moved.transferred_micros == 18 * CREDIT
    main = [
        (lot.amount_micros, lot.expires_at if lot.HasField("expires_at") else None)
        for lot in moved.lots
    ]
    assert main == [
        (5 * CREDIT, soon.expires_at),
        (3 * CREDIT, later.expires_at),
        (10 * CREDIT, None),
    ]
    assert moved.lot == moved.lots[0]
    assert all(lot.balance_kind == types_pb2.BALANCE_KIND_MAIN for lot in moved.lots)
    listed = {lot.lot_id: lot for lot in ledger.lots(inviter)}
    assert [listed[lot.lot_id] for lot in moved.lots] == list(moved.lots)
    (transfer,) = ledger.transactions(inviter, kinds=[pb.TRANSACTION_KIND_TRANSFER])
    assert sum(p.amount_micros for p in transfer.postings) == 0
    assert sorted(p.amount_micros for p in transfer.postings if p.amount_micros > 0) == [
        3 * CREDIT,
        5 * CREDIT,
        10 * CREDIT,
    ]
    assert_audit_clean()


def test_a_referral_does_not_count_twice_for_a_replayed_key_with_another_code(
    sources: Sources, ledger: Ledger
) -> None:
    first = new_account("inviter")
    second = new_account("inviter")
    first_code = sources.create_account(first).account.referral_code
    second_code = sources.create_account(second).account.referral_code
    invitee = new_account("invitee")
    key = new_key("create")
    sources.create_account(invitee, key=key, referral_code=first_code)
    expect_error(
        lambda: sources.create_account(invitee, key=key, referral_code=second_code),
        grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_KEY_REUSED",
    )
    assert ledger.balance(first).reward_balance_micros == 10 * CREDIT
    assert ledger.balance(second).reward_balance_micros == 0
