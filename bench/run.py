"""`make bench` / `python -m bench`: starts the stack, loads the dataset, runs every
scenario and both limits at each concurrency, audits, profiles, prints the table and
writes bench/results.json and BENCHMARKS.md.

Environment:
  BENCH_SECONDS       measured seconds per scenario and concurrency (default 15; quick 2)
  BENCH_QUICK=1       smoke check: small dataset, 2 s runs, concurrency 1 and 16
  BENCH_CONCURRENCY   e.g. "1,16,64" (the default)
  BENCH_SCENARIOS     a comma list of scenario names to run (default: all)
  BENCH_PROCS         load-generator processes at concurrency > 1 (default 2)
  BENCH_PROFILE=0     skip the py-spy profile and the per-statement SQL costs
  BENCH_DATA_DIR      embedded PostgreSQL/Redis for the bench (default .data/bench, or
                      .data/bench-quick with BENCH_QUICK, so a smoke check keeps the full dataset)
  BENCH_FRESH=1       empty the bench database and load the dataset again (embedded only)
  BENCH_LABEL         a label for the BENCHMARKS.md section (e.g. "preliminary")
  BENCH_WRITE_MD=0    do not touch BENCHMARKS.md
  DATABASE_URL / REDIS_URL   use these servers instead of embedded ones
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from bench import dataset, measure, profile, report, server_metrics, stack
from ledger_server.audit import audit_database
from ledger_server.devstack import embedded
from ledger_server.ledger import page_tokens

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results.json"

# name -> what it measures (the table's legend).
SCENARIOS = {
    "consume": "Consume on random accounts (5 lots each, mixed sources and expiries)",
    "reserve_commit": "Reserve then Commit on random accounts; one op = one pair",
    "reserve_release": "Reserve then Release as a failed job on random accounts; one op = one pair",
    "hot_account": "Consume on one account under all the load",
    "balance": "Balance on random accounts",
    "list_transactions_far": "ListTransactions, page of 100 at the far end of 1,000,000 entries",
    "reserve_lots_10000": "Reserve on an account with 10,000 live lots",
    "reserve_lots_5": "Reserve on an account with 5 live lots",
}
LIMITS = {
    "limit_db_consume": "pgbench: SELECT ledger_consume(...) on random accounts (database limit)",
    "limit_transport_health": "grpc.health.v1 Health/Check via the same client (transport limit)",
    "limit_db_hot_account": "pgbench: SELECT ledger_consume(...) on the hot account",
}


@dataclass(frozen=True)
class Config:
    seconds: float
    warmup: float
    quick: bool
    concurrency: list[int]
    scenarios: list[str]
    procs: int
    profile: bool
    data_dir: Path
    fresh: bool
    label: str
    write_md: bool
    sizes: dataset.Sizes

    @classmethod
    def from_env(cls) -> Config:
        env = os.environ
        quick = env.get("BENCH_QUICK", "") not in ("", "0")
        conc = env.get("BENCH_CONCURRENCY") or ("1,16" if quick else "1,16,64")
        wanted = [s for s in (env.get("BENCH_SCENARIOS") or "").split(",") if s]
        every = [*SCENARIOS, *LIMITS]
        for name in wanted:
            if name not in every:
                raise SystemExit(f"bench: unknown scenario {name!r}; known: {', '.join(every)}")
        return cls(
            seconds=float(env.get("BENCH_SECONDS") or (2 if quick else 15)),
            warmup=1.0 if quick else 2.0,
            quick=quick,
            concurrency=[int(c) for c in conc.split(",") if c],
            scenarios=wanted or every,
            procs=int(env.get("BENCH_PROCS") or 2),
            profile=env.get("BENCH_PROFILE", "1") not in ("", "0"),
            data_dir=Path(
                env.get("BENCH_DATA_DIR")
                or embedded.default_data_dir() / ("bench-quick" if quick else "bench")
            ).resolve(),
            fresh=env.get("BENCH_FRESH", "") not in ("", "0"),
            label=env.get("BENCH_LABEL", "quick smoke check" if quick else ""),
            write_md=env.get("BENCH_WRITE_MD", "1") not in ("", "0"),
            sizes=dataset.Sizes(
                accounts=1000 if quick else 10_000,
                journal_entries=20_000 if quick else 1_000_000,
                many_lots=10_000,
            ),
        )


@dataclass
class Window:
    """CPU counters at the start and end of a measured window."""

    server: float
    cluster: float
    machine: measure.MachineCpu
    extra: float = 0.0
    batches: server_metrics.BatchTotals | None = None


def _snapshot(server_pid: int | None, postmaster: int | None, extra_pid: int | None) -> Window:
    return Window(
        server=measure.process_cpu(server_pid) if server_pid else 0.0,
        cluster=measure.cluster_cpu(postmaster),
        machine=measure.machine_cpu(),
        extra=measure.process_cpu(extra_pid) if extra_pid else 0.0,
    )


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def _summary(
    name: str,
    concurrency: int,
    seconds: float,
    latencies_ms: list[float],
    errors: dict[str, int],
    before: Window,
    after: Window,
    generator_cpu: float,
) -> dict[str, Any]:
    ops = len(latencies_ms)
    lat = sorted(latencies_ms)
    server_cpu = after.server - before.server
    cluster_cpu = after.cluster - before.cluster
    busy = after.machine.busy - before.machine.busy
    steal = after.machine.steal - before.machine.steal
    per_k = 1000 / ops if ops else float("nan")
    return {
        "name": name,
        "concurrency": concurrency,
        "seconds": round(seconds, 2),
        "ops": ops,
        "ops_per_s": round(ops / seconds, 1),
        "p50_ms": round(_percentile(lat, 0.50), 3),
        "p99_ms": round(_percentile(lat, 0.99), 3),
        # The far tail (event-loop pauses such as a full garbage collection show here first).
        "p999_ms": round(_percentile(lat, 0.999), 3),
        "max_ms": round(lat[-1], 3) if lat else float("nan"),
        "mean_ms": round(statistics.fmean(lat), 3) if lat else float("nan"),
        "errors": errors,
        "server_cpu_s_per_1000_ops": round(server_cpu * per_k, 4),
        "db_cpu_s_per_1000_ops": round(cluster_cpu * per_k, 4),
        "generator_cpu_s_per_1000_ops": round(generator_cpu * per_k, 4),
        "server_cores": round(server_cpu / seconds, 2),
        "db_cores": round(cluster_cpu / seconds, 2),
        "generator_cores": round(generator_cpu / seconds, 2),
        "machine_busy_cores": round(busy / seconds, 2),
        # CPU the hypervisor gave to other guests while ours waited: a run that had much of
        # it ran on a slower machine than its neighbours in the table.
        "steal_cores": round(steal / seconds, 2),
        # Everything else on the machine (noise); clock-tick rounding can make it dip below 0.
        "other_cores": round(
            max(0.0, busy - steal - server_cpu - cluster_cpu - generator_cpu) / seconds, 2
        ),
        "calls_per_batch": _rounded(
            server_metrics.calls_per_batch(before.batches, after.batches), 1
        ),
    }


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def run_grpc(
    cfg: Config,
    name: str,
    concurrency: int,
    target: str,
    params: dict[str, Any],
    server_pid: int,
    postmaster: int | None,
    metrics_url: str | None = None,
) -> tuple[dict[str, Any], int]:
    """One scenario at one concurrency; returns the summary and micro-credits charged."""
    nprocs = 1 if concurrency == 1 else max(1, min(cfg.procs, concurrency))
    startup = 1.5  # importing grpc and protobuf in a fresh interpreter
    start_at = time.time() + startup + cfg.warmup
    end_at = start_at + cfg.seconds
    procs = []
    for i in range(nprocs):
        workers = concurrency // nprocs + (1 if i < concurrency % nprocs else 0)
        spec = {
            "scenario": "health" if name == "limit_transport_health" else name,
            "target": target,
            "workers": workers,
            "start_at": start_at,
            "end_at": end_at,
            "seed": hash((name, concurrency, i, time.time())),
            "params": params,
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "bench.loadgen", json.dumps(spec)],
                cwd=stack.REPO,
                stdout=subprocess.PIPE,
            )
        )
    time.sleep(max(0.0, start_at - time.time()))
    # The server's /metrics read just outside the window at both ends: what answering the
    # scrape costs the server is not the calls'.
    started_batches = server_metrics.batches(metrics_url)
    before = replace(_snapshot(server_pid, postmaster, None), batches=started_batches)
    time.sleep(max(0.0, end_at - time.time()))
    after = _snapshot(server_pid, postmaster, None)
    after = replace(after, batches=server_metrics.batches(metrics_url))
    latencies: list[float] = []
    errors: dict[str, int] = {}
    generator_cpu = 0.0
    charged = 0
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"load generator for {name} exited with {proc.returncode}")
        result = json.loads(out)
        latencies += result["latencies_ms"]
        for key, count in result["errors"].items():
            errors[key] = errors.get(key, 0) + count
        generator_cpu += result["cpu_s"]
        charged += result["charged_micros"]
    summary = _summary(
        name, concurrency, cfg.seconds, latencies, errors, before, after, generator_cpu
    )
    summary["generator_processes"] = nprocs
    return summary, charged


def run_pgbench(
    cfg: Config,
    name: str,
    script: str,
    concurrency: int,
    database_url: str,
    postmaster: int | None,
) -> dict[str, Any]:
    """pgbench with a custom script; the first `warmup` seconds are left out of the
    window (read from pgbench's per-transaction log)."""
    with tempfile.TemporaryDirectory(prefix="bench-pgbench-") as tmp:
        argv = [
            str(embedded.bin_path() / "pgbench"),
            "-n",
            "-M",
            "prepared",
            "-c",
            str(concurrency),
            "-j",
            str(min(concurrency, 2)),
            "-T",
            str(int(cfg.warmup + cfg.seconds + 1)),
            "-f",
            str(BENCH_DIR / "pgbench" / script),
            "-D",
            f"naccounts={cfg.sizes.accounts}",
            "-l",
            f"--log-prefix={tmp}/log",
            database_url,
        ]
        began = time.time()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        start_at = began + 0.5 + cfg.warmup
        end_at = start_at + cfg.seconds
        time.sleep(max(0.0, start_at - time.time()))
        before = _snapshot(None, postmaster, proc.pid)
        time.sleep(max(0.0, end_at - time.time()))
        after = _snapshot(None, postmaster, proc.pid)
        out, err = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"pgbench failed ({proc.returncode}):\n{out}\n{err}")
        latencies: list[float] = []
        for log in Path(tmp).glob("log*"):
            for line in log.read_text().splitlines():
                f = line.split()
                done = int(f[4]) + int(f[5]) / 1e6
                if start_at <= done - int(f[2]) / 1e6 and done <= end_at:
                    latencies.append(int(f[2]) / 1000)
    failed = 0
    for line in out.splitlines():
        if line.startswith("number of failed transactions:"):
            failed = int(line.split(":")[1].split()[0])
    summary = _summary(
        name,
        concurrency,
        cfg.seconds,
        latencies,
        {"failed": failed} if failed else {},
        before,
        after,
        after.extra - before.extra,
    )
    summary["generator_processes"] = 1
    return summary


def _balance(database_url: str, account: str) -> int:
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT balance_micros FROM accounts WHERE account_id = %s", (account,)
        ).fetchone()
    assert row is not None
    return int(row[0])


def _audit(database_url: str, when: str) -> dict[str, Any]:
    began = time.perf_counter()
    violations = audit_database(database_url)
    seconds = round(time.perf_counter() - began, 1)
    status = "clean" if not violations else f"{len(violations)} violation(s)"
    print(f"bench: audit {when}: {status} ({seconds} s)", flush=True)
    for violation in violations[:20]:
        print(f"  {violation}", flush=True)
    return {"when": when, "violations": len(violations), "seconds": seconds}


def _versions(database_url: str) -> dict[str, str]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute("SHOW server_version").fetchone()
        settings: dict[str, str] = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN ('synchronous_commit',"
                " 'fsync', 'shared_buffers', 'max_connections', 'commit_delay', 'wal_sync_method')"
            ).fetchall()
        )
    import grpc

    return {
        "postgresql": str(row[0]) if row else "?",
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "psycopg": psycopg.__version__,
        "pg_settings": ", ".join(f"{k}={v}" for k, v in sorted(settings.items())),
    }


def _git_state() -> str:
    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", *args], cwd=stack.REPO, capture_output=True, text=True, check=False
        )
        return out.stdout.strip()

    changed = [line for line in git("status", "--porcelain").splitlines() if line]
    return f"{git('rev-parse', '--short', 'HEAD')} + {len(changed)} uncommitted change(s)"


def main() -> int:
    cfg = Config.from_env()
    if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        return 0
    if cfg.fresh and os.environ.get("DATABASE_URL"):
        raise SystemExit("bench: BENCH_FRESH empties the database; only with the embedded one")
    began = time.time()
    git_state = _git_state()  # the code the server starts with
    results: list[dict[str, Any]] = []
    audits: list[dict[str, Any]] = []
    checks: list[str] = []
    extra: dict[str, Any] = {}
    with stack.databases(cfg.data_dir) as dbs:
        log = cfg.data_dir / "server.log"
        with stack.server(dbs, log) as srv:
            print(f"bench: server pid {srv.pid} on {srv.address}; log {log}", flush=True)
            print("bench: loading the dataset (what is missing)", flush=True)
            load_began = time.perf_counter()
            timings = dataset.load(
                dbs.database_url, cfg.sizes, cfg.fresh, may_wipe=dbs.embedded_pgdata is not None
            )
            print(f"bench: dataset ready in {time.perf_counter() - load_began:.1f} s: {timings}")
            with psycopg.connect(dbs.database_url, autocommit=True) as conn:
                for account in (dataset.MANY_LOTS, dataset.FEW_LOTS, dataset.HOT):
                    dataset.settle(conn, account)
                dataset.top_up(conn, dataset.HOT, 1_000_000 * dataset.CREDIT)
                before_far = dataset.oldest_transactions(conn, dataset.JOURNAL, 100)
                checkpoint_s = dataset.checkpoint(conn)
                if checkpoint_s is None:
                    print("bench: no CHECKPOINT (the role may not); early rows may run slower")
                else:
                    timings["checkpoint"] = checkpoint_s
            audits.append(_audit(dbs.database_url, "after load"))
            postmaster = stack.postmaster_pid(dbs)
            far_token = page_tokens.encode(
                [before_far],
                ["transactions", dataset.JOURNAL, None, None, None, None, None, None],
            )
            params: dict[str, dict[str, Any]] = {
                "consume": {
                    "account_prefix": dataset.ACCOUNT_PREFIX,
                    "accounts": cfg.sizes.accounts,
                },
                "reserve_commit": {
                    "account_prefix": dataset.ACCOUNT_PREFIX,
                    "accounts": cfg.sizes.accounts,
                },
                "reserve_release": {
                    "account_prefix": dataset.ACCOUNT_PREFIX,
                    "accounts": cfg.sizes.accounts,
                },
                "hot_account": {"account": dataset.HOT},
                "balance": {
                    "account_prefix": dataset.ACCOUNT_PREFIX,
                    "accounts": cfg.sizes.accounts,
                },
                "list_transactions_far": {"account": dataset.JOURNAL, "page_token": far_token},
                "reserve_lots_10000": {"account": dataset.MANY_LOTS},
                "reserve_lots_5": {"account": dataset.FEW_LOTS},
                "limit_transport_health": {},
            }
            for concurrency in cfg.concurrency:
                for name in cfg.scenarios:
                    print(f"bench: {name} at concurrency {concurrency} ...", end=" ", flush=True)
                    if name == "limit_db_consume":
                        summary = run_pgbench(
                            cfg, name, "consume.sql", concurrency, dbs.database_url, postmaster
                        )
                    elif name == "limit_db_hot_account":
                        summary = run_pgbench(
                            cfg, name, "hot_consume.sql", concurrency, dbs.database_url, postmaster
                        )
                    else:
                        hot_before = (
                            _balance(dbs.database_url, dataset.HOT) if name == "hot_account" else 0
                        )
                        summary, charged = run_grpc(
                            cfg,
                            name,
                            concurrency,
                            srv.address,
                            params[name],
                            srv.pid,
                            postmaster,
                            srv.metrics_url,
                        )
                        if name == "hot_account":
                            spent = hot_before - _balance(dbs.database_url, dataset.HOT)
                            ok = spent == charged
                            checks.append(
                                f"hot_account c={concurrency}: balance fell by {spent} micros,"
                                f" successful calls charged {charged}: "
                                + ("no over-spend, no lost update" if ok else "MISMATCH")
                            )
                            summary["balance_check"] = "ok" if ok else "mismatch"
                    results.append(summary)
                    print(
                        f"{summary['ops_per_s']} ops/s, p50 {summary['p50_ms']} ms,"
                        f" p99 {summary['p99_ms']} ms, errors {summary['errors'] or 0}",
                        flush=True,
                    )
            audits.append(_audit(dbs.database_url, "after the run"))
            if cfg.profile:
                extra["round_trips"] = profile.round_trips(
                    dbs.database_url, srv.address, cfg.sizes.accounts
                )
                extra["profile"] = profile.profile_consume(
                    dbs.database_url,
                    srv.address,
                    srv.pid,
                    cfg.sizes.accounts,
                    seconds=3 if cfg.quick else 10,
                    out_dir=BENCH_DIR / "profile",
                )
                audits.append(_audit(dbs.database_url, "after the profile"))
        versions = _versions(dbs.database_url)
    finished = time.time()
    meta = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "label": cfg.label,
        "code": git_state,
        "duration_s": round(finished - began),
        "seconds_per_run": cfg.seconds,
        "warmup_s": cfg.warmup,
        "generator_processes": cfg.procs,
        "sizes": cfg.sizes.__dict__,
        "load_timings_s": timings,
        "machine": measure.machine_info(),
        **versions,
    }
    report.add_ratios(results)
    document = {
        "meta": meta,
        "results": results,
        "audits": audits,
        "checks": checks,
        "legend": {**SCENARIOS, **LIMITS},
        **extra,
    }
    RESULTS.write_text(json.dumps(document, indent=2) + "\n")
    print()
    print(report.table(results))
    for line in checks:
        print(line)
    print(f"bench: wrote {RESULTS.relative_to(stack.REPO)}")
    if cfg.write_md:
        report.update_benchmarks_md(document)
        print("bench: updated BENCHMARKS.md")
    dirty = [a for a in audits if a["violations"]]
    mismatched = [r for r in results if r.get("balance_check") == "mismatch"]
    return 1 if dirty or mismatched else 0
