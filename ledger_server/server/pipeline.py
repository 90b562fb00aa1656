"""The behaviour of every RPC, composed once per method when the services are registered.

A unary call runs, from the outside in:

1. observability (observability/rpc.py): the request id, the metrics, the one log line; it
   sees the final code of every call, aborts by the steps below included;
2. authentication and authorization (server/auth.py), or, with no callers configured, the
   loopback-only check;
3. the caller's rate limit, and the call's deadline handed to the database
   (server/limits.py);
4. the error boundary (server/error_boundary.py);
5. the servicer method.

Health and reflection are open: no authentication, no rate limit (and no deadline). Streaming
methods (health Watch, reflection) are served as they are; with callers configured, a
streaming method that is not open is not served at all (UNIMPLEMENTED): every ledger RPC is
unary.

ComposingServer is the grpc.aio.Server the services register with (the generated
``add_*Servicer_to_server`` functions, health and reflection): it serves every method as a
generic one (ComposingServer.add_registered_method_handlers says why) and composes each
method's handler on its first call, then keeps it. A call runs that one composed behaviour;
there are no server interceptors, which grpc.aio would run, each rebuilding the method
handler, on every call."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeAlias, cast

import grpc

from ledger_server.observability.rpc import observed
from ledger_server.security import Caller
from ledger_server.server.auth import Authenticator, authorized, is_open, loopback_only
from ledger_server.server.error_boundary import guard
from ledger_server.server.limits import RateLimiter, limited
from ledger_server.server.request_parsing import tolerant

Context = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[[Any, Context], Awaitable[Any]]
MethodHandler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class Pipeline:
    """What every call goes through: one authenticator and one rate limiter (its buckets are
    per caller, across all methods) for the whole server."""

    def __init__(self, callers: tuple[Caller, ...], limiter: RateLimiter) -> None:
        self._auth = Authenticator(callers)
        self._limiter = limiter

    def compose(self, method: str, behaviour: Handler) -> Handler:
        """The unary ``behaviour`` of ``method`` (``/package.Service/Method``) inside every
        step, in the order of the module's documentation."""
        composed = guard(method, behaviour)
        if not is_open(method):
            composed = limited(self._limiter, composed)
        if not self._auth.callers:
            composed = loopback_only(composed)
        elif not is_open(method):
            composed = authorized(self._auth, method, composed)
        return observed(method, composed)

    def method_handler(self, method: str, handler: MethodHandler) -> MethodHandler | None:
        """The handler to serve ``method`` with; None: not served."""
        if handler.unary_unary is None:  # streaming
            if self._auth.callers and not is_open(method):
                return None
            return handler
        # Under grpc.aio the unary behaviour is a coroutine function.
        return grpc.unary_unary_rpc_method_handler(
            self.compose(method, cast(Handler, handler.unary_unary)),
            request_deserializer=tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )


class _ComposingGenericHandler(grpc.GenericRpcHandler):
    """A generic handler's methods, each composed on its first call and then kept (grpc.aio
    asks generic handlers only for methods with no registered handler)."""

    def __init__(self, inner: grpc.GenericRpcHandler, pipeline: Pipeline) -> None:
        self._inner = inner
        self._pipeline = pipeline
        # method -> (the inner handler, its composition)
        self._composed: dict[str, tuple[MethodHandler, MethodHandler | None]] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> MethodHandler | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        known = self._composed.get(method)
        if known is None or known[0] is not handler:
            known = (handler, self._pipeline.method_handler(method, handler))
            self._composed[method] = known
        return known[1]


class ComposingServer(grpc.aio.Server):
    """A grpc.aio.Server that serves each registered method through the pipeline; everything
    else is the wrapped server's."""

    def __init__(self, server: grpc.aio.Server, pipeline: Pipeline) -> None:
        self._server = server
        self._pipeline = pipeline

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, MethodHandler]
    ) -> None:
        """Serves them as generic methods. grpc.aio's server loop keeps one pending
        request per registered method and waits on all of them (``asyncio.wait``) before
        each call it accepts, so ~50 registered methods cost every call ~50 futures' worth
        of Python; generic methods share one pending request. The generated
        ``add_*Servicer_to_server`` functions add a generic handler for the same methods
        first, which then answers; this one serves a method registered only here."""
        self.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(service_name, dict(method_handlers))]
        )

    def add_generic_rpc_handlers(
        self, generic_rpc_handlers: Iterable[grpc.GenericRpcHandler]
    ) -> None:
        self._server.add_generic_rpc_handlers(
            [_ComposingGenericHandler(h, self._pipeline) for h in generic_rpc_handlers]
        )

    def add_insecure_port(self, address: str) -> int:
        return self._server.add_insecure_port(address)

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        return self._server.add_secure_port(address, server_credentials)

    async def start(self) -> None:
        await self._server.start()

    async def stop(self, grace: float | None) -> None:
        await self._server.stop(grace)

    async def wait_for_termination(
        self,
        timeout: float | None = None,  # noqa: ASYNC109 (grpc.aio.Server's signature)
    ) -> bool:
        return await self._server.wait_for_termination(timeout)
