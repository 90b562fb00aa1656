"""The group-commit queue of charging calls (server/group_commit.py), without a database:
a pool whose connections never come back stands in for a stuck PostgreSQL, and one whose
connections answer when the test says so for a working one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from ledger_server.config import ConfigError, Settings
from ledger_server.db import waits
from ledger_server.errors import LedgerError
from ledger_server.server.group_commit import (
    GroupCommit,
    _answer,
    _request,
    _Waiter,
    latest_deadline,
)
from support.set_clock import SetClock
from support.stuck_pool import StuckPool, stop_a_batch_midway, until

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def params(key: str, now: datetime = NOW) -> dict[str, object]:
    return {"key": key, "hash": b"\0", "amount": 1, "usage": None, "feature": "",
            "comment": "", "now": now}  # fmt: skip


def test_a_batch_stopped_midway_answers_its_callers_and_frees_its_slot() -> None:
    """Server shutdown cancels the batch's task: its callers get UNAVAILABLE (retry with
    the same key) instead of waiting forever, and the slot and accounts are given back."""

    async def scenario() -> None:
        pool = StuckPool()
        group_commit = GroupCommit(pool, SetClock(NOW), max_in_flight=1)  # type: ignore[arg-type]
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
        group_commit = GroupCommit(pool, SetClock(NOW), max_in_flight=4)  # type: ignore[arg-type]
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


def test_a_second_lane_opens_only_once_the_first_has_run_open_lane_after() -> None:
    """While the only transaction in flight is young, another account's call waits (to go
    in the next, larger batch) instead of starting a second transaction; once the first has
    run open_lane_after (a lock wait, say), the waiting call goes in a second lane without
    waiting for the first to end."""

    async def scenario() -> None:
        pool = StuckPool()
        group_commit = GroupCommit(pool, SetClock(NOW), max_in_flight=2, open_lane_after=0.3)  # type: ignore[arg-type]
        extra_lanes = _metric("ledger_group_commit_extra_lanes_total")
        first = asyncio.create_task(group_commit.call("consume", "a", params("1")))
        await until(lambda: pool.borrowers == 1)
        second = asyncio.create_task(group_commit.call("consume", "b", params("2")))
        await asyncio.sleep(0.1)
        assert pool.borrowers == 1 and list(group_commit._waiting) == ["b"]
        await until(lambda: pool.borrowers == 2)  # while the first is still stuck
        assert not group_commit._waiting and group_commit._in_flight == 2
        assert _metric("ledger_group_commit_extra_lanes_total") == extra_lanes + 1
        batches = list(group_commit._tasks)
        for task in (first, second, *batches):
            task.cancel()
        await asyncio.gather(first, second, *batches, return_exceptions=True)
        assert group_commit._in_flight == 0 and not group_commit._lane_starts

    asyncio.run(scenario())


def test_calls_waiting_for_a_lane_go_together_when_the_young_one_ends() -> None:
    """The first transaction ends before open_lane_after: everything that queued behind it
    goes as one batch in the lane it frees. A call arriving next waits for that batch to
    have run open_lane_after, not for the timer set while the first ran (which fires
    earlier and must set itself again)."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        pool = StuckPool()
        group_commit = GroupCommit(pool, SetClock(NOW), max_in_flight=2, open_lane_after=0.3)  # type: ignore[arg-type]
        calls = _metric("ledger_group_commit_calls_per_transaction_sum")
        transactions = _metric("ledger_group_commit_calls_per_transaction_count")
        first = asyncio.create_task(group_commit.call("consume", "a", params("1")))
        await until(lambda: pool.borrowers == 1)
        queued = [
            asyncio.create_task(group_commit.call("consume", account, params(account)))
            for account in "bcd"
        ]
        await until(lambda: len(group_commit._waiting) == 3)  # a timer for a's 0.3 s is set
        await asyncio.sleep(0.15)
        first.cancel()
        await until(lambda: pool.borrowers == 2)
        batch_started = loop.time()
        assert group_commit._in_flight == 1 and not group_commit._waiting
        late = asyncio.create_task(group_commit.call("consume", "e", params("e")))
        await asyncio.sleep(0.2)  # a's timer has fired; the batch has run 0.2 s of its 0.3
        assert pool.borrowers == 2 and list(group_commit._waiting) == ["e"]
        await until(lambda: pool.borrowers == 3)
        assert loop.time() - batch_started >= 0.29
        # Counted: the lone call, the three that waited in one transaction, then "e".
        assert _metric("ledger_group_commit_calls_per_transaction_sum") == calls + 5
        assert _metric("ledger_group_commit_calls_per_transaction_count") == transactions + 3
        batches = list(group_commit._tasks)
        for task in batches:
            task.cancel()
        await asyncio.gather(first, late, *queued, *batches, return_exceptions=True)
        assert group_commit._in_flight == 0 and not group_commit._lane_starts

    asyncio.run(scenario())


class _GatedPool:
    """Connections that answer when the test opens their gate (one gate per borrower, in
    order); a batch gets one "ok" per call."""

    def __init__(self) -> None:
        self.borrowers = 0
        self.gates: list[asyncio.Event] = []

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        self.borrowers += 1
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        yield _AnsweringConnection()


class _AnsweringConnection:
    async def execute(self, sql: str, params: dict[str, Any]) -> Any:
        batch = params.get("requests")
        row = (
            [{"ok": {"key": call["key"]}} for call in batch.obj]
            if batch
            else {"key": params["key"]}
        )

        class Cursor:
            async def fetchall(self) -> list[tuple[Any]]:
                return [(row,)]

        return Cursor()


def test_a_batch_gives_its_lane_back_before_its_callers_are_answered() -> None:
    """Answering a batch's callers (their handlers, their replies) takes the event loop for
    a while; the calls that queued behind the batch go to the database first, so the lane
    does not sit idle meanwhile."""

    async def scenario() -> None:
        pool = _GatedPool()
        group_commit = GroupCommit(pool, SetClock(NOW), max_in_flight=1)  # type: ignore[arg-type]
        borrowers_when_answered: dict[str, int] = {}

        async def caller(account: str) -> dict[str, Any]:
            result = await group_commit.call("consume", account, params(account))
            borrowers_when_answered[account] = pool.borrowers
            return result

        alone = asyncio.create_task(caller("a"))
        await until(lambda: pool.borrowers == 1)
        batched = [asyncio.create_task(caller(account)) for account in "bc"]
        await until(lambda: len(group_commit._waiting) == 2)
        pool.gates[0].set()  # "a" ends: "b" and "c" go as one batch
        await until(lambda: pool.borrowers == 2)
        late = asyncio.create_task(caller("d"))
        await until(lambda: "d" in group_commit._waiting)
        pool.gates[1].set()  # the batch ends
        answers = await asyncio.gather(*batched)
        assert [answer["key"] for answer in answers] == ["b", "c"]
        # "d" had asked the pool for its connection before "b" and "c" were answered.
        assert borrowers_when_answered["b"] == borrowers_when_answered["c"] == 3
        pool.gates[2].set()
        assert (await late)["key"] == "d" and (await alone)["key"] == "a"
        assert group_commit._in_flight == 0 and not group_commit._busy

    asyncio.run(scenario())


def test_a_queued_call_that_waited_too_long_is_refused_and_never_sent() -> None:
    """A call is judged at the time it was received; once it has waited MAX_WAIT (within the
    grace a hold is kept past its expiry, db/waits.py) it could find its hold already
    returned by others' maintenance. It is refused ABORTED WAITED_TOO_LONG (nothing ran:
    the client retries it with its key) instead of joining the batch; the call received
    later goes on."""

    async def scenario() -> None:
        pool = _GatedPool()
        clock = SetClock(NOW)
        group_commit = GroupCommit(pool, clock, max_in_flight=1)  # type: ignore[arg-type]
        alone = asyncio.create_task(group_commit.call("consume", "a", params("a")))
        await until(lambda: pool.borrowers == 1)
        stale = asyncio.create_task(group_commit.call("consume", "b", params("b")))
        await until(lambda: "b" in group_commit._waiting)
        clock.at = NOW + waits.MAX_WAIT
        fresh = asyncio.create_task(group_commit.call("consume", "b", params("c", clock.at)))
        await until(lambda: len(group_commit._waiting["b"]) == 2)
        pool.gates[0].set()
        with pytest.raises(LedgerError) as refused:  # not sent: never answered by the pool
            await asyncio.wait_for(stale, timeout=2)
        assert (refused.value.code, refused.value.reason) == (
            grpc.StatusCode.ABORTED,
            "WAITED_TOO_LONG",
        )
        await until(lambda: pool.borrowers == 2)
        pool.gates[1].set()
        assert (await fresh)["key"] == "c" and (await alone)["key"] == "a"
        assert pool.borrowers == 2 and not group_commit._waiting and not group_commit._busy

    asyncio.run(scenario())


def _metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def test_open_lane_after_comes_from_the_environment() -> None:
    settings = Settings.from_env(
        {"DATABASE_URL": "postgresql:///x", "LEDGER_GROUP_COMMIT_OPEN_LANE_AFTER_MS": "7"}
    )
    assert settings.group_commit_open_lane_after == timedelta(milliseconds=7)
    with pytest.raises(ConfigError, match="LEDGER_GROUP_COMMIT_OPEN_LANE_AFTER_MS"):
        Settings.from_env(
            {"DATABASE_URL": "postgresql:///x", "LEDGER_GROUP_COMMIT_OPEN_LANE_AFTER_MS": "-1"}
        )


def test_a_call_that_waited_out_the_batchs_lock_wait_is_a_conflict_to_retry() -> None:
    """Its own lock wait, a quarter of the batch's time, not the caller's deadline: the call
    was rolled back, so ABORTED (the client retries it with the same key), not
    DEADLINE_EXCEEDED (an outcome the caller would have to find out)."""

    async def answered() -> list[BaseException | None]:
        waiters = [_Waiter("consume", f"acct-{n}", {}, None, NOW) for n in range(2)]
        _answer(
            waiters,
            [
                {"error": {"sqlstate": "55P03", "message": "lock timeout", "detail": None,
                           "constraint": None}},
                {"error": {"sqlstate": "57014", "message": "canceling statement",
                           "detail": None, "constraint": None}},
            ],
        )  # fmt: skip
        return [w.future.exception() for w in waiters]

    busy, cancelled = asyncio.run(answered())
    assert isinstance(busy, LedgerError) and isinstance(cancelled, LedgerError)
    assert (busy.code, busy.reason) == (grpc.StatusCode.ABORTED, "CONFLICT")
    assert cancelled.code == grpc.StatusCode.DEADLINE_EXCEEDED  # the whole batch's time-out


def test_callers_that_waited_out_a_lock_each_get_an_error_of_their_own() -> None:
    """One exception object shared by many futures (it was a module constant) collects the
    context of every raise of it, for the life of the server."""

    async def answered() -> list[BaseException | None]:
        waiters = [_Waiter("consume", "acct", {}, None, NOW) for _ in range(2)]
        timed_out = {"error": {"sqlstate": "55P03", "message": "lock timeout", "detail": None,
                               "constraint": None}}  # fmt: skip
        _answer(waiters, [timed_out, timed_out])
        return [w.future.exception() for w in waiters]

    first, second = asyncio.run(answered())
    assert isinstance(first, LedgerError) and isinstance(second, LedgerError)
    assert first is not second


def test_each_call_of_a_batch_carries_the_time_it_was_received() -> None:
    """The call-by-call path runs each call at its own time, not the batch's latest."""

    async def requests() -> list[dict[str, object]]:
        later = NOW + timedelta(seconds=2)
        return [
            _request(_Waiter("commit", "acct", {**params("1"), "reservation_id": "r"}, None, NOW)),
            _request(_Waiter("consume", "acct", params("2", later), None, later)),
        ]

    first, second = asyncio.run(requests())
    assert first["now"] == NOW.isoformat()
    assert second["now"] == (NOW + timedelta(seconds=2)).isoformat()
