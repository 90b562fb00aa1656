"""Where a Consume's time goes.

- SQL round trips per RPC: pg_stat_statements counts every top-level statement a client
  sends (track = top); reset it, make N calls of one RPC through the client, divide.
- The server's Python: py-spy (sampling, --nonblocking so the server is not paused) on
  the server process under Consume load at concurrency 16; the collapsed stacks go to
  bench/profile/consume.raw.txt, a summary to BENCHMARKS.md.
- The SQL inside ledger_consume: pg_stat_statements with track = all during the same
  load counts each statement the PL/pgSQL functions run, with its time.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg

from bench import dataset, stack
from ledger_client import AsyncLedgerClient

_STATEMENTS = """
SELECT calls, regexp_replace(left(query, 90), '\\s+', ' ', 'g')
  FROM pg_stat_statements
 WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
   AND toplevel AND query NOT ILIKE '%%pg_stat_statements%%'
 ORDER BY calls DESC
"""


def _reset(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SELECT pg_stat_statements_reset()")


def round_trips(database_url: str, target: str, accounts: int, n: int = 200) -> dict[str, Any]:
    """Top-level statements per call for the hot-path RPCs (the Consume figure is the
    headline)."""

    async def calls(make: Callable[[AsyncLedgerClient, int], Awaitable[object]]) -> None:
        async with AsyncLedgerClient(target) as client:
            for i in range(n):
                await make(client, i)

    def acct(i: int) -> str:
        return dataset.account_id(random.randrange(accounts))

    async def reserve_commit(client: AsyncLedgerClient, i: int) -> None:
        account = acct(i)
        held = await client.reserve(account, 1000)
        await client.commit(account, held.reservation.reservation_id, 500)

    rpcs: dict[str, Callable[[AsyncLedgerClient, int], Awaitable[object]]] = {
        "consume": lambda c, i: c.consume(acct(i), 1000, feature="bench"),
        "balance": lambda c, i: c.balance(acct(i)),
        "reserve+commit (pair)": reserve_commit,
        "list_transactions": lambda c, i: c.list_transactions(dataset.JOURNAL, page_size=100),
    }
    out: dict[str, Any] = {}
    try:
        with psycopg.connect(database_url, autocommit=True) as conn:
            for name, make in rpcs.items():
                _reset(conn)
                asyncio.run(calls(make))
                rows = conn.execute(_STATEMENTS).fetchall()
                total = sum(int(r[0]) for r in rows)
                out[name] = {
                    "per_op": total / n,
                    "statements": "; ".join(f"{r[0]}x {r[1]}" for r in rows[:6]),
                }
    except psycopg.errors.UndefinedFunction:
        return {}  # pg_stat_statements is not loaded in this cluster
    consume = out["consume"]
    print(f"bench: SQL round trips per call: { {k: v['per_op'] for k, v in out.items()} }")
    return {"ops": n, "per_op": consume["per_op"], "statements": consume["statements"], "rpcs": out}


def _set_track(conn: psycopg.Connection[Any], value: str) -> None:
    conn.execute(f"ALTER SYSTEM SET pg_stat_statements.track = '{value}'")
    conn.execute("SELECT pg_reload_conf()")
    time.sleep(0.5)


def profile_consume(
    database_url: str,
    target: str,
    server_pid: int,
    accounts: int,
    seconds: float,
    out_dir: Path,
) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / "consume.raw.txt"
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        print("bench: py-spy not installed (pip install py-spy); no profile", flush=True)
        return {}
    result: dict[str, Any] = {}
    with psycopg.connect(database_url, autocommit=True) as conn:
        tracked = True
        try:
            _set_track(conn, "all")
            _reset(conn)
        except psycopg.Error:
            tracked = False
        start_at = time.time() + 2.5
        spec = {
            "scenario": "consume",
            "target": target,
            "workers": 16,
            "start_at": start_at,
            "end_at": start_at + seconds + 1,
            "seed": 7,
            "params": {"account_prefix": dataset.ACCOUNT_PREFIX, "accounts": accounts},
        }
        gen = subprocess.Popen(
            [sys.executable, "-m", "bench.loadgen", json.dumps(spec)],
            cwd=stack.REPO,
            stdout=subprocess.PIPE,
        )
        time.sleep(max(0.0, start_at - time.time()))
        spy = subprocess.run(
            [py_spy, "record", "--pid", str(server_pid), "--duration", str(int(seconds)),
             "--rate", "250", "--nonblocking", "--format", "raw", "--output", str(raw)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        gen.communicate(timeout=120)
        if spy.returncode != 0:
            print(f"bench: py-spy failed: {spy.stderr.strip()[-400:]}", flush=True)
        elif raw.exists():
            result["summary_lines"] = summarize(raw.read_text())
            result["raw"] = str(raw.relative_to(stack.REPO))
        if tracked:
            result["sql_lines"] = _nested_sql(conn)
            _set_track(conn, "top")
    for line in result.get("summary_lines", []) + result.get("sql_lines", []):
        print("  " + line)
    return result


ACCOUNT_LOCK = "SELECT * FROM accounts WHERE account_id = p_account FOR UPDATE"


def _nested_sql(conn: psycopg.Connection[Any]) -> list[str]:
    rows = conn.execute(
        """
        SELECT toplevel, calls, total_exec_time,
               regexp_replace(left(query, 100), '\\s+', ' ', 'g')
          FROM pg_stat_statements
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND query NOT ILIKE '%%pg_stat_statements%%'
         ORDER BY total_exec_time DESC
        """
    ).fetchall()
    # Consumes run alone (a top-level SELECT ledger_consume) or in a group-commit batch
    # (a top-level SELECT ledger_consume_batch, whose calls of ledger_consume are PL/pgSQL
    # expressions that pg_stat_statements does not see): each locks its account once.
    top = [r for r in rows if r[0] and "ledger_consume" in r[3]]
    consumes = sum(int(r[1]) for r in rows if not r[0] and ACCOUNT_LOCK in r[3])
    if not top or not consumes:
        return []
    total_ms = sum(float(r[2]) for r in top)
    batched = consumes - sum(int(r[1]) for r in top if "ledger_consume(" in r[3])
    lines = [
        f"ledger_consume: {consumes} calls ({batched} in batches), {total_ms / consumes * 1000:.0f}"
        " us of execution each; the statements inside it (per Consume; share of the time):"
    ]
    for toplevel, count, ms, query in rows:
        if toplevel or len(lines) > 16:
            continue
        lines.append(
            f"{count / consumes:5.2f}x {ms / consumes * 1000:6.0f} us {ms / total_ms:5.1%}  {query}"
        )
    return lines


def _category(frame: str) -> str:
    for needle, name in (
        ("Thread.run (threading.py", "grpc's poller thread (C/Cython core, no Python frames)"),
        ("select (selectors.py", "event loop: epoll_wait"),
        ("ledger_server/", "ledger_server (handlers, mapping, validation)"),
        ("ledger_client/", "ledger_client"),
        ("psycopg_pool/", "psycopg_pool"),
        ("psycopg/", "psycopg"),
        ("google/protobuf", "protobuf"),
        ("grpc/", "grpc (Python layer)"),
        ("asyncio/", "asyncio event loop (incl. grpc's Cython core it calls)"),
        ("workers/", "workers (alert emails)"),
        ("hashlib", "hashlib"),
        ("json/", "json"),
    ):
        if needle in frame:
            return name
    return "other (" + frame.split("(")[-1].split(":")[0].strip(")")[-40:] + ")"


def summarize(raw: str, top: int = 14) -> list[str]:
    """Self time by library, and the ledger_server/psycopg functions with the most
    inclusive time, from py-spy's collapsed stacks ("frame;frame;... count")."""
    by_category: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack_text.split(";")
        total += count
        by_category[_category(frames[-1])] += count
        seen = set()
        for frame in frames:
            if ("ledger_server/" in frame or "psycopg" in frame or "fingerprint" in frame) and (
                frame not in seen
            ):
                seen.add(frame)
                inclusive[_short(frame)] += count
    if not total:
        return ["no samples"]
    lines = [f"{total} samples; self time by where the innermost Python frame is:"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in by_category.most_common(10)]
    lines.append("inclusive time of ledger_server / psycopg functions:")
    lines += [f"  {n / total:6.1%}  {name}" for name, n in inclusive.most_common(top)]
    return lines


def _short(frame: str) -> str:
    # "Consume (ledger_server/server/ledger_service.py:193)" -> keep the module path short
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "/work/main/"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{name} ({where.rsplit(':', 1)[0]})"
