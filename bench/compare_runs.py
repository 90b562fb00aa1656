"""`python -m bench.compare_runs BEFORE.json AFTER.json [--label-before X --label-after Y]`:
two `make bench` results side by side (ops/s, p99, server and database CPU per operation),
for the scenarios and concurrencies both measured. Prints the table and puts it in
BENCHMARKS.md between its markers.

Run the two back to back on the same quiet machine and the same dataset (the "before" from a
worktree of the older revision with BENCH_DATA_DIR pointing at the same bench data and
BENCH_WRITE_MD=0), or the comparison says more about the machine than about the change."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench import report

START = "<!-- bench:before-after:start -->"
END = "<!-- bench:before-after:end -->"


def _index(doc: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(r["name"], r["concurrency"]): r for r in doc["results"]}


def _change(before: float, after: float) -> str:
    return f"{100 * (after - before) / before:+.0f}%" if before else "-"


def table(before: dict[str, Any], after: dict[str, Any], labels: tuple[str, str]) -> str:
    old, new = _index(before), _index(after)
    b, a = labels
    rows = [
        f"| scenario | conc | ops/s {b} | ops/s {a} | change | p99 ms {b} | p99 ms {a} |"
        f" srv CPU ms/op {b} | srv CPU ms/op {a} | db CPU ms/op {b} | db CPU ms/op {a} |",
        "|---" * 11 + "|",
    ]
    for key in sorted(old.keys() & new.keys(), key=lambda k: (k[0].startswith("limit_"), k)):
        x, y = old[key], new[key]
        rows.append(
            f"| {key[0]} | {key[1]} | {x['ops_per_s']:.0f} | {y['ops_per_s']:.0f} |"
            f" {_change(x['ops_per_s'], y['ops_per_s'])} | {x['p99_ms']:.1f} | {y['p99_ms']:.1f} |"
            f" {x['server_cpu_s_per_1000_ops']:.3f} | {y['server_cpu_s_per_1000_ops']:.3f} |"
            f" {x['db_cpu_s_per_1000_ops']:.3f} | {y['db_cpu_s_per_1000_ops']:.3f} |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--label-before", default="before")
    parser.add_argument("--label-after", default="after")
    args = parser.parse_args()
    before = json.loads(args.before.read_text())
    after = json.loads(args.after.read_text())
    text = table(before, after, (args.label_before, args.label_after))
    print(text)
    report.replace_section(START, END, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
