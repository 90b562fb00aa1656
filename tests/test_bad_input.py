"""Bad input gets INVALID_ARGUMENT (or NOT_FOUND) naming the field, and changes
nothing."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from ledger.v1 import admin_service_pb2 as admin_pb
from ledger.v1 import billing_service_pb2 as billing_pb
from ledger.v1 import ledger_service_pb2 as pb
from ledger.v1 import ledger_service_pb2_grpc, types_pb2
from ledger_server.ledger.reserved_keys import RESERVED_KEY_PREFIXES
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
                "comment": "an admin grant names its reason",
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

    def padded(make: Callable[[str, str], Any]) -> Callable[[str, str], Any]:
        """The call's own reservation id padded with dashes, which uuid.UUID drops: it was
        read as the id however long (helper-116: 1,000,036 characters)."""
        return lambda account, reservation_id: make(account, "-" * 100 + reservation_id)

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
        # Durations outside duration.proto's rules were read as another length (helper-84).
        ("Reserve", reserve(ttl=Duration(nanos=2 * 10**9)), INVALID, "INVALID_FIELD", "ttl"),
        ("Reserve", reserve(ttl=Duration(seconds=60, nanos=-5)), INVALID, "INVALID_FIELD", "ttl"),
        ("Reserve", reserve(ttl=Duration(seconds=-1, nanos=5)), INVALID, "INVALID_FIELD", "ttl"),
        (
            "Grant",
            grant(expires_in=Duration(seconds=3600, nanos=-999_999_999)),
            INVALID,
            "INVALID_FIELD",
            "expires_in",
        ),
        ("Commit", commit(reservation_id=""), INVALID, "INVALID_FIELD", "reservation_id"),
        ("Commit", commit(reservation_id="not-a-uuid"), INVALID, "INVALID_FIELD", "reservation_id"),
        ("Commit", commit(reservation_id=unknown), NOT_FOUND, "RESERVATION_NOT_FOUND", None),
        ("Commit", padded(commit()), INVALID, "INVALID_FIELD", "reservation_id"),
        ("Release", padded(release()), INVALID, "INVALID_FIELD", "reservation_id"),
        ("Refund", padded(refund()), INVALID, "INVALID_FIELD", "reservation_id"),
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


# --- keys the ledger keeps for itself ----------------------------------------------------------

_PERIOD = {
    "period_start": Timestamp(seconds=2_000_000_000),
    "period_end": Timestamp(seconds=2_002_592_000),
}
_PACK = billing_pb.CreditPack(
    pack_id="pack-reserved-key",
    translation_key="pack_reserved_key",
    credits_micros=CREDIT,
    price_minor=100,
    currency="USD",
    active=True,
)
_PLAN = billing_pb.SubscriptionPlan(
    plan_id="plan-reserved-key",
    translation_key="plan_reserved_key",
    credits_micros=CREDIT,
    period_unit=billing_pb.BILLING_PERIOD_UNIT_MONTH,
    period_count=1,
    rank=1,
    price_minor=100,
    currency="USD",
)
_PRICE = admin_pb.Price(
    feature="reserved-key", unit=types_pb2.USAGE_UNIT_IMAGES, unit_size=1, unit_price_micros=1
)

# (service, method, the request's other fields, valid, given the account, a held
# reservation and a committed one)
KeyCase = tuple[str, str, Callable[[str, str, str], Any]]
RESERVED_KEY_CASES: list[KeyCase] = [
    ("ledger", "Grant", lambda a, held, done: pb.GrantRequest(
        account_id=a, amount_micros=CREDIT, source=types_pb2.CREDIT_SOURCE_ADMIN)),
    ("ledger", "Reserve", lambda a, held, done: pb.ReserveRequest(
        account_id=a, amount_micros=CREDIT)),
    ("ledger", "Commit", lambda a, held, done: pb.CommitRequest(
        account_id=a, reservation_id=held, amount_micros=CREDIT)),
    ("ledger", "Release", lambda a, held, done: pb.ReleaseRequest(
        account_id=a, reservation_id=held)),
    ("ledger", "Refund", lambda a, held, done: pb.RefundRequest(
        account_id=a, reservation_id=done)),
    ("ledger", "Consume", lambda a, held, done: pb.ConsumeRequest(
        account_id=a, amount_micros=CREDIT)),
    ("ledger", "CreateAccount", lambda a, held, done: pb.CreateAccountRequest(
        account_id=a + "-new")),
    ("ledger", "ClaimDailyReward", lambda a, held, done: pb.ClaimDailyRewardRequest(
        account_id=a)),
    ("ledger", "Redeem", lambda a, held, done: pb.RedeemRequest(
        account_id=a, code="AAAA-BBBB-CCCC-DDDD")),
    ("ledger", "TransferReward", lambda a, held, done: pb.TransferRewardRequest(account_id=a)),
    ("billing", "PurchasePack", lambda a, held, done: billing_pb.PurchasePackRequest(
        account_id=a, pack_id=_PACK.pack_id)),
    ("billing", "Recharge", lambda a, held, done: billing_pb.RechargeRequest(
        account_id=a, amount_minor=30000, currency="CNY")),
    ("billing", "StartSubscriptionPeriod", lambda a, held, done: (
        billing_pb.StartSubscriptionPeriodRequest(account_id=a, plan_id=_PLAN.plan_id, **_PERIOD))),
    ("billing", "ChangeSubscriptionPlan", lambda a, held, done: (
        billing_pb.ChangeSubscriptionPlanRequest(account_id=a, plan_id=_PLAN.plan_id, **_PERIOD))),
    ("billing", "CreateCheckoutSession", lambda a, held, done: (
        billing_pb.CreateCheckoutSessionRequest(account_id=a, pack_id=_PACK.pack_id))),
    ("admin", "GrantCredits", lambda a, held, done: admin_pb.GrantCreditsRequest(
        account_id=a, amount_micros=CREDIT, reason="goodwill")),
    ("admin", "AdjustBalance", lambda a, held, done: admin_pb.AdjustBalanceRequest(
        account_id=a, amount_micros=CREDIT, reason="correction")),
    ("admin", "SetOverdraftLimit", lambda a, held, done: admin_pb.SetOverdraftLimitRequest(
        account_id=a, overdraft_limit_micros=CREDIT, reason="trial")),
]  # fmt: skip
# The administrators' ledger-wide keys (admin_requests): no job of the ledger claims one, so
# the ledger's prefixes are theirs to use (helper-63: refused, they broke admin tools).
ADMIN_WIDE_KEY_CASES: list[KeyCase] = [
    ("admin", "SetLowBalanceAlert", lambda a, held, done: admin_pb.SetLowBalanceAlertRequest(
        account_id=a, threshold_micros=CREDIT)),
    ("admin", "CreateCreditPack", lambda a, held, done: admin_pb.CreateCreditPackRequest(
        pack=_PACK)),
    ("admin", "UpdateCreditPack", lambda a, held, done: admin_pb.UpdateCreditPackRequest(
        pack=_PACK)),
    ("admin", "CreateSubscriptionPlan", lambda a, held, done: (
        admin_pb.CreateSubscriptionPlanRequest(plan=_PLAN))),
    ("admin", "UpdateSubscriptionPlan", lambda a, held, done: (
        admin_pb.UpdateSubscriptionPlanRequest(plan=_PLAN))),
    ("admin", "CreateRedemptionBatch", lambda a, held, done: (
        admin_pb.CreateRedemptionBatchRequest(amount_micros=CREDIT, code_count=1))),
    ("admin", "DisableRedemptionBatch", lambda a, held, done: (
        admin_pb.DisableRedemptionBatchRequest(batch_id=str(uuid.uuid4()), reason="leaked"))),
    # A reset: the change is made (the key is not what refuses it), and leaves the shared
    # database's setting at its default for the other tests.
    ("admin", "UpdateSetting", lambda a, held, done: admin_pb.UpdateSettingRequest(
        key="daily.amount_micros", reset=True, reason="r")),
    ("admin", "SetPrice", lambda a, held, done: admin_pb.SetPriceRequest(price=_PRICE)),
    ("admin", "RemovePrice", lambda a, held, done: admin_pb.RemovePriceRequest(
        feature=_PRICE.feature, unit=_PRICE.unit)),
    ("admin", "SetModelMultiplier", lambda a, held, done: admin_pb.SetModelMultiplierRequest(
        multiplier=admin_pb.ModelMultiplier(model="reserved-key", multiplier_ppm=1))),
    ("admin", "RemoveModelMultiplier", lambda a, held, done: (
        admin_pb.RemoveModelMultiplierRequest(model="reserved-key"))),
]  # fmt: skip


def test_every_mutating_rpc_is_in_the_reserved_key_table() -> None:
    """A new mutating RPC joins the table below, so its keys are checked too."""
    from ledger.v1 import admin_service_pb2, billing_service_pb2, ledger_service_pb2

    mutating = {
        method.name
        for module in (ledger_service_pb2, billing_service_pb2, admin_service_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
        if "idempotency_key" in method.input_type.fields_by_name
    }
    assert mutating == {method for _, method, _ in RESERVED_KEY_CASES + ADMIN_WIDE_KEY_CASES}


@pytest.mark.parametrize("prefix", RESERVED_KEY_PREFIXES)
@pytest.mark.parametrize(
    ("service", "method", "make"), RESERVED_KEY_CASES, ids=[c[1] for c in RESERVED_KEY_CASES]
)
def test_a_key_with_a_prefix_the_ledger_keeps_for_itself_is_refused_and_changes_nothing(
    ledger: Ledger,
    admin: Any,
    billing: Any,
    ledger_db_url: str,
    prefix: str,
    service: str,
    method: str,
    make: Callable[[str, str, str], Any],
) -> None:
    """The daily reward job claims with auto-daily:<day> and the payment worker with
    stripe:<event id>, in the account's own key namespace: a client's call that took the
    key first made the account miss the day's reward for good (helper-56)."""
    account = new_account()
    ledger.grant(account, 20)
    held = ledger.reserve(account, 5 * CREDIT).reservation.reservation_id
    done = ledger.consume(account, 2 * CREDIT).reservation.reservation_id
    before = _state(ledger, account)
    key = f"{prefix}{account}"
    request = make(account, held, done)
    request.idempotency_key = key
    stub = {"ledger": ledger.stub, "billing": billing, "admin": admin}[service]
    expect_error(
        lambda: getattr(stub, method)(request), INVALID, "INVALID_FIELD", "idempotency_key"
    )
    with pytest.raises(grpc.RpcError) as refused:
        getattr(stub, method)(request)
    assert f"must not start with '{prefix}'" in refused.value.details()  # type: ignore[attr-defined]
    assert "reserved" in refused.value.details()  # type: ignore[attr-defined]
    assert _state(ledger, account) == before
    with psycopg.connect(ledger_db_url) as conn:
        stored = conn.execute(
            "SELECT (SELECT count(*) FROM idempotency_keys WHERE idempotency_key = %(k)s)"
            " + (SELECT count(*) FROM admin_requests WHERE idempotency_key = %(k)s)"
            " + (SELECT count(*) FROM accounts WHERE account_id = %(new)s)",
            {"k": key, "new": account + "-new"},
        ).fetchone()
    assert stored == (0,)


@pytest.mark.parametrize("prefix", RESERVED_KEY_PREFIXES)
@pytest.mark.parametrize(
    ("service", "method", "make"), ADMIN_WIDE_KEY_CASES, ids=[c[1] for c in ADMIN_WIDE_KEY_CASES]
)
def test_an_administrators_ledger_wide_key_may_take_the_ledgers_prefixes(
    ledger: Ledger,
    admin: Any,
    prefix: str,
    service: str,
    method: str,
    make: Callable[[str, str, str], Any],
) -> None:
    """Whatever else the change meets (a batch that does not exist, say), its key is not
    what refuses it."""
    account = new_account()
    ledger.grant(account, 20)
    request = make(account, "", "")
    request.idempotency_key = f"{prefix}{account}-{method}"
    try:
        getattr(admin, method)(request)
    except grpc.RpcError as error:
        assert "idempotency_key" not in (error.details() or ""), error  # type: ignore[attr-defined]
