"""The one error boundary, the innermost step of every unary call (server/pipeline.py):
domain errors become google.rpc.Status with an ErrorInfo detail (reason, domain, metadata),
plus a BadRequest field violation for invalid input. Anything else is logged and answered
INTERNAL without internals."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import psycopg
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ledger_server.db.errors import translate
from ledger_server.errors import ERROR_DOMAIN, LedgerError
from ledger_server.server.request_parsing import Undecodable

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


def guard(method: str, inner: Handler) -> Handler:
    """``inner`` (the servicer method ``method``) behind the error boundary."""

    async def guarded(request: Any, context: Context) -> Any:
        try:
            if type(request) is Undecodable:
                raise request.error()
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
