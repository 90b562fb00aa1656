"""Settings read from the environment once at start-up."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta


class ConfigError(ValueError):
    """A setting in the environment has an invalid value."""


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from exc
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class Settings:
    database_url: str
    redis_url: str = ""
    grpc_addr: str = "localhost:50051"
    db_pool_min_size: int = 2
    db_pool_max_size: int = 16
    migrate_on_start: bool = True
    reservation_ttl_default: timedelta = timedelta(minutes=15)
    reservation_ttl_max: timedelta = timedelta(days=7)
    shutdown_grace: timedelta = timedelta(seconds=5)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        database_url = env.get("DATABASE_URL", "")
        if not database_url:
            raise ConfigError("DATABASE_URL is not set (make run starts an embedded PostgreSQL)")
        pool_min = _int(env, "LEDGER_DB_POOL_MIN", 2, minimum=1)
        pool_max = _int(env, "LEDGER_DB_POOL_MAX", 16, minimum=1)
        if pool_max < pool_min:
            raise ConfigError("LEDGER_DB_POOL_MAX must be at least LEDGER_DB_POOL_MIN")
        ttl_default = _int(env, "LEDGER_RESERVATION_TTL_SECONDS", 900, minimum=1)
        ttl_max = _int(env, "LEDGER_RESERVATION_TTL_MAX_SECONDS", 7 * 86400, minimum=1)
        if ttl_max < ttl_default:
            raise ConfigError(
                "LEDGER_RESERVATION_TTL_MAX_SECONDS must be at least LEDGER_RESERVATION_TTL_SECONDS"
            )
        return cls(
            database_url=database_url,
            redis_url=env.get("REDIS_URL", ""),
            grpc_addr=env.get("LEDGER_GRPC_ADDR", "") or "localhost:50051",
            db_pool_min_size=pool_min,
            db_pool_max_size=pool_max,
            migrate_on_start=env.get("LEDGER_MIGRATE_ON_START", "true").lower()
            not in ("0", "false", "no"),
            reservation_ttl_default=timedelta(seconds=ttl_default),
            reservation_ttl_max=timedelta(seconds=ttl_max),
            shutdown_grace=timedelta(seconds=_int(env, "LEDGER_SHUTDOWN_GRACE_SECONDS", 5)),
        )
