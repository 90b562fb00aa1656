"""Observability of every unary call, the outermost step of its composed behaviour
(server/pipeline.py): gives the call a request id (the caller's ``x-request-id``, or a new
one), returns it in the trailing metadata, counts the call and its latency by final status
code, and logs one line per call: failures at INFO (the caller's fault:
FAILED_PRECONDITION, INVALID_ARGUMENT, ...) or WARNING (ours: INTERNAL, UNAVAILABLE, ...),
successes at DEBUG.

It sees the code the error boundary (or any step inside it: authentication, the rate limit)
aborted with, because the inner steps get a thin wrapper of the servicer context that records
aborts and adds the request id to whatever trailing metadata they set. The log line carries
chosen fields only (method, code, reason, duration): never the request or its metadata, which
holds the caller's token."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, cast

import grpc
from google.rpc import error_details_pb2, status_pb2

from ledger_server.observability import metrics, request_id

log = logging.getLogger("ledger_server.rpc")

Context = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[[Any, Context], Awaitable[Any]]
Metadata = Sequence[tuple[str, str | bytes]]

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
        try:
            await self._inner.abort(code, details, self._with_id(metadata))
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            # grpc could not send the status (ExecuteBatchError): the call had ended, its
            # client gone or its deadline passed, so nobody hears this answer. Counted and
            # logged as the cancellation it is, not as a fault of ours (UNKNOWN).
            raise asyncio.CancelledError from error

    async def abort_with_status(self, status: grpc.Status) -> None:
        await self.abort(status.code, status.details, tuple(status.trailing_metadata or ()))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _incoming_request_id(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == request_id.METADATA_KEY:
            return request_id.accept(value)
    return None


def observed(method: str, inner: Handler) -> Handler:
    """``inner`` (the unary method ``method``) with a request id, metrics and its log line."""
    service, name = metrics.split_method(method)

    async def observed_call(request: Any, context: Context) -> Any:
        rid = _incoming_request_id(context.invocation_metadata()) or request_id.new()
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

    return observed_call
