"""Command line: `python -m ledger_server serve | migrate | audit | hash-token`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import TextIO

import psycopg

from ledger_server import runtime_settings
from ledger_server.audit import AuditCannotRun, audit_database
from ledger_server.config import ConfigError, Settings
from ledger_server.db.migrate import migrate
from ledger_server.observability.logging import setup_logging
from ledger_server.security import SecurityError, hash_token
from ledger_server.server import event_loop, startup_heap
from ledger_server.server.app import running_server
from ledger_server.server.hardening import refuse_unsafe

log = logging.getLogger("ledger_server")


async def _serve(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with running_server(settings) as running:
        frozen = startup_heap.freeze()
        log.info(
            "startup heap frozen: %d objects outside the garbage collector's full collections",
            frozen,
            extra={"frozen_objects": frozen},
        )
        log.info(
            "ledger gRPC server listening on %s (port %d), event loop %s",
            settings.grpc_addr,
            running.port,
            f"{type(loop).__module__}.{type(loop).__qualname__}",  # what runs, not the setting
        )
        await stop.wait()
        log.info("shutting down")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ledger_server", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the gRPC server (migrates first)")
    sub.add_parser("migrate", help="apply database migrations")
    sub.add_parser(
        "audit", help="check every ledger invariant; exit 1 on a violation, 3 if it cannot run"
    )
    sub.add_parser(
        "hash-token", help="print the SHA-256 of the token on stdin, for LEDGER_AUTH_TOKENS_FILE"
    )
    args = parser.parse_args(argv)
    if args.command == "hash-token":
        return _hash_token()
    try:
        setup_logging()  # JSON lines on stderr (LEDGER_LOG_FORMAT, LEDGER_LOG_LEVEL)
        settings = Settings.from_env()
        if args.command in ("serve", "migrate"):  # they write the run-time settings' defaults
            runtime_settings.environment_defaults()
    except (ConfigError, ValueError) as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        try:  # secure by default: refuse an unsafe configuration before starting anything
            refuse_unsafe(settings, settings.grpc_addr)  # running_server logs the posture
        except SecurityError as exc:
            print(f"configuration error: {exc}", file=sys.stderr)
            return 2
        try:
            event_loop.run(_serve(settings), settings.event_loop)
        except ConfigError as exc:  # one only the database can tell (LEDGER_TIMEZONE)
            print(f"configuration error: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command == "migrate":
        try:
            applied = migrate(settings.database_url)
        except ConfigError as exc:
            print(f"configuration error: {exc}", file=sys.stderr)
            return 2
        print("applied: " + ", ".join(applied) if applied else "schema is up to date")
        return 0
    try:
        violations = audit_database(settings.database_url)
    except (AuditCannotRun, psycopg.OperationalError) as exc:
        # One line (psycopg adds a hint on a line of its own), and not 1: that means violations.
        print(f"audit could not run: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 3
    for violation in violations:
        print(violation)
    if violations:
        print(f"audit FAILED: {len(violations)} violation(s)", file=sys.stderr)
        return 1
    print("audit clean: every invariant holds")
    return 0


def _hash_token(stdin: TextIO | None = None) -> int:
    """One token on stdin (surrounding whitespace ignored) -> its hex SHA-256 on stdout."""
    token = (stdin or sys.stdin).read().strip()
    if not token or any(c.isspace() for c in token):
        print("hash-token: give one token on stdin (no spaces)", file=sys.stderr)
        return 2
    if len(token) < 32:
        print(
            "hash-token: warning: short token; use a long random one, e.g. "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))'",
            file=sys.stderr,
        )
    print(hash_token(token))
    return 0


if __name__ == "__main__":
    sys.exit(main())
