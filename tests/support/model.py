"""An independent in-memory model of the ledger (DESIGN.md section 4), for the
model-based test: lots spent in consumption order, two-phase reservations with a
time-to-live, refunds to the lots they came from, lot expiry, and idempotency keys.

Nothing here imports the server: the model is written from the contract (README,
DESIGN.md, the protos) so that it can disagree with the server. Times are integer
microseconds since the epoch; an expiry at or before `now` has passed."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.protobuf.message import Message

from ledger.v1 import ledger_service_pb2 as pb
from ledger.v1 import types_pb2

MAIN = types_pb2.BALANCE_KIND_MAIN
REWARD = types_pb2.BALANCE_KIND_REWARD
PENDING = pb.RESERVATION_STATUS_PENDING
COMMITTED = pb.RESERVATION_STATUS_COMMITTED
RELEASED = pb.RESERVATION_STATUS_RELEASED
EXPIRED = pb.RESERVATION_STATUS_EXPIRED
FAILED_JOB = pb.RESERVATION_STATUS_FAILED

# Consumption order (seed 000): daily rewards first, every other source after them.
DAILY_PRIORITY = 0
DEFAULT_PRIORITY = 100


def priority_of(source: int) -> int:
    return DAILY_PRIORITY if source == types_pb2.CREDIT_SOURCE_DAILY else DEFAULT_PRIORITY


@dataclass(frozen=True)
class Expected:
    """An error the model predicts: gRPC code, ErrorInfo reason and some metadata."""

    code: grpc.StatusCode
    reason: str
    metadata: dict[str, str] = field(default_factory=dict)


class Fail(Exception):
    def __init__(self, expected: Expected) -> None:
        super().__init__(expected.reason)
        self.expected = expected


def fail(code: grpc.StatusCode, reason: str, **metadata: object) -> Fail:
    return Fail(Expected(code, reason, {k: str(v) for k, v in metadata.items()}))


@dataclass
class Lot:
    lot_id: int
    source: int
    kind: int
    amount: int
    remaining: int
    expires_at: int | None
    held: int = 0
    expired: int = 0

    @property
    def priority(self) -> int:
        return priority_of(self.source)

    def expired_at(self, now: int) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    def view(self) -> tuple[object, ...]:
        return (
            self.lot_id,
            self.source,
            self.kind,
            self.amount,
            self.remaining,
            self.held,
            self.expired,
            self.expires_at,
            self.priority,
        )


@dataclass
class ReservationLot:
    lot_id: int
    held: int
    committed: int = 0
    refunded: int = 0
    refund_expired: int = 0

    def view(self) -> tuple[int, ...]:
        return (self.lot_id, self.held, self.committed, self.refunded, self.refund_expired)


@dataclass
class Reservation:
    reservation_id: str
    account: str
    status: int
    held: int
    expires_at: int
    lots: list[ReservationLot]
    committed: int = 0
    refunded: int = 0

    def view(self) -> tuple[object, ...]:
        return (
            self.reservation_id,
            self.status,
            self.held,
            self.committed,
            self.refunded,
            tuple(rl.view() for rl in self.lots),
        )


@dataclass
class Account:
    account_id: str
    opened: bool = False
    lots: dict[int, Lot] = field(default_factory=dict)

    def main_lots(self) -> list[Lot]:
        return [lot for lot in self.lots.values() if lot.kind == MAIN]

    @property
    def balance(self) -> int:
        return sum(lot.remaining for lot in self.main_lots())

    @property
    def held(self) -> int:
        return sum(lot.held for lot in self.lots.values())

    @property
    def available(self) -> int:
        return self.balance - self.held

    @property
    def reward(self) -> int:
        return sum(lot.remaining for lot in self.lots.values() if lot.kind == REWARD)

    def balance_view(self) -> tuple[int, int, int, int]:
        return (self.balance, self.available, self.held, self.reward)

    def consumption_order(self, now: int) -> list[Lot]:
        """Live main lots: priority, nearest expiry (permanent last), creation order."""
        live = [lot for lot in self.main_lots() if lot.remaining > 0 and not lot.expired_at(now)]
        return sorted(
            live,
            key=lambda lot: (
                lot.priority,
                lot.expires_at is None,
                lot.expires_at or 0,
                lot.lot_id,
            ),
        )

    def listing_order(self) -> list[Lot]:
        """ListLots(include_inactive): priority, expiry (none last), lot id."""
        return sorted(
            self.lots.values(),
            key=lambda lot: (
                lot.priority,
                lot.expires_at is None,
                lot.expires_at or 0,
                lot.lot_id,
            ),
        )


def fingerprint(method: str, request: Message) -> bytes:
    """What makes two requests the same: the operation and every field but the key, as the
    ledger reads them (a grant's kind spelled out as MAIN is the unset one)."""
    copy = type(request)()
    copy.CopyFrom(request)
    copy.ClearField("idempotency_key")  # type: ignore[arg-type]
    if isinstance(copy, pb.GrantRequest) and copy.balance_kind == types_pb2.BALANCE_KIND_MAIN:
        copy.ClearField("balance_kind")
    return method.encode() + b"\x00" + copy.SerializeToString(deterministic=True)


@dataclass
class StoredKey:
    fingerprint: bytes
    response: bytes  # the original response, serialized deterministically


class LedgerModel:
    def __init__(self, account_ids: list[str]) -> None:
        self.accounts = {a: Account(a) for a in account_ids}
        self.reservations: dict[str, Reservation] = {}
        self.keys: dict[tuple[str, str], StoredKey] = {}

    # --- time ----------------------------------------------------------------------------------

    def boundaries(self) -> list[int]:
        """Every future-relevant moment: lot expiries and pending reservations' time-outs."""
        out = [
            lot.expires_at
            for account in self.accounts.values()
            for lot in account.lots.values()
            if lot.expires_at is not None
        ]
        out.extend(r.expires_at for r in self.reservations.values() if r.status == PENDING)
        return out

    def maintain(self, account_id: str, now: int) -> list[str]:
        """What the server applies before any operation: timed-out reservations are
        released (status EXPIRED), then the unheld credits of expired lots expire.
        Returns the reservations that timed out."""
        account = self.accounts[account_id]
        timed_out = sorted(
            (
                r
                for r in self.reservations.values()
                if r.account == account_id and r.status == PENDING and r.expires_at <= now
            ),
            key=lambda r: (r.expires_at, r.reservation_id),
        )
        for reservation in timed_out:
            self._unhold(reservation)
            reservation.status = EXPIRED
        for lot in account.lots.values():
            if lot.expired_at(now) and lot.remaining > lot.held:
                lot.expired += lot.remaining - lot.held
                lot.remaining = lot.held
        return [r.reservation_id for r in timed_out]

    def maintain_all(self, now: int) -> list[str]:
        out: list[str] = []
        for account_id in self.accounts:
            out.extend(self.maintain(account_id, now))
        return out

    def _unhold(self, reservation: Reservation) -> None:
        account = self.accounts[reservation.account]
        for rl in reservation.lots:
            account.lots[rl.lot_id].held -= rl.held

    # --- idempotency ---------------------------------------------------------------------------

    def replayed(self, account_id: str, key: str, method: str, request: Message) -> bytes | None:
        """The stored response of a retry; raises ALREADY_EXISTS for another request."""
        stored = self.keys.get((account_id, key))
        if stored is None:
            return None
        if stored.fingerprint != fingerprint(method, request):
            raise fail(
                grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED", idempotency_key=key
            )
        return stored.response

    def store(
        self, account_id: str, key: str, method: str, request: Message, response: bytes
    ) -> None:
        self.keys[(account_id, key)] = StoredKey(fingerprint(method, request), response)

    def require_open(self, account_id: str) -> Account:
        account = self.accounts[account_id]
        if not account.opened:
            raise fail(grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND", account_id=account_id)
        return account

    def reservation(self, account_id: str, reservation_id: str) -> Reservation:
        reservation = self.reservations.get(reservation_id)
        if reservation is None or reservation.account != account_id:
            raise fail(
                grpc.StatusCode.NOT_FOUND, "RESERVATION_NOT_FOUND", reservation_id=reservation_id
            )
        return reservation

    # --- operations ----------------------------------------------------------------------------
    #
    # Each checks like the contract says (account, key, state, amounts), raises Fail with the
    # predicted error and changes nothing, or applies the operation. Ids the server chooses
    # (lot and reservation ids) are adopted from its answer by the caller.

    def grant(self, account_id: str, lot: Lot) -> None:
        account = self.accounts[account_id]
        account.opened = True
        account.lots[lot.lot_id] = lot

    def plan_take(self, account_id: str, amount: int, now: int) -> list[ReservationLot]:
        """Which lots a hold or charge of `amount` takes, in consumption order."""
        account = self.require_open(account_id)
        if account.available < amount:
            raise fail(
                grpc.StatusCode.FAILED_PRECONDITION,
                "INSUFFICIENT_CREDITS",
                available_micros=account.available,
            )
        need = amount
        taken: list[ReservationLot] = []
        for lot in account.consumption_order(now):
            take = min(lot.remaining - lot.held, need)
            if take <= 0:
                continue
            taken.append(ReservationLot(lot.lot_id, take))
            need -= take
            if need == 0:
                break
        assert need == 0, "model: live lots do not cover the available balance"
        return taken

    def reserve(
        self,
        account_id: str,
        reservation_id: str,
        amount: int,
        taken: list[ReservationLot],
        expires_at: int,
    ) -> Reservation:
        account = self.accounts[account_id]
        for rl in taken:
            account.lots[rl.lot_id].held += rl.held
        reservation = Reservation(reservation_id, account_id, PENDING, amount, expires_at, taken)
        self.reservations[reservation_id] = reservation
        return reservation

    def consume(
        self,
        account_id: str,
        reservation_id: str,
        amount: int,
        taken: list[ReservationLot],
        now: int,
    ) -> Reservation:
        account = self.accounts[account_id]
        for rl in taken:
            account.lots[rl.lot_id].remaining -= rl.held
            rl.committed = rl.held
        reservation = Reservation(
            reservation_id, account_id, COMMITTED, amount, now, taken, committed=amount
        )
        self.reservations[reservation_id] = reservation
        return reservation

    def check_pending(self, reservation: Reservation) -> None:
        if reservation.status == EXPIRED:
            raise fail(
                grpc.StatusCode.FAILED_PRECONDITION,
                "RESERVATION_EXPIRED",
                reservation_id=reservation.reservation_id,
            )
        if reservation.status != PENDING:
            raise fail(
                grpc.StatusCode.FAILED_PRECONDITION,
                "RESERVATION_NOT_PENDING",
                reservation_id=reservation.reservation_id,
            )

    def check_commit(self, reservation: Reservation, amount: int) -> None:
        self.check_pending(reservation)
        if amount > reservation.held:
            raise fail(
                grpc.StatusCode.FAILED_PRECONDITION,
                "AMOUNT_EXCEEDS_HOLD",
                held_micros=reservation.held,
                requested_micros=amount,
            )

    def commit(self, reservation: Reservation, amount: int, now: int) -> None:
        account = self.accounts[reservation.account]
        rest = amount
        for rl in reservation.lots:
            use = min(rl.held, rest)
            lot = account.lots[rl.lot_id]
            lot.held -= rl.held
            lot.remaining -= use
            rl.committed = use
            rest -= use
        reservation.status = COMMITTED
        reservation.committed = amount
        self.maintain(reservation.account, now)  # the unused part of an expired lot expires

    def check_release(self, reservation: Reservation) -> bool:
        """False when the reservation already timed out: Release answers it as it is."""
        if reservation.status == EXPIRED:
            return False
        if reservation.status != PENDING:
            raise fail(
                grpc.StatusCode.FAILED_PRECONDITION,
                "RESERVATION_NOT_PENDING",
                reservation_id=reservation.reservation_id,
            )
        return True

    def release(self, reservation: Reservation, now: int, job_failed: bool = False) -> None:
        self._unhold(reservation)
        reservation.status = FAILED_JOB if job_failed else RELEASED
        self.maintain(reservation.account, now)

    def check_refund(self, reservation: Reservation, amount: int | None) -> int:
        if reservation.status != COMMITTED:
            raise fail(
                grpc.StatusCode.FAILED_PRECONDITION,
                "RESERVATION_NOT_COMMITTED",
                reservation_id=reservation.reservation_id,
            )
        refundable = reservation.committed - reservation.refunded
        wanted = refundable if amount is None else amount
        if wanted <= 0 or wanted > refundable:
            raise fail(
                grpc.StatusCode.FAILED_PRECONDITION,
                "AMOUNT_EXCEEDS_REFUNDABLE",
                refundable_micros=refundable,
                requested_micros=wanted,
            )
        return wanted

    def refund(self, reservation: Reservation, amount: int, now: int) -> int:
        """Last-charged lot first; what returns to an expired lot expires at once.
        Returns the expired part."""
        account = self.accounts[reservation.account]
        rest = amount
        expired_part = 0
        for rl in reversed(reservation.lots):
            if rest == 0:
                break
            give = min(rl.committed - rl.refunded, rest)
            if give <= 0:
                continue
            lot = account.lots[rl.lot_id]
            rl.refunded += give
            if lot.expired_at(now):
                lot.expired += give
                rl.refund_expired += give
                expired_part += give
            else:
                lot.remaining += give
            rest -= give
        reservation.refunded += amount
        return expired_part
