"""The pack and plan catalogues' fields, checked alike on creation and update, and how an
update reads them. An update changes the fields its update_mask names (AIP-134) and keeps
the others as they are when it commits: a whole record sent from an older copy undid the
changes other administrators made since (a price change lost to a rename). With an etag
(AIP-154) it changes only the version that was read."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import Message
from psycopg import AsyncConnection
from psycopg.rows import TupleRow

from ledger.v1 import billing_service_pb2 as billing_pb
from ledger_server.errors import LedgerError, invalid_field
from ledger_server.ledger import mapping, store, validation

Check = Callable[[Any], object]

_CATALOGUE_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_CURRENCY = re.compile(r"[A-Z]{3}")  # str.isupper() also takes "ÅÅÅ", which the CHECK refuses


def catalogue_id(value: str, field: str) -> str:
    if not _CATALOGUE_ID.fullmatch(value):
        raise invalid_field(field, "must be 1 to 64 lower-case letters, digits, '.', '_' or '-'")
    return value


def _currency(value: str, field: str) -> str:
    if not _CURRENCY.fullmatch(value):
        raise invalid_field(field, "must be an upper-case ISO 4217 code such as USD")
    return value


def _period_unit(plan: billing_pb.SubscriptionPlan) -> str:
    if plan.period_unit not in mapping.PERIOD_UNIT_TO_DB:
        raise invalid_field("plan.period_unit", "must be DAY, MONTH or YEAR")
    return mapping.PERIOD_UNIT_TO_DB[plan.period_unit]


def _period_count(plan: billing_pb.SubscriptionPlan) -> int:
    if plan.period_count <= 0:
        raise invalid_field("plan.period_count", "must be positive")
    return plan.period_count


# The fields an update may change, by their name in the message (and update_mask), in the
# order they are checked; each gives the field's query parameter.
PACK_FIELDS: dict[str, Check] = {
    "translation_key": lambda p: validation.required_text(
        p.translation_key, "pack.translation_key", 128
    ),
    "credits_micros": lambda p: validation.positive_amount(p.credits_micros, "pack.credits_micros"),
    "price_minor": lambda p: validation.non_negative_amount(p.price_minor, "pack.price_minor"),
    "currency": lambda p: _currency(p.currency, "pack.currency"),
    "provider_price_id": lambda p: validation.reference(
        p.provider_price_id, "pack.provider_price_id"
    ),
    "active": lambda p: p.active,
}

PLAN_FIELDS: dict[str, Check] = {
    "period_unit": _period_unit,
    "period_count": _period_count,
    "translation_key": lambda p: validation.required_text(
        p.translation_key, "plan.translation_key", 128
    ),
    "credits_micros": lambda p: validation.non_negative_amount(
        p.credits_micros, "plan.credits_micros"
    ),
    "rank": lambda p: p.rank,
    "price_minor": lambda p: validation.non_negative_amount(p.price_minor, "plan.price_minor"),
    "currency": lambda p: _currency(p.currency, "plan.currency"),
    "provider_price_id": lambda p: validation.reference(
        p.provider_price_id, "plan.provider_price_id"
    ),
    "active": lambda p: p.active,
}


def pack_params(pack: billing_pb.CreditPack) -> dict[str, object]:
    params: dict[str, object] = {"pack_id": catalogue_id(pack.pack_id, "pack.pack_id")}
    return params | {name: check(pack) for name, check in PACK_FIELDS.items()}


def plan_params(plan: billing_pb.SubscriptionPlan) -> dict[str, object]:
    params = {name: check(plan) for name, check in PLAN_FIELDS.items()}
    return params | {"plan_id": catalogue_id(plan.plan_id, "plan.plan_id")}


@dataclass(frozen=True)
class Kind:
    """A catalogue: the request's field holding the record, its id and changeable fields."""

    name: str
    id_field: str
    fields: Mapping[str, Check]
    lock_query: str
    record: Callable[[tuple[Any, ...]], Message]
    not_found: str


PACKS = Kind(
    "pack", "pack_id", PACK_FIELDS, "lock_credit_pack", mapping.credit_pack, "PACK_NOT_FOUND"
)
PLANS = Kind(
    "plan", "plan_id", PLAN_FIELDS, "lock_subscription_plan", mapping.subscription_plan,
    "PLAN_NOT_FOUND",
)  # fmt: skip


@dataclass(frozen=True)
class Update:
    kind: Kind
    record_id: str
    sent: dict[str, object]  # the named fields' parameters, checked
    etag: str
    # For the fingerprint: what the update does not read is no part of the request.
    as_read: dict[str, object]

    async def params(self, conn: AsyncConnection[TupleRow]) -> dict[str, object]:
        """Locks the record (the fields not named keep what it holds until the update
        commits) and answers the update's parameters."""
        key = {self.kind.id_field: self.record_id}
        rows = await store.fetch_all(conn, self.kind.lock_query, key)
        if not rows:
            raise LedgerError(
                grpc.StatusCode.NOT_FOUND,
                self.kind.not_found,
                f"no such {self.kind.name}",
                key,
            )
        current = self.kind.record(rows[0])
        if self.etag and self.etag != getattr(current, "etag"):  # noqa: B009
            raise LedgerError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "ETAG_MISMATCH",
                f"the {self.kind.name} changed since it was read (etag): read it again and"
                " redo the change",
                key,
            )
        fields = self.kind.fields.items()
        kept = {name: check(current) for name, check in fields if name not in self.sent}
        return key | kept | self.sent


def read_update(kind: Kind, request: Any) -> Update:
    """The update `request` asks for; bad input is refused here, before any work."""
    record = getattr(request, kind.name)
    record_id = catalogue_id(getattr(record, kind.id_field), f"{kind.name}.{kind.id_field}")
    names = _named_fields(request, kind.fields)
    as_read: dict[str, object] = {f"{kind.name}.etag": None}  # output only: never read
    as_read |= {f"{kind.name}.{name}": None for name in kind.fields if name not in names}
    return Update(
        kind=kind,
        record_id=record_id,
        sent={name: kind.fields[name](record) for name in names},
        etag=request.etag,
        as_read=as_read,
    )


def _named_fields(request: Any, fields: Mapping[str, Check]) -> list[str]:
    if not request.HasField("update_mask"):
        return list(fields)  # a whole record, as before update_mask: clients of then
    paths = list(request.update_mask.paths)
    if not paths:
        raise invalid_field(
            "update_mask", "names no field: name the fields to change, or '*' for all of them"
        )
    if paths == ["*"]:
        return list(fields)
    for path in paths:
        if path not in fields:
            raise invalid_field(
                "update_mask",
                f"{path[:64]!r} is not a field an update changes: {', '.join(fields)}"
                ", or '*' alone",
            )
    return [name for name in fields if name in paths]
