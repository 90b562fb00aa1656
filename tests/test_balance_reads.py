"""Balance calls read together (server/balance_reads.py): a call that finds a slot free
reads alone; the ones that queue behind it go as one `balances` statement, and each answer
is what a lone Balance gives, maintenance and NOT_FOUND included."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import psycopg
import pytest
from prometheus_client import REGISTRY

from ledger_server.db.pool import open_pool
from ledger_server.db.queries import query
from ledger_server.errors import LedgerError
from ledger_server.ledger import store
from ledger_server.server.balance_reads import BalanceReads
from support.stuck_pool import StuckPool, stop_a_batch_midway, until

CREDIT = 1_000_000


def _grant(conn: psycopg.Connection[Any], account: str, amount: int, now: datetime,
           expires_at: datetime | None) -> None:  # fmt: skip
    conn.execute(
        query("grant"),
        {"account_id": account, "key": secrets.token_hex(8), "hash": bytes(32),
         "amount": amount, "source": "promotion" if expires_at else "purchase",
         "expires_at": expires_at, "balance_kind": "main", "external_ref": "", "comment": "",
         "actor": None, "now": now},
    )  # fmt: skip


class Statements:
    """Records the named queries the reads run (the store functions they call)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.names: list[str] = []
        for function in ("fetch_all", "call_json"):
            original = getattr(store, function)
            monkeypatch.setattr(store, function, self._spy(original))

    def _spy(self, original: Any) -> Any:
        async def recorded(conn: Any, name: str, params: Mapping[str, object]) -> Any:
            self.names.append(name)
            return await original(conn, name, params)

        return recorded


def test_queued_reads_go_as_one_statement_and_answer_as_lone_reads(
    ledger_db_url: str, server_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # server_address: the suite's server has written the run-time settings grants read.
    now = datetime.now(UTC)
    later = now + timedelta(days=2)  # the promotion lot below has expired by then
    tag = secrets.token_hex(4)
    plain = [f"reads-{tag}-{i}" for i in range(3)]
    due, unknown = f"reads-{tag}-due", f"reads-{tag}-unknown"
    with psycopg.connect(ledger_db_url, autocommit=True) as conn:
        for i, account in enumerate(plain):
            _grant(conn, account, (i + 1) * CREDIT, now, None)
        _grant(conn, due, 5 * CREDIT, now, now + timedelta(days=1))
        _grant(conn, due, CREDIT, now, None)
    statements = Statements(monkeypatch)
    order = [plain[0], plain[1], due, plain[2], unknown, plain[1]]
    calls, reads = _metric("_sum"), _metric("_count")

    async def scenario() -> list[Any]:
        pool = await open_pool(ledger_db_url, 1, 2)
        try:
            reads = BalanceReads(pool, max_in_flight=1)
            # The first takes the only slot; the others queue behind it and go together.
            return await asyncio.gather(
                *(reads.read(account, later) for account in order), return_exceptions=True
            )
        finally:
            await pool.close()

    answers = asyncio.run(scenario())
    # plain[0] alone; then one `balances` for the rest, and `balance` for the two it leaves
    # out: the account due maintenance (its promotion expired) and the unknown one.
    assert statements.names == ["balance", "balances", "balance", "balance"]
    # Counted as two reads: the lone one and the batch of five.
    assert (_metric("_sum"), _metric("_count")) == (calls + 6, reads + 2)
    assert [a["balance_micros"] for a in answers[:2]] == [CREDIT, 2 * CREDIT]
    assert answers[2]["balance_micros"] == CREDIT  # the expired 5 credits are gone
    assert answers[3]["balance_micros"] == 3 * CREDIT
    assert isinstance(answers[4], LedgerError) and answers[4].code == grpc.StatusCode.NOT_FOUND
    assert answers[5] == answers[1]
    with psycopg.connect(ledger_db_url, autocommit=True) as conn:
        for account, answer in zip(order, answers, strict=True):
            if account != unknown:
                lone = conn.execute(query("balance"), {"account_id": account, "now": later})
                assert answer == lone.fetchone()[0]  # type: ignore[index]


def _metric(suffix: str) -> float:
    return REGISTRY.get_sample_value(f"ledger_balance_calls_per_read{suffix}") or 0.0


def test_reads_with_a_slot_free_run_alone() -> None:
    async def scenario() -> None:
        pool = StuckPool()
        reads = BalanceReads(pool, max_in_flight=2)  # type: ignore[arg-type]
        calls = [asyncio.create_task(reads.read(a, datetime.now(UTC))) for a in "abc"]
        await until(lambda: pool.borrowers == 2)
        assert [read.account_id for read in reads._waiting] == ["c"]
        for task in calls:
            task.cancel()
        await asyncio.gather(*calls, return_exceptions=True)

    asyncio.run(scenario())


def test_a_batch_stopped_midway_answers_its_callers_and_frees_its_slot() -> None:
    async def scenario() -> None:
        pool = StuckPool()
        reads = BalanceReads(pool, max_in_flight=1)  # type: ignore[arg-type]
        await stop_a_batch_midway(
            pool, lambda account: reads.read(account, datetime.now(UTC)), lambda: reads._tasks
        )
        assert reads._in_flight == 0 and not reads._waiting

    asyncio.run(scenario())


def test_reads_the_batch_found_do_not_wait_for_an_account_left_out(
    ledger_db_url: str, server_address: str
) -> None:
    """An account due maintenance is read through `balance`, which waits for its lock (here
    held by another transaction, as a charge would): the batch's other reads are answered
    before that wait, not after it."""
    now = datetime.now(UTC)
    later = now + timedelta(days=2)
    tag = secrets.token_hex(4)
    first, found, due = (f"reads-{tag}-{name}" for name in ("first", "found", "due"))
    with psycopg.connect(ledger_db_url, autocommit=True) as conn:
        for account in (first, found):
            _grant(conn, account, CREDIT, now, None)
        _grant(conn, due, 5 * CREDIT, now, now + timedelta(days=1))
        _grant(conn, due, CREDIT, now, None)

    async def scenario() -> None:
        pool = await open_pool(ledger_db_url, 1, 2)
        try:
            with psycopg.connect(ledger_db_url) as locker:
                locker.execute("SELECT 1 FROM accounts WHERE account_id = %s FOR UPDATE", (due,))
                reads = BalanceReads(pool, max_in_flight=1)
                alone = asyncio.create_task(reads.read(first, later))
                due_read = asyncio.create_task(reads.read(due, later))  # queued before `found`
                found_read = asyncio.create_task(reads.read(found, later))
                answer = await asyncio.wait_for(found_read, timeout=3)
                assert answer["balance_micros"] == CREDIT
                assert (await alone)["balance_micros"] == CREDIT
                assert not due_read.done()  # still waiting for the lock
                locker.commit()
            assert (await asyncio.wait_for(due_read, timeout=10))["balance_micros"] == CREDIT
        finally:
            await pool.close()

    asyncio.run(scenario())


def test_a_caller_gone_before_its_batch_runs_is_not_counted_in_it() -> None:
    async def scenario() -> None:
        pool = StuckPool()
        reads = BalanceReads(pool, max_in_flight=1)  # type: ignore[arg-type]
        now = datetime.now(UTC)
        calls, batches = _metric("_sum"), _metric("_count")
        alone = asyncio.create_task(reads.read("a", now))
        await until(lambda: pool.borrowers == 1)
        queued = {account: asyncio.create_task(reads.read(account, now)) for account in "bcd"}
        await until(lambda: len(reads._waiting) == 3)
        queued["c"].cancel()  # the caller leaves while it waits
        await asyncio.gather(queued["c"], return_exceptions=True)
        alone.cancel()
        await until(lambda: pool.borrowers == 2)
        # "a" alone, then "b" and "d": the batch read answers two callers, not three.
        assert (_metric("_sum"), _metric("_count")) == (calls + 3, batches + 2)
        batch_tasks = list(reads._tasks)
        for task in (*queued.values(), *batch_tasks):
            task.cancel()
        await asyncio.gather(alone, *queued.values(), *batch_tasks, return_exceptions=True)
        assert reads._in_flight == 0

    asyncio.run(scenario())
