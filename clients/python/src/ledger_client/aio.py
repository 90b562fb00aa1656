"""The asyncio client: :class:`AsyncLedgerClient` (``grpc.aio``) and its reservation
context manager. Create it inside a running event loop."""

# The ``timeout`` arguments are gRPC deadlines, sent to the server with each attempt and
# shared by a call's retries; asyncio.timeout() around a call is no substitute for them.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable
from datetime import date, datetime, timedelta
from types import TracebackType
from typing import TypeVar

import grpc
import grpc.aio

from ledger.v1 import admin_service_pb2 as admin_pb
from ledger.v1 import (
    admin_service_pb2_grpc,
    billing_service_pb2_grpc,
    ledger_service_pb2_grpc,
    report_service_pb2_grpc,
    types_pb2,
)
from ledger.v1 import billing_service_pb2 as billing_pb
from ledger.v1 import ledger_service_pb2 as pb
from ledger.v1 import report_service_pb2 as report_pb
from ledger_client import _common as c
from ledger_client._hold import REFUSED_COMMIT_REASON, HoldState, refused_for_good
from ledger_client.errors import (
    LedgerError,
    client_closed,
    from_rpc_error,
    given_up,
    may_have_been_applied,
)

__all__ = ["AsyncHold", "AsyncLedgerClient"]

log = logging.getLogger("ledger_client")

Req = TypeVar("Req")
Resp = TypeVar("Resp")


def open_channel(config: c.ClientConfig) -> grpc.aio.Channel:
    options = config.channel_options()
    tls = config.credentials.tls
    if tls is None:
        return grpc.aio.insecure_channel(config.target, options=options)
    return grpc.aio.secure_channel(config.target, tls.channel_credentials(), options=options)


class AsyncLedgerClient:
    """The asyncio twin of :class:`~ledger_client.LedgerClient` (same methods, awaited).

    Every method is one logical call: it makes one idempotency key (or uses the caller's
    ``idempotency_key=``) and sends it on every retry. UNAVAILABLE, ABORTED and CANCELLED are
    retried with exponential backoff and jitter (see :class:`RetryPolicy`); the whole call,
    retries included, has a deadline of ``timeout`` seconds. Failures raise
    :class:`~ledger_client.errors.LedgerError` subclasses. Use it as an async context
    manager or await :meth:`close`: a call it ends raises a CANCELLED ``LedgerError`` with
    the call's key (``outcome_unknown`` when an attempt had been sent); a cancellation of the
    caller's own task still raises ``CancelledError``.
    """

    def __init__(
        self,
        target: str,
        *,
        credentials: c.Credentials | None = None,
        retry: c.RetryPolicy | None = None,
        timeout: float | None = 10.0,
        options: Iterable[tuple[str, str | int]] = (),
    ) -> None:
        self.config = c.ClientConfig(
            target=target,
            credentials=credentials or c.Credentials(),
            retry=retry or c.RetryPolicy(),
            timeout=timeout,
            options=tuple(options),
        )
        self._metadata = self.config.credentials.call_metadata()
        self._closed = False
        self._channel = open_channel(self.config)
        self._stub = ledger_service_pb2_grpc.LedgerServiceStub(self._channel)
        self._reports = report_service_pb2_grpc.ReportServiceStub(self._channel)
        self._billing = billing_service_pb2_grpc.BillingServiceStub(self._channel)
        self._admin = admin_service_pb2_grpc.AdminServiceStub(self._channel)

    @classmethod
    def from_config(cls, config: c.ClientConfig) -> AsyncLedgerClient:
        return cls(
            config.target,
            credentials=config.credentials,
            retry=config.retry,
            timeout=config.timeout,
            options=config.options,
        )

    async def close(self) -> None:
        """Closes the channel. Calls in flight in other tasks end with a CANCELLED
        ``LedgerError`` carrying their key, their outcome unknown."""
        self._closed = True  # before the channel cancels the calls in flight
        await self._channel.close()

    async def __aenter__(self) -> AsyncLedgerClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- the retry loop ----------------------------------------------------------------------

    async def _invoke(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[Req, Resp],
        request: Req,
        timeout: float | None,
    ) -> Resp:
        budget = self.config.timeout if timeout is None else timeout
        deadline = None if budget is None else time.monotonic() + budget
        attempt = 0
        applied_maybe = False  # by an attempt so far
        while True:
            attempt += 1
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                return await method(request, timeout=remaining, metadata=self._metadata)
            except grpc.RpcError as rpc_error:
                error = from_rpc_error(rpc_error)
                applied_maybe = applied_maybe or may_have_been_applied(error)
                left = None if deadline is None else deadline - time.monotonic()
                # After close() no retry can be sent (see the sync client).
                retry = self.config.retry
                delay = None if self._closed else retry.delay_before_retry(error, attempt, left)
                if delay is None:
                    raise given_up(error, request, applied_maybe) from rpc_error
            except asyncio.CancelledError as cancelled:
                # close() cancels the calls in flight, which raises CancelledError here
                # though no one cancelled the caller's task: that is the client's doing, and
                # the caller needs the key (the call may have been applied). A cancellation of
                # the caller's own task (cancelling() > 0) propagates as it is.
                task = asyncio.current_task()
                if not self._closed or task is None or task.cancelling():
                    raise
                error = client_closed("the client was closed during the call")
                raise given_up(error, request, True) from cancelled
            except grpc.aio.UsageError as closed:  # "Channel is closed."
                if not self._closed:
                    raise
                error = client_closed("the client is closed: no attempt can be sent")
                raise given_up(error, request, applied_maybe) from closed
            log.info("ledger call failed with %s; retry %d in %.3f s", error, attempt, delay)
            await asyncio.sleep(delay)

    # --- RPCs --------------------------------------------------------------------------------

    async def grant(
        self,
        account_id: str,
        amount_micros: int,
        source: c.SourceLike,
        *,
        expires_at: datetime | None = None,
        expires_in: timedelta | None = None,
        external_ref: str = "",
        comment: str = "",
        balance_kind: c.BalanceKindLike | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> pb.GrantResponse:
        """Adds a lot of credits (creating the account on first use). ``source`` is a
        ``CreditSource`` value or its name (``"purchase"``); no expiry means never."""
        request = c.grant_request(
            account_id,
            amount_micros,
            source,
            expires_at=expires_at,
            expires_in=expires_in,
            external_ref=external_ref,
            comment=comment,
            balance_kind=balance_kind,
            idempotency_key=idempotency_key,
        )
        return await self._invoke(self._stub.Grant, request, timeout)

    async def balance(self, account_id: str, *, timeout: float | None = None) -> pb.BalanceResponse:
        return await self._invoke(
            self._stub.Balance, pb.BalanceRequest(account_id=account_id), timeout
        )

    async def reserve(
        self,
        account_id: str,
        amount_micros: int | None = None,
        *,
        usage: c.UsageLike | None = None,
        ttl: timedelta | None = None,
        feature: str = "",
        model: str = "",
        comment: str = "",
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> pb.ReserveResponse:
        """Holds credits for ``ttl`` (the server's default when None): exactly one of
        ``amount_micros`` and ``usage``, the expected usage by unit (``{"output_tokens":
        4000}`` with ``feature`` and ``model``, or a ``types_pb2.Usage``) whose cost by the
        rate card is held. Prefer :meth:`reservation`, which commits or releases for you."""
        request = c.reserve_request(
            account_id,
            amount_micros,
            usage=usage,
            ttl=ttl,
            feature=feature,
            model=model,
            comment=comment,
            idempotency_key=idempotency_key,
        )
        return await self._invoke(self._stub.Reserve, request, timeout)

    async def commit(
        self,
        account_id: str,
        reservation_id: str,
        amount_micros: int | None = None,
        *,
        usage: c.UsageLike | None = None,
        comment: str = "",
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> pb.CommitResponse:
        """Charges the actual cost and returns the rest of the hold. Give exactly one of
        ``amount_micros`` (0 to the held amount) and ``usage``: the actual quantities by unit
        (``{"output_tokens": 812}``), priced at the reservation's prices if it was made from
        a usage description, else by the current rate card for the reservation's feature
        (or a ``types_pb2.Usage`` naming the feature and model)."""
        request = c.commit_request(
            account_id,
            reservation_id,
            amount_micros,
            usage=usage,
            comment=comment,
            idempotency_key=idempotency_key,
        )
        return await self._invoke(self._stub.Commit, request, timeout)

    async def release(
        self,
        account_id: str,
        reservation_id: str,
        *,
        reason: str = "",
        job_failed: bool = False,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> pb.ReleaseResponse:
        """Returns the whole hold: the job was cancelled or failed, nothing is charged. With
        ``job_failed`` the reservation ends FAILED (the journal shows the job failed), else
        RELEASED."""
        request = c.release_request(
            account_id,
            reservation_id,
            reason=reason,
            job_failed=job_failed,
            idempotency_key=idempotency_key,
        )
        return await self._invoke(self._stub.Release, request, timeout)

    async def refund(
        self,
        account_id: str,
        reservation_id: str,
        amount_micros: int | None = None,
        *,
        reason: str = "",
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> pb.RefundResponse:
        """Gives back committed credits; ``amount_micros`` None means all not yet refunded."""
        request = c.refund_request(
            account_id,
            reservation_id,
            amount_micros,
            reason=reason,
            idempotency_key=idempotency_key,
        )
        return await self._invoke(self._stub.Refund, request, timeout)

    async def consume(
        self,
        account_id: str,
        amount_micros: int | None = None,
        *,
        usage: c.UsageLike | None = None,
        feature: str = "",
        model: str = "",
        comment: str = "",
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> pb.ConsumeResponse:
        """Reserves and commits in one call: ``amount_micros`` (the cost known up front),
        or ``usage`` (quantities by unit, with ``feature`` and ``model``, or a
        ``types_pb2.Usage``) priced by the current rate card."""
        request = c.consume_request(
            account_id,
            amount_micros,
            usage=usage,
            feature=feature,
            model=model,
            comment=comment,
            idempotency_key=idempotency_key,
        )
        return await self._invoke(self._stub.Consume, request, timeout)

    async def get_reservation(
        self, account_id: str, reservation_id: str, *, timeout: float | None = None
    ) -> pb.GetReservationResponse:
        request = pb.GetReservationRequest(account_id=account_id, reservation_id=reservation_id)
        return await self._invoke(self._stub.GetReservation, request, timeout)

    async def list_lots(
        self,
        account_id: str,
        *,
        include_inactive: bool = False,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> pb.ListLotsResponse:
        """One page of the account's lots, in consumption order."""
        request = pb.ListLotsRequest(
            account_id=account_id,
            include_inactive=include_inactive,
            page_size=page_size,
            page_token=page_token,
        )
        return await self._invoke(self._stub.ListLots, request, timeout)

    async def list_transactions(
        self,
        account_id: str,
        *,
        kinds: Iterable[c.TransactionKindLike] = (),
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        feature: str = "",
        model: str = "",
        statuses: Iterable[c.TransactionStatusLike] = (),
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> pb.ListTransactionsResponse:
        """One page of the account's journal, newest first. Filters combine: ``kinds``
        and ``statuses`` (values or short names, ``["charge"]``, ``["pending"]``; all when
        empty), ``start_time`` (included) to ``end_time`` (excluded), ``feature`` and
        ``model``. Filtered by kind, status, feature or model, a page may hold fewer
        entries than ``page_size``, even none, before the last: :meth:`iter_transactions`
        pages on."""
        request = c.list_transactions_request(
            account_id,
            page_size=page_size,
            page_token=page_token,
            filters=c.JournalFilters.of(kinds, start_time, end_time, feature, model, statuses),
        )
        return await self._invoke(self._stub.ListTransactions, request, timeout)

    async def create_account(
        self,
        account_id: str,
        *,
        referral_code: str = "",
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> pb.CreateAccountResponse:
        """Opens an account: the sign-up bonus (when enabled), its referral code and, with
        another account's ``referral_code``, that account's reward. A second creation with
        another key raises ``AlreadyExists`` (reason ``ACCOUNT_EXISTS``)."""
        request = c.create_account_request(
            account_id, referral_code=referral_code, idempotency_key=idempotency_key
        )
        return await self._invoke(self._stub.CreateAccount, request, timeout)

    async def get_account(
        self, account_id: str, *, timeout: float | None = None
    ) -> pb.GetAccountResponse:
        """The account: its referral code, who referred it, its subscription."""
        request = pb.GetAccountRequest(account_id=account_id)
        return await self._invoke(self._stub.GetAccount, request, timeout)

    async def claim_daily_reward(
        self,
        account_id: str,
        *,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> pb.ClaimDailyRewardResponse:
        """Grants the daily reward, once per account per day; ``next_claim_time`` says when
        the next claim opens. A second claim the same day raises ``FailedPrecondition``
        (reason ``DAILY_REWARD_ALREADY_CLAIMED``)."""
        request = c.claim_daily_reward_request(account_id, idempotency_key=idempotency_key)
        return await self._invoke(self._stub.ClaimDailyReward, request, timeout)

    async def redeem(
        self,
        account_id: str,
        code: str,
        *,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> pb.RedeemResponse:
        """Redeems a redemption code (as printed; case and dashes do not matter), once per
        account and code."""
        request = c.redeem_request(account_id, code, idempotency_key=idempotency_key)
        return await self._invoke(self._stub.Redeem, request, timeout)

    async def transfer_reward(
        self,
        account_id: str,
        amount_micros: int | None = None,
        *,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> pb.TransferRewardResponse:
        """Moves referral rewards into the main balance; ``amount_micros`` None means the
        whole reward balance."""
        request = c.transfer_reward_request(
            account_id, amount_micros, idempotency_key=idempotency_key
        )
        return await self._invoke(self._stub.TransferReward, request, timeout)

    async def estimate(
        self,
        feature: str,
        quantities: c.QuantitiesLike,
        *,
        model: str = "",
        timeout: float | None = None,
    ) -> pb.EstimateResponse:
        """What a usage would cost now by the rate card, with the price lines; changes
        nothing. ``quantities`` by unit: ``{"input_tokens": 1200, "output_tokens": 300}``."""
        request = c.estimate_request(feature, quantities, model=model)
        return await self._invoke(self._stub.Estimate, request, timeout)

    # --- the catalogue, checkout and the rate card (what a product shows and sells) ---------

    async def list_credit_packs(
        self, *, timeout: float | None = None
    ) -> billing_pb.ListCreditPacksResponse:
        """The credit packs on sale (BillingService.ListCreditPacks)."""
        request = billing_pb.ListCreditPacksRequest()
        return await self._invoke(self._billing.ListCreditPacks, request, timeout)

    async def list_subscription_plans(
        self, *, timeout: float | None = None
    ) -> billing_pb.ListSubscriptionPlansResponse:
        """The subscription plans on sale (BillingService.ListSubscriptionPlans)."""
        request = billing_pb.ListSubscriptionPlansRequest()
        return await self._invoke(self._billing.ListSubscriptionPlans, request, timeout)

    async def quote_recharge(
        self, amount_minor: int, currency: str, *, timeout: float | None = None
    ) -> billing_pb.QuoteRechargeResponse:
        """The credits and bonus a recharge of ``amount_minor`` (3000 = 30.00) in
        ``currency`` would give; changes nothing."""
        request = billing_pb.QuoteRechargeRequest(amount_minor=amount_minor, currency=currency)
        return await self._invoke(self._billing.QuoteRecharge, request, timeout)

    async def create_checkout_session(
        self,
        account_id: str,
        *,
        pack_id: str = "",
        recharge: tuple[int, str] | None = None,
        plan_id: str = "",
        success_url: str = "",
        cancel_url: str = "",
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> billing_pb.CreateCheckoutSessionResponse:
        """A Stripe Checkout Session for exactly one of a pack, a recharge
        (``(amount_minor, currency)``) or a subscription plan; send the customer to its
        ``session.url``. The credits arrive when Stripe reports the payment. The key is one
        of the account's ledger keys: a retry with it returns the same session."""
        request = c.checkout_request(
            account_id,
            pack_id=pack_id,
            recharge=recharge,
            plan_id=plan_id,
            success_url=success_url,
            cancel_url=cancel_url,
            idempotency_key=idempotency_key,
        )
        return await self._invoke(self._billing.CreateCheckoutSession, request, timeout)

    async def list_prices(
        self,
        feature: str = "",
        *,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> admin_pb.ListPricesResponse:
        """One page of the rate card's prices, of one feature or all (AdminService.ListPrices,
        open to services): what each action costs, for a product to show."""
        request = admin_pb.ListPricesRequest(
            feature=feature, page_size=page_size, page_token=page_token
        )
        return await self._invoke(self._admin.ListPrices, request, timeout)

    async def list_model_multipliers(
        self, *, page_size: int = 0, page_token: str = "", timeout: float | None = None
    ) -> admin_pb.ListModelMultipliersResponse:
        """One page of the rate card's model multipliers (AdminService.ListModelMultipliers)."""
        request = admin_pb.ListModelMultipliersRequest(page_size=page_size, page_token=page_token)
        return await self._invoke(self._admin.ListModelMultipliers, request, timeout)

    # --- pagination helpers ------------------------------------------------------------------

    async def iter_prices(
        self, feature: str = "", *, page_size: int = 0, timeout: float | None = None
    ) -> AsyncIterator[admin_pb.Price]:
        """The whole rate card's prices (of one feature or all), walking all pages."""
        token = ""
        while True:
            page = await self.list_prices(
                feature, page_size=page_size, page_token=token, timeout=timeout
            )
            for price in page.prices:
                yield price
            token = page.next_page_token
            if not token:
                return

    async def iter_model_multipliers(
        self, *, page_size: int = 0, timeout: float | None = None
    ) -> AsyncIterator[admin_pb.ModelMultiplier]:
        """Every model multiplier in force, walking all pages."""
        token = ""
        while True:
            page = await self.list_model_multipliers(
                page_size=page_size, page_token=token, timeout=timeout
            )
            for multiplier in page.multipliers:
                yield multiplier
            token = page.next_page_token
            if not token:
                return

    async def iter_lots(
        self,
        account_id: str,
        *,
        include_inactive: bool = False,
        page_size: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[types_pb2.Lot]:
        """Every lot, walking all pages (each page is one call with its own retries)."""
        token = ""
        while True:
            page = await self.list_lots(
                account_id,
                include_inactive=include_inactive,
                page_size=page_size,
                page_token=token,
                timeout=timeout,
            )
            for lot in page.lots:
                yield lot
            token = page.next_page_token
            if not token:
                return

    async def iter_transactions(
        self,
        account_id: str,
        *,
        kinds: Iterable[c.TransactionKindLike] = (),
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        feature: str = "",
        model: str = "",
        statuses: Iterable[c.TransactionStatusLike] = (),
        page_size: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[pb.Transaction]:
        """Every matching transaction, newest first, walking all pages, short and empty
        ones included, until the last (the filters of :meth:`list_transactions`)."""
        kinds = list(kinds)
        statuses = list(statuses)
        token = ""
        while True:
            page = await self.list_transactions(
                account_id,
                kinds=kinds,
                start_time=start_time,
                end_time=end_time,
                feature=feature,
                model=model,
                statuses=statuses,
                page_size=page_size,
                page_token=token,
                timeout=timeout,
            )
            for transaction in page.transactions:
                yield transaction
            token = page.next_page_token
            if not token:
                return

    # --- reports ---------------------------------------------------------------------------

    async def summary(
        self,
        account_id: str = "",
        *,
        day: date | str | None = None,
        month: date | str | None = None,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        timeout: float | None = None,
    ) -> report_pb.GetSummaryResponse:
        """What happened to one account's credits (every account's with ``account_id=""``,
        for a caller allowed to ask) over exactly one period: ``day`` ("YYYY-MM-DD" or a
        date), ``month`` ("YYYY-MM", or a date for its month), both in the ledger's time
        zone, or ``start_time`` (included) to ``end_time`` (excluded): allocated, consumed,
        adjusted, refunded, expired and remaining, free and purchased apart, usage by
        feature and model."""
        request = c.summary_request(
            account_id, day=day, month=month, start_time=start_time, end_time=end_time
        )
        return await self._invoke(self._reports.GetSummary, request, timeout)

    async def list_journal(
        self,
        account_id: str = "",
        *,
        kinds: Iterable[c.TransactionKindLike] = (),
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        feature: str = "",
        model: str = "",
        statuses: Iterable[c.TransactionStatusLike] = (),
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> report_pb.ListJournalResponse:
        """One page of the platform-wide log (ReportService.ListJournal): every account's
        entries, or one account's, newest first, with the filters of
        :meth:`list_transactions`. Across every account, or filtered by kind, status,
        feature or model, a page may hold fewer entries than ``page_size``, even none,
        before the last: :meth:`iter_journal` pages on."""
        filters = c.JournalFilters.of(kinds, start_time, end_time, feature, model, statuses)
        return await self._journal_page(account_id, filters, page_size, page_token, timeout)

    async def iter_journal(
        self,
        account_id: str = "",
        *,
        kinds: Iterable[c.TransactionKindLike] = (),
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        feature: str = "",
        model: str = "",
        statuses: Iterable[c.TransactionStatusLike] = (),
        page_size: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[pb.Transaction]:
        """Every matching entry of the log, newest first, walking all pages, short and empty
        ones included, until the last (the filters of :meth:`list_journal`)."""
        filters = c.JournalFilters.of(kinds, start_time, end_time, feature, model, statuses)
        token = ""
        while True:
            page = await self._journal_page(account_id, filters, page_size, token, timeout)
            for transaction in page.transactions:
                yield transaction
            token = page.next_page_token
            if not token:
                return

    async def _journal_page(
        self,
        account_id: str,
        filters: c.JournalFilters,
        page_size: int,
        page_token: str,
        timeout: float | None,
    ) -> report_pb.ListJournalResponse:
        request = c.list_journal_request(
            account_id, page_size=page_size, page_token=page_token, filters=filters
        )
        return await self._invoke(self._reports.ListJournal, request, timeout)

    # --- reservations ------------------------------------------------------------------------

    def reservation(
        self,
        account_id: str,
        amount_micros: int | None = None,
        *,
        usage: c.UsageLike | None = None,
        ttl: timedelta | None = None,
        feature: str = "",
        model: str = "",
        comment: str = "",
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> AsyncHold:
        """A context manager that reserves on enter and settles on exit::

            async with client.reservation(account, 2 * MICROS_PER_CREDIT, feature="img") as hold:
                image = await generate()
                hold.set_actual(cost_of(image))

        A normal exit commits the amount given to ``set_actual`` (or the usage given to
        ``set_actual_usage``) or, if neither was called, the full held amount. An exception
        releases the hold (nothing is charged) and propagates. To hold the price of an
        expected usage, pass ``usage=`` (and ``feature``, ``model``) instead of an amount.
        """
        request = c.reserve_request(
            account_id,
            amount_micros,
            usage=usage,
            ttl=ttl,
            feature=feature,
            model=model,
            comment=comment,
            idempotency_key=idempotency_key,
        )
        return AsyncHold(self, request, timeout)


class AsyncHold(HoldState):
    """A reservation held for the duration of an ``async with`` block; see
    :meth:`AsyncLedgerClient.reservation`."""

    def __init__(
        self, client: AsyncLedgerClient, request: pb.ReserveRequest, timeout: float | None
    ) -> None:
        super().__init__(request, timeout)
        self._client = client

    async def commit(
        self,
        amount_micros: int | None = None,
        *,
        usage: c.UsageLike | None = None,
        comment: str | None = None,
        idempotency_key: str | None = None,
    ) -> pb.CommitResponse:
        """Commits now: ``amount_micros``, else the amount given to ``set_actual``, else the
        full held amount; or ``usage``, else the usage given to ``set_actual_usage``.
        The ``async with`` block then ends without another call.

        Every attempt sends the same key (:attr:`commit_idempotency_key`, made on the first
        unless ``idempotency_key`` is given) and, unless ``comment`` is given, the first
        attempt's comment: after an unknown outcome (``DeadlineExceeded``), call it again to
        get the original answer instead of ``ReservationNotPending``."""
        amount, actual_usage, comment, key = self._commit_args(
            amount_micros, usage, comment, idempotency_key
        )
        try:
            self.commit_response = await self._client.commit(
                self.account_id,
                self.reservation_id,
                amount,
                usage=actual_usage,
                comment=comment,
                idempotency_key=key,
                timeout=self._timeout,
            )
        except BaseException as error:
            self._commit_failed(error)  # the end of the block must know why
            raise
        return self.commit_response

    async def release(
        self,
        *,
        reason: str | None = None,
        job_failed: bool | None = None,
        idempotency_key: str | None = None,
    ) -> pb.ReleaseResponse:
        """Returns the whole hold now; nothing is charged (``job_failed``: the job failed,
        see :meth:`AsyncLedgerClient.release`). Like :meth:`commit`, every attempt sends the same
        key (:attr:`release_idempotency_key`) and, unless given, the first attempt's reason
        and ``job_failed``: call it again after an unknown outcome to replay it."""
        reason, job_failed, key = self._release_args(reason, job_failed, idempotency_key)
        try:
            self.release_response = await self._client.release(
                self.account_id,
                self.reservation_id,
                reason=reason,
                job_failed=job_failed,
                idempotency_key=key,
                timeout=self._timeout,
            )
        except BaseException as error:
            self._release_failed(error)  # the end of the block must know why
            raise
        return self.release_response

    async def __aenter__(self) -> AsyncHold:
        self._start()
        self._reserved = await self._client._invoke(
            self._client._stub.Reserve, self._request, self._timeout
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        action = self._exit_action(raised=exc is not None)
        if action == "commit":
            try:
                await self.commit()
            except LedgerError as error:
                if not refused_for_good(error):
                    raise  # may have been applied, or may succeed later: the hold stays
                # Refused for good (nothing charged): give the hold back now.
                try:
                    await self.release(reason=REFUSED_COMMIT_REASON)
                except LedgerError:
                    log.warning(
                        "could not release reservation %s", self.reservation_id, exc_info=True
                    )
                raise
        elif action == "commit again":
            try:
                await self.commit()
            except LedgerError:
                if exc is None:  # the block went on after its commit failed: this error
                    raise
                # The block's own exception matters more; the hold stays pending for the
                # caller's hold.commit() (the same key) or its time-to-live.
                log.warning("could not commit reservation %s", self.reservation_id, exc_info=True)
        elif action == "release":
            try:
                reason, job_failed = self._exit_release_args(exc_type)
                await self.release(reason=reason, job_failed=job_failed)
            except LedgerError:
                if exc is None:  # a release the block tried itself, replayed: its error
                    raise
                # The block's own exception matters more; an unreleased hold is returned by
                # the server when its time-to-live passes.
                log.warning("could not release reservation %s", self.reservation_id, exc_info=True)
        elif action == "release anew":
            # The block already had the refusal (caught, or propagating): this release is the
            # client's best effort to give the hold back, and its failure only logged.
            try:
                reason, job_failed = self._release_anew_args(exc_type)
                await self.release(reason=reason, job_failed=job_failed)
            except LedgerError:
                log.warning("could not release reservation %s", self.reservation_id, exc_info=True)
