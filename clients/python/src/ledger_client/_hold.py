"""State shared by the sync and the asyncio reservation context managers."""

from __future__ import annotations

from ledger.v1 import ledger_service_pb2 as pb


class HoldState:
    """One reservation's life on the client: reserved on enter, then exactly one of commit
    or release. The actual cost defaults to the full held amount (see ``set_actual``)."""

    def __init__(self, request: pb.ReserveRequest, timeout: float | None) -> None:
        self._request = request
        self._timeout = timeout
        self._reserved: pb.ReserveResponse | None = None
        self._actual: int | None = None
        self.commit_response: pb.CommitResponse | None = None
        self.release_response: pb.ReleaseResponse | None = None

    @property
    def account_id(self) -> str:
        return self._request.account_id

    @property
    def idempotency_key(self) -> str:
        """The key of the Reserve call (each commit or release has its own)."""
        return self._request.idempotency_key

    @property
    def reserve_response(self) -> pb.ReserveResponse:
        if self._reserved is None:
            raise RuntimeError("the reservation is made when the context manager is entered")
        return self._reserved

    @property
    def reservation(self) -> pb.Reservation:
        """The reservation as last returned by the server (reserve, commit or release)."""
        if self.commit_response is not None:
            return self.commit_response.reservation
        if self.release_response is not None:
            return self.release_response.reservation
        return self.reserve_response.reservation

    @property
    def reservation_id(self) -> str:
        return self.reserve_response.reservation.reservation_id

    @property
    def held_micros(self) -> int:
        return self.reserve_response.reservation.held_micros

    @property
    def actual_micros(self) -> int | None:
        """What ``set_actual`` recorded; None if it was never called."""
        return self._actual

    @property
    def finished(self) -> bool:
        return self.commit_response is not None or self.release_response is not None

    def set_actual(self, amount_micros: int) -> None:
        """Records the real cost, committed when the ``with`` block ends normally. It must be
        between zero and the held amount; zero commits nothing but settles the hold."""
        if isinstance(amount_micros, bool) or not isinstance(amount_micros, int):
            raise TypeError("amount_micros must be an int of micro-credits")
        if amount_micros < 0:
            raise ValueError("amount_micros must not be negative")
        self._actual = amount_micros

    def _amount_to_commit(self, amount_micros: int | None) -> int:
        if amount_micros is not None:
            self.set_actual(amount_micros)
        return self._actual if self._actual is not None else self.held_micros

    def _check_pending(self, action: str) -> None:
        self.reserve_response  # noqa: B018 - raises when not entered
        if self.commit_response is not None:
            raise RuntimeError(f"cannot {action}: the reservation was committed already")
        if self.release_response is not None:
            raise RuntimeError(f"cannot {action}: the reservation was released already")

    def _start(self) -> None:
        if self._reserved is not None:
            raise RuntimeError("a reservation context manager can be entered only once")


def release_reason(exc_type: type[BaseException] | None) -> str:
    name = exc_type.__qualname__ if exc_type is not None else "exception"
    return f"released by the client: the block raised {name}"
