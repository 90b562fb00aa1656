"""Process settings of the workers and the scheduler, read from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from ledger_server.config import ConfigError, env_bool, env_int
from workers.queues import JOB_TIMEOUT_SECONDS

# The most an SMTP session may take: RQ's job time-out less time to record the attempt.
MAX_SMTP_SESSION_SECONDS = JOB_TIMEOUT_SECONDS - 30


@dataclass(frozen=True)
class SmtpSettings:
    host: str
    port: int
    sender: str
    username: str
    password: str
    starttls: bool
    # The CA certificates (PEM) STARTTLS verifies the server's with; empty: the system's.
    ca_file: str = ""
    # How long one attempt's whole session may take (workers/alerts.py: _Session).
    session_seconds: int = 120

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SmtpSettings:
        env = os.environ if env is None else env
        session_seconds = env_int(env, "LEDGER_SMTP_SESSION_SECONDS", 120, minimum=1)
        if session_seconds > MAX_SMTP_SESSION_SECONDS:
            raise ConfigError(
                f"LEDGER_SMTP_SESSION_SECONDS must be at most {MAX_SMTP_SESSION_SECONDS}"
                f" (the job time-out is {JOB_TIMEOUT_SECONDS} s), got {session_seconds}"
            )
        return cls(
            host=env.get("LEDGER_SMTP_HOST", "") or "localhost",
            port=env_int(env, "LEDGER_SMTP_PORT", 25, minimum=1),
            sender=env.get("LEDGER_SMTP_FROM", "") or "credit-ledger@localhost",
            username=env.get("LEDGER_SMTP_USERNAME", ""),
            password=env.get("LEDGER_SMTP_PASSWORD", ""),
            starttls=env_bool(env, "LEDGER_SMTP_STARTTLS", False),
            ca_file=env.get("LEDGER_SMTP_CA_FILE", ""),
            session_seconds=session_seconds,
        )


def sweep_interval_seconds(env: Mapping[str, str] | None = None) -> int:
    """How often the scheduler runs the sweepers (expiry, time-outs, stalled jobs)."""
    return env_int(
        os.environ if env is None else env, "LEDGER_SWEEP_INTERVAL_SECONDS", 60, minimum=1
    )


@dataclass(frozen=True)
class WebhookLimits:
    """What the webhook receiver gives a client: how long it waits on it (reading the
    request, or a whole body), and how many connections it serves at once (a thread each);
    a connection beyond them is answered 503 and closed, which Stripe retries. On stopping,
    the deliveries in progress get shutdown_grace_seconds to be stored and answered: the
    gRPC server's LEDGER_SHUTDOWN_GRACE_SECONDS, one setting for a deploy's stop of both."""

    timeout_seconds: float = 15
    max_connections: int = 64
    shutdown_grace_seconds: float = 5

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WebhookLimits:
        env = os.environ if env is None else env
        return cls(
            timeout_seconds=env_int(env, "LEDGER_WEBHOOK_TIMEOUT_SECONDS", 15, minimum=1),
            max_connections=env_int(env, "LEDGER_WEBHOOK_MAX_CONNECTIONS", 64, minimum=1),
            shutdown_grace_seconds=env_int(env, "LEDGER_SHUTDOWN_GRACE_SECONDS", 5),
        )
