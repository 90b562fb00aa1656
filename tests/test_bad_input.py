"""Bad input gets INVALID_ARGUMENT (or NOT_FOUND) naming the field, and changes
nothing."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from ledger.v1 import ledger_service_pb2 as pb
from ledger.v1 import ledger_service_pb2_grpc, types_pb2
from support.ledger import CREDIT, Ledger, error_details, expect_error, new_account, new_key

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND

Case = tuple[str, Callable[[str, str], Any], grpc.StatusCode, str, str | None]


def _cases() -> list[Case]:
    def grant(**overrides: Any) -> Callable[[str, str], pb.GrantRequest]:
        def make(account: str, reservation_id: str) -> pb.GrantRequest:
            fields: dict[str, Any] = {
                "account_id": account,
                "idempotency_key": new_key(),
                "amount_micros": CREDIT,
                "source": types_pb2.CREDIT_SOURCE_ADMIN,
            }
            fields.update(overrides)
            return pb.GrantRequest(**fields)

        return make

    def consume(**overrides: Any) -> Callable[[str, str], pb.ConsumeRequest]:
        def make(account: str, reservation_id: str) -> pb.ConsumeRequest:
            fields: dict[str, Any] = {
                "account_id": account,
                "idempotency_key": new_key(),
                "amount_micros": CREDIT,
            }
            fields.update(overrides)
            return pb.ConsumeRequest(**fields)

        return make

    def reserve(**overrides: Any) -> Callable[[str, str], pb.ReserveRequest]:
        def make(account: str, reservation_id: str) -> pb.ReserveRequest:
            fields: dict[str, Any] = {
                "account_id": account,
                "idempotency_key": new_key(),
                "amount_micros": CREDIT,
            }
            fields.update(overrides)
            return pb.ReserveRequest(**fields)

        return make

    def commit(**overrides: Any) -> Callable[[str, str], pb.CommitRequest]:
        def make(account: str, reservation_id: str) -> pb.CommitRequest:
            fields: dict[str, Any] = {
                "account_id": account,
                "reservation_id": reservation_id,
                "idempotency_key": new_key(),
                "amount_micros": CREDIT,
            }
            fields.update(overrides)
            return pb.CommitRequest(**{k: v for k, v in fields.items() if v is not None})

        return make

    def release(**overrides: Any) -> Callable[[str, str], pb.ReleaseRequest]:
        def make(account: str, reservation_id: str) -> pb.ReleaseRequest:
            fields: dict[str, Any] = {
                "account_id": account,
                "reservation_id": reservation_id,
                "idempotency_key": new_key(),
            }
            fields.update(overrides)
            return pb.ReleaseRequest(**fields)

        return make

    def refund(**overrides: Any) -> Callable[[str, str], pb.RefundRequest]:
        def make(account: str, reservation_id: str) -> pb.RefundRequest:
            fields: dict[str, Any] = {
                "account_id": account,
                "reservation_id": reservation_id,
                "idempotency_key": new_key(),
            }
            fields.update(overrides)
            return pb.RefundRequest(**fields)

        return make

    unknown = str(uuid.uuid4())
    past = Timestamp(seconds=1_000_000_000)
    return [
        ("Grant", grant(account_id=""), INVALID, "INVALID_FIELD", "account_id"),
        ("Grant", grant(account_id="x" * 129), INVALID, "INVALID_FIELD", "account_id"),
        ("Grant", grant(account_id="has space"), INVALID, "INVALID_FIELD", "account_id"),
        # Python's `$` also matches before a final newline: the patterns must match whole.
        ("Grant", grant(account_id="alice\n"), INVALID, "INVALID_FIELD", "account_id"),
        ("Grant", grant(idempotency_key="key\n"), INVALID, "INVALID_FIELD", "idempotency_key"),
        ("Grant", grant(amount_micros=0), INVALID, "INVALID_FIELD", "amount_micros"),
        ("Grant", grant(amount_micros=-5), INVALID, "INVALID_FIELD", "amount_micros"),
        ("Grant", grant(amount_micros=10**18), INVALID, "INVALID_FIELD", "amount_micros"),
        ("Grant", grant(idempotency_key=""), INVALID, "INVALID_FIELD", "idempotency_key"),
        ("Grant", grant(idempotency_key="k" * 129), INVALID, "INVALID_FIELD", "idempotency_key"),
        ("Grant", grant(source=0), INVALID, "INVALID_FIELD", "source"),
        ("Grant", grant(source=999), INVALID, "INVALID_FIELD", "source"),
        ("Grant", grant(expires_at=past), INVALID, "INVALID_FIELD", "expires_at"),
        ("Grant", grant(expires_in=Duration(seconds=-1)), INVALID, "INVALID_FIELD", "expires_in"),
        ("Grant", grant(comment="c" * 1025), INVALID, "INVALID_FIELD", "comment"),
        ("Grant", grant(comment="nul\x00byte"), INVALID, "INVALID_FIELD", "comment"),
        ("Grant", grant(external_ref="r" * 257), INVALID, "INVALID_FIELD", "external_ref"),
        # "pay-1" and "pay-1\n" would be two payments
        ("Grant", grant(external_ref="pay-1\n"), INVALID, "INVALID_FIELD", "external_ref"),
        ("Grant", grant(external_ref="pay 1"), INVALID, "INVALID_FIELD", "external_ref"),
        ("Grant", grant(balance_kind=7), INVALID, "INVALID_FIELD", "balance_kind"),
        ("Consume", consume(account_id=""), INVALID, "INVALID_FIELD", "account_id"),
        ("Consume", consume(amount_micros=0), INVALID, "INVALID_FIELD", "amount_micros"),
        ("Consume", consume(amount_micros=-1), INVALID, "INVALID_FIELD", "amount_micros"),
        ("Consume", consume(idempotency_key=""), INVALID, "INVALID_FIELD", "idempotency_key"),
        ("Consume", consume(feature="f" * 65), INVALID, "INVALID_FIELD", "feature"),
        ("Consume", consume(feature="chat\n"), INVALID, "INVALID_FIELD", "feature"),
        ("Consume", consume(account_id="nobody-" + unknown), NOT_FOUND, "ACCOUNT_NOT_FOUND", None),
        ("Reserve", reserve(amount_micros=0), INVALID, "INVALID_FIELD", "amount_micros"),
        ("Reserve", reserve(idempotency_key=""), INVALID, "INVALID_FIELD", "idempotency_key"),
        ("Reserve", reserve(ttl=Duration(seconds=0, nanos=-1)), INVALID, "INVALID_FIELD", "ttl"),
        ("Commit", commit(reservation_id=""), INVALID, "INVALID_FIELD", "reservation_id"),
        ("Commit", commit(reservation_id="not-a-uuid"), INVALID, "INVALID_FIELD", "reservation_id"),
        ("Commit", commit(reservation_id=unknown), NOT_FOUND, "RESERVATION_NOT_FOUND", None),
        ("Commit", commit(amount_micros=None), INVALID, "INVALID_FIELD", "amount_micros"),
        ("Commit", commit(amount_micros=-1), INVALID, "INVALID_FIELD", "amount_micros"),
        ("Commit", commit(idempotency_key=""), INVALID, "INVALID_FIELD", "idempotency_key"),
        ("Release", release(reservation_id=unknown), NOT_FOUND, "RESERVATION_NOT_FOUND", None),
        ("Release", release(idempotency_key=""), INVALID, "INVALID_FIELD", "idempotency_key"),
        ("Release", release(reason="r" * 1025), INVALID, "INVALID_FIELD", "reason"),
        ("Refund", refund(reservation_id=unknown), NOT_FOUND, "RESERVATION_NOT_FOUND", None),
        ("Refund", refund(amount_micros=0), INVALID, "INVALID_FIELD", "amount_micros"),
        ("Refund", refund(idempotency_key=""), INVALID, "INVALID_FIELD", "idempotency_key"),
    ]


CASES = _cases()


def _state(ledger: Ledger, account: str) -> tuple[Any, ...]:
    balance = ledger.balance(account)
    return (
        balance.balance_micros,
        balance.held_micros,
        len(ledger.transactions(account)),
        tuple((lot.remaining_micros, lot.held_micros) for lot in ledger.lots(account, True)),
    )


@pytest.mark.parametrize(
    ("method", "make", "code", "reason", "field"),
    CASES,
    ids=[f"{c[0]}-{c[4] or c[3]}-{i}" for i, c in enumerate(CASES)],
)
def test_bad_input_is_refused_and_changes_nothing(
    ledger: Ledger,
    method: str,
    make: Callable[[str, str], Any],
    code: grpc.StatusCode,
    reason: str,
    field: str | None,
) -> None:
    account = new_account()
    ledger.grant(account, 20)
    reservation_id = ledger.reserve(account, 5 * CREDIT).reservation.reservation_id
    if method == "Refund":
        reservation_id = ledger.consume(account, 2 * CREDIT).reservation.reservation_id
    before = _state(ledger, account)
    request = make(account, reservation_id)
    info = expect_error(lambda: getattr(ledger.stub, method)(request), code, reason, field)
    if reason == "RESERVATION_NOT_FOUND":
        assert info.metadata["reservation_id"] == request.reservation_id
    assert _state(ledger, account) == before


@pytest.mark.parametrize(
    ("method", "request_type"),
    [
        ("Balance", pb.BalanceRequest),
        ("ListLots", pb.ListLotsRequest),
        ("ListTransactions", pb.ListTransactionsRequest),
    ],
)
def test_reads_name_the_account(ledger: Ledger, method: str, request_type: type[Any]) -> None:
    call = getattr(ledger.stub, method)
    expect_error(lambda: call(request_type(account_id="")), INVALID, "INVALID_FIELD", "account_id")
    info = expect_error(
        lambda: call(request_type(account_id=new_account("missing"))),
        NOT_FOUND,
        "ACCOUNT_NOT_FOUND",
    )
    assert info.metadata["account_id"].startswith("missing-")


def test_malformed_page_tokens_are_refused(ledger: Ledger) -> None:
    account = new_account()
    ledger.grant(account, 1)
    # JSON nested 2,000 deep: json.loads raises RecursionError
    nested = base64.urlsafe_b64encode(b'{"p":' + b"[" * 2000 + b"]" * 2000 + b',"f":"x"}')
    for token in ("garbage", "eyJwIjoxfQ", "%%%", nested.decode()):
        expect_error(
            lambda token=token: ledger.stub.ListTransactions(
                pb.ListTransactionsRequest(account_id=account, page_token=token)
            ),
            INVALID,
            "INVALID_FIELD",
            "page_token",
        )
    first = ledger.stub.ListTransactions(
        pb.ListTransactionsRequest(account_id=account, page_size=1)
    )
    ledger.grant(account, 1)
    page = ledger.stub.ListTransactions(pb.ListTransactionsRequest(account_id=account, page_size=1))
    assert page.next_page_token
    expect_error(
        lambda: ledger.stub.ListTransactions(
            pb.ListTransactionsRequest(account_id=new_account(), page_token=page.next_page_token)
        ),
        INVALID,
        "INVALID_FIELD",
        "page_token",
    )
    assert first.transactions


def test_get_reservation_of_another_account_is_not_found(ledger: Ledger) -> None:
    owner, other = new_account(), new_account()
    ledger.grant(owner, 5)
    ledger.grant(other, 5)
    reservation_id = ledger.reserve(owner, CREDIT).reservation.reservation_id
    expect_error(
        lambda: ledger.stub.GetReservation(
            pb.GetReservationRequest(account_id=other, reservation_id=reservation_id)
        ),
        NOT_FOUND,
        "RESERVATION_NOT_FOUND",
    )
    expect_error(
        lambda: ledger.commit(other, reservation_id, CREDIT), NOT_FOUND, "RESERVATION_NOT_FOUND"
    )


def test_oversized_messages_are_refused(server_address: str) -> None:
    with grpc.insecure_channel(
        server_address, options=[("grpc.max_send_message_length", 16 * 1024 * 1024)]
    ) as channel:
        stub = ledger_service_pb2_grpc.LedgerServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Grant(
                pb.GrantRequest(
                    account_id=new_account(),
                    idempotency_key=new_key(),
                    amount_micros=CREDIT,
                    source=types_pb2.CREDIT_SOURCE_ADMIN,
                    comment="x" * (5 * 1024 * 1024),
                )
            )
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "body",
    [
        b"\x0a\x03\xed\xa0\x80",  # account_id: a lone surrogate, not UTF-8
        b"\x0a\x14truncated",  # a string field cut short (20 bytes announced, 9 sent)
    ],
)
def test_a_request_that_does_not_parse_is_refused_by_field(
    server_address: str, body: bytes
) -> None:
    """grpcio answers UNKNOWN, with no ErrorInfo, when the request cannot be parsed."""
    with grpc.insecure_channel(server_address) as channel:
        balance = channel.unary_unary("/ledger.v1.LedgerService/Balance")
        with pytest.raises(grpc.RpcError) as raised:
            balance(body)
    error = raised.value
    assert error.code() == INVALID, error.details()  # type: ignore[attr-defined]
    info, _ = error_details(error)
    assert (info.reason, info.metadata["field"]) == ("INVALID_FIELD", "request")
