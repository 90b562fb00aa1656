"""Development and test plumbing: embedded PostgreSQL/Redis and the `make run` supervisor.

Nothing here is used in production, where DATABASE_URL and REDIS_URL point at real servers.
"""

from ledger_server.devstack.embedded import (
    EmbeddedPostgres,
    EmbeddedRedis,
    Stoppable,
    bin_path,
    create_database,
    default_data_dir,
    drop_database,
    resolve_urls,
    start_postgres,
    start_redis,
    stop_all,
    tune_for_tests,
    with_database,
)

__all__ = [
    "EmbeddedPostgres",
    "EmbeddedRedis",
    "Stoppable",
    "bin_path",
    "create_database",
    "default_data_dir",
    "drop_database",
    "resolve_urls",
    "start_postgres",
    "start_redis",
    "stop_all",
    "tune_for_tests",
    "with_database",
]
