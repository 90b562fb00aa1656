"""The group-commit queue of charging calls (server/group_commit.py), without a database:
a pool whose connections never come back stands in for a stuck PostgreSQL."""

from __future__ import annotations

import asyncio

from ledger_server.server.group_commit import GroupCommit, latest_deadline
from support.stuck_pool import StuckPool, stop_a_batch_midway, until


def params(key: str) -> dict[str, object]:
    return {"key": key, "hash": b"\0", "amount": 1, "usage": None, "feature": "",
            "comment": "", "now": 0}  # fmt: skip


def test_a_batch_stopped_midway_answers_its_callers_and_frees_its_slot() -> None:
    """Server shutdown cancels the batch's task: its callers get UNAVAILABLE (retry with
    the same key) instead of waiting forever, and the slot and accounts are given back."""

    async def scenario() -> None:
        pool = StuckPool()
        group_commit = GroupCommit(pool, max_in_flight=1)  # type: ignore[arg-type]
        await stop_a_batch_midway(
            pool,
            lambda account: group_commit.call("consume", account, params(account)),
            lambda: group_commit._tasks,
        )
        assert group_commit._in_flight == 0
        assert not group_commit._busy and not group_commit._waiting

    asyncio.run(scenario())


def test_calls_for_a_busy_account_wait_even_when_a_slot_is_free() -> None:
    """One transaction per account at a time: a second call for an account in flight
    queues (and later joins a batch) rather than taking a free slot."""

    async def scenario() -> None:
        pool = StuckPool()
        group_commit = GroupCommit(pool, max_in_flight=4)  # type: ignore[arg-type]
        first = asyncio.create_task(group_commit.call("consume", "a", params("1")))
        await until(lambda: pool.borrowers == 1)
        second = asyncio.create_task(group_commit.call("consume", "a", params("2")))
        other = asyncio.create_task(group_commit.call("consume", "b", params("3")))
        await until(lambda: pool.borrowers == 2)  # "b" ran at once, alone
        assert [w.params["key"] for w in group_commit._waiting["a"]] == ["2"]
        for task in (first, second, other):
            task.cancel()
        await asyncio.gather(first, second, other, return_exceptions=True)

    asyncio.run(scenario())


def test_a_batch_waits_for_its_most_patient_caller() -> None:
    assert latest_deadline([10.0, 30.0, 20.0]) == 30.0
    assert latest_deadline([10.0, None]) is None
