"""Checkout Sessions at Stripe, within bounds. Each request to Stripe waits at most
LEDGER_STRIPE_TIMEOUT_SECONDS and never past the gRPC call's deadline (less a margin to
record the session and answer), and runs on this module's own threads: a Stripe that
accepts connections and never answers must not hold a checkout for minutes, nor take the
threads other work of the server waits on.

Stripe's idempotency (https://docs.stripe.com/api/idempotent_requests): Stripe saves the
status code and body of the first request under a key once the endpoint begins executing,
and returns them to every retry with that key, "including 500 errors", until the key is
pruned (24 hours at the earliest); a retry with other parameters is an idempotency_error. A
request that fails validation or conflicts with a concurrent one saves nothing. So only a
request whose answer never arrived (a connection error, a time-out: it may have created a
session) is asked again under the same Stripe key. Once Stripe has answered with an error
(or with a body that is no session), no session anyone could pay exists under that key (the
ledger records none and never shows its URL), and the next attempt of the same checkout
takes a fresh Stripe key: else a 5xx, or a 4xx refusal whose cause is since fixed (a pack's
price id, the API key), would be replayed to every retry for a day, and a retry whose
parameters changed since (a new price id) be refused as a different request. A fresh key
after an answer Stripe did not save costs nothing."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import requests
import stripe

from ledger_server.config import StripeSettings
from ledger_server.db.deadlines import current_deadline
from ledger_server.errors import LedgerError

# Checkouts in flight at Stripe at once per server; more wait for a thread, and one whose
# deadline passes while it waits answers without calling Stripe.
STRIPE_THREADS = 8
# Of the call's time left, kept back to record the session and answer (at most a quarter).
_ANSWER_MARGIN_SECONDS = 0.5
# Shorter than this left for a request: not worth sending.
_MIN_REQUEST_SECONDS = 0.05
# One retry, after a connection error only (the others are Stripe's answer, replayed).
_TRIES = 2
_RETRY_PAUSE_SECONDS = 0.5


def stripe_idempotency_key(account_id: str, key: str, attempt: int) -> str:
    """Derived from the ledger's key, so a retry never creates a second session; attempt 0
    keeps the form used before attempts were counted."""
    digest = hashlib.sha256(f"{account_id}\x00{key}".encode()).hexdigest()
    return f"ledger-checkout-{digest}" + (f"-{attempt}" if attempt else "")


def stripe_answered(exc: stripe.StripeError) -> bool:
    """Stripe answered (an HTTP status): the Stripe key is spent (module docstring)."""
    return exc.http_status is not None


def session_params(
    account_id: str, prepared: dict[str, Any], success_url: str, cancel_url: str
) -> dict[str, Any]:
    """The Checkout Session's parameters. The metadata names the account and what it buys;
    Stripe copies it to the payment intent or subscription, so the events about them
    (refunds, invoices) name the account too."""
    kind = prepared["kind"]
    metadata = {"account_id": account_id, "kind": kind}
    params: dict[str, Any] = {
        "client_reference_id": account_id,
        "success_url": success_url,
        "cancel_url": cancel_url,
        "metadata": metadata,
    }
    if kind == "pack":
        metadata["pack_id"] = prepared["pack_id"]
        params.update(
            mode="payment",
            line_items=[{"price": prepared["price_id"], "quantity": 1}],
            payment_intent_data={"metadata": metadata},
        )
    elif kind == "recharge":
        metadata["amount_minor"] = str(prepared["amount_minor"])
        params.update(
            mode="payment",
            line_items=[
                {
                    "price_data": {
                        "currency": prepared["currency"].lower(),
                        "unit_amount": prepared["amount_minor"],
                        "product_data": {"name": "Credits recharge"},
                    },
                    "quantity": 1,
                }
            ],
            payment_intent_data={"metadata": metadata},
        )
    else:
        metadata["plan_id"] = prepared["plan_id"]
        params.update(
            mode="subscription",
            line_items=[{"price": prepared["price_id"], "quantity": 1}],
            subscription_data={"metadata": metadata},
        )
    return params


class StripeCheckouts:
    def __init__(self, settings: StripeSettings) -> None:
        self._settings = settings
        self._threads = ThreadPoolExecutor(STRIPE_THREADS, thread_name_prefix="stripe")
        self._local = threading.local()  # each thread's HTTP session (kept-alive connections)

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)

    async def create(self, params: dict[str, Any], idempotency_key: str) -> tuple[str, str]:
        """The session's id and URL. Raises stripe.StripeError."""
        deadline = current_deadline()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._threads, self._create, params, idempotency_key, deadline
        )

    def _create(
        self, params: dict[str, Any], idempotency_key: str, deadline: float | None
    ) -> tuple[str, str]:
        tries = 1
        while True:
            try:
                session = self._client(deadline).v1.checkout.sessions.create(
                    params=params,  # type: ignore[arg-type]
                    options={"idempotency_key": idempotency_key},
                )
            except stripe.APIConnectionError as exc:
                left = _time_left(deadline)
                no_time = left is not None and left < _RETRY_PAUSE_SECONDS + _MIN_REQUEST_SECONDS
                if not exc.should_retry or tries == _TRIES or no_time:
                    raise
                tries += 1
                time.sleep(_RETRY_PAUSE_SECONDS)
            else:
                return _id_and_url(session)

    def _client(self, deadline: float | None) -> stripe.StripeClient:
        timeout = self._settings.timeout_seconds
        left = _time_left(deadline)
        if left is not None:
            if left < _MIN_REQUEST_SECONDS:
                raise LedgerError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    "DEADLINE_EXCEEDED",
                    "the call's deadline left no time for the payment provider",
                )
            timeout = min(timeout, left)
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        base = self._settings.api_base
        return stripe.StripeClient(
            self._settings.api_key,
            base_addresses={"api": base} if base else None,
            http_client=stripe.RequestsClient(timeout=timeout, session=session),
            max_network_retries=0,  # retried here, within the deadline
        )


def _time_left(deadline: float | None) -> float | None:
    """What a request to Stripe may take of the call's time left (None: no deadline)."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    return left - min(_ANSWER_MARGIN_SECONDS, max(left, 0.0) / 4)


def _id_and_url(session: stripe.checkout.Session) -> tuple[str, str]:
    session_id = getattr(session, "id", None)
    url = getattr(session, "url", None)
    if isinstance(session_id, str) and session_id and isinstance(url, str) and url:
        return session_id, url
    # Not a session (STRIPE_API_BASE pointing at another service, a proxy's page): Stripe's
    # outage as far as the caller can tell, never the ledger's bug.
    status = session.last_response.code if session.last_response else 200
    raise stripe.APIError("Stripe answered without a session id and URL", http_status=status)


def checkout_error(exc: stripe.StripeError) -> LedgerError:
    detail = {"provider_error": type(exc).__name__}
    if exc.code:
        detail["provider_code"] = str(exc.code)
    if isinstance(exc, stripe.IdempotencyError) or exc.http_status == 409:
        # Another request under the Stripe key: one of the same checkout in flight, or one
        # whose parameters have changed since. The ledger's own key decides which request
        # the checkout is; the retry takes a fresh Stripe key.
        return LedgerError(
            grpc.StatusCode.ABORTED,
            "CONFLICT",
            "the payment provider saw a conflicting request; retry with the same idempotency key",
            detail,
        )
    if isinstance(exc, (stripe.APIConnectionError, stripe.RateLimitError, stripe.APIError)):
        return LedgerError(
            grpc.StatusCode.UNAVAILABLE,
            "PAYMENT_PROVIDER_UNAVAILABLE",
            "the payment provider is unavailable; retry with the same idempotency key",
            detail,
        )
    # Stripe's errors the customer's request cannot get past by retrying (bad price id,
    # wrong API key, ...).
    return LedgerError(
        grpc.StatusCode.FAILED_PRECONDITION,
        "PAYMENT_PROVIDER_REJECTED",
        f"the payment provider refused the checkout: {exc.user_message or exc.code or exc}",
        detail,
    )
