"""``python -m ledger_server.devstack {run,env,stop}``: the ``make run`` supervisor.

``run``
    Resolves DATABASE_URL / REDIS_URL (embedded servers under ``.data/`` when unset), applies
    migrations, starts every process in :data:`PROCESSES` with its output prefixed by its
    name, waits for the gRPC port and prints how to reach it. Ctrl-C / SIGTERM / SIGHUP (its
    terminal closed), make dying, any child exiting or an embedded server it started
    stopping (`make stop`) stops the children (SIGTERM, again, then SIGKILL), then the
    servers it started.
``env``
    Starts the embedded servers if needed (left running) and prints ``export`` lines:
    ``eval "$(python -m ledger_server.devstack env)"``.
``stop``
    Stops the embedded servers left running under ``.data/``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, NoReturn

from ledger_server.config import DEFAULT_METRICS_ADDR, StripeSettings
from ledger_server.devstack import embedded
from ledger_server.devstack.parent_death import dying_with_parent
from ledger_server.pdeathsig import signal_when_parent_dies

DEFAULT_GRPC_ADDR = "localhost:50051"
DEV_WEBHOOK_SECRET = "whsec_dev_credit_ledger"
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ProcessSpec:
    """One long-running child of ``make run``. It gets DATABASE_URL, REDIS_URL and
    LEDGER_GRPC_ADDR in its environment, plus ``env``."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)


def migrate_spec() -> ProcessSpec:
    """Runs to completion before anything in :func:`process_specs` starts."""
    return ProcessSpec("migrate", [sys.executable, "-m", "ledger_server", "migrate"])


def process_specs() -> list[ProcessSpec]:
    """What ``make run`` runs, started in this order and stopped in reverse."""
    return [
        ProcessSpec("server", [sys.executable, "-m", "ledger_server", "serve"]),
        ProcessSpec("worker", [sys.executable, "-m", "workers", "worker"]),
        ProcessSpec("scheduler", [sys.executable, "-m", "workers", "scheduler"]),
        ProcessSpec("webhooks", [sys.executable, "-m", "workers.webhook"]),
    ]


# --- output -----------------------------------------------------------------------------------

_COLORS = ("36", "33", "35", "32", "34", "31")
_print_lock = threading.Lock()


class _Prefixer:
    """Writes lines to stdout prefixed with a padded, optionally coloured name."""

    def __init__(self, names: Sequence[str]) -> None:
        self.width = max(len(n) for n in names)
        self.color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        self.codes = {n: _COLORS[i % len(_COLORS)] for i, n in enumerate(names)}

    def prefix(self, name: str) -> str:
        label = f"{name:<{self.width}} |"
        if self.color:
            return f"\033[{self.codes.get(name, '1')}m{label}\033[0m "
        return label + " "

    def write(self, name: str, line: str) -> None:
        with _print_lock:
            sys.stdout.write(self.prefix(name) + line.rstrip("\r\n") + "\n")
            sys.stdout.flush()

    def pump(self, name: str, stream: IO[bytes]) -> threading.Thread:
        def run() -> None:
            with stream:
                for raw in iter(stream.readline, b""):
                    self.write(name, raw.decode(errors="replace"))

        thread = threading.Thread(target=run, name=f"pump-{name}", daemon=True)
        thread.start()
        return thread


# --- children ---------------------------------------------------------------------------------


@dataclass
class _Child:
    spec: ProcessSpec
    process: subprocess.Popen[bytes]
    pump: threading.Thread


def _spawn(spec: ProcessSpec, env: Mapping[str, str], out: _Prefixer) -> _Child:
    process = subprocess.Popen(
        dying_with_parent(spec.argv),
        env={**env, **spec.env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        # Own process group: a terminal Ctrl-C reaches only the supervisor, which then
        # stops the children in order. PDEATHSIG covers the supervisor being killed.
        start_new_session=True,
    )
    assert process.stdout is not None
    return _Child(spec, process, out.pump(spec.name, process.stdout))


class _Hurry:
    """Set by a second Ctrl-C/SIGTERM while stopping: skip the grace period."""

    flag = False


# A child still running after its grace period gets a second SIGTERM before SIGKILL: RQ's
# worker takes it as a cold shutdown and SIGKILLs the job's work horse, which RQ puts in a
# process group of its own, out of reach of the SIGKILL of the worker's group. RQ ignores
# a second signal within a second of the first.
_SECOND_SIGTERM_AFTER_S = 1.2
_SECOND_SIGTERM_GRACE_S = 3.0


def _stop_children(children: Sequence[_Child], out: _Prefixer, timeout: float) -> None:
    live = [c for c in reversed(children) if c.process.poll() is None]
    for child in live:
        out.write("devstack", f"stopping {child.spec.name} (pid {child.process.pid})")
        with contextlib.suppress(ProcessLookupError):
            child.process.send_signal(signal.SIGTERM)
    first = time.monotonic()
    _wait_for(live, first + timeout)
    if stubborn := [c for c in live if c.process.poll() is None]:
        time.sleep(max(0.0, first + _SECOND_SIGTERM_AFTER_S - time.monotonic()))
        for child in stubborn:
            out.write("devstack", f"stopping {child.spec.name} now (pid {child.process.pid})")
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
        _Hurry.flag = False  # the second Ctrl-C that hurried us must not skip this grace too
        _wait_for(stubborn, time.monotonic() + _SECOND_SIGTERM_GRACE_S)
    for child in live:
        if child.process.poll() is None:
            out.write("devstack", f"killing {child.spec.name} (pid {child.process.pid})")
    for child in children:
        # SIGKILL the whole group: also whatever the child forked and left behind.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.process.pid, signal.SIGKILL)
        child.process.wait()
        child.pump.join(timeout=2)


def _wait_for(children: Sequence[_Child], deadline: float) -> None:
    """Until every child has exited, the deadline passes or a Ctrl-C hurries the stop."""
    while any(c.process.poll() is None for c in children):
        if _Hurry.flag or time.monotonic() > deadline:
            return
        time.sleep(0.05)


# --- gRPC address -----------------------------------------------------------------------------


def _split_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit(f"devstack: LEDGER_GRPC_ADDR must be host:port, got {addr!r}")
    host = host.strip("[]")
    return host, int(port)


def listen_addrs(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """``(setting, host:port)`` of each server of the stack: gRPC, webhooks, metrics (an
    empty address: not served)."""
    return [
        ("LEDGER_GRPC_ADDR", environ.get("LEDGER_GRPC_ADDR") or DEFAULT_GRPC_ADDR),
        ("LEDGER_WEBHOOK_ADDR", StripeSettings.from_env(environ).webhook_addr),
        ("LEDGER_METRICS_ADDR", environ.get("LEDGER_METRICS_ADDR", DEFAULT_METRICS_ADDR)),
    ]


def own_ports(environ: Mapping[str, str]) -> set[int]:
    """The ports this stack's servers will listen on (gRPC, webhooks, metrics), which the
    embedded Redis, started first, must not take."""
    addrs = (addr for _, addr in listen_addrs(environ))
    return {int(port) for addr in addrs if (port := addr.rpartition(":")[2]).isdigit()}


def taken_ports(environ: Mapping[str, str]) -> list[str]:
    """One line for each server of the stack whose port something already listens on,
    naming the setting to change. Checked before anything starts: a taken webhook or
    metrics port showed only after the banner, as a traceback."""
    taken = []
    for setting, addr in listen_addrs(environ):
        bind_host, _, port = addr.rpartition(":")
        if not port.isdigit() or int(port) == 0:  # not served, or any free port
            continue
        host = _connect_host(bind_host.strip("[]"))
        if _accepts(host, int(port)):
            taken.append(f"something already listens on {host}:{port}; stop it or set {setting}")
    return taken


def _connect_host(host: str) -> str:
    """Where a client on this machine connects for a server bound to ``host``."""
    return "localhost" if host in ("", "0.0.0.0", "::", "*") else host


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# --- commands ---------------------------------------------------------------------------------


class _Interrupted(Exception):
    pass


def _raise_interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise _Interrupted(signal.Signals(signum).name)


def _hurry(signum: int, frame: FrameType | None) -> None:
    _Hurry.flag = True


def _hurry_on_signals() -> None:
    """While shutting down, another Ctrl-C/SIGTERM only cuts the grace period short."""
    signal.signal(signal.SIGINT, _hurry)
    signal.signal(signal.SIGTERM, _hurry)
    signal.signal(signal.SIGHUP, _hurry)


def _buf_command() -> str | None:
    if shutil.which("buf"):
        return "buf"
    local = embedded.repo_root() / "node_modules" / ".bin" / "buf"
    if local.exists():
        return os.path.relpath(local) if Path.cwd() == embedded.repo_root() else str(local)
    return None


_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)
_CONNINFO_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def mask_password(url: str) -> str:
    """``url`` with its password replaced by ``***``, for printing: the userinfo of a URL
    (``scheme://user:pw@host``), a ``password=`` query parameter, or the ``password`` of a
    libpq ``key=value`` string. A password with unencoded ``@``, ``/`` or ``?`` is masked
    whole: when in doubt, more is hidden (even the host), never part of a password."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return _CONNINFO_PASSWORD.sub(lambda m: m.group(1) + "***", url)
    authority = rest.partition("/")[0]
    # The userinfo ends at the last "@" before the path; with none there, at the last "@"
    # before the query (an unencoded "/" in the password).
    end = authority.rfind("@") if "@" in authority else rest.partition("?")[0].rfind("@")
    user, colon, password = rest[: max(end, 0)].partition(":")
    if password:  # an empty one (the embedded server's URL) stays as it is, pasteable
        rest = f"{user}{colon}***{rest[end:]}"
    return _QUERY_PASSWORD.sub(lambda m: m.group(1) + "***", f"{scheme}://{rest}")


def ready_banner(host: str, port: int, env: Mapping[str, str]) -> str:
    """What a newcomer sees once the stack is up: where it listens and a first call to paste
    (a grant with a fixed idempotency key, so pasting it twice grants once)."""
    buf = _buf_command()
    base = f"{buf or 'buf'} curl --protocol grpc --http2-prior-knowledge"
    webhook_addr = StripeSettings.from_env(env).webhook_addr
    url = f"http://{_url_host(host)}:{port}/ledger.v1.LedgerService"
    grant = (
        """'{"account_id":"demo","idempotency_key":"demo-welcome","""
        """"amount_micros":"100000000","source":"CREDIT_SOURCE_PROMOTION"}'"""
    )
    # The `ledger` CLI reads LEDGER_ADDRESS, not the server's LEDGER_GRPC_ADDR.
    address = f"{_url_host(host)}:{port}"
    cli = "" if address == DEFAULT_GRPC_ADDR else f"  ledger CLI: export LEDGER_ADDRESS={address}\n"
    return (
        f"\ncredit-ledger is up: gRPC on {host}:{port} (reflection and health enabled)\n"
        f"  Stripe webhooks: http://{webhook_addr}/stripe/webhook"
        f" (signing secret {env.get('STRIPE_WEBHOOK_SECRET', '')})\n"
        f"  metrics: {_metrics_endpoint(env)}\n"
        f"{cli}"
        # The URLs may come from the environment with real credentials: a terminal's
        # scrollback, a shared screen or a pasted log must not show the passwords.
        f"  DATABASE_URL={mask_password(env['DATABASE_URL'])}\n"
        f"  REDIS_URL={mask_password(env['REDIS_URL'])}\n"
        f"  try:  {base} -d {grant} {url}/Grant\n"
        f'  then: {base} -d \'{{"account_id":"demo"}}\' {url}/Balance\n'
        + ("" if buf else "  (no buf here yet: `make node_modules` installs it)\n")
        + "  Ctrl-C stops everything.\n"
    )


def _metrics_endpoint(env: Mapping[str, str]) -> str:
    addr = env.get("LEDGER_METRICS_ADDR", DEFAULT_METRICS_ADDR)
    if not addr:
        return "not served (LEDGER_METRICS_ADDR is empty)"
    if addr.endswith(":0"):
        return f"on a free port of {addr[:-2]}, which the server's log names"
    return f"http://{addr}/metrics"


def cmd_run(data_dir: Path, ready_timeout: float) -> int:
    grpc_addr = os.environ.get("LEDGER_GRPC_ADDR") or DEFAULT_GRPC_ADDR
    bind_host, port = _split_addr(grpc_addr)
    host = _connect_host(bind_host)
    if taken := taken_ports(os.environ):
        print("\n".join(f"devstack: {line}" for line in taken), file=sys.stderr)
        return 1

    specs = process_specs()
    out = _Prefixer(["devstack", migrate_spec().name, *(s.name for s in specs)])
    parent = os.getppid()
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)  # its terminal closed
    # make killed alone (kill -9, an OOM kill) left this process running the whole stack
    # under init, holding its ports: a SIGTERM when it dies stops the stack as Ctrl-C does.
    if not signal_when_parent_dies(signal.SIGTERM, parent):
        out.write("devstack", "make exited: not starting")
        return 1
    started: list[embedded.Stoppable] = []
    children: list[_Child] = []
    left_running: list[str] = []
    try:
        database_url, redis_url, started = embedded.resolve_urls(
            data_dir, avoid_ports=own_ports(os.environ), own_postgres=True
        )
        left_running = _left_running(started)
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "LEDGER_GRPC_ADDR": grpc_addr,
            # Local development only: a known signing secret so the webhook receiver
            # accepts events signed with it (`stripe listen` prints your own to use instead).
            "STRIPE_WEBHOOK_SECRET": os.environ.get("STRIPE_WEBHOOK_SECRET") or DEV_WEBHOOK_SECRET,
            "PYTHONUNBUFFERED": "1",
        }
        code = _supervise(specs, env, host, port, ready_timeout, out, children, started)
    except _Interrupted as exc:
        _hurry_on_signals()
        with _print_lock:
            print(flush=True)
        out.write("devstack", f"{exc}: shutting down")
        code = 0
    finally:
        _hurry_on_signals()
        _stop_children(children, out, STOP_TIMEOUT_S)
        for server in reversed(started):
            out.write("devstack", f"stopping embedded {server.name}")
            try:
                server.stop()
            except Exception as exc:
                out.write("devstack", f"could not stop {server.name}: {exc}")
                code = 1
        signal_when_parent_dies(0, parent)  # for a caller that goes on (a test)
    for name in left_running:
        out.write("devstack", f"embedded {name} was running before: left up (`make stop` stops it)")
    out.write("devstack", "stopped")
    return code


def _left_running(started: Sequence[embedded.Stoppable]) -> list[str]:
    """The embedded servers make run used but did not start (nor take over): started by
    `make migrate` or `make env`, or used by another live make run."""
    ours = {server.name for server in started}
    used = [
        name
        for name, url_var in (("postgres", "DATABASE_URL"), ("redis", "REDIS_URL"))
        if not os.environ.get(url_var)
    ]
    return [name for name in used if name not in ours]


def _supervise(
    specs: Sequence[ProcessSpec],
    env: Mapping[str, str],
    host: str,
    port: int,
    ready_timeout: float,
    out: _Prefixer,
    children: list[_Child],
    servers: Sequence[embedded.Stoppable] = (),
) -> int:
    """Migrates, starts ``specs`` (appending to ``children``), waits until one exits or one
    of the embedded ``servers`` stops."""
    migrate = _spawn(migrate_spec(), env, out)
    children.append(migrate)
    if (code := migrate.process.wait()) != 0:
        out.write("devstack", f"migrations failed (exit {code})")
        return 1
    migrate.pump.join(timeout=2)
    children.remove(migrate)

    for spec in specs:
        children.append(_spawn(spec, env, out))

    deadline = time.monotonic() + ready_timeout
    while not _accepts(host, port):
        if dead := [c for c in children if c.process.poll() is not None]:
            out.write("devstack", f"{dead[0].spec.name} exited ({dead[0].process.returncode})")
            return 1
        if time.monotonic() > deadline:
            out.write("devstack", f"gRPC port {host}:{port} not open after {ready_timeout:g}s")
            return 1
        time.sleep(0.1)

    with _print_lock:
        print(ready_banner(host, port, env), flush=True)
    return _watch(children, servers, out)


def _watch(
    children: Sequence[_Child], servers: Sequence[embedded.Stoppable], out: _Prefixer
) -> int:
    """Returns 1 once a child exits or an embedded server stops (`make stop` in another
    terminal, a crash): the stack does not run on without its database or Redis. Polling
    the embedded Redis also reaps it, which `make stop` then sees gone."""
    while True:
        if dead := [c for c in children if c.process.poll() is not None]:
            out.write("devstack", f"{dead[0].spec.name} exited ({dead[0].process.returncode})")
            return 1
        if gone := [s for s in servers if not s.is_running()]:
            out.write("devstack", f"embedded {gone[0].name} stopped")
            return 1
        time.sleep(0.2)


def cmd_env(data_dir: Path, with_redis: bool) -> int:
    lines: list[str] = []
    database_url = os.environ.get("DATABASE_URL") or ""
    if not database_url:
        database_url = embedded.start_postgres(data_dir / "pg").url
    lines.append(f"export DATABASE_URL={shlex.quote(database_url)}")
    if with_redis:
        redis_url = os.environ.get("REDIS_URL") or ""
        if not redis_url:
            redis_url = embedded.start_redis(data_dir / "redis", daemonize=True).url
        lines.append(f"export REDIS_URL={shlex.quote(redis_url)}")
    print("\n".join(lines), flush=True)
    return 0


def cmd_stop(data_dir: Path) -> int:
    try:
        stopped = embedded.stop_all(data_dir)
    except RuntimeError as exc:
        print(f"devstack: {exc}", file=sys.stderr)
        return 1
    for what in stopped:
        print(f"devstack: stopped {what}", file=sys.stderr)
    if not stopped:
        print(f"devstack: no embedded server running under {data_dir}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ledger_server.devstack", description=__doc__)
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where embedded servers keep their data (default: $LEDGER_DATA_DIR or <repo>/.data)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="migrate and run the service with embedded servers")
    run.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT_S)
    env = sub.add_parser("env", help="start embedded servers if needed; print export lines")
    env.add_argument("--no-redis", action="store_true", help="only DATABASE_URL")
    sub.add_parser("stop", help="stop the embedded servers running under the data dir")
    args = parser.parse_args(argv)

    data_dir: Path = (args.data_dir or embedded.default_data_dir()).resolve()
    if args.command == "run":
        return cmd_run(data_dir, args.ready_timeout)
    if args.command == "env":
        return cmd_env(data_dir, with_redis=not args.no_redis)
    return cmd_stop(data_dir)


if __name__ == "__main__":
    sys.exit(main())
