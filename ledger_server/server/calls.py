"""What every handler does with the database: borrow one connection and run one
named query (a ledger function is one transaction), then tell a retried caller
its answer is a replay."""

from __future__ import annotations

from typing import Any

import grpc
from psycopg_pool import AsyncConnectionPool

from ledger_server.ledger import store
from ledger_server.observability.metrics import observe_ledger_result

Context = grpc.aio.ServicerContext[Any, Any]
REPLAYED_METADATA_KEY = "ledger-idempotent-replay"


async def call_json(
    pool: AsyncConnectionPool, name: str, params: dict[str, object]
) -> dict[str, Any]:
    async with pool.connection() as conn:
        data = await store.call_json(conn, name, params)
    observe_ledger_result(name, data)  # credits granted / consumed by source
    return data


async def fetch_all(
    pool: AsyncConnectionPool, name: str, params: dict[str, object]
) -> list[tuple[Any, ...]]:
    async with pool.connection() as conn:
        return await store.fetch_all(conn, name, params)


def mark_replay(context: Context, data: dict[str, Any]) -> None:
    if data.get("replayed"):
        context.set_trailing_metadata(((REPLAYED_METADATA_KEY, "true"),))
