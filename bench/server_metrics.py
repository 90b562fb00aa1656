"""What the server under test says of itself: its Prometheus `/metrics`, read at both ends of
a measured window. Its batching histograms give how many calls each group-commit
transaction (Consume, Reserve, Commit) or each read of the balances (Balance) answered in
the window: that is what makes a call cheap under load."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

# Charging calls per group-commit transaction, Balance calls per read.
BATCH_HISTOGRAMS = (
    "ledger_group_commit_calls_per_transaction",
    "ledger_balance_calls_per_read",
)


@dataclass(frozen=True)
class BatchTotals:
    calls: float  # the histograms' _sum
    batches: float  # their _count


def parse_batches(text: str) -> BatchTotals:
    calls = batches = 0.0
    for family in text_string_to_metric_families(text):
        if family.name not in BATCH_HISTOGRAMS:
            continue
        for sample in family.samples:
            if sample.name == f"{family.name}_sum":
                calls += sample.value
            elif sample.name == f"{family.name}_count":
                batches += sample.value
    return BatchTotals(calls=calls, batches=batches)


def batches(metrics_url: str | None) -> BatchTotals | None:
    """The server's batching totals so far; None without a metrics endpoint, or when it
    does not answer (the server logs and goes on when it cannot bind the port): the
    column then shows "-" rather than the run stopping after its dataset load."""
    if not metrics_url:
        return None
    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as reply:
            return parse_batches(reply.read().decode())
    except OSError:  # URLError and time-outs included
        return None


def calls_per_batch(before: BatchTotals | None, after: BatchTotals | None) -> float | None:
    """Calls answered per transaction or read in the window; None when none ran."""
    if before is None or after is None:
        return None
    ran = after.batches - before.batches
    if ran <= 0:
        return None
    return (after.calls - before.calls) / ran
