"""A scripted stand-in for LedgerService, for client behaviour the real server cannot be
made to show on demand: a CONFLICT on the first attempts, a call that outlives its
deadline, odd error details, what metadata and which client certificate reached the server.
It answers Balance, Consume, Reserve, Commit and Release."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from ledger.v1 import ledger_service_pb2 as pb

SERVICE = "ledger.v1.LedgerService"


@dataclass(frozen=True)
class Failure(grpc.Status):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...] = ()


def failure(
    code: grpc.StatusCode,
    reason: str = "",
    *,
    domain: str = "credit-ledger",
    metadata: Mapping[str, str] | None = None,
    message: str | None = None,
    also: tuple[Message, ...] = (),
) -> Failure:
    """A failed call with a google.rpc.Status trailer: the details in ``also`` first, then
    an ErrorInfo with ``reason`` (none when the reason is empty)."""
    details = list(also)
    if reason:
        details.append(
            error_details_pb2.ErrorInfo(reason=reason, domain=domain, metadata=metadata or {})
        )
    packed = []
    for detail in details:
        packed.append(any_pb2.Any())
        packed[-1].Pack(detail)
    text = message if message is not None else (reason.lower() or code.name.lower())
    status = status_pb2.Status(code=code.value[0], message=text, details=packed)
    return Failure(code, text, (("grpc-status-details-bin", status.SerializeToString()),))


@dataclass
class Received:
    method: str
    request: Message
    metadata: dict[str, str]
    peer_common_names: list[str]


@dataclass
class FakeLedger:
    """``failures`` are answered in order, one per call, before calls succeed; ``block``
    makes every call wait until it is set."""

    failures: list[Failure] = field(default_factory=list)
    block: threading.Event | None = None
    received: list[Received] = field(default_factory=list)
    # Failures of one method only (by name, "Commit"), answered before ``failures``.
    method_failures: dict[str, list[Failure]] = field(default_factory=dict)

    def _record(self, method: str, request: Message, context: grpc.ServicerContext) -> None:
        raw: bytes | Iterable[bytes] = context.auth_context().get("x509_common_name", [])
        names = [raw] if isinstance(raw, bytes) else list(raw)
        self.received.append(
            Received(
                method,
                request,
                {k: v for k, v in context.invocation_metadata() if isinstance(v, str)},
                [name.decode() for name in names],
            )
        )
        if self.block is not None:
            self.block.wait(timeout=30)
        if self.method_failures.get(method):
            context.abort_with_status(self.method_failures[method].pop(0))
        if self.failures:
            context.abort_with_status(self.failures.pop(0))

    def balance(
        self, request: pb.BalanceRequest, context: grpc.ServicerContext
    ) -> pb.BalanceResponse:
        self._record("Balance", request, context)
        return pb.BalanceResponse(account_id=request.account_id, balance_micros=42)

    def consume(
        self, request: pb.ConsumeRequest, context: grpc.ServicerContext
    ) -> pb.ConsumeResponse:
        self._record("Consume", request, context)
        return pb.ConsumeResponse(transaction_id="tx-" + request.idempotency_key)

    def reserve(
        self, request: pb.ReserveRequest, context: grpc.ServicerContext
    ) -> pb.ReserveResponse:
        self._record("Reserve", request, context)
        reservation = pb.Reservation(
            reservation_id="res-" + request.idempotency_key,
            account_id=request.account_id,
            held_micros=request.amount_micros,
            status=pb.RESERVATION_STATUS_PENDING,
        )
        return pb.ReserveResponse(reservation=reservation)

    def commit(self, request: pb.CommitRequest, context: grpc.ServicerContext) -> pb.CommitResponse:
        self._record("Commit", request, context)
        return pb.CommitResponse(transaction_id="tx-" + request.idempotency_key)

    def release(
        self, request: pb.ReleaseRequest, context: grpc.ServicerContext
    ) -> pb.ReleaseResponse:
        self._record("Release", request, context)
        return pb.ReleaseResponse()

    def handler(self) -> grpc.GenericRpcHandler:
        unary = grpc.unary_unary_rpc_method_handler
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Reserve": unary(
                    self.reserve,
                    request_deserializer=pb.ReserveRequest.FromString,
                    response_serializer=pb.ReserveResponse.SerializeToString,
                ),
                "Commit": unary(
                    self.commit,
                    request_deserializer=pb.CommitRequest.FromString,
                    response_serializer=pb.CommitResponse.SerializeToString,
                ),
                "Release": unary(
                    self.release,
                    request_deserializer=pb.ReleaseRequest.FromString,
                    response_serializer=pb.ReleaseResponse.SerializeToString,
                ),
                "Balance": grpc.unary_unary_rpc_method_handler(
                    self.balance,
                    request_deserializer=pb.BalanceRequest.FromString,
                    response_serializer=pb.BalanceResponse.SerializeToString,
                ),
                "Consume": grpc.unary_unary_rpc_method_handler(
                    self.consume,
                    request_deserializer=pb.ConsumeRequest.FromString,
                    response_serializer=pb.ConsumeResponse.SerializeToString,
                ),
            },
        )


@contextmanager
def serve_fake(
    fake: FakeLedger, credentials: grpc.ServerCredentials | None = None
) -> Iterator[str]:
    """Serves ``fake`` on 127.0.0.1 (TLS when ``credentials`` are given); yields host:port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((fake.handler(),))
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        if fake.block is not None:
            fake.block.set()
        server.stop(grace=None)
