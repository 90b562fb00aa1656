"""make test's processes keep apart on a shared Redis (REDIS_URL): each takes its own
database numbers, so one never flushes the queues another's workers are reading."""

from __future__ import annotations

import pytest

from support.rq_workers import redis_db_url, session_redis_url


def test_each_process_takes_its_own_redis_databases(monkeypatch: pytest.MonkeyPatch) -> None:
    taken: list[set[str]] = []
    for worker in ("gw0", "gw1"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        taken.append(
            {
                session_redis_url("redis://cache:6379/5"),
                *(redis_db_url("redis://cache:6379/5", db) for db in (7, 9, 11, 13)),
            }
        )
    assert len(taken[0]) == len(taken[1]) == 5
    assert taken[0].isdisjoint(taken[1]), taken
    assert "redis://cache:6379/6" in taken[1]

    monkeypatch.delenv("PYTEST_XDIST_WORKER")  # one process: the numbers as they are
    assert session_redis_url("redis://cache:6379") == "redis://cache:6379/0"
    assert redis_db_url("redis://cache:6379/5", 7) == "redis://cache:6379/7"


def test_a_database_past_redis_16_is_refused_with_what_to_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    with pytest.raises(RuntimeError, match="lower database number"):
        session_redis_url("redis://cache:6379/15")
