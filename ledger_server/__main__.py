"""Command line: `python -m ledger_server serve | migrate | audit`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from ledger_server.audit import audit_database
from ledger_server.config import ConfigError, Settings
from ledger_server.db.migrate import migrate
from ledger_server.server.app import running_server

log = logging.getLogger("ledger_server")


async def _serve(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with running_server(settings) as running:
        log.info("ledger gRPC server listening on %s (port %d)", settings.grpc_addr, running.port)
        await stop.wait()
        log.info("shutting down")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ledger_server", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the gRPC server (migrates first)")
    sub.add_parser("migrate", help="apply database migrations")
    sub.add_parser("audit", help="check every ledger invariant; exit 1 on a violation")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        asyncio.run(_serve(settings))
        return 0
    if args.command == "migrate":
        applied = migrate(settings.database_url)
        print("applied: " + ", ".join(applied) if applied else "schema is up to date")
        return 0
    violations = audit_database(settings.database_url)
    for violation in violations:
        print(violation)
    if violations:
        print(f"audit FAILED: {len(violations)} violation(s)", file=sys.stderr)
        return 1
    print("audit clean: every invariant holds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
