"""Domain errors: what went wrong in the ledger's own terms, with the gRPC code it
maps to. The server's error boundary turns them into google.rpc.Status with an
ErrorInfo detail (reason, domain, metadata)."""

from __future__ import annotations

from collections.abc import Mapping

import grpc

ERROR_DOMAIN = "credit-ledger"


class LedgerError(Exception):
    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field = self.metadata.get("field")


def invalid_field(field: str, violation: str) -> LedgerError:
    return LedgerError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FIELD",
        f"{field}: {violation}",
        {"field": field, "violation": violation},
    )


def unavailable(message: str) -> LedgerError:
    return LedgerError(grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE", message)
