"""ComposingServer: every method is served as a generic one, through the pipeline.

grpc.aio's server waits on one pending request per registered method before each call it
accepts, so the server registers none (BENCHMARKS.md, session 12); these tests hold both
halves of that: nothing reaches the wrapped server as a registered method, and a method
registered only that way is still served, composed like every other."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from ledger.v1 import ledger_service_pb2, ledger_service_pb2_grpc
from ledger_server.observability import request_id
from ledger_server.server.limits import RateLimiter
from ledger_server.server.pipeline import ComposingServer, Pipeline

ECHO = "test.v1.Echo"


class _RecordingServer:
    """Stands in for grpc.aio.Server: keeps what the ComposingServer hands it."""

    def __init__(self) -> None:
        self.registered: list[str] = []
        self.generic: list[grpc.GenericRpcHandler] = []

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.registered.append(service)

    def add_generic_rpc_handlers(self, handlers: list[grpc.GenericRpcHandler]) -> None:
        self.generic.extend(handlers)


class _CallDetails(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def _pipeline() -> Pipeline:
    return Pipeline((), RateLimiter(0, 0))


def test_no_method_reaches_the_server_as_a_registered_one() -> None:
    recording = _RecordingServer()
    composing = ComposingServer(recording, _pipeline())  # type: ignore[arg-type]
    ledger_service_pb2_grpc.add_LedgerServiceServicer_to_server(
        ledger_service_pb2_grpc.LedgerServiceServicer(), composing
    )
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), composing)

    assert recording.registered == []
    service = ledger_service_pb2.DESCRIPTOR.services_by_name["LedgerService"]
    methods = [f"/{service.full_name}/{m.name}" for m in service.methods]
    methods.append("/grpc.health.v1.Health/Check")
    for method in methods:
        served = [h.service(_CallDetails(method)) for h in recording.generic]
        assert any(handler is not None for handler in served), method


def test_a_method_registered_only_as_such_is_served_through_the_pipeline() -> None:
    async def echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return request[::-1]

    async def scenario() -> tuple[bytes, tuple[tuple[str, str | bytes], ...]]:
        composing = ComposingServer(grpc.aio.server(), _pipeline())
        composing.add_registered_method_handlers(
            ECHO, {"Reverse": grpc.unary_unary_rpc_method_handler(echo)}
        )
        port = composing.add_insecure_port("127.0.0.1:0")
        await composing.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary(f"/{ECHO}/Reverse")(b"ledger", timeout=10)
                answer = await call
                return answer, tuple(await call.trailing_metadata() or ())
        finally:
            await composing.stop(None)

    answer, trailing = asyncio.run(scenario())
    assert answer == b"regdel"
    # The pipeline's first step (observability) names every call in its trailing metadata.
    assert request_id.METADATA_KEY in dict(trailing)
