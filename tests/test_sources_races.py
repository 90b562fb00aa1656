"""Concurrent calls on the credit sources: an account opens once, the sign-up bonus, the
daily reward, a referral reward and a redemption are each applied exactly once."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
import pytest

from ledger.v1 import ledger_service_pb2 as pb
from ledger.v1 import ledger_service_pb2_grpc, types_pb2
from support.ledger import CREDIT, Ledger, error_details, new_account, new_key
from support.sources import Sources

AuditCheck = Callable[[], None]
T = TypeVar("T")
N = 12


@pytest.fixture
def sources(stub: Any, admin: Any, billing: Any) -> Sources:
    return Sources(stub, admin, billing)


def _all_at_once(
    server_address: str,
    calls: list[Callable[[ledger_service_pb2_grpc.LedgerServiceStub], T]],
) -> list[T | grpc.RpcError]:
    """Runs each call on its own channel and thread, released together."""
    start = threading.Barrier(len(calls))

    def run(call: Callable[[ledger_service_pb2_grpc.LedgerServiceStub], T]) -> T | grpc.RpcError:
        with grpc.insecure_channel(server_address) as channel:
            grpc.channel_ready_future(channel).result(timeout=10)
            stub = ledger_service_pb2_grpc.LedgerServiceStub(channel)
            start.wait(timeout=30)
            try:
                return call(stub)
            except grpc.RpcError as error:
                return error

    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(run, calls))


def _outcomes(results: list[Any]) -> Counter[str]:
    out: Counter[str] = Counter()
    for result in results:
        if isinstance(result, grpc.RpcError):
            out[error_details(result)[0].reason] += 1
        else:
            out["ok"] += 1
    return out


def test_concurrent_creations_open_the_account_once(
    sources: Sources,
    server_address: str,
    ledger: Ledger,
    configure: Any,
    assert_audit_clean: AuditCheck,
) -> None:
    configure.reset("signup.enabled")
    account = new_account()
    results = _all_at_once(
        server_address,
        [
            lambda stub: stub.CreateAccount(
                pb.CreateAccountRequest(account_id=account, idempotency_key=new_key())
            )
            for _ in range(N)
        ],
    )
    assert _outcomes(results) == Counter({"ok": 1, "ACCOUNT_EXISTS": N - 1})
    assert ledger.balance(account).balance_micros == 100 * CREDIT
    assert len(ledger.lots(account, include_inactive=True)) == 1
    assert_audit_clean()


def test_concurrent_first_grants_apply_the_signup_bonus_once(
    server_address: str, ledger: Ledger, configure: Any, assert_audit_clean: AuditCheck
) -> None:
    configure.reset("signup.enabled")
    account = new_account()
    results = _all_at_once(
        server_address,
        [
            lambda stub: stub.Grant(
                pb.GrantRequest(
                    account_id=account,
                    idempotency_key=new_key(),
                    amount_micros=CREDIT,
                    source=types_pb2.CREDIT_SOURCE_PURCHASE,
                )
            )
            for _ in range(N)
        ],
    )
    assert _outcomes(results) == Counter({"ok": N})
    assert ledger.balance(account).balance_micros == (100 + N) * CREDIT
    signups = [lot for lot in ledger.lots(account) if lot.source == types_pb2.CREDIT_SOURCE_SIGNUP]
    assert len(signups) == 1
    assert_audit_clean()


def test_concurrent_daily_claims_grant_once(
    sources: Sources, server_address: str, ledger: Ledger, assert_audit_clean: AuditCheck
) -> None:
    account = sources.create_account().account.account_id
    results = _all_at_once(
        server_address,
        [
            lambda stub: stub.ClaimDailyReward(
                pb.ClaimDailyRewardRequest(account_id=account, idempotency_key=new_key())
            )
            for _ in range(N)
        ],
    )
    assert _outcomes(results) == Counter({"ok": 1, "DAILY_REWARD_ALREADY_CLAIMED": N - 1})
    assert ledger.balance(account).balance_micros == 10 * CREDIT
    assert_audit_clean()


def test_concurrent_referred_signups_each_reward_the_inviter(
    sources: Sources, server_address: str, ledger: Ledger, assert_audit_clean: AuditCheck
) -> None:
    inviter = new_account("inviter")
    code = sources.create_account(inviter).account.referral_code
    results = _all_at_once(
        server_address,
        [
            lambda stub: stub.CreateAccount(
                pb.CreateAccountRequest(
                    account_id=new_account("invitee"),
                    idempotency_key=new_key(),
                    referral_code=code,
                )
            )
            for _ in range(N)
        ],
    )
    assert _outcomes(results) == Counter({"ok": N})
    assert ledger.balance(inviter).reward_balance_micros == N * 10 * CREDIT
    assert_audit_clean()


def test_one_account_redeeming_one_code_concurrently_gets_it_once(
    sources: Sources, server_address: str, ledger: Ledger, assert_audit_clean: AuditCheck
) -> None:
    (code,) = sources.create_batch(10 * CREDIT, max_redemptions_per_code=5).codes
    account = sources.create_account().account.account_id
    results = _all_at_once(
        server_address,
        [
            lambda stub: stub.Redeem(
                pb.RedeemRequest(account_id=account, idempotency_key=new_key(), code=code)
            )
            for _ in range(N)
        ],
    )
    assert _outcomes(results) == Counter({"ok": 1, "REDEMPTION_CODE_ALREADY_REDEEMED": N - 1})
    assert ledger.balance(account).balance_micros == 10 * CREDIT
    assert_audit_clean()


def test_concurrent_reward_transfers_never_move_more_than_the_reward_balance(
    sources: Sources, server_address: str, ledger: Ledger, assert_audit_clean: AuditCheck
) -> None:
    inviter = new_account("inviter")
    code = sources.create_account(inviter).account.referral_code
    for _ in range(3):
        sources.create_account(referral_code=code)  # 30 credits of rewards
    results = _all_at_once(
        server_address,
        [
            lambda stub: stub.TransferReward(
                pb.TransferRewardRequest(
                    account_id=inviter, idempotency_key=new_key(), amount_micros=4 * CREDIT
                )
            )
            for _ in range(N)
        ],
    )
    assert _outcomes(results) == Counter({"ok": 7, "INSUFFICIENT_REWARD_BALANCE": N - 7})
    balance = ledger.balance(inviter)
    assert (balance.balance_micros, balance.reward_balance_micros) == (28 * CREDIT, 2 * CREDIT)
    assert_audit_clean()
