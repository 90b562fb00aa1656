"""TLS for the gRPC server: LEDGER_TLS_CERT_FILE and LEDGER_TLS_KEY_FILE (PEM) turn it on;
LEDGER_TLS_CLIENT_CA_FILE also requires every client to present a certificate signed by that
CA (mutual TLS). The files are read once, at start-up."""

from __future__ import annotations

from pathlib import Path

import grpc

from ledger_server.security import SecurityError


def _read(path: str, variable: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SecurityError(f"cannot read {variable} {path}: {exc.strerror}") from None


def server_credentials(
    cert_file: str, key_file: str, client_ca_file: str = ""
) -> grpc.ServerCredentials | None:
    """The server's credentials; None (plaintext) when no certificate is configured."""
    if not cert_file and not key_file:
        if client_ca_file:
            raise SecurityError(
                "LEDGER_TLS_CLIENT_CA_FILE (mutual TLS) needs LEDGER_TLS_CERT_FILE and "
                "LEDGER_TLS_KEY_FILE"
            )
        return None
    if not cert_file or not key_file:
        raise SecurityError("set both LEDGER_TLS_CERT_FILE and LEDGER_TLS_KEY_FILE, or neither")
    cert = _read(cert_file, "LEDGER_TLS_CERT_FILE")
    key = _read(key_file, "LEDGER_TLS_KEY_FILE")
    client_ca = _read(client_ca_file, "LEDGER_TLS_CLIENT_CA_FILE") if client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
