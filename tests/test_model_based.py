"""The ledger against an independent model (issue 8, must-show 1).

A Hypothesis state machine drives the real gRPC server on the real database with grants
of every source (with and without expiry, main and reward balances), reservations,
commits (zero, partial, full), releases, refunds (partial, full), consumes, clock jumps
from seconds to days (lot expiry, reservation time-to-live), replays of earlier requests
under their idempotency key and other requests under a used key. tests/support/model.py
predicts every answer, every error (code, reason and metadata) and the state after every
step; after each step the server's balances, lots (ListLots with inactive ones) and the
reservations the step could have changed (GetReservation) must equal the model, and the
ledger audit of the example's accounts must be clean (after every step that may have changed
something, and at the end of every example: a step of refused or replayed calls only is
audited with the next one, as a broken invariant stays broken). The whole database is
audited once more at the end.

The machine runs on a server of its own with a clock of its own (an OffsetClock, only
moving forward), so its jumps of days never move the time of the rest of the suite. All
times are relative to that clock's now; a jump never lands within a minute of an expiry,
so the real time that passes during a step cannot change what the model predicts.

CI: LEDGER_MODEL_EXAMPLES (default 100; 200 until the suite neared its 10 minutes)
examples of LEDGER_MODEL_STEPS (default 50) steps, derandomized. `make soak` sets
LEDGER_SOAK_EXAMPLES=2000 and explores at random (a failure prints the seed and the steps
to reproduce it)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from ledger.v1 import ledger_service_pb2 as pb
from ledger.v1 import ledger_service_pb2_grpc, types_pb2
from ledger_server.audit import audit_database
from ledger_server.clock import OffsetClock
from ledger_server.config import Settings
from support.ledger import CREDIT, Ledger, error_details, new_account, new_key
from support.model import (
    MAIN,
    PENDING,
    REWARD,
    Expected,
    Fail,
    LedgerModel,
    Lot,
    Reservation,
    fail,
    priority_of,
)
from support.scoped_audit import ScopedAudit
from support.server import ServerThread
from support.settings import SettingsChanger

SOAK_EXAMPLES = os.environ.get("LEDGER_SOAK_EXAMPLES")
EXAMPLES = int(SOAK_EXAMPLES or os.environ.get("LEDGER_MODEL_EXAMPLES", "100"))
STEPS = int(os.environ.get("LEDGER_MODEL_STEPS", "50"))

SECOND = 1_000_000  # in microseconds, the model's unit of time
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
DAY = 24 * HOUR
# No call is made within GUARD of an expiry or a time-out, and a clock jump never lands
# within MARGIN of one: the few milliseconds between the model's now and the server's
# cannot fall on either side of a boundary.
MARGIN = 60 * SECOND
GUARD = 5 * SECOND

# Every source a Grant may name: OVERDRAFT is the overdraft limit's own lot
# (AdminService.SetOverdraftLimit; tests/test_overdraft.py), never granted.
SOURCES = [
    v
    for v in types_pb2.CreditSource.values()
    if v not in (types_pb2.CREDIT_SOURCE_UNSPECIFIED, types_pb2.CREDIT_SOURCE_OVERDRAFT)
]
MUTATIONS = ("Grant", "Reserve", "Commit", "Release", "Refund", "Consume")


def micros(ts: Timestamp) -> int:
    return ts.seconds * SECOND + ts.nanos // 1000


def timestamp(value: int) -> Timestamp:
    out = Timestamp()
    out.FromMicroseconds(value)
    return out


def reservation_view(r: pb.Reservation) -> tuple[object, ...]:
    return (
        r.reservation_id,
        r.status,
        r.held_micros,
        r.committed_micros,
        r.refunded_micros,
        tuple(
            (
                int(rl.lot_id),
                rl.held_micros,
                rl.committed_micros,
                rl.refunded_micros,
                rl.refund_expired_micros,
            )
            for rl in r.lots
        ),
    )


def lot_view(lot: types_pb2.Lot) -> tuple[object, ...]:
    return (
        int(lot.lot_id),
        lot.source,
        lot.balance_kind,
        lot.amount_micros,
        lot.remaining_micros,
        lot.held_micros,
        lot.expired_micros,
        micros(lot.expires_at) if lot.HasField("expires_at") else None,
        lot.priority,
    )


def balance_view(b: types_pb2.AccountBalance | pb.BalanceResponse) -> tuple[int, int, int, int]:
    return (b.balance_micros, b.available_micros, b.held_micros, b.reward_balance_micros)


# --- strategies --------------------------------------------------------------------------------

seconds_to_days = st.one_of(
    st.integers(1, 59),
    st.integers(60, 3600),
    st.integers(3600, DAY // SECOND),
    st.integers(DAY // SECOND, 10 * DAY // SECOND),
)
lifetimes = st.one_of(
    st.integers(60, 3600),
    st.integers(3600, 3 * DAY // SECOND),
    st.integers(DAY // SECOND, 60 * 86400),
)
ttls = st.one_of(st.none(), st.integers(600, 3 * 3600), st.integers(3600, 7 * DAY // SECOND))
grant_amounts = st.one_of(st.integers(1, 60).map(lambda c: c * CREDIT), st.integers(1, 50 * CREDIT))


class Stats:
    """What the runs did, printed at the end (and a sign that the rules really run)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.examples = 0
        self.steps = 0
        self.audits = 0
        self.audit_seconds = 0.0

    def count(self, what: str) -> None:
        self.calls[what] = self.calls.get(what, 0) + 1


class LedgerMachine(RuleBasedStateMachine):
    # Set by the test before the run: the stub, the server's clock, the scoped audit.
    stub: ledger_service_pb2_grpc.LedgerServiceStub
    clock: OffsetClock
    audit: ScopedAudit
    stats: Stats

    def __init__(self) -> None:
        super().__init__()
        self.model = LedgerModel([])
        self.history: list[tuple[str, Message]] = []
        self.check_accounts: set[str] = set()
        self.check_reservations: set[str] = set()
        self.grant_deadlines: list[int] = []
        # Whether the last step was only refused or replayed calls: nothing may have changed,
        # so its audit is left to the next step that changes something (or to teardown). A
        # broken invariant stays broken, so it is still found, a step or a few later.
        self.unchanged = False
        self.stats.examples += 1

    # --- time ----------------------------------------------------------------------------------

    def now(self) -> int:
        return int(self.clock.now().timestamp() * SECOND)

    def boundaries(self) -> list[int]:
        """The model's expiries and time-outs, and the expires_at of every Grant sent
        (a request sent again is refused once its expires_at has passed)."""
        return [*self.model.boundaries(), *self.grant_deadlines]

    def settle(self) -> int:
        """The model's now for the next call, with what is due applied."""
        t = self.now()
        near = [b for b in self.boundaries() if abs(b - t) <= GUARD]
        assert not near, f"timing guard: a boundary is within {GUARD} us of now ({near}, {t})"
        self.check_reservations.update(self.model.maintain_all(t))
        return t

    # --- set-up --------------------------------------------------------------------------------

    @initialize(count=st.integers(2, 3), opened=st.integers(1, 3), data=st.data())
    def open_accounts(self, count: int, opened: int, data: st.DataObject) -> None:
        ids = [new_account("model") for _ in range(count)]
        self.model = LedgerModel(ids)
        self.audit.scope(ids)
        for account_id in ids[: min(opened, count)]:
            self._grant(account_id, data)

    def account(self, data: st.DataObject) -> str:
        """Mostly an opened account; now and then any (an unopened one is NOT_FOUND)."""
        opened = [a for a, v in self.model.accounts.items() if v.opened]
        if opened and data.draw(st.integers(0, 9), label="opened?") > 0:
            return data.draw(st.sampled_from(opened), label="account")
        return data.draw(st.sampled_from(list(self.model.accounts)), label="account")

    # --- the one way a call is made --------------------------------------------------------------

    def execute(
        self,
        method: str,
        request: Any,
        predict: Callable[[int], Any],
        invalid: str | None = None,
    ) -> None:
        """Predicts with the model, calls the server, compares. `invalid` names a field the
        input checks refuse (before anything else); `predict(now)` raises Fail for a
        predicted error or returns a function that checks the response and applies the
        operation to the model."""
        account_id = request.account_id
        t = self.settle()
        self.check_accounts.add(account_id)
        # The key comes first: a retry gets its original response, another request under a
        # used key is ALREADY_EXISTS; only a new key meets the check that expires_at is ahead.
        if (
            method == "Grant"
            and request.HasField("expires_at")
            and micros(request.expires_at) <= t
            and (account_id, request.idempotency_key) not in self.model.keys
        ):
            invalid = "expires_at"
        expected_error: Expected | None = None
        replay: bytes | None = None
        apply: Callable[[Any], None] | None = None
        try:
            if invalid is not None:
                raise fail(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD", field=invalid)
            if method != "Grant":
                self.model.require_open(account_id)
            replay = self.model.replayed(account_id, request.idempotency_key, method, request)
            if replay is None:
                apply = predict(t)
        except Fail as predicted:
            expected_error = predicted.expected
        self.history.append((method, request))
        try:
            response, call = getattr(self.stub, method).with_call(request)
        except grpc.RpcError as error:
            code = error.code()  # type: ignore[attr-defined]
            assert expected_error is not None, (
                f"{method} failed with {code.name} {error.details()}"  # type: ignore[attr-defined]
                f" but the model expected success: {request}"
            )
            info, _ = error_details(error)
            assert (code, info.reason) == (expected_error.code, expected_error.reason), (
                method,
                info.reason,
                error.details(),  # type: ignore[attr-defined]
                expected_error,
            )
            for key, value in expected_error.metadata.items():
                assert info.metadata[key] == value, (method, key, dict(info.metadata), value)
            self.stats.count(f"{method}:{info.reason}")
            self.unchanged = True
            return
        assert expected_error is None, f"{method} succeeded, the model expected {expected_error}"
        data = response.SerializeToString(deterministic=True)
        replayed = ("ledger-idempotent-replay", "true") in (call.trailing_metadata() or ())
        if replay is not None:
            assert data == replay, f"{method} replay differs from the original response"
            assert replayed, "a replay is not marked in the trailing metadata"
            self.stats.count(f"{method}:replay")
            self.unchanged = True
            return
        assert not replayed, f"a new {method} is marked as a replay"
        assert apply is not None
        apply(response)
        self.model.store(account_id, request.idempotency_key, method, request, data)
        self.stats.count(f"{method}:ok")

    def expect_balance(self, account_id: str, balance: types_pb2.AccountBalance) -> None:
        assert balance.account_id == account_id
        assert balance_view(balance) == self.model.accounts[account_id].balance_view(), (
            "response balance",
            account_id,
        )

    def expect_reservation(self, reservation: pb.Reservation, model: Reservation) -> None:
        assert reservation_view(reservation) == model.view(), ("reservation", model.reservation_id)
        self.check_reservations.add(model.reservation_id)

    # --- requests ------------------------------------------------------------------------------

    def grant_request(self, account_id: str, data: st.DataObject, key: str) -> pb.GrantRequest:
        source = data.draw(st.sampled_from(SOURCES), label="source")
        request = pb.GrantRequest(
            account_id=account_id,
            idempotency_key=key,
            amount_micros=data.draw(grant_amounts, label="amount"),
            source=source,
            # An admin grant names its reason (LedgerService.Grant refuses one without).
            comment="model grant" if source == types_pb2.CREDIT_SOURCE_ADMIN else "",
        )
        if source == types_pb2.CREDIT_SOURCE_REFERRAL and data.draw(st.booleans(), label="reward"):
            request.balance_kind = REWARD
        elif data.draw(st.booleans(), label="explicit main"):
            request.balance_kind = MAIN
        expiry = data.draw(st.sampled_from(["never", "never", "in", "at"]), label="expiry")
        if expiry == "in":
            request.expires_in.CopyFrom(Duration(seconds=data.draw(lifetimes, label="expires_in")))
        elif expiry == "at":
            at = self.now() + data.draw(lifetimes, label="expires_at") * SECOND
            request.expires_at.CopyFrom(timestamp(at))
            self.grant_deadlines.append(at)
        return request

    def predict_grant(self, request: pb.GrantRequest) -> Callable[[int], Any]:
        def predict(t: int) -> Callable[[pb.GrantResponse], None]:
            def apply(response: pb.GrantResponse) -> None:
                got = response.lot
                expires = micros(got.expires_at) if got.HasField("expires_at") else None
                which = request.WhichOneof("expiry")
                if which is None:
                    assert expires is None
                elif which == "expires_at":
                    assert expires == micros(request.expires_at)
                else:
                    lifetime = request.expires_in.seconds * SECOND
                    assert expires is not None and t + lifetime <= expires <= self.now() + lifetime
                kind = REWARD if request.balance_kind == REWARD else MAIN
                lot = Lot(
                    int(got.lot_id),
                    request.source,
                    kind,
                    request.amount_micros,
                    request.amount_micros,
                    expires,
                )
                assert lot_view(got) == lot.view(), "granted lot"
                assert got.priority == priority_of(request.source)
                self.model.grant(request.account_id, lot)
                self.expect_balance(request.account_id, response.balance)

            return apply

        return predict

    def reserve_request(self, account_id: str, data: st.DataObject, key: str) -> pb.ReserveRequest:
        request = pb.ReserveRequest(
            account_id=account_id, idempotency_key=key, amount_micros=self.spend(account_id, data)
        )
        ttl = data.draw(ttls, label="ttl")
        if ttl is not None:
            request.ttl.CopyFrom(Duration(seconds=ttl))
        return request

    def predict_reserve(self, request: pb.ReserveRequest) -> Callable[[int], Any]:
        def predict(t: int) -> Callable[[pb.ReserveResponse], None]:
            taken = self.model.plan_take(request.account_id, request.amount_micros, t)

            def apply(response: pb.ReserveResponse) -> None:
                got = response.reservation
                ttl = request.ttl.seconds * SECOND if request.HasField("ttl") else 15 * MINUTE
                expires = micros(got.expires_at)
                assert t + ttl <= expires <= self.now() + ttl, "reservation time-to-live"
                reservation = self.model.reserve(
                    request.account_id, got.reservation_id, request.amount_micros, taken, expires
                )
                self.expect_reservation(got, reservation)
                self.expect_balance(request.account_id, response.balance)

            return apply

        return predict

    def consume_request(self, account_id: str, data: st.DataObject, key: str) -> pb.ConsumeRequest:
        return pb.ConsumeRequest(
            account_id=account_id, idempotency_key=key, amount_micros=self.spend(account_id, data)
        )

    def predict_consume(self, request: pb.ConsumeRequest) -> Callable[[int], Any]:
        def predict(t: int) -> Callable[[pb.ConsumeResponse], None]:
            taken = self.model.plan_take(request.account_id, request.amount_micros, t)

            def apply(response: pb.ConsumeResponse) -> None:
                got = response.reservation
                reservation = self.model.consume(
                    request.account_id, got.reservation_id, request.amount_micros, taken, t
                )
                self.expect_reservation(got, reservation)
                self.expect_balance(request.account_id, response.balance)

            return apply

        return predict

    def reservation_id(self, account_id: str, data: st.DataObject) -> str:
        """Mostly one of the account's (pending ones first); now and then another
        account's or one that does not exist (both NOT_FOUND)."""
        own = [r for r, v in self.model.reservations.items() if v.account == account_id]
        pending = [r for r in own if self.model.reservations[r].status == PENDING]
        others = [r for r, v in self.model.reservations.items() if v.account != account_id]
        pick = data.draw(st.integers(0, 19), label="which reservation")
        if pick >= 5 and pending:
            return data.draw(st.sampled_from(pending), label="pending reservation")
        if pick >= 2 and own:
            return data.draw(st.sampled_from(own), label="own reservation")
        if pick == 1 and others:
            return data.draw(st.sampled_from(others), label="another account's reservation")
        return data.draw(st.uuids().map(str), label="unknown reservation")

    def commit_request(self, account_id: str, data: st.DataObject, key: str) -> pb.CommitRequest:
        reservation_id = self.reservation_id(account_id, data)
        known = self.model.reservations.get(reservation_id)
        held = known.held if known is not None else CREDIT
        amount = data.draw(
            st.one_of(
                st.just(0),
                st.just(held),
                st.just(held + 1),
                st.integers(0, held),
                st.integers(held, held + 5 * CREDIT),
            ),
            label="commit amount",
        )
        return pb.CommitRequest(
            account_id=account_id,
            reservation_id=reservation_id,
            idempotency_key=key,
            amount_micros=amount,
        )

    def predict_commit(self, request: pb.CommitRequest) -> Callable[[int], Any]:
        def predict(t: int) -> Callable[[pb.CommitResponse], None]:
            reservation = self.model.reservation(request.account_id, request.reservation_id)
            self.model.check_commit(reservation, request.amount_micros)

            def apply(response: pb.CommitResponse) -> None:
                self.model.commit(reservation, request.amount_micros, t)
                self.expect_reservation(response.reservation, reservation)
                self.expect_balance(request.account_id, response.balance)

            return apply

        return predict

    def release_request(self, account_id: str, data: st.DataObject, key: str) -> pb.ReleaseRequest:
        return pb.ReleaseRequest(
            account_id=account_id,
            reservation_id=self.reservation_id(account_id, data),
            idempotency_key=key,
            job_failed=data.draw(st.booleans()),
        )

    def predict_release(self, request: pb.ReleaseRequest) -> Callable[[int], Any]:
        def predict(t: int) -> Callable[[pb.ReleaseResponse], None]:
            reservation = self.model.reservation(request.account_id, request.reservation_id)
            releases = self.model.check_release(reservation)

            def apply(response: pb.ReleaseResponse) -> None:
                if releases:
                    self.model.release(reservation, t, request.job_failed)
                self.expect_reservation(response.reservation, reservation)
                self.expect_balance(request.account_id, response.balance)

            return apply

        return predict

    def refund_request(self, account_id: str, data: st.DataObject, key: str) -> pb.RefundRequest:
        reservation_id = self.reservation_id(account_id, data)
        request = pb.RefundRequest(
            account_id=account_id, reservation_id=reservation_id, idempotency_key=key
        )
        known = self.model.reservations.get(reservation_id)
        left = known.committed - known.refunded if known is not None else CREDIT
        pick = data.draw(st.integers(0, 9), label="refund kind")
        amount = (
            None
            if pick <= 2
            else left
            if pick <= 4
            else left + 1
            if pick == 5
            else 0
            if pick == 6
            else data.draw(st.integers(1, max(left, 1)), label="refund amount")
        )
        if amount is not None:
            request.amount_micros = amount
        return request

    def predict_refund(self, request: pb.RefundRequest) -> Callable[[int], Any]:
        def predict(t: int) -> Callable[[pb.RefundResponse], None]:
            reservation = self.model.reservation(request.account_id, request.reservation_id)
            amount = request.amount_micros if request.HasField("amount_micros") else None
            wanted = self.model.check_refund(reservation, amount)

            def apply(response: pb.RefundResponse) -> None:
                expired = self.model.refund(reservation, wanted, t)
                assert (response.refunded_micros, response.expired_micros) == (wanted, expired)
                self.expect_reservation(response.reservation, reservation)
                self.expect_balance(request.account_id, response.balance)

            return apply

        return predict

    def spend(self, account_id: str, data: st.DataObject) -> int:
        available = max(self.model.accounts[account_id].available, 0)
        choices = [
            st.integers(1, 30).map(lambda c: c * CREDIT),
            st.integers(1, 10 * CREDIT),
            st.just(available + 1),
            st.integers(0, 1200).map(lambda p: max(1, available * p // 1000)),
        ]
        if available > 0:
            choices.append(st.just(available))
        return data.draw(st.one_of(*choices), label="amount")

    def build(self, method: str, account_id: str, data: st.DataObject, key: str) -> Message:
        return {
            "Grant": self.grant_request,
            "Reserve": self.reserve_request,
            "Commit": self.commit_request,
            "Release": self.release_request,
            "Refund": self.refund_request,
            "Consume": self.consume_request,
        }[method](account_id, data, key)

    def send(self, method: str, request: Any) -> None:
        """Sends a request; invalid input is predicted before anything else."""
        predictors = {
            "Grant": self.predict_grant,
            "Reserve": self.predict_reserve,
            "Commit": self.predict_commit,
            "Release": self.predict_release,
            "Refund": self.predict_refund,
            "Consume": self.predict_consume,
        }
        invalid = None
        if method == "Refund" and request.HasField("amount_micros") and request.amount_micros <= 0:
            invalid = "amount_micros"
        self.execute(method, request, predictors[method](request), invalid)

    def _grant(self, account_id: str, data: st.DataObject) -> None:
        self.send("Grant", self.grant_request(account_id, data, new_key("grant")))

    # --- the rule --------------------------------------------------------------------------------
    #
    # One rule that draws what to do with weights (Hypothesis picks rules uniformly, and the
    # money operations should dominate the clock jumps). Shrinking still works per draw.

    OPERATIONS = (
        *("grant",) * 3,
        *("reserve",) * 4,
        *("commit",) * 3,
        *("release",) * 2,
        *("refund",) * 2,
        *("consume",) * 3,
        *("advance_clock",) * 2,
        *("replay",) * 2,
        "reuse_key",
    )

    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        self.unchanged = False
        operation = data.draw(st.sampled_from(self.OPERATIONS), label="operation")
        if operation == "advance_clock":
            self.advance_clock(data)
        elif operation == "replay":
            self.replay(data)
        elif operation == "reuse_key":
            self.reuse_key(data)
        else:
            method = operation.capitalize()
            account_id = self.account(data)
            self.send(method, self.build(method, account_id, data, new_key(operation)))

    def advance_clock(self, data: st.DataObject) -> None:
        """Jumps from seconds to days; half the time just past a lot's expiry or a
        reservation's time-out."""
        t = self.now()
        ahead = sorted(b for b in self.boundaries() if b > t)
        if ahead and data.draw(st.booleans(), label="to a boundary"):
            target = (
                data.draw(st.sampled_from(ahead), label="boundary")
                + data.draw(st.integers(1, 3600), label="past it by") * SECOND
            )
        else:
            target = t + data.draw(seconds_to_days, label="seconds") * SECOND
        # Never land within MARGIN of an expiry or a time-out (see MARGIN).
        moved = True
        while moved:
            moved = False
            for b in self.boundaries():
                if abs(b - target) < MARGIN:
                    target = b + MARGIN
                    moved = True
        self.clock.advance(timedelta(microseconds=target - t))
        self.check_accounts.update(self.model.accounts)
        self.stats.count("advance")

    def replay(self, data: st.DataObject) -> None:
        """An earlier request sent again as it was: a stored success answers the original
        bytes and changes nothing; a failure stored nothing, so it runs as new."""
        if not self.history:
            return
        method, request = data.draw(st.sampled_from(self.history), label="replayed")
        self.send(method, request)

    def reuse_key(self, data: st.DataObject) -> None:
        """A used key with another request (any operation): ALREADY_EXISTS, no change."""
        if not self.model.keys:
            return
        account_id, key = data.draw(st.sampled_from(list(self.model.keys)), label="used key")
        method = data.draw(st.sampled_from(MUTATIONS), label="method")
        self.send(method, self.build(method, account_id, data, key))

    # --- the comparison after every step ---------------------------------------------------------

    @invariant()
    def server_equals_model(self) -> None:
        if not self.model.accounts:
            return
        self.stats.steps += 1
        # Every account's balances, every step (an operation on one must leave the others
        # alone); the lots of the accounts the step touched (all of them after a clock jump).
        for account_id in self.model.accounts:
            self.compare_account(account_id, lots=account_id in self.check_accounts)
        for reservation_id in sorted(self.check_reservations):
            self.compare_reservation(reservation_id)
        self.check_accounts.clear()
        self.check_reservations.clear()
        if not self.unchanged:
            self.check_audit()

    def check_audit(self) -> None:
        started = time.perf_counter()
        violations = self.audit.violations()
        self.stats.audit_seconds += time.perf_counter() - started
        self.stats.audits += 1
        assert violations == [], "\n".join(str(v) for v in violations)

    def compare_account(self, account_id: str, lots: bool = True) -> None:
        self.settle()
        account = self.model.accounts[account_id]
        if not account.opened:
            try:
                self.stub.Balance(pb.BalanceRequest(account_id=account_id))
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
                return
            raise AssertionError(f"{account_id} exists, the model never opened it")
        balance = self.stub.Balance(pb.BalanceRequest(account_id=account_id))
        assert balance_view(balance) == account.balance_view(), ("balance", account_id)
        if not lots:
            return
        listed = self.stub.ListLots(
            pb.ListLotsRequest(account_id=account_id, include_inactive=True, page_size=1000)
        ).lots
        assert [lot_view(lot) for lot in listed] == [
            lot.view() for lot in account.listing_order()
        ], (
            "lots",
            account_id,
        )

    def compare_reservation(self, reservation_id: str) -> None:
        self.settle()
        reservation = self.model.reservations[reservation_id]
        got = self.stub.GetReservation(
            pb.GetReservationRequest(account_id=reservation.account, reservation_id=reservation_id)
        ).reservation
        assert reservation_view(got) == reservation.view(), ("reservation", reservation_id)

    def teardown(self) -> None:
        if not self.model.accounts:
            return
        for account_id in sorted(self.model.accounts):
            self.compare_account(account_id)
        for reservation_id in sorted(self.model.reservations):
            self.compare_reservation(reservation_id)
        self.check_audit()


# --- the run -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_server(ledger_db_url: str, redis_url: str) -> Iterator[tuple[str, OffsetClock]]:
    """A server of the state machine's own, with a clock of its own."""
    clock = OffsetClock()
    settings_ = Settings(
        database_url=ledger_db_url, redis_url=redis_url, db_pool_min_size=2, db_pool_max_size=4
    )
    server = ServerThread(settings_, clock).start()
    try:
        yield server.address, clock
    finally:
        server.stop()


def test_the_ledger_agrees_with_the_model_step_by_step(
    model_server: tuple[str, OffsetClock], ledger_db_url: str, configure: SettingsChanger
) -> None:
    # The baseline the model assumes: grants open accounts with nothing else in them.
    configure("signup.enabled", False)
    configure("monthly_free.enabled", False)
    address, clock = model_server
    stats = Stats()
    audit = ScopedAudit(ledger_db_url)
    started = time.monotonic()
    with grpc.insecure_channel(address) as channel:
        LedgerMachine.stub = ledger_service_pb2_grpc.LedgerServiceStub(channel)
        LedgerMachine.clock = clock
        LedgerMachine.audit = audit
        LedgerMachine.stats = stats
        try:
            run_state_machine_as_test(
                LedgerMachine,
                settings=settings(
                    max_examples=EXAMPLES,
                    stateful_step_count=STEPS,
                    deadline=None,
                    derandomize=SOAK_EXAMPLES is None,
                    database=None,
                    print_blob=True,
                    suppress_health_check=list(HealthCheck),
                ),
            )
        finally:
            audit.close()
    elapsed = time.monotonic() - started
    print(
        f"\nmodel-based: {stats.examples} examples, {stats.steps} steps in {elapsed:.0f} s"
        f" ({stats.audits} scoped audits, {stats.audit_seconds:.0f} s); "
        + ", ".join(f"{k}={v}" for k, v in sorted(stats.calls.items()))
    )
    violations = audit_database(ledger_db_url)
    assert violations == [], "\n".join(str(v) for v in violations)
    assert stats.steps >= EXAMPLES * STEPS // 2  # the examples really ran their steps


# --- server bugs found by the machine, pinned -------------------------------------------------


def test_a_retried_grant_gets_its_original_response_after_its_expires_at_passed(
    ledger: Ledger, clock: OffsetClock
) -> None:
    """A Grant with an absolute expires_at, retried after that moment (its first answer was
    lost, the client retries later): the contract says a retry with the same key and the
    same request returns the original response. The server checks expires_at against now
    before it looks at the key, and answers INVALID_ARGUMENT."""
    account = new_account("retry")
    request = pb.GrantRequest(
        account_id=account,
        idempotency_key=new_key(),
        amount_micros=5 * CREDIT,
        source=types_pb2.CREDIT_SOURCE_PROMOTION,
        expires_at=timestamp(int(clock.now().timestamp() * SECOND) + HOUR),
    )
    first = ledger.stub.Grant(request)
    clock.advance(timedelta(hours=2))
    again = ledger.stub.Grant(request)
    assert again.SerializeToString(deterministic=True) == first.SerializeToString(
        deterministic=True
    )
