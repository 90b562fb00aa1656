"""What the server under test says of itself: its Prometheus `/metrics`, read at both ends of
a measured window. The group-commit histogram gives how many charging calls each of the
window's transactions carried, which is what makes a Consume cheap under load."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

GROUP_COMMIT = "ledger_group_commit_calls_per_transaction"


@dataclass(frozen=True)
class GroupCommitTotals:
    calls: float  # the histogram's _sum
    transactions: float  # its _count


def parse_group_commit(text: str) -> GroupCommitTotals:
    calls = transactions = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != GROUP_COMMIT:
            continue
        for sample in family.samples:
            if sample.name == f"{GROUP_COMMIT}_sum":
                calls = sample.value
            elif sample.name == f"{GROUP_COMMIT}_count":
                transactions = sample.value
    return GroupCommitTotals(calls=calls, transactions=transactions)


def group_commit(metrics_url: str | None) -> GroupCommitTotals | None:
    """The server's group-commit totals so far; None without a metrics endpoint."""
    if not metrics_url:
        return None
    with urllib.request.urlopen(metrics_url, timeout=5) as reply:
        return parse_group_commit(reply.read().decode())


def calls_per_transaction(
    before: GroupCommitTotals | None, after: GroupCommitTotals | None
) -> float | None:
    """Charging calls per group-commit transaction in the window; None when none ran."""
    if before is None or after is None:
        return None
    transactions = after.transactions - before.transactions
    if transactions <= 0:
        return None
    return (after.calls - before.calls) / transactions
