"""Schema migrations: numbered files in sql/migrations/ applied once each, in
order; then the function files in sql/functions/, re-applied whenever their
content changes (they are all CREATE OR REPLACE), unless a newer release has
migrated the database. Everything runs in one transaction under an advisory lock,
so servers and workers starting together migrate once."""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources

import psycopg
from psycopg.rows import TupleRow

from ledger_server.db.connect import connect
from ledger_server.db.session_limits import SET_SESSION_LIMITS

log = logging.getLogger(__name__)

# An arbitrary constant that identifies "credit-ledger migration" among advisory locks.
_MIGRATION_LOCK_ID = 7_202_611_210

_MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class SqlFile:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


class MigrationError(RuntimeError):
    pass


def _sql_files(folder_name: str) -> list[SqlFile]:
    folder = resources.files("ledger_server") / "sql" / folder_name
    files: list[SqlFile] = []
    for entry in folder.iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if match is None:
            if entry.name.endswith(".sql"):
                raise MigrationError(f"{folder_name}/{entry.name}: name must be NNNN_name.sql")
            continue
        files.append(SqlFile(int(match[1]), entry.name, entry.read_text(encoding="utf-8")))
    files.sort(key=lambda f: f.version)
    versions = [f.version for f in files]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"{folder_name}: two files share a version number")
    return files


def migrations() -> list[SqlFile]:
    return _sql_files("migrations")


def function_files() -> list[SqlFile]:
    return _sql_files("functions")


_BOOKKEEPING = b"""
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS schema_functions (
    name       text        PRIMARY KEY,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


def migrate_connection(conn: psycopg.Connection[TupleRow]) -> list[str]:
    """Applies what is missing; returns the names of the files applied."""
    applied_now: list[str] = []
    with conn.transaction():
        conn.execute(b"SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_ID,))
        conn.execute(_BOOKKEEPING)
        rows = conn.execute(b"SELECT version, name, checksum FROM schema_migrations").fetchall()
        done = {int(r[0]): (str(r[1]), str(r[2])) for r in rows}
        for migration in migrations():
            if migration.version in done:
                name, checksum = done[migration.version]
                if checksum != migration.checksum:
                    raise MigrationError(
                        f"migration {name} was changed after it was applied; "
                        "add a new numbered migration instead"
                    )
                continue
            log.info("applying migration %s", migration.name)
            conn.execute(migration.sql.encode())
            conn.execute(
                b"INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (migration.version, migration.name, migration.checksum),
            )
            applied_now.append(migration.name)
        newer = sorted(set(done) - {migration.version for migration in migrations()})
        if newer:
            # A newer release has migrated this database: this server is one of the old ones
            # of a rolling deploy. The functions are that release's (which keeps the forms
            # the old servers call); putting this release's back would undo them.
            log.warning(
                "the database has migrations this release does not know (%s); "
                "its ledger functions are a newer release's and are left as they are",
                ", ".join(done[version][0] for version in newer),
            )
            return applied_now
        rows = conn.execute(b"SELECT name, checksum FROM schema_functions").fetchall()
        current = {str(r[0]): str(r[1]) for r in rows}
        for functions in function_files():
            if current.get(functions.name) == functions.checksum:
                continue
            log.info("applying functions %s", functions.name)
            conn.execute(functions.sql.encode())
            conn.execute(
                b"INSERT INTO schema_functions (name, checksum) VALUES (%s, %s) "
                b"ON CONFLICT (name) DO UPDATE "
                b"SET checksum = excluded.checksum, applied_at = now()",
                (functions.name, functions.checksum),
            )
            applied_now.append(functions.name)
        _add_missing_settings(conn)
    return applied_now


def _add_missing_settings(conn: psycopg.Connection[TupleRow]) -> None:
    """The settings this release added, at their defaults (this environment's), before any
    of its servers starts: the previous release's servers run the new functions meanwhile."""
    from ledger_server import runtime_settings  # it imports the server's configuration

    defaults = runtime_settings.environment_defaults()
    runtime_settings.check_with_database(conn, defaults, runtime_settings.set_in_environment())
    runtime_settings.add_missing_defaults(conn, defaults, datetime.now(UTC))


def migrate(database_url: str) -> list[str]:
    with connect(database_url, autocommit=True) as conn:
        conn.execute(SET_SESSION_LIMITS)  # a migration's backfill computes as the ledger does
        return migrate_connection(conn)
