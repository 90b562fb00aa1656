"""Every ErrorInfo reason the server can answer with is declared in the contract
(ledger.v1.ErrorReason), so clients can rely on the list."""

from __future__ import annotations

import re
from pathlib import Path

import grpc

from ledger.v1 import errors_pb2
from ledger_client import LedgerError as ClientError
from ledger_client.errors import error_for
from ledger_server.db.errors import _LEDGER_SQLSTATES

REPO = Path(__file__).resolve().parent.parent

# LedgerError(grpc.StatusCode.X, "REASON", ...) and the helpers that build one.
_RAISED = re.compile(
    r"""(?:LedgerError\(\s*grpc\.StatusCode\.\w+,\s*|_not_found\(\s*|reason=)"([A-Z][A-Z_]+)\"""",
    re.S,
)


def _declared() -> set[str]:
    return {
        name.removeprefix("ERROR_REASON_")
        for name in errors_pb2.ErrorReason.DESCRIPTOR.values_by_name
        if name != "ERROR_REASON_UNSPECIFIED"
    }


def test_every_reason_the_server_raises_is_in_the_contract() -> None:
    raised = {reason for _, reason in _LEDGER_SQLSTATES.values()}
    for path in [*(REPO / "ledger_server").rglob("*.py"), *(REPO / "workers").rglob("*.py")]:
        raised |= set(_RAISED.findall(path.read_text()))
    raised |= {"INVALID_FIELD", "STORAGE_UNAVAILABLE"}  # ledger_server.errors helpers
    assert len(raised) > 40, "the scan found too few reasons to be looking in the right places"
    assert raised - _declared() == set()


# LedgerError(grpc.StatusCode.X, "REASON", ...): the code and reason of each error raised.
_RAISED_WITH_CODE = re.compile(
    r"""LedgerError\(\s*grpc\.StatusCode\.(\w+),\s*"([A-Z][A-Z_]+)\"""", re.S
)


def test_every_code_and_reason_the_server_raises_has_a_client_exception_of_its_own() -> None:
    """The client's README lists a class for each; one answered with a code it did not map
    (REPORT_OUT_OF_RANGE, OUT_OF_RANGE) came back as the bare LedgerError (helper-159)."""
    raised = set(_LEDGER_SQLSTATES.values())
    for path in [*(REPO / "ledger_server").rglob("*.py"), *(REPO / "workers").rglob("*.py")]:
        for code, reason in _RAISED_WITH_CODE.findall(path.read_text()):
            raised.add((getattr(grpc.StatusCode, code), reason))
    assert len(raised) > 40, "the scan found too few errors to be looking in the right places"
    untyped = {
        (code.name, reason)
        for code, reason in raised
        if code != grpc.StatusCode.INTERNAL and type(error_for(code, "", reason)) is ClientError
    }
    assert untyped == set()
