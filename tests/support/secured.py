"""Helpers for the security and limits tests: callers with fresh random tokens, a server of
their own (ServerThread with replaced Settings) and bearer metadata."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import grpc

from ledger_server.clock import Clock
from ledger_server.config import Settings
from ledger_server.security import Caller, hash_token, load_callers
from support.server import ServerThread


@dataclass(frozen=True)
class Callers:
    """Callers as configured (from LEDGER_AUTH_TOKENS JSON), and their plaintext tokens."""

    callers: tuple[Caller, ...]
    tokens: dict[str, str]

    def metadata(self, name: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.tokens[name]}"),)


def make_callers(*specs: dict[str, Any]) -> Callers:
    """``make_callers({"name": "ops", "role": "admin"}, ...)``: each gets a new token."""
    tokens = {spec["name"]: secrets.token_urlsafe(32) for spec in specs}
    document = {
        "callers": [{**spec, "token_sha256": hash_token(tokens[spec["name"]])} for spec in specs]
    }
    callers = load_callers({"LEDGER_AUTH_TOKENS": json.dumps(document)})
    return Callers(callers, tokens)


def base_settings(database_url: str, redis_url: str) -> Settings:
    return Settings(
        database_url=database_url, redis_url=redis_url, db_pool_min_size=1, db_pool_max_size=4
    )


@contextmanager
def serving(settings: Settings, clock: Clock, **changes: Any) -> Iterator[ServerThread]:
    """A server of the test's own on 127.0.0.1:<ephemeral>, with ``changes`` to settings."""
    server = ServerThread(replace(settings, **changes), clock).start()
    try:
        yield server
    finally:
        server.stop()


def status_code(call: Any) -> grpc.StatusCode:
    """The code a call ends with (OK when it succeeds)."""
    try:
        call()
    except grpc.RpcError as error:
        code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
        return code
    return grpc.StatusCode.OK
