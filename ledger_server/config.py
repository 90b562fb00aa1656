"""Settings read from the environment once at start-up."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta

from ledger_server.security import Caller, SecurityError, load_callers
from ledger_server.server.event_loop import DEFAULT_EVENT_LOOP, EVENT_LOOPS

DEFAULT_METRICS_ADDR = "localhost:9464"

# The smallest LEDGER_MAX_MESSAGE_BYTES (gRPC's own default): the largest answer of a mutating
# call must fit it, or gRPC refuses to send that answer after the ledger committed the call,
# and a retry under the same key replays it, as large. TransferReward's is the largest: up to
# 16,384 new lots (one per expiry taken; its entry numbers at most 32,768 postings, a lot made
# and at least one taken per expiry) of at most 228 bytes, about 3.6 MiB; a Reserve, Consume,
# Commit, Release or Refund lists up to 32,767 lots of at most 61 bytes, 1.9 MiB.
# tests/test_limits.py builds both at their largest.
MIN_MESSAGE_BYTES = 4 * 1024 * 1024


class ConfigError(ValueError):
    """A setting in the environment has an invalid value."""


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from exc
    if not 0 <= value < float("inf"):
        raise ConfigError(f"{name} must be a non-negative number, got {raw!r}")
    return value


def env_int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    """An integer variable: unset or empty, the default; not an integer or under minimum, a
    ConfigError naming it (the server's settings here, the workers' in workers/settings.py)."""
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


TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    """A yes/no variable, read as the run-time settings read theirs (runtime_settings.py): 1,
    true, yes, on or 0, false, no, off in any case; unset or empty, the default; anything
    else a ConfigError naming it, not a silent default (`LEDGER_SMTP_STARTTLS=y` sent the
    relay's password in plain text; `LEDGER_MIGRATE_ON_START=off` migrated)."""
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in TRUE_WORDS:
        return True
    if raw in FALSE_WORDS:
        return False
    raise ConfigError(
        f"{name} must be one of {', '.join(TRUE_WORDS + FALSE_WORDS)}, got {env[name]!r}"
    )


def _stripe_timeout(env: Mapping[str, str]) -> float:
    value = _float(env, "LEDGER_STRIPE_TIMEOUT_SECONDS", 10.0)
    if value <= 0:  # requests refuses a zero time-out, and "no time-out" is what this bounds
        raise ConfigError("LEDGER_STRIPE_TIMEOUT_SECONDS must be more than 0")
    return value


@dataclass(frozen=True)
class StripeSettings:
    """Stripe: the API key for Checkout Sessions, the webhook signing secret and where the
    webhook receiver listens. Empty key or secret: that half of payments is switched off
    (CreateCheckoutSession answers FAILED_PRECONDITION; the receiver answers 503, so Stripe
    keeps the events and retries them once a secret is configured)."""

    api_key: str = ""
    webhook_secret: str = ""
    webhook_tolerance: timedelta = timedelta(seconds=300)
    # Overrides https://api.stripe.com (a local test double, stripe-mock).
    api_base: str = ""
    # How long one request to Stripe's API may take (connect, then each read); a call's
    # deadline shortens it. The library's own default, 80 s, outlasts any caller.
    timeout_seconds: float = 10.0
    webhook_addr: str = "localhost:8081"
    checkout_success_url: str = (
        "http://localhost:3000/billing/success?session_id={CHECKOUT_SESSION_ID}"
    )
    checkout_cancel_url: str = "http://localhost:3000/billing/cancel"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StripeSettings:
        env = os.environ if env is None else env
        defaults = cls()
        return cls(
            api_key=env.get("STRIPE_API_KEY", ""),
            # A secret read from a file usually ends in a newline, and with it every
            # delivery failed its signature check, silently (helper-165).
            webhook_secret=env.get("STRIPE_WEBHOOK_SECRET", "").strip(),
            webhook_tolerance=timedelta(
                seconds=env_int(env, "STRIPE_WEBHOOK_TOLERANCE_SECONDS", 300, minimum=1)
            ),
            api_base=env.get("STRIPE_API_BASE", "").rstrip("/"),
            timeout_seconds=_stripe_timeout(env),
            webhook_addr=env.get("LEDGER_WEBHOOK_ADDR", "") or defaults.webhook_addr,
            checkout_success_url=env.get("LEDGER_CHECKOUT_SUCCESS_URL", "")
            or defaults.checkout_success_url,
            checkout_cancel_url=env.get("LEDGER_CHECKOUT_CANCEL_URL", "")
            or defaults.checkout_cancel_url,
        )


@dataclass(frozen=True)
class Settings:
    database_url: str
    redis_url: str = ""
    grpc_addr: str = "localhost:50051"
    db_pool_min_size: int = 2
    db_pool_max_size: int = 16
    group_commit_max_in_flight: int = 2
    group_commit_open_lane_after: timedelta = timedelta(milliseconds=100)
    balance_max_in_flight: int = 2
    migrate_on_start: bool = True
    reservation_ttl_default: timedelta = timedelta(minutes=15)
    reservation_ttl_max: timedelta = timedelta(days=7)
    shutdown_grace: timedelta = timedelta(seconds=5)
    stripe: StripeSettings = field(default_factory=lambda: StripeSettings())
    # Security and limits (README, Security).
    callers: tuple[Caller, ...] = ()
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    max_message_bytes: int = MIN_MESSAGE_BYTES
    statement_timeout_ms: int = 5000
    rate_limit_per_second: float = 0.0
    rate_limit_burst: int = 0
    # Observability (ledger_server/observability/). Empty: /metrics is not served (the
    # default of a Settings built in code, e.g. by tests; from_env defaults to localhost:9464).
    metrics_addr: str = ""
    health_check_interval: timedelta = timedelta(seconds=5)
    event_loop: str = DEFAULT_EVENT_LOOP  # server/event_loop.py

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        database_url = env.get("DATABASE_URL", "")
        if not database_url:
            raise ConfigError("DATABASE_URL is not set (make run starts an embedded PostgreSQL)")
        pool_min = env_int(env, "LEDGER_DB_POOL_MIN", 2, minimum=1)
        pool_max = env_int(env, "LEDGER_DB_POOL_MAX", 16, minimum=1)
        if pool_max < pool_min:
            raise ConfigError("LEDGER_DB_POOL_MAX must be at least LEDGER_DB_POOL_MIN")
        ttl_default = env_int(env, "LEDGER_RESERVATION_TTL_SECONDS", 900, minimum=1)
        ttl_max = env_int(env, "LEDGER_RESERVATION_TTL_MAX_SECONDS", 7 * 86400, minimum=1)
        if ttl_max < ttl_default:
            raise ConfigError(
                "LEDGER_RESERVATION_TTL_MAX_SECONDS must be at least LEDGER_RESERVATION_TTL_SECONDS"
            )
        event_loop = env.get("LEDGER_EVENT_LOOP", "") or DEFAULT_EVENT_LOOP
        if event_loop not in EVENT_LOOPS:
            raise ConfigError(
                f"LEDGER_EVENT_LOOP must be one of {', '.join(EVENT_LOOPS)}, got {event_loop!r}"
            )
        try:
            callers = load_callers(env)
        except SecurityError as exc:
            raise ConfigError(str(exc)) from None
        return cls(
            database_url=database_url,
            redis_url=env.get("REDIS_URL", ""),
            grpc_addr=env.get("LEDGER_GRPC_ADDR", "") or "localhost:50051",
            db_pool_min_size=pool_min,
            db_pool_max_size=pool_max,
            group_commit_max_in_flight=env_int(
                env, "LEDGER_GROUP_COMMIT_MAX_IN_FLIGHT", 2, minimum=1
            ),
            group_commit_open_lane_after=timedelta(
                milliseconds=env_int(env, "LEDGER_GROUP_COMMIT_OPEN_LANE_AFTER_MS", 100)
            ),
            balance_max_in_flight=env_int(env, "LEDGER_BALANCE_MAX_IN_FLIGHT", 2, minimum=1),
            migrate_on_start=env_bool(env, "LEDGER_MIGRATE_ON_START", True),
            reservation_ttl_default=timedelta(seconds=ttl_default),
            reservation_ttl_max=timedelta(seconds=ttl_max),
            shutdown_grace=timedelta(seconds=env_int(env, "LEDGER_SHUTDOWN_GRACE_SECONDS", 5)),
            stripe=StripeSettings.from_env(env),
            callers=callers,
            tls_cert_file=env.get("LEDGER_TLS_CERT_FILE", ""),
            tls_key_file=env.get("LEDGER_TLS_KEY_FILE", ""),
            tls_client_ca_file=env.get("LEDGER_TLS_CLIENT_CA_FILE", ""),
            max_message_bytes=env_int(
                env, "LEDGER_MAX_MESSAGE_BYTES", MIN_MESSAGE_BYTES, minimum=MIN_MESSAGE_BYTES
            ),
            statement_timeout_ms=env_int(env, "LEDGER_STATEMENT_TIMEOUT_MS", 5000),
            rate_limit_per_second=_float(env, "LEDGER_RATE_LIMIT_PER_SECOND", 0.0),
            rate_limit_burst=env_int(env, "LEDGER_RATE_LIMIT_BURST", 0),
            metrics_addr=env.get("LEDGER_METRICS_ADDR", DEFAULT_METRICS_ADDR),
            health_check_interval=timedelta(
                seconds=env_int(env, "LEDGER_HEALTH_CHECK_INTERVAL_SECONDS", 5, minimum=1)
            ),
            event_loop=event_loop,
        )
