"""The outermost server interceptor: gives every unary call a request id (the caller's
``x-request-id``, or a new one), returns it in the trailing metadata, counts the call and
its latency by final status code, and logs one line per call: failures at INFO (the
caller's fault: FAILED_PRECONDITION, INVALID_ARGUMENT, ...) or WARNING (ours: INTERNAL,
UNAVAILABLE, ...), successes at DEBUG.

It sees the code the error boundary (or any interceptor inside it) aborted with, because
the handlers get a thin wrapper of the servicer context that records aborts and adds the
request id to whatever trailing metadata they set. The log line carries chosen fields
only (method, code, reason, duration): never the request or its metadata, which holds
the caller's token."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

import grpc
from google.rpc import error_details_pb2, status_pb2

from ledger_server.observability import metrics, request_id

log = logging.getLogger("ledger_server.rpc")

Context = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[[Any, Context], Awaitable[Any]]
Metadata = Sequence[tuple[str, str | bytes]]
Request = TypeVar("Request")
Response = TypeVar("Response")

_DETAILS_KEY = "grpc-status-details-bin"
# Codes that mean the server (or what it depends on) failed, not the request.
_SERVER_FAULTS = frozenset(
    {"INTERNAL", "UNKNOWN", "UNAVAILABLE", "DATA_LOSS", "DEADLINE_EXCEEDED", "UNIMPLEMENTED"}
)


def _reason(metadata: Metadata | None) -> str:
    """The ErrorInfo reason inside a google.rpc.Status trailer, "" when there is none."""
    for key, value in metadata or ():
        if key != _DETAILS_KEY or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except Exception:
            return ""
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                return str(info.reason)
    return ""


class _ObservedContext:
    """The servicer context the handlers see: the real one, plus the request id in every
    trailing metadata and a record of the reason of an abort."""

    def __init__(self, inner: Context, rid: str) -> None:
        self._inner = inner
        self._rid = rid
        self._trailing: tuple[tuple[str, str | bytes], ...] = ()
        self.reason = ""
        inner.set_trailing_metadata(((request_id.METADATA_KEY, rid),))

    def _with_id(self, metadata: Metadata) -> tuple[tuple[str, str | bytes], ...]:
        kept = tuple((k, v) for k, v in metadata if k != request_id.METADATA_KEY)
        return (*kept, (request_id.METADATA_KEY, self._rid))

    def set_trailing_metadata(self, trailing_metadata: Metadata) -> None:
        self._trailing = tuple(trailing_metadata)
        self._inner.set_trailing_metadata(self._with_id(self._trailing))

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Metadata = ()
    ) -> None:
        metadata = tuple(trailing_metadata) or self._trailing
        self.reason = self.reason or _reason(metadata)
        await self._inner.abort(code, details, self._with_id(metadata))

    async def abort_with_status(self, status: grpc.Status) -> None:
        await self.abort(status.code, status.details, tuple(status.trailing_metadata or ()))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _incoming_request_id(details: grpc.HandlerCallDetails) -> str | None:
    for key, value in details.invocation_metadata or ():
        if key == request_id.METADATA_KEY:
            return request_id.accept(value)
    return None


def _observed(method: str, incoming: str | None, inner: Handler) -> Handler:
    service, name = metrics.split_method(method)

    async def observed(request: Any, context: Context) -> Any:
        rid = incoming or request_id.new()
        token = request_id.set_current(rid)
        wrapped = _ObservedContext(context, rid)
        started = time.perf_counter()
        code = "OK"
        try:
            response = await inner(request, cast(Context, wrapped))
            set_code = context.code()
            if set_code is not None:
                code = set_code.name
            return response
        except grpc.aio.AbortError:
            aborted = context.code()
            code = aborted.name if aborted is not None else "UNKNOWN"
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception:
            code = "UNKNOWN"
            raise
        finally:
            seconds = time.perf_counter() - started
            metrics.observe_rpc(method, code, seconds)
            fields = {
                "rpc_service": service,
                "rpc_method": name,
                "code": code,
                "duration_ms": round(seconds * 1000, 3),
            }
            if code == "OK":
                log.debug("%s ok", name, extra=fields)
            else:
                fields["reason"] = wrapped.reason
                level = logging.WARNING if code in _SERVER_FAULTS else logging.INFO
                reason = f" {wrapped.reason}" if wrapped.reason else ""
                log.log(level, "%s failed: %s%s", name, code, reason, extra=fields)
            request_id.reset(token)

    return observed


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    """Put it first in the server's interceptor list, so it sees what every other does."""

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Request, Response] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Request, Response] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler  # streaming (health Watch, reflection): passed through as is
        inner = cast(Handler, handler.unary_unary)
        return grpc.unary_unary_rpc_method_handler(
            _observed(
                handler_call_details.method, _incoming_request_id(handler_call_details), inner
            ),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
