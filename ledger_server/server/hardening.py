"""What running_server needs from security and limits before it serves: the start-up checks
(secure by default) and the server credentials (TLS, mutual TLS). The per-call checks
(authentication, then rate limit and deadline) are composed into each method by
server/pipeline.py."""

from __future__ import annotations

import logging

import grpc

from ledger_server.config import Settings
from ledger_server.security import check_listen_address
from ledger_server.server.limits import RateLimiter
from ledger_server.tls import server_credentials

log = logging.getLogger(__name__)


def refuse_unsafe(settings: Settings, address: str) -> grpc.ServerCredentials | None:
    """Refuses (SecurityError) an unsafe configuration; returns the TLS credentials to listen
    with (None: plaintext). Logs nothing: `python -m ledger_server serve` calls it to refuse
    before starting anything, then running_server's startup_checks logs the posture, once
    (helper-83: both logged it)."""
    check_listen_address(address, settings.callers)
    return server_credentials(
        settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
    )


def startup_checks(settings: Settings, address: str) -> grpc.ServerCredentials | None:
    """Refuses (SecurityError) an unsafe configuration before anything starts and logs the
    security posture; returns the TLS credentials to listen with (None: plaintext)."""
    credentials = refuse_unsafe(settings, address)
    if settings.callers:
        log.info(
            "authentication on: %d caller(s): %s",
            len(settings.callers),
            ", ".join(f"{c.name} ({c.role.value})" for c in settings.callers),
        )
    else:
        log.warning(
            "running UNAUTHENTICATED for local development: no callers are configured "
            "(LEDGER_AUTH_TOKENS_FILE), so only loopback connections are accepted"
        )
    if credentials is None:
        log.info("TLS off (plaintext gRPC)")
    else:
        mutual = "on: client certificates required" if settings.tls_client_ca_file else "off"
        log.info("TLS on; mutual TLS %s", mutual)
    limiter = RateLimiter(settings.rate_limit_per_second, settings.rate_limit_burst)
    if limiter.enabled:
        log.info(
            "rate limit: %g calls/s per caller, burst %d (per server process)",
            limiter.rate,
            limiter.burst,
        )
    return credentials
