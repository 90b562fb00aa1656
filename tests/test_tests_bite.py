"""The tests bite (issue 8, must-show 3): with the row locks or the idempotency check
switched off, the concurrency and idempotency tests fail.

Each test makes a scratch database, migrates it, serves it with a second real server
(support.server.ServerThread), and runs the very test functions of test_concurrency.py and
test_idempotency.py against it, twice: with the ledger's SQL as it is (they pass), then
with a patched copy of sql/functions/0001_ledger.sql applied (support/broken_sql.py; they
must fail). Nothing is left to timing: without locks the patched copy sleeps 0.3 s after
reading the account, so every concurrent call reads the same balances; without
idempotency a retry is simply a new call."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import test_concurrency
import test_idempotency
from google.protobuf import struct_pb2

from ledger.v1 import admin_service_pb2, admin_service_pb2_grpc, ledger_service_pb2_grpc
from ledger_server.audit import audit_database
from ledger_server.clock import OffsetClock
from ledger_server.config import Settings
from ledger_server.db.migrate import migrate
from support import broken_sql
from support.ledger import Ledger, new_key
from support.server import ServerThread
from support.settings import ActorMetadata


@dataclass
class Scratch:
    database_url: str
    address: str
    ledger: Ledger

    def assert_audit_clean(self) -> None:
        violations = audit_database(self.database_url)
        assert violations == [], "\n".join(str(v) for v in violations)


@pytest.fixture
def scratch(fresh_database_url: str, redis_url: str) -> Iterator[Scratch]:
    """A migrated scratch database served by a server of its own (pool of 16 connections
    open from the start, so concurrent calls really run at once), sign-up bonus off like
    the suite's baseline."""
    migrate(fresh_database_url)
    settings = Settings(
        database_url=fresh_database_url,
        redis_url=redis_url,
        db_pool_min_size=16,
        db_pool_max_size=16,
    )
    server = ServerThread(settings, OffsetClock()).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            admin = admin_service_pb2_grpc.AdminServiceStub(
                grpc.intercept_channel(channel, ActorMetadata("tests-bite"))
            )
            admin.UpdateSetting(
                admin_service_pb2.UpdateSettingRequest(
                    key="signup.enabled",
                    value=struct_pb2.Value(bool_value=False),
                    reason="the suite's baseline",
                    idempotency_key=new_key("baseline"),
                )
            )
            yield Scratch(
                fresh_database_url,
                server.address,
                Ledger(ledger_service_pb2_grpc.LedgerServiceStub(channel)),
            )
    finally:
        server.stop()


def fails(check: Callable[[], Any]) -> str:
    """Runs a test function; returns how it failed (an assertion, or a call the test
    expected to succeed answering an error). Raises when it passes."""
    try:
        check()
    except (AssertionError, grpc.RpcError) as failure:
        return f"{type(failure).__name__}: {str(failure)[:300]}"
    raise AssertionError("the test passed against the broken ledger: it does not bite")


def test_without_row_locks_the_concurrency_test_fails(scratch: Scratch) -> None:
    def fifty_consumes() -> None:
        test_concurrency.test_fifty_concurrent_consumes_of_three_credits_from_one_hundred(
            scratch.ledger, scratch.address, scratch.assert_audit_clean
        )

    fifty_consumes()  # the ledger as it is: exactly 33 succeed, 17 refused, 1 credit left

    broken_sql.apply(scratch.database_url, broken_sql.patched(broken_sql.NO_LOCKS))
    failure = fails(fifty_consumes)
    print(f"\nwithout row locks: {failure}")

    broken_sql.apply(scratch.database_url, broken_sql.original())
    fifty_consumes()  # and with the locks back, it passes again


@pytest.mark.parametrize("operation", test_idempotency.OPERATIONS)
def test_without_the_idempotency_check_the_idempotency_tests_fail(
    scratch: Scratch, operation: str
) -> None:
    def sequential() -> None:
        test_idempotency.test_three_sequential_sends_have_one_effect(
            scratch.ledger, operation, scratch.assert_audit_clean
        )

    def concurrent() -> None:
        test_idempotency.test_three_concurrent_sends_have_one_effect(
            scratch.ledger, scratch.address, operation, scratch.assert_audit_clean
        )

    def same_key_other_request() -> None:
        test_idempotency.test_same_key_with_another_request_is_rejected(
            scratch.ledger, operation, scratch.assert_audit_clean
        )

    checks = [sequential, concurrent, same_key_other_request]
    for check in checks:  # the ledger as it is
        check()

    broken_sql.apply(scratch.database_url, broken_sql.patched(broken_sql.NO_IDEMPOTENCY))
    failures = [fails(check) for check in checks]
    print(f"\nwithout idempotency, {operation}: " + " | ".join(failures))

    broken_sql.apply(scratch.database_url, broken_sql.original())
    for check in checks:
        check()
