"""Idempotency of the administrators' changes that move no credits (catalogue, rate card,
settings, redemption batches, alert thresholds), as DESIGN.md section 4 asks of every
mutating RPC: the change runs in one transaction that first claims its key
(admin_requests, migration 0015) and ends by storing its response; a retry with the same
key answers that response, marked as a replay, and the same key with another request is
refused. A change that fails stores nothing, so its retry runs again.

The request is fingerprinted as read (fingerprint.py, `as_read`). A key stored by a release
that fingerprinted requests as sent still answers the retry sent the same way: the ledger
keeps its keys, and the forms the ledger reads alike are all in use (the CLI spells out a
batch's one redemption per code, other callers leave it unset)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar

import grpc
from google.protobuf.message import Message
from psycopg import AsyncConnection
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from ledger_server.errors import LedgerError
from ledger_server.ledger import store, validation
from ledger_server.ledger.fingerprint import AsRead, request_fingerprint
from ledger_server.server.calls import Context, mark_replay
from ledger_server.server.identity import caller_identity

Response = TypeVar("Response", bound=Message)
Change = Callable[[AsyncConnection[TupleRow]], Awaitable[Response]]


async def once(
    pool: AsyncConnectionPool,
    context: Context,
    operation: str,
    request: Message,
    response_type: type[Response],
    now: datetime,
    change: Change[Response],
    as_read: AsRead | None = None,
) -> Response:
    """Runs change(conn) once per idempotency key of `request`, in one transaction."""
    key = validation.idempotency_key(
        getattr(request, "idempotency_key"),  # noqa: B009
        account_namespace=False,
    )
    fingerprint = request_fingerprint(operation, request, as_read)
    same = {fingerprint, request_fingerprint(operation, request)}
    async with pool.connection() as conn, conn.transaction():
        claimed = await store.fetch_all(
            conn,
            "claim_admin_request",
            {
                "key": key,
                "operation": operation,
                "hash": fingerprint,
                "actor": caller_identity(context),
                "now": now,
            },
        )
        if not claimed:
            [(original, original_hash, stored)] = await store.fetch_all(
                conn, "admin_request", {"key": key}
            )
            if original != operation or bytes(original_hash) not in same:
                raise LedgerError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    "IDEMPOTENCY_KEY_REUSED",
                    "idempotency key was used for a different request",
                    {"idempotency_key": key, "original_operation": original},
                )
            mark_replay(context, {"replayed": True})
            return response_type.FromString(bytes(stored))
        response = await change(conn)
        await store.fetch_all(
            conn,
            "answer_admin_request",
            {"key": key, "response": response.SerializeToString(deterministic=True)},
        )
        return response
