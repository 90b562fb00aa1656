"""State shared by the sync and the asyncio reservation context managers."""

from __future__ import annotations

import grpc

from ledger.v1 import ledger_service_pb2 as pb
from ledger.v1 import types_pb2
from ledger_client._common import UsageLike, key_or_new, to_usage
from ledger_client.errors import LedgerError


class HoldState:
    """One reservation's life on the client: reserved on enter, then exactly one of commit
    or release. The actual cost defaults to the full held amount (see ``set_actual``).

    The commit and the release each get one idempotency key, made on the first attempt and
    kept on the hold: calling ``commit()`` (or ``release()``) again after an unknown outcome
    (``DeadlineExceeded``, say) sends the same request with the same key, so the server
    answers the first attempt's result instead of ``ReservationNotPending``.

    Once a commit was tried, the end of the block releases the hold only when the server
    refused that commit for good: else it may have been applied, or may succeed later. A
    release the block tried is replayed at its end unless the server refused it for good:
    then a release of the client's own (a new key) gives the hold back instead."""

    def __init__(self, request: pb.ReserveRequest, timeout: float | None) -> None:
        self._request = request
        self._timeout = timeout
        self._reserved: pb.ReserveResponse | None = None
        self._actual: int | None = None
        self._actual_usage: types_pb2.Usage | None = None
        self.commit_response: pb.CommitResponse | None = None
        self.release_response: pb.ReleaseResponse | None = None
        self._commit_key: str | None = None
        self._commit_comment = ""
        self._commit_failure: BaseException | None = None
        self._release_key: str | None = None
        self._release_reason = ""
        self._release_job_failed = False
        self._release_failure: BaseException | None = None

    @property
    def account_id(self) -> str:
        return self._request.account_id

    @property
    def idempotency_key(self) -> str:
        """The key of the Reserve call (the commit and the release have their own)."""
        return self._request.idempotency_key

    @property
    def commit_idempotency_key(self) -> str | None:
        """The key every commit attempt of this hold sends; None before the first."""
        return self._commit_key

    @property
    def release_idempotency_key(self) -> str | None:
        """The key every release attempt of this hold sends; None before the first."""
        return self._release_key

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
    def actual_usage(self) -> types_pb2.Usage | None:
        """What ``set_actual_usage`` recorded; None if it was never called."""
        return self._actual_usage

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
        if self._reserved is not None and amount_micros > self.held_micros:
            raise ValueError(
                f"amount_micros {amount_micros} is more than the {self.held_micros} held"
            )
        self._actual = amount_micros
        self._actual_usage = None

    def set_actual_usage(self, usage: UsageLike) -> None:
        """Records the real usage by unit (``{"output_tokens": 812}``), committed when the
        ``with`` block ends normally and priced by the server: at the reservation's prices
        if it was made from a usage, else by the rate card for its feature (or pass a
        ``types_pb2.Usage`` naming the feature and model). Replaces ``set_actual``."""
        self._actual_usage = to_usage(usage)
        self._actual = None

    def _commit_args(
        self,
        amount_micros: int | None,
        usage: UsageLike | None,
        comment: str | None,
        idempotency_key: str | None,
    ) -> tuple[int | None, types_pb2.Usage | None, str, str]:
        """The amount or usage, comment and key of a commit attempt: ``amount_micros`` or
        ``usage``, else what ``set_actual`` or ``set_actual_usage`` recorded, else the held
        amount. The key (and the comment, when none is given) are the first attempt's, so a
        repeat is a replay of it."""
        self._check_pending("commit")
        if amount_micros is not None and usage is not None:
            raise ValueError("give at most one of amount_micros and usage")
        if amount_micros is not None:
            self.set_actual(amount_micros)
        elif usage is not None:
            self.set_actual_usage(usage)
        if idempotency_key is not None or self._commit_key is None:
            self._commit_key = key_or_new(idempotency_key)
        if comment is not None:
            self._commit_comment = comment
        if self._actual_usage is not None:
            return None, self._actual_usage, self._commit_comment, self._commit_key
        amount = self._actual if self._actual is not None else self.held_micros
        return amount, None, self._commit_comment, self._commit_key

    def _release_args(
        self, reason: str | None, job_failed: bool | None, idempotency_key: str | None
    ) -> tuple[str, bool, str]:
        """The reason, job_failed and key of a release attempt: the first attempt's unless
        given."""
        self._check_pending("release")
        if idempotency_key is not None or self._release_key is None:
            self._release_key = key_or_new(idempotency_key)
        if reason is not None:
            self._release_reason = reason
        if job_failed is not None:
            self._release_job_failed = job_failed
        return self._release_reason, self._release_job_failed, self._release_key

    def _exit_action(self, raised: bool) -> str | None:
        """What the end of the block does: nothing once settled; a release tried before
        (its outcome unknown) is replayed, never followed by a commit. A commit the block
        tried is replayed (``"commit again"``, same key) when its failure may pass; refused
        for good (nothing was charged, and never will be), the hold is released; cut short
        (an interrupt, a cancellation: it may have been applied), it is left pending for the
        caller or its time-to-live. Otherwise a commit, or a release when the block raised.

        A release the block tried that the server refused for good is never sent again (it
        would be refused again): a release of the client's own (``"release anew"``) takes
        its place, still never a commit."""
        if self.finished:
            return None
        failure = self._release_failure
        release_refused = isinstance(failure, LedgerError) and refused_for_good(failure)
        if self._release_key is not None and not release_refused:
            return "release"
        release = "release anew" if release_refused else "release"
        if self._commit_key is not None:
            failure = self._commit_failure
            if isinstance(failure, LedgerError):
                return release if refused_for_good(failure) else "commit again"
            return "commit again" if failure is None else None
        if release_refused:
            return release
        return "release" if raised else "commit"

    def _commit_failed(self, error: BaseException) -> None:
        self._commit_failure = error

    def _release_failed(self, error: BaseException) -> None:
        self._release_failure = error

    def _release_anew_args(self, exc_type: type[BaseException] | None) -> tuple[str, bool]:
        """The reason and job_failed of the release that replaces one refused for good, and a
        new key for it (the refused key may be the cause: ``AlreadyExists``). ``job_failed``
        as the block asked, or because it raised."""
        self._release_key = None
        raised = exc_type is not None and issubclass(exc_type, Exception)
        return REFUSED_RELEASE_REASON, self._release_job_failed or raised

    def _exit_release_args(
        self, exc_type: type[BaseException] | None
    ) -> tuple[str | None, bool | None]:
        """The reason and job_failed of the release at the end of the block: the first
        attempt's, if one was made (a replay must send the same request), else why the block
        ended. An exception means the job failed; a cancellation, an interrupt or an exit
        (BaseException but not Exception) means it did not run to the end."""
        if self._release_key is not None:
            return None, None
        return release_reason(exc_type), exc_type is not None and issubclass(exc_type, Exception)

    def _check_pending(self, action: str) -> None:
        self.reserve_response  # noqa: B018 - raises when not entered
        if self.commit_response is not None:
            raise RuntimeError(f"cannot {action}: the reservation was committed already")
        if self.release_response is not None:
            raise RuntimeError(f"cannot {action}: the reservation was released already")

    def _start(self) -> None:
        if self._reserved is not None:
            raise RuntimeError("a reservation context manager can be entered only once")


# The only commit failures after which the block's hold is released: the request can never
# succeed (bad input, the reservation's state, a key reused) and no attempt of it may have
# been applied. Any other failure (a dropped connection, a time-out, a conflict, a rate limit,
# a server error) leaves the hold as it is, for the caller to call commit() again (the same
# key replays it if it was applied); releasing it would give the finished work away unbilled.
_REFUSALS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)


def refused_for_good(error: LedgerError) -> bool:
    return error.code in _REFUSALS and not error.outcome_unknown


# A commit refused for good (not an unknown outcome): nothing was charged, and the hold goes
# back now rather than when its time-to-live passes.
REFUSED_COMMIT_REASON = "released by the client: the commit at the end of the block was refused"


# A release the block tried was refused for good (a reason too long, say): nothing was
# released, so the client sends its own rather than leave the hold until its time-to-live.
REFUSED_RELEASE_REASON = "released by the client: the release in the block was refused"


def release_reason(exc_type: type[BaseException] | None) -> str:
    name = exc_type.__qualname__ if exc_type is not None else "exception"
    return f"released by the client: the block raised {name}"
