"""AdminService: hand grants and debits, the pack and plan catalogues, redemption
batches and run-time settings. Every change records the caller's identity."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from psycopg import AsyncConnection
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from ledger.v1 import admin_service_pb2 as pb
from ledger.v1 import admin_service_pb2_grpc
from ledger.v1 import types_pb2 as types_pb
from ledger_server import runtime_settings
from ledger_server.clock import Clock
from ledger_server.errors import LedgerError, invalid_field
from ledger_server.ledger import mapping, page_tokens, store, validation
from ledger_server.ledger.fingerprint import AsRead, request_fingerprint, unset_if_default
from ledger_server.server import admin_requests, catalogue
from ledger_server.server.alert_emails import AlertEmails
from ledger_server.server.calls import Context, call_json, fetch_all, mark_replay
from ledger_server.server.identity import caller_identity

Conn = AsyncConnection[TupleRow]
Response = TypeVar("Response", bound=Message)

MAX_CODES_PER_BATCH = 10_000
MAX_REDEMPTIONS_PER_CODE = 1_000_000


def _price_key(
    feature: str, model: str, unit: types_pb.UsageUnit.ValueType, prefix: str
) -> dict[str, object]:
    """The rate card's key of a price, checked the same way by SetPrice and RemovePrice."""
    if not feature:
        raise invalid_field(f"{prefix}feature", "must not be empty")
    if unit == types_pb.USAGE_UNIT_UNSPECIFIED or unit not in types_pb.UsageUnit.values():
        raise invalid_field(f"{prefix}unit", "must be set to a known unit")
    return {
        "feature": validation.code(feature, f"{prefix}feature"),
        "model": validation.code(model, f"{prefix}model"),
        "unit": validation.unit_to_db(unit),
    }


def _exists(kind: str, identifier: str) -> LedgerError:
    return LedgerError(
        grpc.StatusCode.ALREADY_EXISTS,
        "ALREADY_EXISTS",
        f"{kind} {identifier} exists",
        {"id": identifier},
    )


def _not_found(reason: str, key: str, identifier: str) -> LedgerError:
    return LedgerError(
        grpc.StatusCode.NOT_FOUND, reason, f"no such {key.replace('_', ' ')}", {key: identifier}
    )


class AdminService(admin_service_pb2_grpc.AdminServiceServicer):
    def __init__(
        self,
        pool: AsyncConnectionPool,
        clock: Clock,
        setting_defaults: Mapping[str, Any],
        alert_emails: AlertEmails,
    ) -> None:
        self._pool = pool
        self._clock = clock
        self._defaults = dict(setting_defaults)
        self._alert_emails = alert_emails

    # --- credits ---------------------------------------------------------------------------

    async def GrantCredits(
        self, request: pb.GrantCreditsRequest, context: Context
    ) -> pb.GrantCreditsResponse:
        now = self._clock.now()
        params: dict[str, object] = {
            "account_id": validation.account_id(request.account_id),
            "key": validation.idempotency_key(request.idempotency_key),
            "amount": validation.positive_amount(request.amount_micros),
            "source": "admin",
            "expires_at": validation.lot_expiry(request, now),
            "balance_kind": "main",
            "external_ref": "",
            "comment": validation.required_text(request.reason, "reason"),
            "actor": caller_identity(context),
            "hash": request_fingerprint("admin_grant", request),
            "now": now,
        }
        data = await call_json(self._pool, "grant", params)
        mark_replay(context, data)
        return pb.GrantCreditsResponse(
            lot=mapping.lot(data["lot"]),
            transaction_id=data["transaction_id"],
            balance=mapping.account_balance(data["balance"]),
        )

    async def AdjustBalance(
        self, request: pb.AdjustBalanceRequest, context: Context
    ) -> pb.AdjustBalanceResponse:
        params: dict[str, object] = {
            "account_id": validation.account_id(request.account_id),
            "key": validation.idempotency_key(request.idempotency_key),
            "amount": validation.positive_amount(request.amount_micros),
            "reason": validation.required_text(request.reason, "reason"),
            "actor": caller_identity(context),
            "hash": request_fingerprint("adjust_balance", request),
            "now": self._clock.now(),
        }
        data = await call_json(self._pool, "adjust_balance", params)
        mark_replay(context, data)
        self._alert_emails.queue_for(request.account_id, data)
        return pb.AdjustBalanceResponse(
            transaction_id=data["transaction_id"],
            balance=mapping.account_balance(data["balance"]),
        )

    async def SetOverdraftLimit(
        self, request: pb.SetOverdraftLimitRequest, context: Context
    ) -> pb.SetOverdraftLimitResponse:
        params: dict[str, object] = {
            "account_id": validation.account_id(request.account_id),
            "key": validation.idempotency_key(request.idempotency_key),
            "limit": validation.non_negative_amount(
                request.overdraft_limit_micros, "overdraft_limit_micros"
            ),
            "reason": validation.required_text(request.reason, "reason"),
            "actor": caller_identity(context),
            "hash": request_fingerprint("set_overdraft_limit", request),
            "now": self._clock.now(),
        }
        data = await call_json(self._pool, "set_overdraft_limit", params)
        mark_replay(context, data)
        return pb.SetOverdraftLimitResponse(
            transaction_id=data["transaction_id"],
            balance=mapping.account_balance(data["balance"]),
        )

    # --- catalogue -------------------------------------------------------------------------

    async def _once(
        self,
        context: Context,
        operation: str,
        request: Message,
        response_type: type[Response],
        change: admin_requests.Change[Response],
        as_read: AsRead | None = None,
    ) -> Response:
        """The change, once per idempotency key (a retry answers the first response)."""
        return await admin_requests.once(
            self._pool,
            context,
            operation,
            request,
            response_type,
            self._clock.now(),
            change,
            as_read,
        )

    async def _write_catalogue(
        self, conn: Conn, query: str, params: dict[str, object], context: Context
    ) -> tuple[Any, ...] | None:
        params.update(actor=caller_identity(context), now=self._clock.now())
        rows = await store.fetch_all(conn, query, params)
        return rows[0] if rows else None

    async def CreateCreditPack(
        self, request: pb.CreateCreditPackRequest, context: Context
    ) -> pb.CreateCreditPackResponse:
        params = catalogue.pack_params(request.pack)

        async def change(conn: Conn) -> pb.CreateCreditPackResponse:
            row = await self._write_catalogue(conn, "insert_credit_pack", params, context)
            if row is None:
                raise _exists("credit pack", request.pack.pack_id)
            return pb.CreateCreditPackResponse(pack=mapping.credit_pack(row))

        return await self._once(
            context, "create_credit_pack", request, pb.CreateCreditPackResponse, change
        )

    async def UpdateCreditPack(
        self, request: pb.UpdateCreditPackRequest, context: Context
    ) -> pb.UpdateCreditPackResponse:
        update = catalogue.read_update(catalogue.PACKS, request)

        async def change(conn: Conn) -> pb.UpdateCreditPackResponse:
            params = await update.params(conn)
            row = await self._write_catalogue(conn, "update_credit_pack", params, context)
            if row is None:
                raise _not_found("PACK_NOT_FOUND", "pack_id", update.record_id)
            return pb.UpdateCreditPackResponse(pack=mapping.credit_pack(row))

        return await self._once(
            context,
            "update_credit_pack",
            request,
            pb.UpdateCreditPackResponse,
            change,
            update.as_read,
        )

    async def ListAllCreditPacks(
        self, request: pb.ListAllCreditPacksRequest, context: Context
    ) -> pb.ListAllCreditPacksResponse:
        rows = await fetch_all(self._pool, "list_credit_packs", {"include_inactive": True})
        return pb.ListAllCreditPacksResponse(packs=[mapping.credit_pack(row) for row in rows])

    async def ListAllSubscriptionPlans(
        self, request: pb.ListAllSubscriptionPlansRequest, context: Context
    ) -> pb.ListAllSubscriptionPlansResponse:
        # An inactive plan's etag is read here: a conditional reactivation needs it.
        rows = await fetch_all(self._pool, "list_subscription_plans", {"include_inactive": True})
        return pb.ListAllSubscriptionPlansResponse(
            plans=[mapping.subscription_plan(row) for row in rows]
        )

    async def CreateSubscriptionPlan(
        self, request: pb.CreateSubscriptionPlanRequest, context: Context
    ) -> pb.CreateSubscriptionPlanResponse:
        params = catalogue.plan_params(request.plan)

        async def change(conn: Conn) -> pb.CreateSubscriptionPlanResponse:
            row = await self._write_catalogue(conn, "insert_subscription_plan", params, context)
            if row is None:
                raise _exists("subscription plan", request.plan.plan_id)
            return pb.CreateSubscriptionPlanResponse(plan=mapping.subscription_plan(row))

        return await self._once(
            context, "create_subscription_plan", request, pb.CreateSubscriptionPlanResponse, change
        )

    async def UpdateSubscriptionPlan(
        self, request: pb.UpdateSubscriptionPlanRequest, context: Context
    ) -> pb.UpdateSubscriptionPlanResponse:
        update = catalogue.read_update(catalogue.PLANS, request)

        async def change(conn: Conn) -> pb.UpdateSubscriptionPlanResponse:
            params = await update.params(conn)
            # Subscribers' renewals name the plan's price: PLAN_IN_USE while any may come.
            await store.fetch_all(
                conn,
                "require_plan_price_change_allowed",
                {**params, "now": self._clock.now()},
            )
            row = await self._write_catalogue(conn, "update_subscription_plan", params, context)
            if row is None:
                raise _not_found("PLAN_NOT_FOUND", "plan_id", update.record_id)
            return pb.UpdateSubscriptionPlanResponse(plan=mapping.subscription_plan(row))

        return await self._once(
            context,
            "update_subscription_plan",
            request,
            pb.UpdateSubscriptionPlanResponse,
            change,
            update.as_read,
        )

    # --- redemption codes --------------------------------------------------------------------

    async def CreateRedemptionBatch(
        self, request: pb.CreateRedemptionBatchRequest, context: Context
    ) -> pb.CreateRedemptionBatchResponse:
        now = self._clock.now()
        if not 1 <= request.code_count <= MAX_CODES_PER_BATCH:
            raise invalid_field("code_count", f"must be 1 to {MAX_CODES_PER_BATCH}")
        if not 0 <= request.max_redemptions_per_code <= MAX_REDEMPTIONS_PER_CODE:
            raise invalid_field(
                "max_redemptions_per_code", f"must be 0 (one) to {MAX_REDEMPTIONS_PER_CODE}"
            )
        code_expires_at = None
        if request.HasField("code_expire_time"):
            # That it is still in the future is checked in the change (SQL), after the key's
            # lookups: a retry sent after the codes' expiry still gets its first answer.
            code_expires_at = validation.timestamp(request.code_expire_time, "code_expire_time")
            if code_expires_at.year > 9000:
                raise invalid_field("code_expire_time", "is too far in the future")
        credit_lifetime = None
        if request.HasField("credit_lifetime"):
            credit_lifetime = validation.duration(
                validation.duration_value(request.credit_lifetime, "credit_lifetime"),
                "credit_lifetime",
                validation.MAX_LOT_LIFETIME,
            )
        params: dict[str, object] = {
            "key": validation.idempotency_key(request.idempotency_key, account_namespace=False),
            # Compared only with the keys of releases before admin_requests, which
            # fingerprinted the request as sent.
            "hash": request_fingerprint("create_redemption_batch", request),
            "amount": validation.positive_amount(request.amount_micros),
            "count": request.code_count,
            "max_redemptions": request.max_redemptions_per_code or 1,
            "code_expires_at": code_expires_at,
            "credit_lifetime": credit_lifetime,
            "note": validation.text(request.note, "note"),
            "account_prefix": request.account_prefix
            and validation.account_prefix(request.account_prefix),
            "actor": caller_identity(context),
            "now": now,
        }

        async def change(conn: Conn) -> pb.CreateRedemptionBatchResponse:
            # A batch made before its key moved to admin_requests comes back as a replay.
            data = await store.call_json(conn, "create_redemption_batch", params)
            mark_replay(context, data)
            return pb.CreateRedemptionBatchResponse(
                batch=mapping.redemption_batch(data["batch"]),
                codes=[mapping.format_code(code) for code in data["codes"]],
            )

        as_read = {
            "max_redemptions_per_code": unset_if_default(request.max_redemptions_per_code, 1)
        }
        return await self._once(
            context,
            "create_redemption_batch",
            request,
            pb.CreateRedemptionBatchResponse,
            change,
            as_read,
        )

    @staticmethod
    def _batch_id(value: str) -> str:
        return str(validation.uuid_value(value, "batch_id", "CreateRedemptionBatch"))

    async def DisableRedemptionBatch(
        self, request: pb.DisableRedemptionBatchRequest, context: Context
    ) -> pb.DisableRedemptionBatchResponse:
        batch_id = self._batch_id(request.batch_id)
        params: dict[str, object] = {
            "batch_id": batch_id,
            "reason": validation.required_text(request.reason, "reason"),
            "actor": caller_identity(context),
            "now": self._clock.now(),
        }

        async def change(conn: Conn) -> pb.DisableRedemptionBatchResponse:
            rows = await store.fetch_all(conn, "disable_redemption_batch", params)
            if rows[0][0] is None:
                raise _not_found("REDEMPTION_BATCH_NOT_FOUND", "batch_id", request.batch_id)
            return pb.DisableRedemptionBatchResponse(batch=mapping.redemption_batch(rows[0][0]))

        return await self._once(
            context,
            "disable_redemption_batch",
            request,
            pb.DisableRedemptionBatchResponse,
            change,
            {"batch_id": batch_id},
        )

    async def GetRedemptionBatch(
        self, request: pb.GetRedemptionBatchRequest, context: Context
    ) -> pb.GetRedemptionBatchResponse:
        batch_id = self._batch_id(request.batch_id)
        rows = await fetch_all(self._pool, "get_redemption_batch", {"batch_id": batch_id})
        if not rows or rows[0][0] is None:
            raise _not_found("REDEMPTION_BATCH_NOT_FOUND", "batch_id", request.batch_id)
        return pb.GetRedemptionBatchResponse(batch=mapping.redemption_batch(rows[0][0]))

    # --- settings ----------------------------------------------------------------------------

    def _setting(self, data: dict[str, Any]) -> pb.Setting:
        definition = runtime_settings.BY_KEY[data["key"]]
        return mapping.setting(
            data, self._defaults[definition.key], definition.env_var, definition.description
        )

    async def ListSettings(
        self, request: pb.ListSettingsRequest, context: Context
    ) -> pb.ListSettingsResponse:
        rows = await fetch_all(self._pool, "list_settings", {})
        stored = {row[0]["key"]: row[0] for row in rows}
        return pb.ListSettingsResponse(
            settings=[
                self._setting(stored[d.key])
                for d in runtime_settings.DEFINITIONS
                if d.key in stored
            ]
        )

    async def UpdateSetting(
        self, request: pb.UpdateSettingRequest, context: Context
    ) -> pb.UpdateSettingResponse:
        if not request.key:
            raise invalid_field("key", "must name a setting")
        key = validation.code(request.key, "key")  # checked before it is echoed in NOT_FOUND
        reason = validation.required_text(request.reason, "reason")
        definition = runtime_settings.BY_KEY.get(key)
        if definition is None:
            raise _not_found("SETTING_NOT_FOUND", "setting", key)
        if request.reset:
            value, source = self._defaults[definition.key], "environment"
        else:
            if not request.HasField("value"):
                raise invalid_field("value", "is required unless reset is set")
            try:
                value = mapping.from_value(request.value)
            except ValueError:  # NaN or an infinity, which JSON (and the settings) cannot hold
                raise invalid_field("value", "must be finite") from None
            violation = definition.violation(value)
            if violation is not None:
                raise invalid_field("value", f"{definition.key} {violation}")
            value, source = definition.normalize(value), "admin"
        params: dict[str, object] = {
            "key": definition.key,
            "value": Jsonb(value),
            "source": source,
            "actor": caller_identity(context),
            "reason": reason,
            "now": self._clock.now(),
            "over_admin": True,
        }

        async def change(conn: Conn) -> pb.UpdateSettingResponse:
            data = await store.call_json(conn, "put_setting", params)
            return pb.UpdateSettingResponse(setting=self._setting(data))

        # A reset ignores any value sent with it (helper-99: a retry of a reset with a
        # value was refused as another request).
        as_read: AsRead = {"value": None} if request.reset else {}
        return await self._once(
            context, "update_setting", request, pb.UpdateSettingResponse, change, as_read
        )

    async def ListSettingChanges(
        self, request: pb.ListSettingChangesRequest, context: Context
    ) -> pb.ListSettingChangesResponse:
        key = validation.code(request.key, "key") or None
        page_size = validation.page_size(request.page_size)
        filters: list[object] = ["setting_changes", key]
        position = page_tokens.decode(request.page_token, filters, (page_tokens.ID,))
        rows = await fetch_all(
            self._pool,
            "list_setting_changes",
            {"key": key, "before": position[0] if position else None, "limit": page_size + 1},
        )
        response = pb.ListSettingChangesResponse(
            changes=[mapping.setting_change(row) for row in rows[:page_size]]
        )
        if len(rows) > page_size:
            response.next_page_token = page_tokens.encode([rows[page_size - 1][0]], filters)
        return response

    # --- rate card ---------------------------------------------------------------------------

    async def SetPrice(self, request: pb.SetPriceRequest, context: Context) -> pb.SetPriceResponse:
        price = request.price
        key = _price_key(price.feature, price.model, price.unit, "price.")
        if price.unit_size < 0:
            raise invalid_field("price.unit_size", "must be positive (1 when unset)")
        params: dict[str, object] = {
            **key,
            "unit_size": price.unit_size or 1,
            "unit_price_micros": validation.non_negative_amount(
                price.unit_price_micros, "price.unit_price_micros"
            ),
            "active": True,
            "actor": caller_identity(context),
            "now": self._clock.now(),
        }

        async def change(conn: Conn) -> pb.SetPriceResponse:
            await _lock_price(conn, key)
            rows = await store.fetch_all(conn, "insert_price", params)
            return pb.SetPriceResponse(price=mapping.price(rows[0][0]))

        # A unit size of 1 is the unset one (helper-99: the two were two requests).
        as_read = {"price.unit_size": unset_if_default(price.unit_size, 1)}
        return await self._once(context, "set_price", request, pb.SetPriceResponse, change, as_read)

    async def RemovePrice(
        self, request: pb.RemovePriceRequest, context: Context
    ) -> pb.RemovePriceResponse:
        key = _price_key(request.feature, request.model, request.unit, "")

        async def change(conn: Conn) -> pb.RemovePriceResponse:
            await _lock_price(conn, key)
            current = await store.fetch_all(conn, "current_price", key)
            if not current:
                raise LedgerError(
                    grpc.StatusCode.NOT_FOUND,
                    "PRICE_NOT_FOUND",
                    "the rate card has no such price",
                    {"feature": request.feature, "model": request.model, "unit": str(key["unit"])},
                )
            row = current[0][0]
            await store.fetch_all(
                conn,
                "insert_price",
                {
                    **key,
                    "unit_size": row["unit_size"],
                    "unit_price_micros": row["unit_price_micros"],
                    "active": False,
                    "actor": caller_identity(context),
                    "now": self._clock.now(),
                },
            )
            return pb.RemovePriceResponse()

        return await self._once(context, "remove_price", request, pb.RemovePriceResponse, change)

    async def ListPrices(
        self, request: pb.ListPricesRequest, context: Context
    ) -> pb.ListPricesResponse:
        feature = validation.code(request.feature, "feature") or None
        page_size = validation.page_size(request.page_size)
        filters: list[object] = ["prices", feature]
        text = page_tokens.TEXT
        position = page_tokens.decode(request.page_token, filters, (text, text, text))
        after_feature, after_model, after_unit = position or (None, None, None)
        rows = await fetch_all(
            self._pool,
            "list_prices",
            {
                "feature": feature,
                "after_feature": after_feature,
                "after_model": after_model,
                "after_unit": after_unit,
                "limit": page_size + 1,
            },
        )
        response = pb.ListPricesResponse(prices=[mapping.price(row[0]) for row in rows[:page_size]])
        if len(rows) > page_size:
            response.next_page_token = page_tokens.encode(list(rows[page_size - 1][1:]), filters)
        return response

    async def SetModelMultiplier(
        self, request: pb.SetModelMultiplierRequest, context: Context
    ) -> pb.SetModelMultiplierResponse:
        multiplier = request.multiplier
        if not multiplier.model:
            raise invalid_field("multiplier.model", "must not be empty")
        params: dict[str, object] = {
            "model": validation.code(multiplier.model, "multiplier.model"),
            "multiplier_ppm": validation.non_negative_amount(
                multiplier.multiplier_ppm, "multiplier.multiplier_ppm"
            ),
            "active": True,
            "actor": caller_identity(context),
            "now": self._clock.now(),
        }

        async def change(conn: Conn) -> pb.SetModelMultiplierResponse:
            await _lock_multiplier(conn, str(params["model"]))
            rows = await store.fetch_all(conn, "insert_multiplier", params)
            return pb.SetModelMultiplierResponse(multiplier=mapping.model_multiplier(rows[0][0]))

        return await self._once(
            context, "set_model_multiplier", request, pb.SetModelMultiplierResponse, change
        )

    async def RemoveModelMultiplier(
        self, request: pb.RemoveModelMultiplierRequest, context: Context
    ) -> pb.RemoveModelMultiplierResponse:
        if not request.model:
            raise invalid_field("model", "must not be empty")
        model = validation.code(request.model, "model")

        async def change(conn: Conn) -> pb.RemoveModelMultiplierResponse:
            await _lock_multiplier(conn, model)
            current = await store.fetch_all(conn, "current_multiplier", {"model": model})
            if not current:
                raise _not_found("MULTIPLIER_NOT_FOUND", "model", model)
            # A withdrawn version, as RemovePrice writes for a price: the versions stay, so
            # a reservation priced with this multiplier still settles at it.
            await store.fetch_all(
                conn,
                "insert_multiplier",
                {
                    "model": model,
                    "multiplier_ppm": current[0][0]["multiplier_ppm"],
                    "active": False,
                    "actor": caller_identity(context),
                    "now": self._clock.now(),
                },
            )
            return pb.RemoveModelMultiplierResponse()

        return await self._once(
            context, "remove_model_multiplier", request, pb.RemoveModelMultiplierResponse, change
        )

    async def ListModelMultipliers(
        self, request: pb.ListModelMultipliersRequest, context: Context
    ) -> pb.ListModelMultipliersResponse:
        page_size = validation.page_size(request.page_size)
        filters: list[object] = ["model_multipliers"]
        position = page_tokens.decode(request.page_token, filters, (page_tokens.TEXT,))
        rows = await fetch_all(
            self._pool,
            "list_multipliers",
            {"after_model": position[0] if position else None, "limit": page_size + 1},
        )
        response = pb.ListModelMultipliersResponse(
            multipliers=[mapping.model_multiplier(row[0]) for row in rows[:page_size]]
        )
        if len(rows) > page_size:
            response.next_page_token = page_tokens.encode([rows[page_size - 1][1]], filters)
        return response

    # --- low-balance alerts -----------------------------------------------------------------

    async def SetLowBalanceAlert(
        self, request: pb.SetLowBalanceAlertRequest, context: Context
    ) -> pb.SetLowBalanceAlertResponse:
        account_id = validation.account_id(request.account_id)
        threshold = (
            validation.non_negative_amount(request.threshold_micros, "threshold_micros")
            if request.HasField("threshold_micros")
            else None
        )
        email = request.email.strip()
        if email and runtime_settings.BY_KEY["alerts.email_to"].violation(email):
            raise invalid_field("email", "must be an email address")

        async def change(conn: Conn) -> pb.SetLowBalanceAlertResponse:
            rows = await store.fetch_all(
                conn,
                "set_low_balance_alert",
                {"account_id": account_id, "threshold": threshold, "email": email or None},
            )
            if not rows:
                raise _not_found("ACCOUNT_NOT_FOUND", "account_id", account_id)
            _, stored_threshold, stored_email = rows[0]
            response = pb.SetLowBalanceAlertResponse(account_id=account_id, email=stored_email)
            if stored_threshold is not None:
                response.threshold_micros = stored_threshold
            return response

        # A retry that types the address with spaces is the same.
        return await self._once(
            context,
            "set_low_balance_alert",
            request,
            pb.SetLowBalanceAlertResponse,
            change,
            {"email": email},
        )

    async def ListLowBalanceAlerts(
        self, request: pb.ListLowBalanceAlertsRequest, context: Context
    ) -> pb.ListLowBalanceAlertsResponse:
        account_id = validation.account_id(request.account_id) if request.account_id else None
        page_size = validation.page_size(request.page_size)
        filters: list[object] = ["low_balance_alerts", account_id]
        position = page_tokens.decode(request.page_token, filters, (page_tokens.ID,))
        rows = await fetch_all(
            self._pool,
            "list_low_balance_alerts",
            {
                "account_id": account_id,
                "before": position[0] if position else None,
                "limit": page_size + 1,
            },
        )
        # Only an empty page asks: an account with alerts exists (accounts are never deleted).
        if account_id is not None and not rows:
            [(exists,)] = await fetch_all(self._pool, "account_exists", {"account_id": account_id})
            if not exists:
                raise LedgerError(
                    grpc.StatusCode.NOT_FOUND,
                    "ACCOUNT_NOT_FOUND",
                    "account not found",
                    {"account_id": account_id},
                )
        response = pb.ListLowBalanceAlertsResponse(
            alerts=[mapping.low_balance_alert(row[0]) for row in rows[:page_size]]
        )
        if len(rows) > page_size:
            response.next_page_token = page_tokens.encode([rows[page_size - 1][1]], filters)
        return response


async def _lock_multiplier(conn: Conn, model: str) -> None:
    """Until the change commits, no other change of this multiplier (lock_rate_card_entry)."""
    await store.fetch_all(conn, "lock_rate_card_entry", {"entry": f"multiplier:{model}"})


async def _lock_price(conn: Conn, key: dict[str, object]) -> None:
    """Until the change commits, no other change of this price (lock_rate_card_entry)."""
    entry = f"price:{key['feature']}/{key['model']}/{key['unit']}"
    await store.fetch_all(conn, "lock_rate_card_entry", {"entry": entry})
