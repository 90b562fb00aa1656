"""One load-generator process: `python -m bench.loadgen '<json spec>'`.

Runs `workers` closed-loop callers of one scenario through the project's asyncio client
(`ledger_client.AsyncLedgerClient`, one channel per process, its retry loop and deadline
on every call) from process start until `end_at` (wall clock). Calls that complete inside
[start_at, end_at] are measured; the ones before `start_at` warm the connection, the pool
and PostgreSQL's plan caches. Prints one JSON object: ops, errors, latencies (ms), this
process's CPU seconds inside the window and, for charges, the micro-credits charged by
every successful call (for the over-spend check)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from grpc_health.v1 import health_pb2

from bench import health as health_rpc
from ledger_client import AsyncLedgerClient, LedgerError

Op = Callable[[], Awaitable[int]]  # returns micro-credits charged (0 when none)


@dataclass
class Stats:
    latencies_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    ops_total: int = 0
    charged_micros: int = 0
    cpu_at_start: float | None = None
    cpu_at_end: float | None = None


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def make_op(client: AsyncLedgerClient, spec: dict[str, Any]) -> Op:
    scenario = spec["scenario"]
    p = spec.get("params", {})
    rnd = random.Random(spec.get("seed"))

    def random_account() -> str:
        return f"{p['account_prefix']}{rnd.randrange(p['accounts']):06d}"

    if scenario == "consume":

        async def consume() -> int:
            amount = rnd.randint(1000, 100_000)
            await client.consume(random_account(), amount, feature="bench")
            return amount

        return consume
    if scenario == "reserve_commit":

        async def reserve_commit() -> int:
            account = random_account()
            held = await client.reserve(account, 100_000, feature="bench")
            await client.commit(account, held.reservation.reservation_id, 60_000)
            return 60_000

        return reserve_commit
    if scenario == "reserve_release":

        async def reserve_release() -> int:  # a job that failed: nothing is charged
            account = random_account()
            held = await client.reserve(account, 100_000, feature="bench")
            await client.release(account, held.reservation.reservation_id, job_failed=True)
            return 0

        return reserve_release
    if scenario == "hot_account":

        async def hot() -> int:
            await client.consume(p["account"], 1000, feature="bench")
            return 1000

        return hot
    if scenario == "balance":

        async def balance() -> int:
            await client.balance(random_account())
            return 0

        return balance
    if scenario == "list_transactions_far":

        async def far_page() -> int:
            page = await client.list_transactions(
                p["account"], page_size=100, page_token=p["page_token"]
            )
            if len(page.transactions) != 100:
                raise RuntimeError(f"far page has {len(page.transactions)} entries, not 100")
            return 0

        return far_page
    if scenario.startswith("reserve_lots"):

        async def reserve() -> int:
            await client.reserve(p["account"], 1000, feature="bench")
            return 0

        return reserve
    if scenario == "health":
        # The transport limit: the standard health RPC on the same channel, through the
        # same retry loop and deadline handling as every ledger call.
        check = health_rpc.check(client._channel)
        request = health_pb2.HealthCheckRequest()

        async def health() -> int:
            await client._invoke(check, request, None)
            return 0

        return health
    raise SystemExit(f"unknown scenario {scenario!r}")


async def worker(op: Op, stats: Stats, start_at: float, end_at: float) -> None:
    while True:
        began_wall = time.time()
        if began_wall >= end_at:
            return
        began = time.perf_counter()
        try:
            charged = await op()
        except LedgerError as error:
            name = error.code.name if error.code is not None else type(error).__name__
            stats.errors[name] = stats.errors.get(name, 0) + 1
            continue
        except Exception as error:  # counted, never fatal: a bench reports, it does not stop
            name = type(error).__name__
            stats.errors[name] = stats.errors.get(name, 0) + 1
            continue
        elapsed = time.perf_counter() - began
        stats.ops_total += 1
        stats.charged_micros += charged
        if began_wall >= start_at and began_wall + elapsed <= end_at:
            stats.latencies_ms.append(elapsed * 1000)


async def cpu_marks(stats: Stats, start_at: float, end_at: float) -> None:
    await asyncio.sleep(max(0.0, start_at - time.time()))
    stats.cpu_at_start = _cpu()
    await asyncio.sleep(max(0.0, end_at - time.time()))
    stats.cpu_at_end = _cpu()


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    stats = Stats()
    async with AsyncLedgerClient(spec["target"], timeout=spec.get("timeout", 30.0)) as client:
        op = make_op(client, spec)
        start_at, end_at = spec["start_at"], spec["end_at"]
        await asyncio.gather(
            cpu_marks(stats, start_at, end_at),
            *(worker(op, stats, start_at, end_at) for _ in range(spec["workers"])),
        )
    cpu = (stats.cpu_at_end or 0.0) - (stats.cpu_at_start or 0.0)
    return {
        "ops": len(stats.latencies_ms),
        "ops_total": stats.ops_total,
        "errors": stats.errors,
        "latencies_ms": stats.latencies_ms,
        "cpu_s": cpu,
        "charged_micros": stats.charged_micros,
    }


def main() -> int:
    spec = json.loads(sys.argv[1])
    result = asyncio.run(run(spec))
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
