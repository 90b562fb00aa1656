"""`ledger`: the operator CLI. Talks to a running server over gRPC (--address or
LEDGER_ADDRESS, default localhost:50051) as the administrator named by --actor or
LEDGER_ACTOR; `audit` and `migrate` use DATABASE_URL directly.

Exit codes: 0 ok; 1 the server refused the request (a domain error) or the audit
found violations; 2 bad usage; 3 the server or database is unreachable; 141 the reader of
the output went away (`ledger ... | head`), as a tool killed by SIGPIPE reports."""

from __future__ import annotations

import argparse
import getpass
import math
import os
import signal
import sys
from collections.abc import Sequence

import grpc
import psycopg

from ledger_server.cli import commands, output

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # what a shell reports for a tool SIGPIPE killed
_UNAVAILABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def _default_actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def _int32(text: str) -> int:
    """A count sent in an int32 field (--limit, --count, --max-per-code): past its range the
    request could not be built and the CLI crashed; its sign is the server's to check."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not -(2**31) <= value < 2**31:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range (at most {2**31 - 1:,})")
    return value


def _seconds(text: str) -> float:
    """A time-out: nan, inf or none above zero read as an unreachable server (exit 3)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a number of seconds above 0")
    return value


def _common_options(top_level: bool) -> argparse.ArgumentParser:
    """The options every command takes, before or after the subcommand. Below the top
    level they default to SUPPRESS, so an option given before the subcommand is not
    overwritten by the subcommand's default (argparse shares parents' actions, hence
    one parser per level)."""
    common = argparse.ArgumentParser(add_help=False)

    def default(value: object) -> object:
        return value if top_level else argparse.SUPPRESS

    common.add_argument(
        "--address",
        default=default(os.environ.get("LEDGER_ADDRESS", "localhost:50051")),
        help="server host:port (LEDGER_ADDRESS, default localhost:50051)",
    )
    common.add_argument(
        "--actor",
        default=default(os.environ.get("LEDGER_ACTOR") or _default_actor()),
        help="administrator identity sent as x-ledger-actor (LEDGER_ACTOR)",
    )
    common.add_argument(
        "--json", action="store_true", default=default(False), help="protobuf JSON output"
    )
    common.add_argument(
        "--timeout", type=_seconds, default=default(10.0), help="seconds per call (10)"
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common_options(top_level=False)
    parser = argparse.ArgumentParser(
        prog="ledger",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_common_options(top_level=True)],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, command: commands.Command, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=[common])
        p.set_defaults(run=command)
        return p

    def key_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--key", dest="idempotency_key", help="idempotency key (default: a new one, printed)"
        )

    p = add("balance", commands.balance, "an account's balances")
    p.add_argument("account")

    p = add("lots", commands.lots, "an account's lots in consumption order")
    p.add_argument("account")
    p.add_argument("--all", action="store_true", help="include exhausted and expired lots")

    def journal_options(p: argparse.ArgumentParser, limit_help: str) -> None:
        """The filters and paging `transactions` and `journal` share."""
        p.add_argument("--kind", action="append", default=[], help="grant, charge, refund, ...")
        p.add_argument("--feature", default="")
        p.add_argument("--since", help="ISO time, included (UTC unless it says otherwise)")
        p.add_argument("--until", help="ISO time, excluded")
        p.add_argument("--limit", type=_int32, default=50, help=limit_help)
        p.add_argument("--page-token", default="", help="continue where a listing stopped")

    p = add("transactions", commands.transactions, "an account's journal, newest first")
    p.add_argument("account")
    journal_options(p, "entries to list (50)")

    p = add("journal", commands.journal, "every account's journal (or one's), newest first")
    p.add_argument("--account", help="one account's entries only")
    journal_options(p, "entries to list (50)")

    p = add("grant", commands.grant, "grant credits by hand (source admin)")
    p.add_argument("account")
    p.add_argument("credits", help="for example 10 or 96.5")
    p.add_argument("--reason", required=True)
    p.add_argument("--expires-in-days", help="days the credits last, for example 30 or 0.5")
    key_option(p)

    p = add("adjust", commands.adjust, "debit credits by hand (an adjustment)")
    p.add_argument("account")
    p.add_argument("credits")
    p.add_argument("--reason", required=True)
    key_option(p)

    p = add("overdraft", commands.overdraft, "set how far below zero an account may go")
    p.add_argument("account")
    p.add_argument("credits", help="the new limit; 0 takes the overdraft away")
    p.add_argument("--reason", required=True)
    key_option(p)

    p = add("reservations", commands.reservation, "show a reservation and its lots")
    p.add_argument("account")
    p.add_argument("reservation")

    codes = add("codes", commands.codes_show, "redemption code batches").add_subparsers(
        dest="codes_command", required=True, metavar="ACTION"
    )
    p = codes.add_parser("create", help="generate a batch of codes", parents=[common])
    p.set_defaults(run=commands.codes_create)
    p.add_argument("--credits", required=True, help="credits per redemption")
    p.add_argument("--count", type=_int32, required=True, help="number of codes")
    p.add_argument("--max-per-code", type=_int32, default=1, help="redemptions per code (1)")
    p.add_argument("--codes-expire", help="ISO time after which codes are refused")
    p.add_argument("--credit-days", help="days the granted credits last")
    p.add_argument("--note", default="")
    p.add_argument(
        "--account-prefix", default="", help="only accounts whose id starts with this redeem"
    )
    key_option(p)
    p = codes.add_parser("show", help="show a batch", parents=[common])
    p.set_defaults(run=commands.codes_show)
    p.add_argument("batch")
    p = codes.add_parser("disable", help="disable every code of a batch", parents=[common])
    p.set_defaults(run=commands.codes_disable)
    p.add_argument("batch")
    p.add_argument("--reason", required=True)
    key_option(p)

    p = add("summary", commands.summary, "allocated, consumed, expired, ... over a period")
    p.add_argument("account", nargs="?", help="one account (default: every account)")
    period = p.add_mutually_exclusive_group()
    period.add_argument("--day", help="YYYY-MM-DD in the ledger's time zone")
    period.add_argument("--month", help="YYYY-MM in the ledger's time zone")
    period.add_argument("--since", help="custom range start (ISO time, with --until)")
    p.add_argument("--until", help="custom range end, excluded")

    p = add("audit", commands.audit, "check every ledger invariant (DATABASE_URL)")
    p.set_defaults(database_url=None)
    p = add("migrate", commands.migrate, "apply database migrations (DATABASE_URL)")
    p.set_defaults(database_url=None)

    config = add("config", commands.config_list, "run-time settings").add_subparsers(
        dest="config_command", required=True, metavar="ACTION"
    )
    p = config.add_parser("list", help="every setting", parents=[common])
    p.set_defaults(run=commands.config_list)
    p = config.add_parser("set", help="change a setting", parents=[common])
    p.set_defaults(run=commands.config_set)
    p.add_argument("key")
    p.add_argument("value", help='JSON (true, 100, "Asia/Shanghai") or plain text')
    p.add_argument("--reason", required=True)
    key_option(p)
    p = config.add_parser("reset", help="back to the environment default", parents=[common])
    p.set_defaults(run=commands.config_reset)
    p.add_argument("key")
    p.add_argument("--reason", required=True)
    key_option(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _run(argv)
        # Here, not at exit, where Python can only print the failure of a closed pipe.
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # The reader went away (`ledger codes create ... | head -8`; helper-83): stop quietly
        # instead of with a traceback. Python's own flush at exit would fail again on the
        # pipe, so stdout goes to /dev/null (the recipe of Python's signal documentation).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("audit", "migrate"):
        args.database_url = os.environ.get("DATABASE_URL", "")
        if not args.database_url:
            parser.error(f"{args.command} needs DATABASE_URL")
    session = commands.Session(
        address=args.address, actor=args.actor, timeout=args.timeout, json=args.json
    )
    try:
        code: int = args.run(args, session)
        return code
    except output.UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"ledger: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except grpc.RpcError as exc:
        error = output.rpc_error(exc)
        output.print_error(error, args.json)
        unreachable = isinstance(exc, grpc.Call) and exc.code() in _UNAVAILABLE
        if unreachable and not args.json:
            print(f"  (is the ledger server running at {args.address}?)", file=sys.stderr)
        return EXIT_UNAVAILABLE if unreachable else EXIT_FAILED
    except psycopg.OperationalError as exc:
        output.print_error({"code": "UNAVAILABLE", "message": str(exc).strip()}, args.json)
        return EXIT_UNAVAILABLE
    finally:
        session.close()
