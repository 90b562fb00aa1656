"""Fuzzing every RPC and the Stripe webhook receiver (issue 8, must-show 5).

For each method of LedgerService, BillingService, AdminService and ReportService,
Hypothesis builds requests from the method's input descriptor (tests/support/
proto_strategies.py): any field set or not, integers over their whole range, long,
unicode and NUL strings, unknown enum numbers, random page tokens, timestamps and
durations out of range, several oneof members at once, nested messages. Real account
and reservation ids are mixed in so requests also get past the input checks.

Properties, per call: the status is never INTERNAL or UNKNOWN; a rejected call (any
non-OK code) changes nothing in the ledger (row counts of the money and catalogue tables,
the sums of all balances); the server still answers at the end. Webhook: a body without a
valid signature gets 400 and stores nothing; a correctly signed body of garbage is never
answered 5xx.

Everything runs on a database and a server of its own, so what the fuzzer creates (plans,
packs, prices, settings) touches no other test. Bounded: LEDGER_FUZZ_EXAMPLES (default 45)
examples per RPC, derandomized; about 30-60 s in all."""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf.descriptor import MethodDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool
from redis import Redis

from ledger.v1 import (
    admin_service_pb2,
    billing_service_pb2,
    ledger_service_pb2,
    ledger_service_pb2_grpc,
    report_service_pb2,
    types_pb2,
)
from ledger_server.clock import OffsetClock
from ledger_server.config import Settings
from ledger_server.db.migrate import migrate
from ledger_server.devstack import embedded
from support.ledger import CREDIT, Ledger
from support.proto_strategies import messages, printable_keys, text_values
from support.rq_workers import redis_db_url
from support.server import ServerThread
from support.settings import ActorMetadata
from support.webhooks import post, sign
from workers.webhook import WebhookReceiver, WebhookServer

EXAMPLES = int(os.environ.get("LEDGER_FUZZ_EXAMPLES", "45"))
WEBHOOK_EXAMPLES = int(os.environ.get("LEDGER_FUZZ_WEBHOOK_EXAMPLES", "150"))
FUZZ_REDIS_DB = 11
SECRET = "whsec_fuzz_secret"

SERVICES = [
    ledger_service_pb2.DESCRIPTOR.services_by_name["LedgerService"],
    billing_service_pb2.DESCRIPTOR.services_by_name["BillingService"],
    admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"],
    report_service_pb2.DESCRIPTOR.services_by_name["ReportService"],
]
METHODS: list[MethodDescriptor] = [m for s in SERVICES for m in s.methods]

# What a rejected call must leave as it was: the rows of the money and catalogue tables,
# and every account's balances.
TABLES = (
    "accounts",
    "lots",
    "journal_transactions",
    "postings",
    "reservations",
    "reservation_lots",
    "idempotency_keys",
    "settings",
    "setting_changes",
    "daily_claims",
    "credit_packs",
    "subscription_plans",
    "subscriptions",
    "purchases",
    "redemption_batches",
    "redemption_codes",
    "redemptions",
    "prices",
    "model_multipliers",
    "checkout_sessions",
    "payment_events",
)
SNAPSHOT = (
    "SELECT "
    + ", ".join(f"(SELECT count(*) FROM {t})" for t in TABLES)
    + ", (SELECT coalesce(sum(balance_micros), 0) || '/' || coalesce(sum(held_micros), 0)"
    " || '/' || coalesce(sum(reward_balance_micros), 0) FROM accounts)"
    ", (SELECT coalesce(sum(remaining_micros), 0) || '/' || coalesce(sum(held_micros), 0)"
    " FROM lots)"
).encode()


@dataclass
class FuzzStack:
    address: str
    database_url: str
    accounts: list[str]
    reservations: list[str]
    conn: psycopg.Connection[TupleRow]

    def snapshot(self) -> tuple[Any, ...]:
        row = self.conn.execute(SNAPSHOT).fetchone()
        assert row is not None
        return tuple(row)


@pytest.fixture(scope="module")
def fuzz_database_url(database_url: str) -> Iterator[str]:
    name = f"ledger_fuzz_{secrets.token_hex(6)}"
    embedded.create_database(database_url, name)
    try:
        url = embedded.with_database(database_url, name)
        migrate(url)
        yield url
    finally:
        embedded.drop_database(database_url, name)


@pytest.fixture(scope="module")
def fuzz_stack(fuzz_database_url: str, redis_url: str) -> Iterator[FuzzStack]:
    """A server on the fuzz database, with a few funded accounts and reservations."""
    settings_ = Settings(
        database_url=fuzz_database_url,
        redis_url=redis_db_url(redis_url, FUZZ_REDIS_DB),
        db_pool_min_size=1,
        db_pool_max_size=4,
    )
    server = ServerThread(settings_, OffsetClock()).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            ledger = Ledger(ledger_service_pb2_grpc.LedgerServiceStub(channel))
            accounts = [f"fuzz-{i}" for i in range(3)]
            reservations = []
            for account in accounts:
                ledger.grant(account, 500, source=types_pb2.CREDIT_SOURCE_PURCHASE)
                ledger.grant(account, 50, source=types_pb2.CREDIT_SOURCE_DAILY)
                reservations.append(ledger.reserve(account, 5 * CREDIT).reservation.reservation_id)
                reservations.append(ledger.consume(account, 7 * CREDIT).reservation.reservation_id)
        with psycopg.connect(fuzz_database_url, autocommit=True) as conn:
            yield FuzzStack(server.address, fuzz_database_url, accounts, reservations, conn)
    finally:
        server.stop()


def _hints(stack: FuzzStack) -> dict[str, st.SearchStrategy[Any]]:
    amounts = st.one_of(st.integers(1, 20 * CREDIT), st.integers(-(2**63), 2**63 - 1))
    return {
        "account_id": st.sampled_from(stack.accounts),
        "reservation_id": st.sampled_from(stack.reservations),
        "idempotency_key": printable_keys,
        "amount_micros": amounts,
        "feature": st.sampled_from(["chat", "image.generate", "x"]),
    }


@pytest.mark.parametrize(
    "method", METHODS, ids=[f"{m.containing_service.name}.{m.name}" for m in METHODS]
)
def test_no_request_gets_an_internal_error_or_changes_anything_when_rejected(
    fuzz_stack: FuzzStack, method: MethodDescriptor
) -> None:
    path = f"/{method.containing_service.full_name}/{method.name}"
    counts: dict[str, int] = {}
    with grpc.insecure_channel(fuzz_stack.address) as raw:
        channel = grpc.intercept_channel(raw, ActorMetadata("fuzzer"))
        call = channel.unary_unary(path)  # bytes in, bytes out

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(request=messages(method.input_type, _hints(fuzz_stack)))
        def fuzz(request: Any) -> None:
            before = fuzz_stack.snapshot()
            try:
                call(request.SerializeToString(), timeout=30)
                counts["OK"] = counts.get("OK", 0) + 1
                return
            except grpc.RpcError as error:
                code = error.code()  # type: ignore[attr-defined]
                details = error.details()  # type: ignore[attr-defined]
            counts[code.name] = counts.get(code.name, 0) + 1
            assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (
                f"{path}: {code.name} {details}\nrequest: {request}"
            )
            assert fuzz_stack.snapshot() == before, (
                f"{path} was refused ({code.name} {details}) but changed the ledger\n"
                f"request: {request}"
            )

        fuzz()
        # Still serving.
        Ledger(ledger_service_pb2_grpc.LedgerServiceStub(raw)).balance(fuzz_stack.accounts[0])
    print(f"\n{path}: {sorted(counts.items())}")


# --- the Stripe webhook receiver ---------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_webhook_url(fuzz_stack: FuzzStack, redis_url: str) -> Iterator[str]:
    pool: ConnectionPool[psycopg.Connection[TupleRow]] = ConnectionPool(
        fuzz_stack.database_url, min_size=1, max_size=4, kwargs={"autocommit": True}, open=True
    )
    client = Redis.from_url(redis_db_url(redis_url, FUZZ_REDIS_DB))
    receiver = WebhookReceiver(SECRET, 300, connect=pool.connection, redis=lambda: client)
    server = WebhookServer(receiver, "127.0.0.1:0").start()
    try:
        yield server.url
    finally:
        server.stop()
        client.flushdb()
        client.close()
        pool.close()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text_values,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text_values, inner, max_size=4),
    max_leaves=12,
)
events = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(text_values, json_values),
        "type": st.one_of(
            st.sampled_from(["checkout.session.completed", "invoice.paid", "charge.refunded", "x"]),
            json_values,
        ),
        "data": st.one_of(json_values, st.fixed_dictionaries({"object": json_values})),
        "created": json_values,
    },
)
bodies = st.one_of(
    st.binary(max_size=2000),
    text_values.map(str.encode),
    json_values.map(lambda v: json.dumps(v).encode()),
    events.map(lambda v: json.dumps(v).encode()),
)
signatures = st.one_of(
    st.none(),
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200),
    st.builds(
        lambda t, v: f"t={t},v1={v}",
        st.integers(-(10**12), 10**12),
        st.text(alphabet="0123456789abcdef", max_size=64),
    ),
)


def _stored_events(stack: FuzzStack) -> int:
    row = stack.conn.execute(b"SELECT count(*) FROM payment_events").fetchone()
    assert row is not None
    return int(row[0])


def test_webhook_bodies_without_a_valid_signature_get_400_and_store_nothing(
    fuzz_stack: FuzzStack, fuzz_webhook_url: str
) -> None:
    @settings(
        max_examples=WEBHOOK_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(body=bodies, signature=signatures, forged=st.booleans())
    def fuzz(body: bytes, signature: str | None, forged: bool) -> None:
        if forged:  # a real signature, of another body or with another secret
            signature = sign(body + b" ", SECRET) if len(body) % 2 else sign(body, "whsec_x")
        before = _stored_events(fuzz_stack)
        status, _ = post(fuzz_webhook_url, body, signature)
        assert status == 400, (status, body[:200], signature)
        assert _stored_events(fuzz_stack) == before

    fuzz()


def test_correctly_signed_garbage_is_never_answered_5xx(
    fuzz_stack: FuzzStack, fuzz_webhook_url: str
) -> None:
    """A body signed with the real secret (as only Stripe can) but of any shape: 400 or
    200, never a server error. Each one that is stored is stored once."""

    @settings(
        max_examples=WEBHOOK_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(body=bodies)
    def fuzz(body: bytes) -> None:
        before = _stored_events(fuzz_stack)
        status, answer = post(fuzz_webhook_url, body, sign(body, SECRET, int(time.time())))
        assert status in (200, 400), (status, answer, body[:300])
        if status == 400:
            assert _stored_events(fuzz_stack) == before

    fuzz()


# --- server bugs found by the fuzzer, pinned ----------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"null",
        b"[]",
        b'"evt"',
        b"1",
        b'{"id": "evt_\\u0000", "type": "invoice.paid"}',
    ],
    ids=["null", "list", "string", "number", "nul-in-id"],
)
def test_a_correctly_signed_body_that_is_no_storable_event_gets_400(
    fuzz_stack: FuzzStack, fuzz_webhook_url: str, body: bytes
) -> None:
    """Valid JSON, correctly signed, but not an event object the receiver can store: a
    bad request (400, nothing stored), not a server error that makes Stripe retry it."""
    before = _stored_events(fuzz_stack)
    status, answer = post(fuzz_webhook_url, body, sign(body, SECRET, int(time.time())))
    assert status == 400, (status, answer)
    assert _stored_events(fuzz_stack) == before


def test_a_signed_event_with_nul_characters_is_stored_with_them_replaced(
    fuzz_stack: FuzzStack, fuzz_webhook_url: str
) -> None:
    """A NUL typed into a paid checkout's billing name (jsonb cannot hold it) is stored as
    U+FFFD, and text that merely reads backslash-u0000 is stored as it is: both events used
    to be refused for good with 400, and the payment's credits lost."""
    body = (
        b'{"id": "evt_nul_in_name", "type": "checkout.session.completed", "data": {"object":'
        b' {"customer_details": {"name": "Bob\\u0000", "\\u0000key": "x",'
        b' "address": "C:\\\\u0000dir"}}}}'
    )
    status, answer = post(fuzz_webhook_url, body, sign(body, SECRET, int(time.time())))
    assert status == 200, (status, answer)
    row = fuzz_stack.conn.execute(
        b"SELECT payload #> '{data,object,customer_details}' FROM payment_events"
        b" WHERE event_id = 'evt_nul_in_name'"
    ).fetchone()
    assert row is not None
    assert row[0] == {"name": "Bob\ufffd", "\ufffdkey": "x", "address": "C:\\u0000dir"}
