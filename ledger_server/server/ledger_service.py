"""LedgerService: validates each request, runs one ledger operation on one
connection, and maps the result to the response. The money logic itself lives in
the SQL functions (sql/functions/), one round trip per operation."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import grpc
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from ledger.v1 import ledger_service_pb2 as pb
from ledger.v1 import ledger_service_pb2_grpc, types_pb2
from ledger_server.clock import Clock
from ledger_server.config import Settings
from ledger_server.errors import LedgerError, invalid_field
from ledger_server.ledger import mapping, page_tokens, validation
from ledger_server.ledger.fingerprint import request_fingerprint, unset_if_default
from ledger_server.security import current_principal
from ledger_server.server import journal_pages
from ledger_server.server.alert_emails import AlertEmails
from ledger_server.server.balance_reads import BalanceReads
from ledger_server.server.calls import Context, call_json, fetch_all, mark_replay
from ledger_server.server.group_commit import GroupCommit
from ledger_server.server.identity import caller_identity


def _source(value: types_pb2.CreditSource.ValueType) -> str:
    if value == types_pb2.CREDIT_SOURCE_UNSPECIFIED:
        raise invalid_field("source", "must be set")
    if value not in types_pb2.CreditSource.values():
        raise invalid_field("source", f"unknown credit source {value}")
    if value == types_pb2.CREDIT_SOURCE_OVERDRAFT:
        raise invalid_field("source", "OVERDRAFT is set by AdminService.SetOverdraftLimit")
    return mapping.source_to_db(value)


def _grant_comment(request: pb.GrantRequest) -> str:
    """DESIGN.md 5: an admin grant comes with a reason (AdminService.GrantCredits requires
    one); a grant of the admin source through this service names it in its comment."""
    if request.source == types_pb2.CREDIT_SOURCE_ADMIN and not request.comment.strip():
        raise invalid_field("comment", "is required for a CREDIT_SOURCE_ADMIN grant: its reason")
    return validation.text(request.comment, "comment")


def _balance_kind(value: types_pb2.BalanceKind.ValueType) -> str:
    if value not in types_pb2.BalanceKind.values():
        raise invalid_field("balance_kind", f"unknown balance kind {value}")
    return mapping.balance_kind_to_db(value)


def _settling_fingerprint(
    operation: str,
    request: pb.CommitRequest | pb.ReleaseRequest | pb.RefundRequest,
    params: dict[str, object],
) -> bytes:
    """The reservation id as read: a retry may write it in upper case (or without dashes)."""
    return request_fingerprint(
        operation, request, {"reservation_id": str(params["reservation_id"])}
    )


async def _keyed_as_read_or_as_sent(
    run: Callable[[dict[str, object]], Awaitable[dict[str, Any]]],
    params: dict[str, object],
    sent: bytes,
) -> dict[str, Any]:
    """Runs the call under its fingerprint as read. The releases before stored a key's
    request as sent (fingerprint.py), so a key they took for a request written another way
    (BALANCE_KIND_MAIN spelled out, an upper-case reservation id) is refused as another
    request's; only then, once, the call runs under the sent form's fingerprint, and the
    identical retry across the upgrade answers its first response (helper-126)."""
    try:
        return await run(params)
    except LedgerError as error:
        if error.reason != "IDEMPOTENCY_KEY_REUSED" or params["hash"] == sent:
            raise
        return await run({**params, "hash": sent})


def _amount_or_usage(
    request: pb.ReserveRequest | pb.ConsumeRequest,
) -> tuple[int | None, Jsonb | None]:
    """Exactly one of a raw amount and a usage description priced by the rate card."""
    has_usage = request.HasField("usage")
    if has_usage == (request.amount_micros != 0):
        raise invalid_field("amount_micros", "set exactly one of amount_micros and usage")
    if has_usage:
        # Both checked as codes first: a feature of any length echoed in the message below
        # made the status larger than gRPC's metadata limit (RESOURCE_EXHAUSTED).
        usage = validation.usage(request.usage)
        feature = validation.code(request.feature, "feature")
        if feature and feature != usage["feature"]:
            # The usage's feature is what is priced and filed; another one beside it was
            # dropped without a word (the client refuses it too).
            raise invalid_field(
                "feature", f"is {feature!r} but usage.feature is {usage['feature']!r}"
            )
        return None, Jsonb(usage)
    return validation.positive_amount(request.amount_micros), None


def _charge_fingerprints(
    operation: str, request: pb.ReserveRequest | pb.ConsumeRequest, usage: Jsonb | None
) -> tuple[bytes, bytes]:
    """The request as read, then as sent. With a usage, ``feature`` is empty or the usage's
    own (_amount_or_usage), so both read the same: the client's ``consume(feature=F,
    usage=...)`` spells it, ``consume(usage=Usage(feature=F))`` does not, and a retry of
    one in the other form was refused as another request (helper-164's review)."""
    sent = request_fingerprint(operation, request)
    if usage is None or not request.feature:
        return sent, sent
    return request_fingerprint(operation, request, {"feature": None}), sent


class LedgerService(ledger_service_pb2_grpc.LedgerServiceServicer):
    def __init__(
        self,
        pool: AsyncConnectionPool,
        clock: Clock,
        settings: Settings,
        alert_emails: AlertEmails,
    ) -> None:
        self._pool = pool
        self._clock = clock
        self._settings = settings
        self._alert_emails = alert_emails
        self._group_commit = GroupCommit(
            pool,
            clock,
            settings.group_commit_max_in_flight,
            settings.group_commit_open_lane_after.total_seconds(),
        )
        self._balances = BalanceReads(pool, settings.balance_max_in_flight)

    async def _call(self, name: str, params: dict[str, object]) -> dict[str, Any]:
        return await call_json(self._pool, name, params)

    async def Grant(self, request: pb.GrantRequest, context: Context) -> pb.GrantResponse:
        now = self._clock.now()
        params: dict[str, object] = {
            "account_id": validation.account_id(request.account_id),
            "key": validation.idempotency_key(request.idempotency_key),
            "amount": validation.positive_amount(request.amount_micros),
            "source": _source(request.source),
            "expires_at": validation.lot_expiry(request, now),
            "balance_kind": _balance_kind(request.balance_kind),
            "external_ref": validation.reference(request.external_ref, "external_ref"),
            "comment": _grant_comment(request),
            "actor": caller_identity(context),  # DESIGN.md 5: grants name who made them
            # Unset is BALANCE_KIND_MAIN: a retry may spell it out.
            "hash": request_fingerprint(
                "grant",
                request,
                {
                    "balance_kind": unset_if_default(
                        request.balance_kind, types_pb2.BALANCE_KIND_MAIN
                    )
                },
            ),
            "now": now,
        }
        data = await _keyed_as_read_or_as_sent(
            functools.partial(self._call, "grant"), params, request_fingerprint("grant", request)
        )
        mark_replay(context, data)
        return pb.GrantResponse(
            lot=mapping.lot(data["lot"]),
            transaction_id=data["transaction_id"],
            balance=mapping.account_balance(data["balance"]),
        )

    async def Balance(self, request: pb.BalanceRequest, context: Context) -> pb.BalanceResponse:
        account_id = validation.account_id(request.account_id)
        return mapping.balance_response(await self._balances.read(account_id, self._clock.now()))

    def _ttl(self, request: pb.ReserveRequest) -> timedelta:
        if not request.HasField("ttl"):
            return self._settings.reservation_ttl_default
        ttl = validation.duration_value(request.ttl, "ttl")
        return validation.duration(ttl, "ttl", self._settings.reservation_ttl_max)

    async def Reserve(self, request: pb.ReserveRequest, context: Context) -> pb.ReserveResponse:
        now = self._clock.now()
        amount, usage = _amount_or_usage(request)
        params: dict[str, object] = {
            "account_id": validation.account_id(request.account_id),
            "key": validation.idempotency_key(request.idempotency_key),
            "amount": amount,
            "usage": usage,
            "expires_at": now + self._ttl(request),
            "feature": validation.code(request.feature, "feature"),
            "comment": validation.text(request.comment, "comment"),
            "now": now,
        }
        params["hash"], sent = _charge_fingerprints("reserve", request, usage)
        data = await _keyed_as_read_or_as_sent(
            functools.partial(self._group_commit.call, "reserve", request.account_id),
            params,
            sent,
        )
        mark_replay(context, data)
        return pb.ReserveResponse(
            reservation=mapping.reservation(data["reservation"]),
            balance=mapping.account_balance(data["balance"]),
        )

    async def Commit(self, request: pb.CommitRequest, context: Context) -> pb.CommitResponse:
        if request.HasField("amount_micros") == request.HasField("usage"):
            raise invalid_field(
                "amount_micros", "set exactly one of amount_micros (the actual cost) and usage"
            )
        usage = None
        if request.HasField("usage"):
            # The feature and model are the reservation's; only quantities are needed.
            usage = Jsonb(validation.usage(request.usage, require_feature=False))
        params: dict[str, object] = {
            "account_id": validation.account_id(request.account_id),
            "reservation_id": validation.reservation_id(request.reservation_id),
            "key": validation.idempotency_key(request.idempotency_key),
            "amount": (
                validation.non_negative_amount(request.amount_micros)
                if request.HasField("amount_micros")
                else None
            ),
            "usage": usage,
            "comment": validation.text(request.comment, "comment"),
            "now": self._clock.now(),
        }
        params["hash"] = _settling_fingerprint("commit", request, params)
        data = await _keyed_as_read_or_as_sent(
            functools.partial(self._group_commit.call, "commit", request.account_id),
            params,
            request_fingerprint("commit", request),
        )
        mark_replay(context, data)
        self._alert_emails.queue_for(request.account_id, data)
        return pb.CommitResponse(
            reservation=mapping.reservation(data["reservation"]),
            transaction_id=data["transaction_id"],
            balance=mapping.account_balance(data["balance"]),
        )

    async def Release(self, request: pb.ReleaseRequest, context: Context) -> pb.ReleaseResponse:
        params: dict[str, object] = {
            "account_id": validation.account_id(request.account_id),
            "reservation_id": validation.reservation_id(request.reservation_id),
            "key": validation.idempotency_key(request.idempotency_key),
            "reason": validation.text(request.reason, "reason"),
            "job_failed": request.job_failed,
            "now": self._clock.now(),
        }
        params["hash"] = _settling_fingerprint("release", request, params)
        data = await _keyed_as_read_or_as_sent(
            functools.partial(self._group_commit.call, "release", request.account_id),
            params,
            request_fingerprint("release", request),
        )
        mark_replay(context, data)
        return pb.ReleaseResponse(
            reservation=mapping.reservation(data["reservation"]),
            balance=mapping.account_balance(data["balance"]),
        )

    async def Refund(self, request: pb.RefundRequest, context: Context) -> pb.RefundResponse:
        amount = (
            validation.positive_amount(request.amount_micros)
            if request.HasField("amount_micros")
            else None
        )
        params: dict[str, object] = {
            "account_id": validation.account_id(request.account_id),
            "reservation_id": validation.reservation_id(request.reservation_id),
            "key": validation.idempotency_key(request.idempotency_key),
            "amount": amount,
            "reason": validation.text(request.reason, "reason"),
            "now": self._clock.now(),
        }
        params["hash"] = _settling_fingerprint("refund", request, params)
        data = await _keyed_as_read_or_as_sent(
            functools.partial(self._group_commit.call, "refund", request.account_id),
            params,
            request_fingerprint("refund", request),
        )
        mark_replay(context, data)
        return pb.RefundResponse(
            reservation=mapping.reservation(data["reservation"]),
            transaction_id=data["transaction_id"],
            refunded_micros=data["refunded_micros"],
            expired_micros=data["expired_micros"],
            balance=mapping.account_balance(data["balance"]),
        )

    async def Consume(self, request: pb.ConsumeRequest, context: Context) -> pb.ConsumeResponse:
        amount, usage = _amount_or_usage(request)
        params: dict[str, object] = {
            "account_id": validation.account_id(request.account_id),
            "key": validation.idempotency_key(request.idempotency_key),
            "amount": amount,
            "usage": usage,
            "feature": validation.code(request.feature, "feature"),
            "comment": validation.text(request.comment, "comment"),
            "now": self._clock.now(),
        }
        params["hash"], sent = _charge_fingerprints("consume", request, usage)
        data = await _keyed_as_read_or_as_sent(
            functools.partial(self._group_commit.call, "consume", request.account_id),
            params,
            sent,
        )
        mark_replay(context, data)
        self._alert_emails.queue_for(request.account_id, data)
        return pb.ConsumeResponse(
            reservation=mapping.reservation(data["reservation"]),
            transaction_id=data["transaction_id"],
            balance=mapping.account_balance(data["balance"]),
        )

    async def GetReservation(
        self, request: pb.GetReservationRequest, context: Context
    ) -> pb.GetReservationResponse:
        params: dict[str, object] = {
            "account_id": validation.account_id(request.account_id),
            "reservation_id": validation.reservation_id(request.reservation_id),
            "now": self._clock.now(),
        }
        data = await self._call("get_reservation", params)
        return pb.GetReservationResponse(reservation=mapping.reservation(data))

    async def ListLots(self, request: pb.ListLotsRequest, context: Context) -> pb.ListLotsResponse:
        account_id = validation.account_id(request.account_id)
        page_size = validation.page_size(request.page_size)
        filters: list[object] = ["lots", account_id, request.include_inactive]
        position = page_tokens.decode(
            request.page_token,
            filters,
            (page_tokens.PRIORITY, page_tokens.MICROS_OR_NONE, page_tokens.ID),
        )
        after_priority, after_expires, after_lot = position or (None, None, None)
        rows = await fetch_all(
            self._pool,
            "list_lots",
            {
                "account_id": account_id,
                "include_inactive": request.include_inactive,
                "now": self._clock.now(),
                "after_priority": after_priority,
                "after_expires": after_expires,
                "after_lot": after_lot,
                "limit": page_size + 1,
            },
        )
        response = pb.ListLotsResponse(lots=[mapping.lot(row[0]) for row in rows[:page_size]])
        if len(rows) > page_size:
            last = rows[page_size - 1]
            response.next_page_token = page_tokens.encode([last[1], last[2], last[3]], filters)
        return response

    async def ListTransactions(
        self, request: pb.ListTransactionsRequest, context: Context
    ) -> pb.ListTransactionsResponse:
        account_id = validation.account_id(request.account_id)
        page_size = validation.page_size(request.page_size)
        params = journal_pages.filters(request)
        bound_to = journal_pages.token_filters("transactions", account_id, params)
        position = journal_pages.position(request, bound_to)
        rows = await fetch_all(
            self._pool,
            "list_transactions",
            {
                **params,
                "account_id": account_id,
                "before": position[0] if position else None,
                "limit": page_size + 1,
                "scan": journal_pages.scan_bound(account_id, params),
                "now": self._clock.now(),
            },
        )
        response = pb.ListTransactionsResponse()
        response.next_page_token = journal_pages.fill(
            response.transactions,
            rows,
            page_size,
            bound_to,
            journal_pages.page_bytes(self._settings.max_message_bytes),
        )
        return response

    async def CreateAccount(
        self, request: pb.CreateAccountRequest, context: Context
    ) -> pb.CreateAccountResponse:
        referral_code = validation.referral_code(request.referral_code)
        params: dict[str, object] = {
            "account_id": validation.account_id(request.account_id),
            "key": validation.idempotency_key(request.idempotency_key),
            "referral_code": referral_code,
            # A retry may type the code another way (case, spaces): it is the same request.
            "hash": request_fingerprint(
                "create_account", request, {"referral_code": referral_code}
            ),
            "now": self._clock.now(),
        }
        if params["referral_code"]:
            await self._inviter_in_scope(str(params["referral_code"]))
        data = await self._call("create_account", params)
        mark_replay(context, data)
        return pb.CreateAccountResponse(
            account=_scoped(mapping.account(data["account"])),
            signup_lot=mapping.optional_lot(data["signup_lot"]),
            balance=mapping.account_balance(data["balance"]),
        )

    async def GetAccount(
        self, request: pb.GetAccountRequest, context: Context
    ) -> pb.GetAccountResponse:
        params: dict[str, object] = {
            "account_id": validation.account_id(request.account_id),
            "now": self._clock.now(),
        }
        return pb.GetAccountResponse(
            account=_scoped(mapping.account(await self._call("get_account", params)))
        )

    async def _inviter_in_scope(self, referral_code: str) -> None:
        """A service scoped to a prefix may only name an inviter inside it: the referral
        reward would otherwise credit an account it may not touch (helper-54, helper-55).
        Outside, the code is unknown to it, as it is to a caller with a wrong code."""
        caller = current_principal()
        if caller is None or caller.account_prefix is None:
            return
        rows = await fetch_all(self._pool, "referral_code_owner", {"code": referral_code})
        if not rows or not caller.may_touch(rows[0][0]):
            raise LedgerError(
                grpc.StatusCode.NOT_FOUND,
                "REFERRAL_CODE_NOT_FOUND",
                "no account has this referral code",
                {"referral_code": referral_code},
            )

    async def ClaimDailyReward(
        self, request: pb.ClaimDailyRewardRequest, context: Context
    ) -> pb.ClaimDailyRewardResponse:
        params: dict[str, object] = {
            "account_id": validation.account_id(request.account_id),
            "key": validation.idempotency_key(request.idempotency_key),
            "hash": request_fingerprint("claim_daily_reward", request),
            "now": self._clock.now(),
        }
        data = await self._call("claim_daily_reward", params)
        mark_replay(context, data)
        response = pb.ClaimDailyRewardResponse(
            lot=mapping.lot(data["lot"]), balance=mapping.account_balance(data["balance"])
        )
        mapping.set_timestamp(response.next_claim_time, data["next_claim_time"])
        return response

    async def Redeem(self, request: pb.RedeemRequest, context: Context) -> pb.RedeemResponse:
        code = validation.redemption_code(request.code)
        params: dict[str, object] = {
            "account_id": validation.account_id(request.account_id),
            "key": validation.idempotency_key(request.idempotency_key),
            "code": code,
            # A retry may type the code another way (case, dashes, spaces): the same request.
            "hash": request_fingerprint("redeem", request, {"code": code}),
            "now": self._clock.now(),
        }
        data = await self._call("redeem", params)
        mark_replay(context, data)
        return pb.RedeemResponse(
            lot=mapping.lot(data["lot"]), balance=mapping.account_balance(data["balance"])
        )

    async def TransferReward(
        self, request: pb.TransferRewardRequest, context: Context
    ) -> pb.TransferRewardResponse:
        amount = (
            validation.positive_amount(request.amount_micros)
            if request.HasField("amount_micros")
            else None
        )
        params: dict[str, object] = {
            "account_id": validation.account_id(request.account_id),
            "key": validation.idempotency_key(request.idempotency_key),
            "amount": amount,
            "hash": request_fingerprint("transfer_reward", request),
            "now": self._clock.now(),
        }
        data = await self._call("transfer_reward", params)
        mark_replay(context, data)
        return pb.TransferRewardResponse(
            transferred_micros=data["transferred_micros"],
            lot=mapping.lot(data["lot"]),
            # Answers stored before transfers kept expiries hold one lot.
            lots=[mapping.lot(lot) for lot in data.get("lots", [data["lot"]])],
            transaction_id=data["transaction_id"],
            balance=mapping.account_balance(data["balance"]),
        )

    async def Estimate(self, request: pb.EstimateRequest, context: Context) -> pb.EstimateResponse:
        if not request.HasField("usage"):
            raise invalid_field("usage", "is required")
        usage = validation.usage(request.usage)
        params: dict[str, object] = {
            "feature": usage["feature"],
            "model": usage["model"],
            "quantities": Jsonb(usage["quantities"]),
        }
        return pb.EstimateResponse(usage=mapping.priced_usage(await self._call("estimate", params)))


def _scoped(account: types_pb2.Account) -> types_pb2.Account:
    """The account as the caller may see it: a scoped service is not told who referred it
    when that account is outside its scope."""
    caller = current_principal()
    if caller is not None and not caller.may_touch(account.referred_by_account_id):
        account.referred_by_account_id = ""
    return account
