"""An experimental, minimal LedgerService (Consume and Balance only) plus the health
service, served either by grpc.aio or by the sync grpc server with a thread pool, to
choose between the two by measurement (`python -m bench.compare_servers`).

Both modes run the same handler code as ledger_server's: the same validation, request
fingerprint, named query (one SQL round trip into ledger_consume / ledger_balance), error
translation and response mapping, imported from ledger_server. What they leave out is the
same for both: the call pipeline (observability, auth, limits, error boundary), coalescing and
alert emails. Not a server to deploy.

    python -m bench.sync_server --mode sync|aio --addr 127.0.0.1:50099 [--threads 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import psycopg
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from ledger.v1 import ledger_service_pb2 as pb
from ledger.v1 import ledger_service_pb2_grpc
from ledger_server.clock import SystemClock
from ledger_server.db.errors import translate
from ledger_server.db.queries import query
from ledger_server.errors import LedgerError
from ledger_server.ledger import mapping, validation
from ledger_server.ledger.fingerprint import request_fingerprint
from ledger_server.server.ledger_service import _amount_or_usage

CLOCK = SystemClock()


def consume_params(request: pb.ConsumeRequest) -> dict[str, object]:
    amount, usage = _amount_or_usage(request)
    return {
        "account_id": validation.account_id(request.account_id),
        "key": validation.idempotency_key(request.idempotency_key),
        "amount": amount,
        "usage": usage,
        "feature": validation.code(request.feature, "feature"),
        "comment": validation.text(request.comment, "comment"),
        "hash": request_fingerprint("consume", request),
        "now": CLOCK.now(),
    }


def balance_params(request: pb.BalanceRequest) -> dict[str, object]:
    return {"account_id": validation.account_id(request.account_id), "now": CLOCK.now()}


def consume_response(data: Mapping[str, Any]) -> pb.ConsumeResponse:
    return pb.ConsumeResponse(
        reservation=mapping.reservation(data["reservation"]),
        transaction_id=data["transaction_id"],
        balance=mapping.account_balance(data["balance"]),
    )


def _domain(exc: psycopg.Error) -> Exception:
    return translate(exc) or exc


class SyncLedger(ledger_service_pb2_grpc.LedgerServiceServicer):
    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    def _call(self, name: str, params: dict[str, object]) -> Any:
        with self._pool.connection() as conn:
            try:
                return conn.execute(query(name), params).fetchall()[0][0]
            except psycopg.Error as exc:
                raise _domain(exc) from exc

    def Consume(self, request: pb.ConsumeRequest, context: Any) -> pb.ConsumeResponse:
        try:
            return consume_response(self._call("consume", consume_params(request)))
        except LedgerError as error:
            context.abort(error.code, error.message)
            raise

    def Balance(self, request: pb.BalanceRequest, context: Any) -> pb.BalanceResponse:
        try:
            return mapping.balance_response(self._call("balance", balance_params(request)))
        except LedgerError as error:
            context.abort(error.code, error.message)
            raise


class AioLedger(ledger_service_pb2_grpc.LedgerServiceServicer):
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def _call(self, name: str, params: dict[str, object]) -> Any:
        async with self._pool.connection() as conn:
            try:
                cursor = await conn.execute(query(name), params)
                return (await cursor.fetchall())[0][0]
            except psycopg.Error as exc:
                raise _domain(exc) from exc

    async def Consume(self, request: pb.ConsumeRequest, context: Any) -> pb.ConsumeResponse:
        try:
            return consume_response(await self._call("consume", consume_params(request)))
        except LedgerError as error:
            await context.abort(error.code, error.message)
            raise

    async def Balance(self, request: pb.BalanceRequest, context: Any) -> pb.BalanceResponse:
        try:
            return mapping.balance_response(await self._call("balance", balance_params(request)))
        except LedgerError as error:
            await context.abort(error.code, error.message)
            raise


def _listening(addr: str, port: int) -> None:
    """The line bench/stack.py reads the port from (``--addr`` may ask for port 0)."""
    print(f"listening on {addr} (port {port})", flush=True)


def serve_sync(url: str, addr: str, threads: int, pool_max: int) -> None:
    pool = ConnectionPool(
        url, min_size=2, max_size=pool_max, configure=lambda c: c.set_autocommit(True), open=True
    )
    server = grpc.server(ThreadPoolExecutor(max_workers=threads))
    ledger_service_pb2_grpc.add_LedgerServiceServicer_to_server(
        SyncLedger(pool),  # type: ignore[abstract]  # serves the RPCs the comparison calls
        server,
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    _listening(addr, server.add_insecure_port(addr))
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.stop(2).wait()
    pool.close()


async def serve_aio(url: str, addr: str, pool_max: int) -> None:
    async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.set_autocommit(True)

    pool = AsyncConnectionPool(url, min_size=2, max_size=pool_max, configure=configure, open=False)
    await pool.open(wait=True)
    server = grpc.aio.server()
    ledger_service_pb2_grpc.add_LedgerServiceServicer_to_server(
        AioLedger(pool),  # type: ignore[abstract]  # serves the RPCs the comparison calls
        server,
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    _listening(addr, server.add_insecure_port(addr))
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(2)
    await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("sync", "aio"), required=True)
    parser.add_argument("--addr", required=True)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--pool-max", type=int, default=16)
    args = parser.parse_args()
    url = os.environ["DATABASE_URL"]
    if args.mode == "sync":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        serve_sync(url, args.addr, args.threads, args.pool_max)
    else:
        asyncio.run(serve_aio(url, args.addr, args.pool_max))


if __name__ == "__main__":
    main()
