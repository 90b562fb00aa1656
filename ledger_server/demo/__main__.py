"""`python -m ledger_server.demo [--address host:port]` (or `make demo-data`): loads
catalogue.json into a running ledger through AdminService. Safe to run again:
prices and multipliers get a new version only when they change, packs and plans
are created or updated."""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from importlib import resources
from typing import Any

import grpc
from google.protobuf import json_format

from ledger.v1 import admin_service_pb2 as admin_pb
from ledger.v1 import admin_service_pb2_grpc
from ledger.v1 import billing_service_pb2 as billing_pb
from ledger_server.server.identity import ACTOR_METADATA_KEY


def load_catalogue() -> dict[str, Any]:
    text = (resources.files("ledger_server.demo") / "catalogue.json").read_text(encoding="utf-8")
    catalogue: dict[str, Any] = json.loads(text)
    return catalogue


def _key() -> str:
    """A new idempotency key per change (the loader is re-run, not retried)."""
    return f"demo-{uuid.uuid4().hex}"


def _price_key(price: admin_pb.Price) -> tuple[str, str, int]:
    return (price.feature, price.model, price.unit)


def load(channel: grpc.Channel, actor: str = "demo-data") -> dict[str, int]:
    """Loads the catalogue; returns how many entries were written per kind."""
    admin = admin_service_pb2_grpc.AdminServiceStub(channel)
    metadata = ((ACTOR_METADATA_KEY, actor),)
    catalogue = load_catalogue()
    written = {"prices": 0, "multipliers": 0, "packs": 0, "plans": 0}

    # Every page of the rate card: what is already so is not written again.
    current: dict[tuple[str, str, int], admin_pb.Price] = {}
    token = ""
    while True:
        prices = admin.ListPrices(
            admin_pb.ListPricesRequest(page_size=1000, page_token=token), metadata=metadata
        )
        current.update((_price_key(p), p) for p in prices.prices)
        if not (token := prices.next_page_token):
            break
    for entry in catalogue["prices"]:
        price = json_format.ParseDict({"unit_size": 1, **entry}, admin_pb.Price())
        existing = current.get(_price_key(price))
        if existing and (existing.unit_size, existing.unit_price_micros) == (
            price.unit_size,
            price.unit_price_micros,
        ):
            continue
        admin.SetPrice(
            admin_pb.SetPriceRequest(price=price, idempotency_key=_key()), metadata=metadata
        )
        written["prices"] += 1

    multipliers: dict[str, int] = {}
    token = ""
    while True:
        page = admin.ListModelMultipliers(
            admin_pb.ListModelMultipliersRequest(page_size=1000, page_token=token),
            metadata=metadata,
        )
        multipliers.update((m.model, m.multiplier_ppm) for m in page.multipliers)
        if not (token := page.next_page_token):
            break
    for entry in catalogue["multipliers"]:
        multiplier = json_format.ParseDict(entry, admin_pb.ModelMultiplier())
        if multipliers.get(multiplier.model) == multiplier.multiplier_ppm:
            continue
        admin.SetModelMultiplier(
            admin_pb.SetModelMultiplierRequest(multiplier=multiplier, idempotency_key=_key()),
            metadata=metadata,
        )
        written["multipliers"] += 1

    for entry in catalogue["packs"]:
        pack = json_format.ParseDict(entry, billing_pb.CreditPack())
        try:
            admin.CreateCreditPack(
                admin_pb.CreateCreditPackRequest(pack=pack, idempotency_key=_key()),
                metadata=metadata,
            )
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
            admin.UpdateCreditPack(
                admin_pb.UpdateCreditPackRequest(pack=pack, idempotency_key=_key()),
                metadata=metadata,
            )
        written["packs"] += 1

    for entry in catalogue["plans"]:
        plan = json_format.ParseDict(entry, billing_pb.SubscriptionPlan())
        try:
            admin.CreateSubscriptionPlan(
                admin_pb.CreateSubscriptionPlanRequest(plan=plan, idempotency_key=_key()),
                metadata=metadata,
            )
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
            admin.UpdateSubscriptionPlan(
                admin_pb.UpdateSubscriptionPlanRequest(plan=plan, idempotency_key=_key()),
                metadata=metadata,
            )
        written["plans"] += 1
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ledger_server.demo", description=__doc__)
    parser.add_argument(
        "--address",
        default=os.environ.get("LEDGER_GRPC_ADDR") or "localhost:50051",
        help="the ledger's gRPC address (default: $LEDGER_GRPC_ADDR or localhost:50051)",
    )
    args = parser.parse_args(argv)
    with grpc.insecure_channel(args.address) as channel:
        try:
            written = load(channel)
        except grpc.RpcError as error:
            print(f"demo-data: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    print("demo-data: " + ", ".join(f"{n} {kind}" for kind, n in written.items()) + " written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
