"""A throw-away certificate authority with a server and a client certificate, made with the
openssl command line (valid for 127.0.0.1 and localhost, for one day)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Certs:
    ca: bytes
    server_cert: bytes
    server_key: bytes
    client_cert: bytes
    client_key: bytes


def _openssl(directory: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)


def _issue(directory: Path, name: str, common_name: str) -> None:
    _openssl(
        directory,
        *("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
        *("-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={common_name}"),
    )
    (directory / f"{name}.ext").write_text(
        "subjectAltName = DNS:localhost, IP:127.0.0.1\n"
        "basicConstraints = CA:FALSE\n"
        "keyUsage = digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = serverAuth, clientAuth\n"
    )
    _openssl(
        directory,
        *("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key"),
        *("-CAcreateserial", "-days", "1", "-out", f"{name}.pem", "-extfile", f"{name}.ext"),
    )


def make_certs(directory: Path) -> Certs:
    directory.mkdir(parents=True, exist_ok=True)
    _openssl(
        directory,
        *("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
        *("-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=test-ca"),
    )
    _issue(directory, "server", "ledger-server")
    _issue(directory, "client", "image-studio")

    def read(name: str) -> bytes:
        return (directory / name).read_bytes()

    return Certs(
        ca=read("ca.pem"),
        server_cert=read("server.pem"),
        server_key=read("server.key"),
        client_cert=read("client.pem"),
        client_key=read("client.key"),
    )
