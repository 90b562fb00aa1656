"""Observability against the session's in-process server (fast; the process-level checks,
/metrics over HTTP and the server's own log output, are in test_faults.py)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import threading
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from ledger.v1 import ledger_service_pb2 as pb
from ledger.v1 import ledger_service_pb2_grpc
from ledger_server.observability import request_id
from ledger_server.observability.logging import JsonFormatter
from ledger_server.observability.metrics import credits_in_result
from ledger_server.observability.rpc import observed
from ledger_server.server.auth import loopback_only
from support.ledger import CREDIT, Ledger, new_account


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _settled(name: str, expected: float, **labels: str) -> float:
    """The counter once it reaches ``expected`` (bounded wait): the server counts a call as
    its handler ends, which can be just after the client has its answer."""
    event = threading.Event()
    for _ in range(200):
        if _value(name, **labels) >= expected:
            break
        event.wait(0.05)
    return _value(name, **labels)


def test_calls_are_counted_by_final_code_and_answer_with_their_request_id(
    stub: ledger_service_pb2_grpc.LedgerServiceStub, ledger: Ledger
) -> None:
    account = new_account("obs")
    ledger.grant(account, 5)
    labels = {"service": "ledger.v1.LedgerService", "method": "Consume"}
    ok_before = _value("ledger_rpc_requests_total", **labels, code="OK")
    refused_before = _value("ledger_rpc_requests_total", **labels, code="FAILED_PRECONDITION")
    invalid_before = _value("ledger_rpc_requests_total", **labels, code="INVALID_ARGUMENT")

    _, call = stub.Consume.with_call(
        pb.ConsumeRequest(account_id=account, idempotency_key="c1", amount_micros=CREDIT),
        metadata=(("x-request-id", "obs-ok-1"),),
    )
    assert ("x-request-id", "obs-ok-1") in call.trailing_metadata()
    # A replay keeps its replay marker next to the request id.
    _, call = stub.Consume.with_call(
        pb.ConsumeRequest(account_id=account, idempotency_key="c1", amount_micros=CREDIT),
        metadata=(("x-request-id", "obs-ok-2"),),
    )
    trailing = dict(call.trailing_metadata())
    assert trailing["x-request-id"] == "obs-ok-2"
    assert trailing["ledger-idempotent-replay"] == "true"
    with pytest.raises(grpc.RpcError) as refused:
        stub.Consume(
            pb.ConsumeRequest(account_id=account, idempotency_key="c2", amount_micros=99 * CREDIT)
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert dict(refused.value.trailing_metadata())["x-request-id"]  # made up by the server
    # Not a request id we would log: replaced by one of ours.
    with pytest.raises(grpc.RpcError) as invalid:
        stub.Consume(
            pb.ConsumeRequest(account_id=account, idempotency_key="c3", amount_micros=-1),
            metadata=(("x-request-id", "has spaces " + "x" * 200),),
        )
    assert dict(invalid.value.trailing_metadata())["x-request-id"] != "has spaces " + "x" * 200

    total = "ledger_rpc_requests_total"
    assert _settled(total, ok_before + 2, **labels, code="OK") == ok_before + 2
    refused_after = _settled(total, refused_before + 1, **labels, code="FAILED_PRECONDITION")
    assert refused_after == refused_before + 1
    invalid_after = _settled(total, invalid_before + 1, **labels, code="INVALID_ARGUMENT")
    assert invalid_after == invalid_before + 1


def test_replays_do_not_count_credits_twice(ledger: Ledger) -> None:
    account = new_account("obs-credits")
    granted_before = _value("ledger_credits_granted_micros_total", source="purchase")
    ledger.grant(account, 7, key="g1")
    ledger.grant(account, 7, key="g1")  # a replay
    granted = _settled("ledger_credits_granted_micros_total", granted_before, source="purchase")
    assert granted == granted_before + 7 * CREDIT
    consumed_before = _value("ledger_credits_consumed_micros_total", source="purchase")
    request = pb.ConsumeRequest(account_id=account, idempotency_key="once", amount_micros=CREDIT)
    ledger.stub.Consume(request)
    ledger.stub.Consume(request)  # a replay
    assert (
        _value("ledger_credits_consumed_micros_total", source="purchase")
        == consumed_before + CREDIT
    )


def test_credits_in_a_result_count_every_new_lot_by_source_and_nothing_on_a_replay() -> None:
    lot = {"source": "purchase", "amount_micros": 10 * CREDIT}
    bonus = {"source": "promotion", "amount_micros": CREDIT}
    assert credits_in_result("recharge", {"lot": lot, "bonus_lot": bonus}) == (
        {"purchase": 10 * CREDIT, "promotion": CREDIT},
        {},
    )
    assert credits_in_result("recharge", {"lot": lot, "bonus_lot": None}) == (
        {"purchase": 10 * CREDIT},
        {},
    )
    assert credits_in_result("recharge", {"lot": lot, "replayed": True}) == ({}, {})
    # A transfer moves credits between lots: nothing new.
    assert credits_in_result("transfer_reward", {"lot": lot}) == ({}, {})
    charged = {"reservation": {"lots": [{"source": "daily", "committed_micros": 3}] * 2}}
    assert credits_in_result("consume", charged) == ({}, {"daily": 6})


def test_json_lines_carry_the_request_id_and_mask_tokens() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.observability")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with request_id.bound("rid-123"):
            logger.warning(
                "caller sent authorization: Bearer abc.DEF-123",
                extra={"authorization": "Bearer abc.DEF-123", "code": "OK", "n": 3},
            )
    finally:
        logger.removeHandler(handler)
    line = json.loads(stream.getvalue())
    assert line["request_id"] == "rid-123"
    assert line["level"] == "WARNING"
    assert (line["code"], line["n"]) == ("OK", 3)
    assert "abc.DEF-123" not in stream.getvalue()
    assert line["authorization"] == "[redacted]"


def test_an_answer_to_a_call_that_has_ended_is_counted_cancelled_not_unknown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A handler that finishes its work after its client gave up (as a charge whose database
    work must complete) then answers an error: grpc cannot send it (ExecuteBatchError). That
    is the client's cancellation, not a fault of ours to log as UNKNOWN at WARNING."""
    method = "/test.Observed/LateRefusal"
    handler_ended = threading.Event()

    async def late_refusal(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        with contextlib.suppress(asyncio.CancelledError):  # its work goes on
            await asyncio.sleep(10)
        try:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "too late")
        finally:
            handler_ended.set()
        return b""

    async def run() -> None:
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(observed(method, late_refusal))
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("test.Observed", {"LateRefusal": handler}),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as gone:
                    await channel.unary_unary(method)(b"", timeout=0.2)
                assert gone.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            for _ in range(100):
                if handler_ended.is_set():
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.1)  # the handler's task ends just after its abort
        finally:
            await server.stop(None)

    labels = {"service": "test.Observed", "method": "LateRefusal"}
    with caplog.at_level(logging.INFO, logger="ledger_server.rpc"):
        asyncio.run(run())
    assert handler_ended.is_set()
    assert _value("ledger_rpc_requests_total", **labels, code="UNKNOWN") == 0
    assert _value("ledger_rpc_requests_total", **labels, code="CANCELLED") == 1
    lines = [r for r in caplog.records if r.name == "ledger_server.rpc"]
    assert [(r.levelno, r.getMessage()) for r in lines] == [
        (logging.INFO, "LateRefusal failed: CANCELLED")
    ]


def test_a_call_whose_peer_grpc_no_longer_names_is_not_refused_as_remote() -> None:
    """grpc names no peer ("") once a call's stream has ended; loopback_only must not
    answer it UNAUTHENTICATED LOOPBACK_ONLY (a refusal of a caller from elsewhere)."""

    class EndedCall:
        aborted = False

        def peer(self) -> str:
            return ""

        async def abort_with_status(self, *args: object) -> None:
            self.aborted = True

    async def inner(request: object, context: object) -> bytes:
        raise AssertionError("an ended call is not served")

    context = EndedCall()
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(loopback_only(inner)(b"", context))  # type: ignore[arg-type]
    assert not context.aborted
