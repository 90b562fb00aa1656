"""`python -m bench.sql_cost [--baseline REV]`: what the ledger functions cost PostgreSQL, in
CPU instructions per operation.

CPU seconds on a shared 2-core machine move by 30% from one run to the next; instruction
counts do not. This runs PostgreSQL's single-user backend under valgrind's callgrind on a
scratch cluster (`.data/bench-sqlcost/`), once with 50 and once with 250 calls of each
operation, and divides the difference by 200 (start-up, catalogue loading and plan caching
cancel out; every call is planned and run like a pooled connection's after warm-up). With
`--baseline REV` the same is measured for the SQL of git revision REV (checked out in a
temporary worktree) on its own database, so a change is shown against what it replaced.

Operations, on accounts holding 5 lots (daily, sign-up, promotion, subscription, purchase):
`consume`, `consume, batch of 25` (per Consume, 25 of them on one account in one
`ledger_consume_batch`, as the server coalesces a hot account's calls), `consume, 25 accounts
in a batch` (per Consume, 25 calls on 25 accounts committed together, the server's group
commit; a tree without group commit runs them as 25 transactions, as its server did),
`reserve+commit` (one pair), `reserve+commit, 25 accounts in a batch` (per pair: a batch of
25 Reserves on 25 accounts, then a batch of their 25 Commits), `reserve+release, 25 accounts
in a batch` (the same with Releases of failed jobs; a tree whose batches take no Release
answers each with an error), `balance`. Needs `valgrind` on PATH; writes
bench/sql_cost.json and a section of BENCHMARKS.md."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from bench import report
from bench.run import BENCH_DIR
from ledger_server.devstack import embedded

START = "<!-- bench:sqlcost:start -->"
END = "<!-- bench:sqlcost:end -->"
ACCOUNTS = 200
SMALL, LARGE = 50, 250
OPERATIONS = (
    "consume",
    "consume, batch of 25",
    "consume, 25 accounts in a batch",
    "reserve+commit",
    "reserve+commit, 25 accounts in a batch",
    "reserve+release, 25 accounts in a batch",
    "balance",
)
BATCH = 25  # the hot-account path: Consumes coalesced into one ledger_consume_batch

# Run with PYTHONPATH set to the tree whose SQL is measured: its migrate, its settings.
SEED = """
import sys, uuid, psycopg
from datetime import datetime, timedelta, timezone
from ledger_server import runtime_settings
from ledger_server.db.migrate import migrate
url, accounts = sys.argv[1], int(sys.argv[2])
migrate(url)
now = datetime.now(timezone.utc)
with psycopg.connect(url, autocommit=True) as conn:
    runtime_settings.sync_environment_defaults(conn, runtime_settings.environment_defaults(), now)
    conn.execute("UPDATE settings SET value = 'false'::jsonb"
                 " WHERE key IN ('signup.enabled', 'monthly_free.enabled')")
    for i in range(accounts):
        for j, source in enumerate(("daily", "signup", "promotion", "subscription", "purchase")):
            expires = None if source == "purchase" else now + timedelta(days=7 + 50 * j)
            conn.execute(
                "SELECT ledger_grant(%s, %s, %s, %s, %s, %s, 'main', '', '', 'bench', %s)",
                (f"sqlcost-{i:04d}", uuid.uuid4().hex, b"seed", 10**11, source, expires, now))
"""


# Whether the tree's ledger_consume_batch commits calls on many accounts together.
GROUP_COMMIT = "SELECT to_regprocedure('ledger_consume_batch(jsonb, timestamptz)') IS NOT NULL"


def _account(i: int) -> str:
    return f"sqlcost-{(i * 7919) % ACCOUNTS:04d}"


def _consume(account: str, key: str, amount: int) -> str:
    return (
        f"SELECT ledger_consume('{account}', '{key}', '\\x00'::bytea, {amount},"
        " NULL::jsonb, 'bench', '', now());"
    )


def _batch(tag: str, start: int, one_account: bool, group_commit: bool) -> list[str]:
    """BATCH Consumes from call ``start`` on: on one account or on as many accounts."""
    calls = [
        (_account(start if one_account else j), f"b-{tag}-{j}", 1000 + j % 99000)
        for j in range(start, start + BATCH)
    ]
    if not group_commit:  # the tree before group commit
        if not one_account:
            return [_consume(*call) for call in calls]  # one transaction each
        requests = ", ".join(
            f'{{"key": "{key}", "hash": "00", "amount": {amount}, "usage": null,'
            ' "feature": "bench", "comment": ""}'
            for _, key, amount in calls
        )
        return [f"SELECT ledger_consume_batch('{calls[0][0]}', '[{requests}]'::jsonb, now());"]
    requests = ", ".join(
        f'{{"account": "{account}", "key": "{key}", "hash": "00", "amount": {amount},'
        ' "usage": null, "feature": "bench", "comment": ""}'
        for account, key, amount in calls
    )
    return [f"SELECT ledger_consume_batch('[{requests}]'::jsonb, now());"]


def _pairs_batch(tag: str, start: int, second: str = "commit") -> str:
    """BATCH Reserves on as many accounts in one ledger_consume_batch, then their Commits
    (or Releases of failed jobs) in another, one statement (the second calls need the
    Reserves' reservation ids)."""
    reserves = ", ".join(
        f'{{"op": "reserve", "account": "{_account(j)}", "key": "r-{tag}-{j}", "hash": "00",'
        f' "amount": 50000, "usage": null, "feature": "bench", "comment": "",'
        f' "expires_at": "2999-01-01T00:00:00Z"}}'
        for j in range(start, start + BATCH)
    )
    fields = (
        "'amount', 1000 + n * 7, 'usage', NULL, 'comment', ''"
        if second == "commit"
        else "'reason', '', 'job_failed', true"
    )
    return (
        f"WITH held AS (SELECT ledger_consume_batch('[{reserves}]'::jsonb, now()) AS answers)"
        " SELECT ledger_consume_batch((SELECT jsonb_agg(jsonb_build_object("
        f"'op', '{second}', 'account', a -> 'ok' -> 'reservation' ->> 'account_id',"
        f" 'key', 'm-{tag}-' || n, 'hash', '00', {fields},"
        " 'reservation_id', a -> 'ok' -> 'reservation' ->> 'reservation_id')"
        " ORDER BY n) FROM held, jsonb_array_elements(held.answers) WITH ORDINALITY AS t(a, n)),"
        " now());"
    )


def statements(operation: str, count: int, tag: str, group_commit: bool) -> str:
    """``count`` calls of ``operation`` as the server makes them, spread over the accounts.
    ``group_commit``: the tree's ledger_consume_batch takes calls on many accounts."""
    lines = []
    for i in range(count):
        account = _account(i)
        amount = 1000 + (i * 104729) % 99000
        if operation == "consume":
            lines.append(_consume(account, f"c-{tag}-{i}", amount))
        elif operation.startswith("consume, "):
            if i % BATCH == 0:
                lines += _batch(tag, i, operation == "consume, batch of 25", group_commit)
        elif operation == "reserve+commit":
            reserve = (
                f"ledger_reserve('{account}', 'r-{tag}-{i}', '\\x00'::bytea, 50000, NULL::jsonb,"
                " now() + interval '1 hour', 'bench', '', now())"
            )
            lines.append(
                f"SELECT ledger_commit('{account}', ({reserve} -> 'reservation' ->>"
                f" 'reservation_id')::uuid, 'm-{tag}-{i}', '\\x00'::bytea, {amount // 3},"
                " NULL::jsonb, '', now());"
            )
        elif operation == "reserve+commit, 25 accounts in a batch":
            if i % BATCH == 0:
                lines.append(_pairs_batch(tag, i))
        elif operation == "reserve+release, 25 accounts in a batch":
            if i % BATCH == 0:
                lines.append(_pairs_batch(tag, i, "release"))
        else:
            lines.append(f"SELECT ledger_balance('{account}', now());")
    return "\n".join(lines) + "\n"


def instructions(pgdata: Path, database: str, script: str, work: Path) -> int:
    """Instructions the single-user backend executes for ``script`` (from start to exit)."""
    script_path = work / "script.sql"
    script_path.write_text(script)
    out = work / "callgrind.out"
    out.unlink(missing_ok=True)
    postgres = embedded.bin_path() / "postgres"
    command = [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
        str(postgres), "--single", "-D", str(pgdata), "-c", "fsync=off", database,
    ]  # fmt: skip
    with script_path.open("rb") as stdin:
        result = subprocess.run(
            command, stdin=stdin, capture_output=True, user=embedded.pg_system_user(), check=False
        )
    if result.returncode != 0 or b"ERROR:" in result.stdout + result.stderr:
        raise RuntimeError(f"single-user run failed:\n{result.stdout[-2000:]!r}")
    for line in out.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no instruction total in {out}")


@contextmanager
def worktree(revision: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sqlcost-"))
    subprocess.run(["git", "worktree", "add", "-q", "--detach", str(path), revision], check=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], check=False)
        shutil.rmtree(path, ignore_errors=True)


def measure(trees: dict[str, Path], data_dir: Path) -> dict[str, dict[str, int]]:
    pgdata = data_dir / "sqlcost-pg"
    group_commit: dict[str, bool] = {}
    server = embedded.start_postgres(pgdata)
    try:
        for label, tree in trees.items():
            database = f"sqlcost_{label}"
            embedded.drop_database(server.url, database)
            embedded.create_database(server.url, database)
            env = {**os.environ, "PYTHONPATH": str(tree)}
            url = embedded.with_database(server.url, database)
            seed = [sys.executable, "-c", SEED, url, str(ACCOUNTS)]
            subprocess.run(seed, env=env, cwd=tree, check=True)  # -c puts the cwd first
            with psycopg.connect(url) as conn:
                row = conn.execute(GROUP_COMMIT).fetchone()
                group_commit[label] = bool(row and row[0])
    finally:
        server.stop()  # the single-user backend needs the cluster to itself
    work = Path(tempfile.mkdtemp(prefix="sqlcost-run-"))
    os.chmod(work, 0o777)  # the backend runs as the cluster's system user and writes here
    results: dict[str, dict[str, int]] = {}
    try:
        for run, (label, _) in enumerate(trees.items()):
            results[label] = {}
            for number, operation in enumerate(OPERATIONS):
                tag = f"{run}-{number}"
                small, large = (
                    instructions(
                        pgdata,
                        f"sqlcost_{label}",
                        statements(operation, count, f"{tag}{count}", group_commit[label]),
                        work,
                    )
                    for count in (SMALL, LARGE)
                )
                results[label][operation] = (large - small) // (LARGE - SMALL)
                print(f"sqlcost: {label:<9} {operation:<15} {results[label][operation]:>10,} Ir")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def section(results: dict[str, dict[str, int]], revisions: dict[str, str]) -> str:
    labels = list(results)
    header = "| operation | " + " | ".join(f"{revisions[x]} (Ir)" for x in labels)
    rows = [header + (" | change |" if len(labels) == 2 else " |")]
    rows.append("|---" * (len(labels) + 1 + (len(labels) == 2)) + "|")
    for operation in OPERATIONS:
        cells = [f"{results[x][operation]:,}" for x in labels]
        change = ""
        if len(labels) == 2:
            before, after = (results[x][operation] for x in labels)
            change = f" {100 * (after - before) / before:+.1f}% |"
        rows.append(f"| {operation} | " + " | ".join(cells) + " |" + change)
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="git revision whose SQL to measure beside the tree's")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("sqlcost: valgrind is not on PATH", file=sys.stderr)
        return 2
    data_dir = Path(os.environ.get("BENCH_DATA_DIR", embedded.repo_root() / ".data" / "bench"))
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "ledger_server/sql"]).returncode
    revisions = {"current": head + (" + working tree" if dirty else "")}
    trees = {"current": embedded.repo_root()}
    with baseline_worktree(args.baseline) as baseline_tree:
        if baseline_tree is not None:
            revisions = {"baseline": args.baseline, **revisions}
            trees = {"baseline": baseline_tree, **trees}
        results = measure(trees, data_dir)
    (BENCH_DIR / "sql_cost.json").write_text(
        json.dumps({"revisions": revisions, "instructions_per_call": results}, indent=2) + "\n"
    )
    report.replace_section(START, END, section(results, revisions))
    print("sqlcost: wrote bench/sql_cost.json and updated BENCHMARKS.md")
    return 0


@contextmanager
def baseline_worktree(revision: str | None) -> Iterator[Path | None]:
    if revision is None:
        yield None
        return
    with worktree(revision) as path:
        yield path


if __name__ == "__main__":
    sys.exit(main())
