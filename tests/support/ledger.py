"""Small helpers for talking to the ledger in tests."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ledger.v1 import ledger_service_pb2 as pb
from ledger.v1 import ledger_service_pb2_grpc, types_pb2

CREDIT = 1_000_000
# How long past its expiry a pending hold is left so by others' maintenance and the sweeper
# (ledger_hold_grace, sql/functions/0001_ledger.sql): a test that wants a hold timed out by a
# later call moves the clock past both.
HOLD_GRACE = timedelta(minutes=1)


def new_account(prefix: str = "acct") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def new_key(prefix: str = "k") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def error_details(error: grpc.RpcError) -> tuple[error_details_pb2.ErrorInfo, list[str]]:
    """The ErrorInfo of a failed call and the fields its BadRequest names."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, f"no rich status on {error}"
    info = error_details_pb2.ErrorInfo()
    fields: list[str] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            fields.extend(v.field for v in bad_request.field_violations)
    assert info.reason, f"no ErrorInfo on {error}"
    assert info.domain == "credit-ledger"
    return info, fields


def expect_error(
    call: Callable[[], Any], code: grpc.StatusCode, reason: str, field: str | None = None
) -> error_details_pb2.ErrorInfo:
    try:
        call()
    except grpc.RpcError as error:
        assert error.code() == code, f"{error.code()} {error.details()}"  # type: ignore[attr-defined]
        info, fields = error_details(error)
        assert info.reason == reason, (info.reason, error.details())  # type: ignore[attr-defined]
        if field is not None:
            assert info.metadata["field"] == field, (dict(info.metadata), field)
            assert fields == [field]
            assert field in error.details()  # type: ignore[attr-defined]
        return info
    raise AssertionError(f"expected {code.name} {reason}, the call succeeded")


class Ledger:
    """A LedgerService stub with short-hands for the common calls."""

    def __init__(self, stub: ledger_service_pb2_grpc.LedgerServiceStub) -> None:
        self.stub = stub

    def grant(
        self,
        account_id: str,
        credits: float | None = None,
        *,
        micros: int | None = None,
        source: int = types_pb2.CREDIT_SOURCE_PURCHASE,
        key: str | None = None,
        **fields: Any,
    ) -> pb.GrantResponse:
        amount = micros if micros is not None else round((credits or 0) * CREDIT)
        if source == types_pb2.CREDIT_SOURCE_ADMIN:  # an admin grant names its reason
            fields.setdefault("comment", "test grant")
        return self.stub.Grant(
            pb.GrantRequest(
                account_id=account_id,
                idempotency_key=key or new_key("grant"),
                amount_micros=amount,
                source=source,  # type: ignore[arg-type]
                **fields,
            )
        )

    def consume(
        self, account_id: str, micros: int, key: str | None = None, **fields: Any
    ) -> pb.ConsumeResponse:
        return self.stub.Consume(
            pb.ConsumeRequest(
                account_id=account_id,
                idempotency_key=key or new_key("consume"),
                amount_micros=micros,
                **fields,
            )
        )

    def reserve(
        self, account_id: str, micros: int, key: str | None = None, **fields: Any
    ) -> pb.ReserveResponse:
        return self.stub.Reserve(
            pb.ReserveRequest(
                account_id=account_id,
                idempotency_key=key or new_key("reserve"),
                amount_micros=micros,
                **fields,
            )
        )

    def commit(
        self, account_id: str, reservation_id: str, micros: int, key: str | None = None
    ) -> pb.CommitResponse:
        return self.stub.Commit(
            pb.CommitRequest(
                account_id=account_id,
                reservation_id=reservation_id,
                idempotency_key=key or new_key("commit"),
                amount_micros=micros,
            )
        )

    def release(
        self, account_id: str, reservation_id: str, key: str | None = None
    ) -> pb.ReleaseResponse:
        return self.stub.Release(
            pb.ReleaseRequest(
                account_id=account_id,
                reservation_id=reservation_id,
                idempotency_key=key or new_key("release"),
            )
        )

    def refund(
        self,
        account_id: str,
        reservation_id: str,
        micros: int | None = None,
        key: str | None = None,
    ) -> pb.RefundResponse:
        request = pb.RefundRequest(
            account_id=account_id,
            reservation_id=reservation_id,
            idempotency_key=key or new_key("refund"),
        )
        if micros is not None:
            request.amount_micros = micros
        return self.stub.Refund(request)

    def balance(self, account_id: str) -> pb.BalanceResponse:
        return self.stub.Balance(pb.BalanceRequest(account_id=account_id))

    def lots(self, account_id: str, include_inactive: bool = False) -> list[types_pb2.Lot]:
        return list(
            self.stub.ListLots(
                pb.ListLotsRequest(
                    account_id=account_id, include_inactive=include_inactive, page_size=1000
                )
            ).lots
        )

    def transactions(self, account_id: str, **filters: Any) -> list[pb.Transaction]:
        out: list[pb.Transaction] = []
        token = ""
        while True:
            page = self.stub.ListTransactions(
                pb.ListTransactionsRequest(
                    account_id=account_id, page_size=1000, page_token=token, **filters
                )
            )
            out.extend(page.transactions)
            token = page.next_page_token
            if not token:
                return out


async def consume_or_error(
    stub: ledger_service_pb2_grpc.LedgerServiceStub, account_id: str, key: str, micros: int
) -> pb.ConsumeResponse | grpc.aio.AioRpcError:
    """One Consume on an asyncio channel's stub; a refused call is returned, not raised,
    so many can be gathered."""
    try:
        return await stub.Consume(
            pb.ConsumeRequest(account_id=account_id, idempotency_key=key, amount_micros=micros)
        )
    except grpc.aio.AioRpcError as error:
        return error
