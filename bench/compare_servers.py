"""`python -m bench.compare_servers`: grpc.aio against the sync grpc server, by measurement.

Runs Consume, Balance and Health/Check at each concurrency against three servers on the
bench database: the project's server (`python -m ledger_server serve`: grpc.aio with its
call pipeline of observability, auth, limits and error boundary), and bench/sync_server.py in
`aio` and in `sync` mode (the same handler code, without that pipeline). Same knobs as
`make bench` (BENCH_SECONDS, BENCH_CONCURRENCY, BENCH_QUICK, BENCH_PROCS); writes
bench/compare_servers.json and a section of BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import dataset, report, stack
from bench.run import BENCH_DIR, Config, run_grpc

START = "<!-- bench:servers:start -->"
END = "<!-- bench:servers:end -->"


@contextlib.contextmanager
def experimental(
    dbs: stack.Databases, mode: str, log_dir: Path = BENCH_DIR.parent / ".data" / "bench"
) -> Iterator[tuple[str, int]]:
    # Port 0: the server picks its port and logs it, so nothing can take it between a
    # probe and the bind.
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{mode}-server.log"
    log = log_path.open("ab")
    offset = log.tell()
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.sync_server", "--mode", mode, "--addr", "127.0.0.1:0"],
        env={**os.environ, "DATABASE_URL": dbs.database_url},
        cwd=stack.REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        address = f"127.0.0.1:{stack.wait_for_ports(log_path, offset, 60, process).grpc}"
        stack.wait_serving(address, 60, process)
        yield address, process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def main() -> int:
    cfg = Config.from_env()
    results: list[dict[str, Any]] = []
    with stack.databases(cfg.data_dir) as dbs:
        dataset.load(dbs.database_url, cfg.sizes, False, may_wipe=dbs.embedded_pgdata is not None)
        postmaster = stack.postmaster_pid(dbs)
        params = {"account_prefix": dataset.ACCOUNT_PREFIX, "accounts": cfg.sizes.accounts}

        def measure(server: str, address: str, pid: int) -> None:
            for concurrency in cfg.concurrency:
                for name in ("consume", "balance", "limit_transport_health"):
                    summary, _ = run_grpc(cfg, name, concurrency, address, params, pid, postmaster)
                    summary["server"] = server
                    results.append(summary)
                    print(
                        f"{server:<22} {name:<24} c={concurrency:<3} {summary['ops_per_s']:>7}"
                        f" ops/s  p99 {summary['p99_ms']} ms"
                        f"  srv {summary['server_cpu_s_per_1000_ops']} s/1k",
                        flush=True,
                    )

        with stack.server(dbs, cfg.data_dir / "server.log") as srv:
            measure("project (aio+pipeline)", srv.address, srv.pid)
        for mode in ("aio", "sync"):
            with experimental(dbs, mode) as (address, pid):
                measure(f"bench {mode}", address, pid)
    (BENCH_DIR / "compare_servers.json").write_text(json.dumps(results, indent=2) + "\n")
    rows = [
        "| server | rpc | conc | ops/s | p50 ms | p99 ms | srv CPU s/1k | db CPU s/1k |"
        " other cores |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r['server']} | {r['name']} | {r['concurrency']} | {r['ops_per_s']:.0f} |"
            f" {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['server_cpu_s_per_1000_ops']:.3f} |"
            f" {r['db_cpu_s_per_1000_ops']:.3f} | {r['other_cores']:.2f} |"
        )
    report.replace_section(START, END, "\n".join(rows))
    print("bench: wrote bench/compare_servers.json and updated BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
