"""The one error boundary: domain errors become google.rpc.Status with an
ErrorInfo detail (reason, domain, metadata), plus a BadRequest field violation
for invalid input. Anything else is logged and answered INTERNAL without
internals."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import grpc
import psycopg
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ledger_server.db.errors import translate
from ledger_server.errors import ERROR_DOMAIN, LedgerError

log = logging.getLogger(__name__)


def to_status(error: LedgerError) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(
        reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata
    )
    details = [any_pb2.Any()]
    details[0].Pack(info)
    if error.field is not None:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=error.field, description=error.metadata.get("violation", error.message)
                )
            ]
        )
        details.append(any_pb2.Any())
        details[-1].Pack(bad_request)
    status = status_pb2.Status(code=error.code.value[0], message=error.message, details=details)
    return rpc_status.to_status(status)


_INTERNAL = status_pb2.Status(code=code_pb2.INTERNAL, message="internal error")

Context = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[[Any, Context], Awaitable[Any]]
Request = TypeVar("Request")
Response = TypeVar("Response")


def _guard(method: str, inner: Handler) -> Handler:
    async def guarded(request: Any, context: Context) -> Any:
        try:
            return await inner(request, context)
        except LedgerError as error:
            await context.abort_with_status(to_status(error))
        except psycopg.Error as exc:
            domain_error = translate(exc)
            if domain_error is not None:
                await context.abort_with_status(to_status(domain_error))
            log.exception("database error in %s", method)
            await context.abort_with_status(rpc_status.to_status(_INTERNAL))
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("unexpected error in %s", method)
            await context.abort_with_status(rpc_status.to_status(_INTERNAL))

    return guarded


class ErrorBoundary(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Request, Response] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Request, Response] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        # Under grpc.aio the unary behaviour is a coroutine function.
        inner = cast(Handler, handler.unary_unary)
        return grpc.unary_unary_rpc_method_handler(
            _guard(handler_call_details.method, inner),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
