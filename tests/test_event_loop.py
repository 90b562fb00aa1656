"""The server's event loop (LEDGER_EVENT_LOOP): uvloop by default, the standard asyncio loop
on request, and the suite's in-process server on the same loop as `serve`."""

from __future__ import annotations

import asyncio
import re

import pytest
import uvloop

from ledger_client import LedgerClient
from ledger_server.clock import OffsetClock
from ledger_server.config import ConfigError, Settings
from ledger_server.db.migrate import migrate
from ledger_server.server import event_loop
from support.ledger import CREDIT, new_account
from support.server import ServerThread
from support.server_process import ServerProcess


def test_the_event_loop_setting_defaults_to_uvloop_and_names_itself_when_wrong() -> None:
    base = {"DATABASE_URL": "postgresql://localhost/x"}
    assert Settings.from_env(base).event_loop == "uvloop"
    assert Settings.from_env({**base, "LEDGER_EVENT_LOOP": "asyncio"}).event_loop == "asyncio"
    with pytest.raises(ConfigError, match="LEDGER_EVENT_LOOP must be one of uvloop, asyncio"):
        Settings.from_env({**base, "LEDGER_EVENT_LOOP": "trio"})


def test_run_runs_the_coroutine_on_the_chosen_loop() -> None:
    async def loop_type() -> type[asyncio.AbstractEventLoop]:
        return type(asyncio.get_running_loop())

    assert event_loop.run(loop_type(), "uvloop") is uvloop.Loop
    assert not issubclass(event_loop.run(loop_type(), "asyncio"), uvloop.Loop)


def test_the_suites_server_thread_runs_on_uvloop(ledger_db_url: str) -> None:
    server = ServerThread(Settings(database_url=ledger_db_url), OffsetClock()).start()
    try:
        assert isinstance(server.loop, uvloop.Loop)
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("loop", "logged"), [("uvloop", "uvloop.Loop"), ("asyncio", "asyncio.unix_events.")]
)
def test_the_server_process_charges_on_either_loop(
    fresh_database_url: str, loop: str, logged: str
) -> None:
    migrate(fresh_database_url)
    server = ServerProcess(fresh_database_url, env={"LEDGER_EVENT_LOOP": loop}).start()
    account = new_account(f"loop-{loop}")
    try:
        with LedgerClient(server.address, timeout=30) as client:
            before = client.grant(account, 10 * CREDIT, "purchase").balance.balance_micros
            client.consume(account, 3 * CREDIT)
            reservation = client.reserve(account, 2 * CREDIT).reservation
            client.commit(account, reservation.reservation_id, CREDIT)
            assert client.balance(account).balance_micros == before - 4 * CREDIT
    finally:
        server.stop()
    log = "".join(server.log)
    assert f"event loop {logged}" in log
    frozen = re.search(r"startup heap frozen: (\d+) objects", log)
    assert frozen and int(frozen.group(1)) > 10_000  # the modules and descriptors, at least
