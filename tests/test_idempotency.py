"""A retry with the same idempotency key has one effect and gets the original
response; the same key with a different request is ALREADY_EXISTS and changes
nothing."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf.message import Message

from ledger.v1 import admin_service_pb2 as admin_pb
from ledger.v1 import admin_service_pb2_grpc, ledger_service_pb2_grpc, types_pb2
from ledger.v1 import ledger_service_pb2 as pb
from support.ledger import CREDIT, Ledger, expect_error, new_account, new_key


def _operations(
    ledger: Ledger,
) -> dict[str, Callable[[str], tuple[Callable[[Message], Message], Message, Message]]]:
    """Per RPC: set up an account and return (call, request, same request with another amount)."""
    stub = ledger.stub

    def grant(account: str) -> tuple[Any, Message, Message]:
        ledger.grant(account, 1)
        request = pb.GrantRequest(
            account_id=account,
            idempotency_key=new_key(),
            amount_micros=7 * CREDIT,
            source=types_pb2.CREDIT_SOURCE_ADMIN,
            comment="goodwill",
        )
        other = pb.GrantRequest()
        other.CopyFrom(request)
        other.amount_micros = 8 * CREDIT
        return stub.Grant, request, other

    def consume(account: str) -> tuple[Any, Message, Message]:
        ledger.grant(account, 50)
        request = pb.ConsumeRequest(
            account_id=account, idempotency_key=new_key(), amount_micros=3 * CREDIT
        )
        other = pb.ConsumeRequest(
            account_id=account, idempotency_key=request.idempotency_key, amount_micros=4 * CREDIT
        )
        return stub.Consume, request, other

    def reserve(account: str) -> tuple[Any, Message, Message]:
        ledger.grant(account, 50)
        request = pb.ReserveRequest(
            account_id=account, idempotency_key=new_key(), amount_micros=5 * CREDIT
        )
        other = pb.ReserveRequest(
            account_id=account, idempotency_key=request.idempotency_key, amount_micros=6 * CREDIT
        )
        return stub.Reserve, request, other

    def commit(account: str) -> tuple[Any, Message, Message]:
        ledger.grant(account, 50)
        reservation_id = ledger.reserve(account, 10 * CREDIT).reservation.reservation_id
        request = pb.CommitRequest(
            account_id=account,
            reservation_id=reservation_id,
            idempotency_key=new_key(),
            amount_micros=4 * CREDIT,
        )
        other = pb.CommitRequest()
        other.CopyFrom(request)
        other.amount_micros = 5 * CREDIT
        return stub.Commit, request, other

    def refund(account: str) -> tuple[Any, Message, Message]:
        ledger.grant(account, 50)
        reservation_id = ledger.consume(account, 10 * CREDIT).reservation.reservation_id
        request = pb.RefundRequest(
            account_id=account,
            reservation_id=reservation_id,
            idempotency_key=new_key(),
            amount_micros=2 * CREDIT,
        )
        other = pb.RefundRequest()
        other.CopyFrom(request)
        other.amount_micros = 3 * CREDIT
        return stub.Refund, request, other

    def release(account: str) -> tuple[Any, Message, Message]:
        ledger.grant(account, 50)
        reservation_id = ledger.reserve(account, 10 * CREDIT).reservation.reservation_id
        request = pb.ReleaseRequest(
            account_id=account, reservation_id=reservation_id, idempotency_key=new_key()
        )
        other = pb.ReleaseRequest()
        other.CopyFrom(request)
        other.reason = "another reason"
        return stub.Release, request, other

    return {
        "Grant": grant,
        "Consume": consume,
        "Reserve": reserve,
        "Commit": commit,
        "Refund": refund,
        "Release": release,
    }


def _state(ledger: Ledger, account: str) -> tuple[Any, ...]:
    balance = ledger.balance(account)
    return (
        balance.balance_micros,
        balance.held_micros,
        balance.available_micros,
        len(ledger.transactions(account)),
        tuple((lot.remaining_micros, lot.held_micros) for lot in ledger.lots(account, True)),
    )


OPERATIONS = ["Grant", "Consume", "Reserve", "Commit", "Refund", "Release"]


@pytest.mark.parametrize("operation", OPERATIONS)
def test_three_sequential_sends_have_one_effect(
    ledger: Ledger, operation: str, assert_audit_clean: Any
) -> None:
    account = new_account()
    call, request, _ = _operations(ledger)[operation](account)
    before = _state(ledger, account)
    first = call(request)
    after_first = _state(ledger, account)
    assert after_first != before
    responses = [first, call(request), call(request)]
    assert len({r.SerializeToString(deterministic=True) for r in responses}) == 1
    assert _state(ledger, account) == after_first
    assert_audit_clean()


@pytest.mark.parametrize("operation", OPERATIONS)
def test_three_concurrent_sends_have_one_effect(
    ledger: Ledger, server_address: str, operation: str, assert_audit_clean: Any
) -> None:
    account = new_account()
    _, request, _ = _operations(ledger)[operation](account)
    before = _state(ledger, account)
    channels = [grpc.insecure_channel(server_address) for _ in range(3)]
    try:
        calls = [
            getattr(ledger_service_pb2_grpc.LedgerServiceStub(channel), operation)
            for channel in channels
        ]
        with ThreadPoolExecutor(max_workers=3) as pool:
            responses = list(pool.map(lambda call: call(request), calls))
    finally:
        for channel in channels:
            channel.close()
    assert len({r.SerializeToString(deterministic=True) for r in responses}) == 1
    after = _state(ledger, account)
    assert after != before
    # One more replay changes nothing further: the three sends had one effect.
    getattr(ledger.stub, operation)(request)
    assert _state(ledger, account) == after
    assert_audit_clean()


@pytest.mark.parametrize("operation", OPERATIONS)
def test_same_key_with_another_request_is_rejected(
    ledger: Ledger, operation: str, assert_audit_clean: Any
) -> None:
    account = new_account()
    call, request, other = _operations(ledger)[operation](account)
    original = call(request)
    state = _state(ledger, account)
    info = expect_error(
        lambda: call(other), grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED"
    )
    assert info.metadata["idempotency_key"] == request.idempotency_key  # type: ignore[attr-defined]
    assert _state(ledger, account) == state
    assert call(request).SerializeToString() == original.SerializeToString()
    assert_audit_clean()


def test_a_key_is_scoped_to_its_account(ledger: Ledger) -> None:
    first, second = new_account(), new_account()
    key = new_key()
    ledger.grant(first, 5, key=key)
    ledger.grant(second, 5, key=key)
    assert ledger.balance(first).balance_micros == 5 * CREDIT
    assert ledger.balance(second).balance_micros == 5 * CREDIT


def test_a_replay_is_marked_in_trailing_metadata(ledger: Ledger) -> None:
    account = new_account()
    request = pb.GrantRequest(
        account_id=account,
        idempotency_key=new_key(),
        amount_micros=CREDIT,
        source=types_pb2.CREDIT_SOURCE_ADMIN,
        comment="goodwill",
    )
    _, first = ledger.stub.Grant.with_call(request)
    _, second = ledger.stub.Grant.with_call(request)
    assert ("ledger-idempotent-replay", "true") not in (first.trailing_metadata() or ())
    assert ("ledger-idempotent-replay", "true") in second.trailing_metadata()


def _admin_operations(
    admin: admin_service_pb2_grpc.AdminServiceStub,
) -> dict[str, Callable[[], tuple[Callable[[Message], Message], Message]]]:
    """Per administrators' RPC: (call, request), in the form clients usually send."""

    def create_batch() -> tuple[Any, Message]:
        request = admin_pb.CreateRedemptionBatchRequest(
            idempotency_key=new_key(), amount_micros=CREDIT, code_count=1
        )
        return admin.CreateRedemptionBatch, request

    def disable_batch() -> tuple[Any, Message]:
        _, batch = create_batch()
        batch_id = admin.CreateRedemptionBatch(batch).batch.batch_id
        request = admin_pb.DisableRedemptionBatchRequest(
            batch_id=batch_id, reason="leaked", idempotency_key=new_key()
        )
        return admin.DisableRedemptionBatch, request

    return {"CreateRedemptionBatch": create_batch, "DisableRedemptionBatch": disable_batch}


# Per RPC: its operation's name, and a field written another way the ledger reads alike.
_WRITTEN_ANOTHER_WAY: dict[str, tuple[str, Callable[[Any], None]]] = {
    "Grant": ("grant", lambda r: setattr(r, "balance_kind", types_pb2.BALANCE_KIND_MAIN)),
    "Commit": ("commit", lambda r: setattr(r, "reservation_id", r.reservation_id.upper())),
    "Refund": ("refund", lambda r: setattr(r, "reservation_id", r.reservation_id.upper())),
    "Release": ("release", lambda r: setattr(r, "reservation_id", r.reservation_id.upper())),
    "CreateRedemptionBatch": (
        "create_redemption_batch",
        lambda r: setattr(r, "max_redemptions_per_code", 1),
    ),
    "DisableRedemptionBatch": (
        "disable_redemption_batch",
        lambda r: setattr(r, "batch_id", r.batch_id.upper()),
    ),
}


def _as_sent(operation: str, request: Message) -> bytes:
    """The fingerprint releases before stored: every field as sent, but the key."""
    copy = type(request)()
    copy.CopyFrom(request)
    copy.ClearField("idempotency_key")  # type: ignore[arg-type]
    serialized = copy.SerializeToString(deterministic=True)
    return hashlib.sha256(operation.encode() + b"\x00" + serialized).digest()


@pytest.mark.parametrize("operation", list(_WRITTEN_ANOTHER_WAY))
def test_a_retry_written_another_way_the_ledger_reads_alike_is_a_replay(
    ledger: Ledger,
    admin: admin_service_pb2_grpc.AdminServiceStub,
    ledger_db_url: str,
    operation: str,
) -> None:
    """An upper-case id, the value an unset field means spelled out: the same request, not
    IDEMPOTENCY_KEY_REUSED. The usual form keeps the fingerprint releases before stored
    (a retry during a rolling deploy still matches)."""
    name, rewrite = _WRITTEN_ANOTHER_WAY[operation]
    account = new_account()
    admin_operations = _admin_operations(admin)
    if operation in admin_operations:
        call, request = admin_operations[operation]()
        stored_hash = "SELECT request_hash FROM admin_requests WHERE idempotency_key = %s"
        where: tuple[str, ...] = (request.idempotency_key,)  # type: ignore[attr-defined]
    else:
        call, request, _ = _operations(ledger)[operation](account)
        stored_hash = """SELECT request_hash FROM idempotency_keys
                          WHERE account_id = %s AND idempotency_key = %s"""
        where = (account, request.idempotency_key)  # type: ignore[attr-defined]
    first = call(request)
    with psycopg.connect(ledger_db_url) as conn:
        row = conn.execute(stored_hash, where).fetchone()
    assert row is not None and bytes(row[0]) == _as_sent(name, request)

    retry = type(request)()
    retry.CopyFrom(request)
    rewrite(retry)
    assert retry != request
    again, rpc = call.with_call(retry)  # type: ignore[attr-defined]
    assert again == first
    assert ("ledger-idempotent-replay", "true") in (rpc.trailing_metadata() or ())


@pytest.mark.parametrize("operation", ["Grant", "Commit", "Refund", "Release"])
def test_a_key_an_earlier_release_stored_as_sent_answers_its_identical_retry(
    ledger: Ledger, ledger_db_url: str, operation: str
) -> None:
    """A request written another way (MAIN spelled out, an upper-case reservation id) whose
    key the release before took, storing the request as sent: its identical retry after the
    upgrade is a replay, not IDEMPOTENCY_KEY_REUSED (helper-126: a caller told the key is
    another request's may send the grant again under a new one)."""
    name, rewrite = _WRITTEN_ANOTHER_WAY[operation]
    account = new_account()
    call, request, _ = _operations(ledger)[operation](account)
    rewrite(request)
    first = call(request)
    with psycopg.connect(ledger_db_url) as conn:  # as the release before stored it
        conn.execute(
            """UPDATE idempotency_keys SET request_hash = %s
                WHERE account_id = %s AND idempotency_key = %s""",
            (_as_sent(name, request), account, request.idempotency_key),  # type: ignore[attr-defined]
        )
    again, rpc = call.with_call(request)  # type: ignore[attr-defined]
    assert again == first
    assert ("ledger-idempotent-replay", "true") in (rpc.trailing_metadata() or ())
    other = type(request)()
    other.CopyFrom(request)
    field = "reason" if operation in ("Refund", "Release") else "comment"
    setattr(other, field, "another request")
    with pytest.raises(grpc.RpcError) as refused:  # still another request's key
        call(other)
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS  # type: ignore[attr-defined]
