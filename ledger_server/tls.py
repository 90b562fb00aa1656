"""TLS for the gRPC server: LEDGER_TLS_CERT_FILE and LEDGER_TLS_KEY_FILE (PEM) turn it on;
LEDGER_TLS_CLIENT_CA_FILE also requires every client to present a certificate signed by that
CA (mutual TLS). The files are read and checked once, at start-up."""

from __future__ import annotations

import ssl
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
    _check(cert_file, key_file, client_ca_file)
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


class _EncryptedKey(Exception):
    pass


def _no_password() -> str:
    # Called only for an encrypted key: without a callback OpenSSL would prompt on the
    # terminal, and gRPC cannot use an encrypted key anyway.
    raise _EncryptedKey


def _reason(exc: OSError, unparsable: str) -> str:
    # OpenSSL's reason ("KEY_VALUES_MISMATCH"); a file it cannot parse at all only gets
    # "[SSL] PEM lib (_ssl.c:3926)", and a file gone since it was read an OSError.
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str):
        return reason.lower().replace("_", " ")
    return exc.strerror if not isinstance(exc, ssl.SSLError) and exc.strerror else unparsable


def _check(cert_file: str, key_file: str, client_ca_file: str) -> None:
    """That the files hold what gRPC needs, so a wrong one is a configuration error naming
    its variable. gRPC checks them only when the port is added, after the server has
    started (and written its run-time settings), and then fails with "Failed to bind to
    address", which reads as a port conflict."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cafile=cert_file)
    except OSError as exc:
        raise SecurityError(
            f"LEDGER_TLS_CERT_FILE {cert_file} holds no PEM certificate"
            f" ({_reason(exc, 'not readable as PEM')})"
        ) from None
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_password)
    except _EncryptedKey:
        raise SecurityError(
            f"LEDGER_TLS_KEY_FILE {key_file} is encrypted; give the key unencrypted"
        ) from None
    except OSError as exc:
        raise SecurityError(
            f"LEDGER_TLS_KEY_FILE {key_file} is not the PEM private key of the certificate in "
            f"LEDGER_TLS_CERT_FILE {cert_file} ({_reason(exc, 'no PEM private key found')})"
        ) from None
    if client_ca_file:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=client_ca_file)
        except OSError as exc:
            raise SecurityError(
                f"LEDGER_TLS_CLIENT_CA_FILE {client_ca_file} holds no PEM certificate"
                f" ({_reason(exc, 'not readable as PEM')})"
            ) from None
