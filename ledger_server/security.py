"""Who may call the server, and where it may listen.

Callers are configured in LEDGER_AUTH_TOKENS_FILE (a JSON or TOML file) or LEDGER_AUTH_TOKENS
(the same JSON, inline): a name, a role and the SHA-256 of the caller's bearer token (never the
token itself; ``python -m ledger_server hash-token`` prints it), plus an optional account-id
prefix that scopes a service. A server with no callers configured runs unauthenticated for
local development and may only listen on a loopback address.

This module is pure (no gRPC): the per-call check is ledger_server/server/auth.py."""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import json
import re
import tomllib
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from ledger_server.ledger.account_ids import account_prefix_problem


class SecurityError(ValueError):
    """The security configuration is invalid or unsafe: the server must not start."""


class Role(StrEnum):
    SERVICE = "service"  # a product service: spends and reads its accounts
    ADMIN = "admin"  # operators: everything, AdminService included
    WORKER = "worker"  # payment and schedule workers: BillingService, LedgerService reads


@dataclass(frozen=True)
class Caller:
    name: str
    role: Role
    token_sha256: bytes = field(repr=False)  # the 32-byte digest
    # Services only: the account ids this caller may touch start with this prefix.
    account_prefix: str | None = None

    def may_touch(self, account_id: str) -> bool:
        return self.account_prefix is None or (
            bool(account_id) and account_id.startswith(self.account_prefix)
        )


def hash_token(token: str) -> str:
    """The hex SHA-256 of a token, as LEDGER_AUTH_TOKENS_FILE stores it."""
    return hashlib.sha256(token.encode()).hexdigest()


# --- configuration ------------------------------------------------------------------------------

_NAME = re.compile(r"[\x21-\x7e]{1,128}")  # what caller_identity records as the actor
_HASH = re.compile(r"[0-9a-f]{64}")
_KEYS = {"name", "role", "token_sha256", "account_prefix"}


def _caller(entry: object, where: str) -> Caller:
    if not isinstance(entry, dict):
        raise SecurityError(f"{where}: each caller must be an object")
    if "token" in entry:
        raise SecurityError(
            f"{where}: store the token's SHA-256 as token_sha256 "
            "(python -m ledger_server hash-token), never the token"
        )
    unknown = set(entry) - _KEYS
    if unknown:
        raise SecurityError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_KEYS)}")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise SecurityError(f"{where}: name must be 1 to 128 printable ASCII characters")
    where = f"{where} ({name})"
    try:
        role = Role(str(entry.get("role")))
    except ValueError:
        roles = ", ".join(r.value for r in Role)
        raise SecurityError(f"{where}: role must be one of {roles}") from None
    digest = entry.get("token_sha256")
    if not isinstance(digest, str) or not _HASH.fullmatch(digest.lower()):
        raise SecurityError(f"{where}: token_sha256 must be 64 hex digits")
    prefix = entry.get("account_prefix")
    if prefix is not None:
        if role is not Role.SERVICE:
            raise SecurityError(f"{where}: account_prefix applies to the service role only")
        if not isinstance(prefix, str):
            raise SecurityError(f"{where}: account_prefix must be a string")
        problem = account_prefix_problem(prefix)
        if problem is not None:
            raise SecurityError(f"{where}: account_prefix {problem}")
    return Caller(name, role, bytes.fromhex(digest), prefix)


def parse_callers(document: Any, source: str) -> tuple[Caller, ...]:
    """Callers from a parsed document: ``{"callers": [...]}`` (or, in JSON, the bare list)."""
    entries = document.get("callers") if isinstance(document, dict) else document
    if not isinstance(entries, list) or not entries:
        raise SecurityError(f"{source}: expected a non-empty list of callers under 'callers'")
    callers = tuple(_caller(entry, f"{source}: caller {i}") for i, entry in enumerate(entries))
    if len({c.name for c in callers}) != len(callers):
        raise SecurityError(f"{source}: caller names must be unique")
    if len({c.token_sha256 for c in callers}) != len(callers):
        raise SecurityError(f"{source}: two callers share a token")
    return callers


def load_callers(env: Mapping[str, str]) -> tuple[Caller, ...]:
    path = env.get("LEDGER_AUTH_TOKENS_FILE", "")
    inline = env.get("LEDGER_AUTH_TOKENS", "")
    if path and inline:
        raise SecurityError("set LEDGER_AUTH_TOKENS_FILE or LEDGER_AUTH_TOKENS, not both")
    if inline:
        try:
            return parse_callers(json.loads(inline), "LEDGER_AUTH_TOKENS")
        except ValueError as exc:
            if isinstance(exc, SecurityError):
                raise
            raise SecurityError(f"LEDGER_AUTH_TOKENS is not valid JSON: {exc}") from None
    if not path:
        return ()
    source = f"LEDGER_AUTH_TOKENS_FILE {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SecurityError(f"cannot read {source}: {exc.strerror}") from None
    try:
        document = tomllib.loads(text) if path.endswith(".toml") else json.loads(text)
    except ValueError as exc:
        raise SecurityError(
            f"{source} is not valid {'TOML' if path.endswith('.toml') else 'JSON'}: {exc}"
        ) from None
    return parse_callers(document, source)


# --- the authenticated caller of the current call ---------------------------------------------

_principal: ContextVar[Caller | None] = ContextVar("ledger_principal", default=None)


def current_principal() -> Caller | None:
    """The caller the current RPC authenticated as; None when no tokens are configured."""
    return _principal.get()


@contextmanager
def acting_as(caller: Caller) -> Iterator[None]:
    token = _principal.set(caller)
    try:
        yield
    finally:
        _principal.reset(token)


# --- loopback ---------------------------------------------------------------------------------


def listen_host(address: str) -> str | None:
    """The host part of a gRPC listen address; None for a unix socket."""
    if address.startswith(("unix:", "unix-abstract:")):
        return None
    host, _, _ = address.rpartition(":")
    return host.strip("[]")


def is_loopback_host(host: str) -> bool:
    if host.lower() in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # another host name, or "" / "0.0.0.0" / "::" (every interface)


# Checked on every call without tokens; a connection's peer string repeats on each of its calls.
@functools.lru_cache(maxsize=4096)
def is_loopback_peer(peer: str) -> bool:
    """A peer as grpc reports it: ``ipv4:127.0.0.1:5123``, ``ipv6:%5B::1%5D:5123`` (the
    brackets percent-encoded), ``unix:...``."""
    kind, _, rest = peer.partition(":")
    rest = urllib.parse.unquote(rest)
    if kind in ("unix", "unix-abstract"):
        return True
    if kind not in ("ipv4", "ipv6"):
        return False
    host = rest.rpartition(":")[0].strip("[]").split("%")[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def check_listen_address(address: str, callers: tuple[Caller, ...]) -> None:
    """Secure by default: without callers the server listens on loopback only."""
    if callers:
        return
    host = listen_host(address)
    if host is None or is_loopback_host(host):
        return
    raise SecurityError(
        f"refusing to listen on {address} without authentication: no callers are configured "
        "(LEDGER_AUTH_TOKENS_FILE or LEDGER_AUTH_TOKENS; see README, Security). Configure "
        "callers, or listen on a loopback address (localhost, 127.0.0.1, [::1]) for local "
        "development."
    )
