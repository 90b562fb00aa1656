"""The standard health RPC as a typed call on either kind of channel: the bench waits on it
(sync) and uses it as the transport limit (asyncio). The typed stubs declare HealthStub
without its methods, so the call is built here instead."""

from __future__ import annotations

from typing import Any, overload

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2

Request = health_pb2.HealthCheckRequest
Response = health_pb2.HealthCheckResponse
HEALTH_CHECK = "/grpc.health.v1.Health/Check"


@overload
def check(channel: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable[Request, Response]: ...
@overload
def check(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable[Request, Response]: ...
def check(channel: grpc.Channel | grpc.aio.Channel) -> Any:
    return channel.unary_unary(
        HEALTH_CHECK,
        request_serializer=Request.SerializeToString,
        response_deserializer=Response.FromString,
    )
