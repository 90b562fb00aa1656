"""Authentication and authorization: who is calling, and may they make this call. The
composed behaviour of every unary call (server/pipeline.py) runs this check first, right
after observability.

With callers configured, every call except health and reflection must carry
``authorization: Bearer <token>``; the token's SHA-256 is compared, in constant time, with
every configured caller's. No or an unknown token: UNAUTHENTICATED. A role that may not make
the call, or a service outside its account scope: PERMISSION_DENIED. Both are
google.rpc.Status with an ErrorInfo, and neither message ever contains the token. Handlers see
the caller through ledger_server.security.current_principal() (caller_identity() records its
name as the actor).

Without callers (local development) calls are served unauthenticated, from loopback peers
only: the listen address is loopback (checked at start-up), and each unary call's peer is
checked again here (loopback_only), as defence in depth."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from ledger.v1 import (
    admin_service_pb2,
    billing_service_pb2,
    ledger_service_pb2,
    report_service_pb2,
)
from ledger_server.errors import LedgerError
from ledger_server.security import Caller, Role, acting_as, is_loopback_peer
from ledger_server.server.error_boundary import to_status
from ledger_server.server.request_parsing import Undecodable

Context = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[[Any, Context], Awaitable[Any]]

AUTHORIZATION_METADATA_KEY = "authorization"

# Open to anyone who can connect: load balancers' health checks and buf curl / grpcurl.
OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def is_open(method: str) -> bool:
    return method.startswith(OPEN_PREFIXES)


@dataclass(frozen=True)
class Rule:
    """Which roles besides admin may call a method, and whether a scoped service may only
    name (in the request's ``account_id``) accounts within its scope."""

    roles: frozenset[Role]
    scoped: bool


def _methods(descriptor: Any, service: str) -> dict[str, str]:
    full = descriptor.services_by_name[service]
    return {m.name: f"/{full.full_name}/{m.name}" for m in full.methods}


_S, _W = Role.SERVICE, Role.WORKER
_LEDGER = _methods(ledger_service_pb2.DESCRIPTOR, "LedgerService")
_BILLING = _methods(billing_service_pb2.DESCRIPTOR, "BillingService")
_REPORT = _methods(report_service_pb2.DESCRIPTOR, "ReportService")
_ADMIN = _methods(admin_service_pb2.DESCRIPTOR, "AdminService")

_SERVICE_SPEND = ("Reserve", "Commit", "Release", "Refund", "Consume")
_SERVICE_ACCOUNT = ("CreateAccount", "ClaimDailyReward", "Redeem", "TransferReward")
_READS = ("Balance", "GetReservation", "ListLots", "ListTransactions", "GetAccount")

RULES: dict[str, Rule] = {
    # LedgerService: services spend and read their accounts; workers read. Grant (credits
    # of any source, from nothing) is for administrators.
    **{_LEDGER[m]: Rule(frozenset({_S}), scoped=True) for m in _SERVICE_SPEND},
    **{_LEDGER[m]: Rule(frozenset({_S}), scoped=True) for m in _SERVICE_ACCOUNT},
    **{_LEDGER[m]: Rule(frozenset({_S, _W}), scoped=True) for m in _READS},
    _LEDGER["Estimate"]: Rule(frozenset({_S, _W}), scoped=False),  # the rate card, no account
    _LEDGER["Grant"]: Rule(frozenset(), scoped=True),
    # BillingService belongs to the workers (fulfilment). Services may read the catalogue and
    # start a checkout for their accounts (no credits move until the worker fulfils it).
    **{_BILLING[m]: Rule(frozenset({_W}), scoped=True) for m in _BILLING},
    _BILLING["ListCreditPacks"]: Rule(frozenset({_S, _W}), scoped=False),
    _BILLING["ListSubscriptionPlans"]: Rule(frozenset({_S, _W}), scoped=False),
    _BILLING["QuoteRecharge"]: Rule(frozenset({_S, _W}), scoped=False),
    _BILLING["CreateCheckoutSession"]: Rule(frozenset({_S, _W}), scoped=True),
    # Reports: services for their accounts (a scoped service must name one).
    _REPORT["GetSummary"]: Rule(frozenset({_S}), scoped=True),
    _REPORT["ListJournal"]: Rule(frozenset({_S}), scoped=True),
    # AdminService: administrators only, but for the rate card, which products show their
    # users (what each action costs, seeds 002 and 004) and Estimate prices call by call.
    **{_ADMIN[m]: Rule(frozenset(), scoped=False) for m in _ADMIN},
    _ADMIN["ListPrices"]: Rule(frozenset({_S, _W}), scoped=False),
    _ADMIN["ListModelMultipliers"]: Rule(frozenset({_S, _W}), scoped=False),
}
_ADMIN_ONLY = Rule(frozenset(), scoped=False)  # any method not listed


def _unauthenticated(message: str, reason: str = "UNAUTHENTICATED") -> LedgerError:
    return LedgerError(grpc.StatusCode.UNAUTHENTICATED, reason, message)


class Authenticator:
    """Checks one call's credentials and permissions; raises LedgerError when refused."""

    def __init__(self, callers: tuple[Caller, ...]) -> None:
        self.callers = callers

    def authenticate(self, metadata: Any) -> Caller:
        values = [v for k, v in metadata or () if k == AUTHORIZATION_METADATA_KEY]
        if not values:
            raise _unauthenticated("this call needs 'authorization: Bearer <token>' metadata")
        if len(values) > 1 or not isinstance(values[0], str):
            raise _unauthenticated("send exactly one 'authorization: Bearer <token>'")
        scheme, _, token = values[0].strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _unauthenticated("the authorization metadata must be 'Bearer <token>'")
        digest = hashlib.sha256(token.encode()).digest()
        found: Caller | None = None
        for caller in self.callers:  # every hash compared: the time does not tell which matched
            if hmac.compare_digest(digest, caller.token_sha256):
                found = caller
        if found is None:
            raise _unauthenticated("unknown token")
        return found

    @staticmethod
    def authorize(caller: Caller, method: str, request: object) -> None:
        if caller.role is Role.ADMIN:
            return
        rule = RULES.get(method, _ADMIN_ONLY)
        if caller.role not in rule.roles:
            raise LedgerError(
                grpc.StatusCode.PERMISSION_DENIED,
                "PERMISSION_DENIED",
                f"the {caller.role.value} role may not call {method}",
                {"caller": caller.name, "role": caller.role.value, "method": method},
            )
        if rule.scoped and caller.account_prefix is not None:
            if isinstance(request, Undecodable):  # it names no account: say what is wrong
                raise request.error()
            account_id = getattr(request, "account_id", "")
            if not isinstance(account_id, str) or not caller.may_touch(account_id):
                raise LedgerError(
                    grpc.StatusCode.PERMISSION_DENIED,
                    "ACCOUNT_OUT_OF_SCOPE",
                    f"{caller.name} may only name accounts starting with {caller.account_prefix!r}",
                    {"caller": caller.name, "account_prefix": caller.account_prefix},
                )


def authorized(auth: Authenticator, method: str, inner: Handler) -> Handler:
    """``inner`` (the unary method ``method``) for authenticated callers allowed to call it,
    run as that caller (current_principal())."""

    async def authorized_call(request: Any, context: Context) -> Any:
        try:
            caller = auth.authenticate(context.invocation_metadata())
            auth.authorize(caller, method, request)
        except LedgerError as error:
            await context.abort_with_status(to_status(error))
        with acting_as(caller):
            return await inner(request, context)

    return authorized_call


def loopback_only(inner: Handler) -> Handler:
    """``inner`` for loopback peers only (running without callers)."""

    async def loopback_call(request: Any, context: Context) -> Any:
        peer = context.peer()
        if not peer:
            # grpc names no peer once the call's stream has ended (its client gone): nobody
            # to refuse, and not a caller from elsewhere.
            raise asyncio.CancelledError
        if not is_loopback_peer(peer):
            await context.abort_with_status(
                to_status(
                    _unauthenticated(
                        "this server runs without authentication and serves loopback clients only",
                        "LOOPBACK_ONLY",
                    )
                )
            )
        return await inner(request, context)

    return loopback_call
