"""Security (issue 8): per-caller bearer tokens with roles and account scopes, TLS and mutual
TLS, secure by default (loopback only without tokens; refusing to listen elsewhere), and
tokens never logged. Each test runs a server of its own (ServerThread) on the session database.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ledger.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    billing_service_pb2,
    billing_service_pb2_grpc,
    ledger_service_pb2_grpc,
    report_service_pb2,
    report_service_pb2_grpc,
    types_pb2,
)
from ledger.v1 import ledger_service_pb2 as pb
from ledger_client import TLS, Credentials, LedgerClient, RetryPolicy, Unauthenticated
from ledger_server.clock import OffsetClock
from ledger_server.config import ConfigError, Settings
from ledger_server.security import (
    SecurityError,
    check_listen_address,
    hash_token,
    is_loopback_peer,
)
from ledger_server.server.auth import RULES, loopback_only
from support.certs import make_certs
from support.ledger import CREDIT, expect_error, new_account, new_key
from support.secured import Callers, base_settings, make_callers, serving, status_code
from support.server import ServerThread
from support.server_process import ServerProcess

REPO = Path(__file__).resolve().parents[1]

CALLERS = make_callers(
    {"name": "ops-admin", "role": "admin"},
    {"name": "image-studio", "role": "service", "account_prefix": "studio:"},
    {"name": "any-service", "role": "service"},
    {"name": "billing-worker", "role": "worker"},
)


@pytest.fixture(scope="module")
def settings(ledger_db_url: str, redis_url: str) -> Settings:
    return base_settings(ledger_db_url, redis_url)


@pytest.fixture(scope="module")
def secured(settings: Settings, clock: OffsetClock) -> Iterator[str]:
    """The address of a server with CALLERS configured."""
    with serving(settings, clock, callers=CALLERS.callers) as server:
        yield server.address


@pytest.fixture(scope="module")
def channel(secured: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(secured) as channel:
        yield channel


def _as(name: str) -> tuple[tuple[str, str], ...]:
    return CALLERS.metadata(name)


def _open_account(channel: grpc.Channel, account_id: str, credits: int = 10) -> int:
    """Opens an account with ``credits`` (and any sign-up bonus) as the administrator;
    returns its balance."""
    reply = admin_service_pb2_grpc.AdminServiceStub(channel).GrantCredits(
        admin_service_pb2.GrantCreditsRequest(
            account_id=account_id,
            idempotency_key=new_key(),
            amount_micros=credits * CREDIT,
            reason="test",
        ),
        metadata=_as("ops-admin"),
    )
    return reply.balance.balance_micros


# --- must show: no token, a wrong role, a wrong scope ------------------------------------------


def test_a_call_without_a_valid_token_is_unauthenticated(channel: grpc.Channel) -> None:
    ledger = ledger_service_pb2_grpc.LedgerServiceStub(channel)
    request = pb.BalanceRequest(account_id=new_account())
    for metadata in [
        (),  # no token
        (("authorization", "Bearer not-a-configured-token"),),
        (("authorization", f"Basic {CALLERS.tokens['ops-admin']}"),),  # not a bearer token
        (("authorization", "Bearer "),),
    ]:
        expect_error(
            lambda metadata=metadata: ledger.Balance(request, metadata=metadata),
            grpc.StatusCode.UNAUTHENTICATED,
            "UNAUTHENTICATED",
        )
    admin = admin_service_pb2_grpc.AdminServiceStub(channel)
    expect_error(
        lambda: admin.ListSettings(admin_service_pb2.ListSettingsRequest()),
        grpc.StatusCode.UNAUTHENTICATED,
        "UNAUTHENTICATED",
    )


def test_a_service_token_on_an_admin_rpc_is_permission_denied(channel: grpc.Channel) -> None:
    admin = admin_service_pb2_grpc.AdminServiceStub(channel)
    account = new_account("studio:")
    for caller in ("image-studio", "any-service", "billing-worker"):
        info = expect_error(
            lambda caller=caller: admin.GrantCredits(
                admin_service_pb2.GrantCreditsRequest(
                    account_id=account,
                    idempotency_key=new_key(),
                    amount_micros=CREDIT,
                    reason="free money",
                ),
                metadata=_as(caller),
            ),
            grpc.StatusCode.PERMISSION_DENIED,
            "PERMISSION_DENIED",
        )
        assert info.metadata["caller"] == caller
    # LedgerService.Grant mints credits of any source: administrators only.
    ledger = ledger_service_pb2_grpc.LedgerServiceStub(channel)
    expect_error(
        lambda: ledger.Grant(
            pb.GrantRequest(
                account_id=account,
                idempotency_key=new_key(),
                amount_micros=CREDIT,
                source=types_pb2.CREDIT_SOURCE_PURCHASE,
            ),
            metadata=_as("image-studio"),
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_DENIED",
    )


def test_services_and_workers_read_the_rate_card_but_do_not_change_it(
    channel: grpc.Channel,
) -> None:
    """A product shows its users what each action costs: the prices and model multipliers
    are readable by services (scoped ones too) and workers; setting them is for
    administrators."""
    admin = admin_service_pb2_grpc.AdminServiceStub(channel)
    for caller in ("image-studio", "any-service", "billing-worker"):
        admin.ListPrices(admin_service_pb2.ListPricesRequest(), metadata=_as(caller))
        admin.ListModelMultipliers(
            admin_service_pb2.ListModelMultipliersRequest(), metadata=_as(caller)
        )
        expect_error(
            lambda caller=caller: admin.SetModelMultiplier(
                admin_service_pb2.SetModelMultiplierRequest(
                    multiplier=admin_service_pb2.ModelMultiplier(
                        model="gpt-test", multiplier_ppm=2_000_000
                    ),
                    idempotency_key=new_key(),
                ),
                metadata=_as(caller),
            ),
            grpc.StatusCode.PERMISSION_DENIED,
            "PERMISSION_DENIED",
        )


def test_a_service_outside_its_account_scope_is_permission_denied(channel: grpc.Channel) -> None:
    ledger = ledger_service_pb2_grpc.LedgerServiceStub(channel)
    reports = report_service_pb2_grpc.ReportServiceStub(channel)
    ours, theirs = new_account("studio:"), new_account("other:")
    opened = _open_account(channel, ours)
    theirs_opened = _open_account(channel, theirs)

    # Within its scope the service spends and reads.
    consumed = ledger.Consume(
        pb.ConsumeRequest(
            account_id=ours, idempotency_key=new_key(), amount_micros=CREDIT, feature="chat"
        ),
        metadata=_as("image-studio"),
    )
    assert consumed.balance.balance_micros == opened - CREDIT
    assert ledger.Balance(pb.BalanceRequest(account_id=ours), metadata=_as("image-studio"))

    spend = pb.ConsumeRequest(
        account_id=theirs, idempotency_key=new_key(), amount_micros=CREDIT, feature="chat"
    )
    for call in [
        lambda: ledger.Consume(spend, metadata=_as("image-studio")),
        lambda: ledger.Balance(pb.BalanceRequest(account_id=theirs), metadata=_as("image-studio")),
        lambda: ledger.CreateAccount(
            pb.CreateAccountRequest(account_id=new_account("other:"), idempotency_key=new_key()),
            metadata=_as("image-studio"),
        ),
        # Every account at once is outside any scope.
        lambda: reports.GetSummary(
            report_service_pb2.GetSummaryRequest(month="2026-03"), metadata=_as("image-studio")
        ),
        # ... nor every account's journal.
        lambda: reports.ListJournal(
            report_service_pb2.ListJournalRequest(), metadata=_as("image-studio")
        ),
    ]:
        info = expect_error(call, grpc.StatusCode.PERMISSION_DENIED, "ACCOUNT_OUT_OF_SCOPE")
        assert info.metadata["account_prefix"] == "studio:"
    assert ledger.Balance(pb.BalanceRequest(account_id=theirs), metadata=_as("ops-admin"))
    assert (
        ledger.Balance(pb.BalanceRequest(account_id=theirs), metadata=_as("ops-admin"))
    ).balance_micros == theirs_opened  # nothing was spent
    # A service without a scope reaches every account.
    ledger.Consume(spend, metadata=_as("any-service"))


def test_a_scoped_service_s_unparsable_request_is_invalid_not_out_of_scope(
    channel: grpc.Channel,
) -> None:
    """A body that does not parse names no account: the scoped caller is told the body is
    wrong (INVALID_ARGUMENT naming request), not that it reached outside its prefix."""
    balance = channel.unary_unary("/ledger.v1.LedgerService/Balance")
    info = expect_error(
        lambda: balance(b"\x0a\xff", metadata=_as("image-studio")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FIELD",
        "request",
    )
    assert "account_prefix" not in info.metadata


def test_a_scoped_service_cannot_reward_an_inviter_outside_its_scope(
    channel: grpc.Channel,
) -> None:
    """A referral code names its inviter: a scoped service opening its own accounts with
    another tenant's code would credit that tenant's account (helper-54, helper-55). To it
    the code is unknown, and an account it may see does not name a referrer it may not."""
    ledger = ledger_service_pb2_grpc.LedgerServiceStub(channel)
    theirs, ours = new_account("other:"), new_account("studio:")
    admin = _as("ops-admin")
    their_code = ledger.CreateAccount(
        pb.CreateAccountRequest(account_id=theirs, idempotency_key=new_key()), metadata=admin
    ).account.referral_code
    our_code = ledger.CreateAccount(
        pb.CreateAccountRequest(account_id=ours, idempotency_key=new_key()), metadata=admin
    ).account.referral_code

    invitee = new_account("studio:")
    opening = pb.CreateAccountRequest(
        account_id=invitee, idempotency_key=new_key(), referral_code=their_code
    )
    info = expect_error(
        lambda: ledger.CreateAccount(opening, metadata=_as("image-studio")),
        grpc.StatusCode.NOT_FOUND,
        "REFERRAL_CODE_NOT_FOUND",
    )
    assert info.metadata["referral_code"] == their_code
    assert (
        ledger.Balance(pb.BalanceRequest(account_id=theirs), metadata=admin)
    ).reward_balance_micros == 0
    expect_error(
        lambda: ledger.GetAccount(pb.GetAccountRequest(account_id=invitee), metadata=admin),
        grpc.StatusCode.NOT_FOUND,
        "ACCOUNT_NOT_FOUND",
    )

    # Its own tenant's code works.
    opened = ledger.CreateAccount(
        pb.CreateAccountRequest(
            account_id=invitee, idempotency_key=new_key(), referral_code=our_code
        ),
        metadata=_as("image-studio"),
    )
    assert opened.account.referred_by_account_id == ours
    assert (
        ledger.Balance(pb.BalanceRequest(account_id=ours), metadata=admin)
    ).reward_balance_micros > 0

    # An account the administrator referred across tenants names its referrer only to
    # callers that may see it.
    crossed = new_account("studio:")
    ledger.CreateAccount(
        pb.CreateAccountRequest(
            account_id=crossed, idempotency_key=new_key(), referral_code=their_code
        ),
        metadata=admin,
    )
    seen = pb.GetAccountRequest(account_id=crossed)
    assert ledger.GetAccount(seen, metadata=admin).account.referred_by_account_id == theirs
    assert (
        ledger.GetAccount(seen, metadata=_as("image-studio")).account.referred_by_account_id == ""
    )
    assert ledger.GetAccount(seen, metadata=_as("any-service")).account.referred_by_account_id == (
        theirs
    )


def test_an_admin_token_works_and_names_the_actor(channel: grpc.Channel) -> None:
    admin = admin_service_pb2_grpc.AdminServiceStub(channel)
    assert admin.ListSettings(admin_service_pb2.ListSettingsRequest(), metadata=_as("ops-admin"))
    account = new_account()
    admin.GrantCredits(
        admin_service_pb2.GrantCreditsRequest(
            account_id=account, idempotency_key=new_key(), amount_micros=CREDIT, reason="r"
        ),
        # With tokens the token's name is the actor: x-ledger-actor is ignored.
        metadata=(*_as("ops-admin"), ("x-ledger-actor", "somebody-else")),
    )
    ledger = ledger_service_pb2_grpc.LedgerServiceStub(channel)
    page = ledger.ListTransactions(
        pb.ListTransactionsRequest(account_id=account), metadata=_as("ops-admin")
    )
    actors = [t.actor for t in page.transactions]  # newest first (a sign-up bonus may follow)
    assert actors[0] == "ops-admin"
    assert "somebody-else" not in actors
    # ... and every other service.
    assert ledger.Balance(pb.BalanceRequest(account_id=account), metadata=_as("ops-admin"))
    billing = billing_service_pb2_grpc.BillingServiceStub(channel)
    billing.ListCreditPacks(billing_service_pb2.ListCreditPacksRequest(), metadata=_as("ops-admin"))


def test_a_ledger_grant_names_its_caller_as_the_actor(channel: grpc.Channel) -> None:
    """DESIGN.md section 5: grants are recorded with who made them, by LedgerService's
    Grant too (administrators only)."""
    account = new_account()
    ledger = ledger_service_pb2_grpc.LedgerServiceStub(channel)
    ledger.Grant(
        pb.GrantRequest(
            account_id=account,
            idempotency_key=new_key(),
            amount_micros=CREDIT,
            source=types_pb2.CREDIT_SOURCE_PROMOTION,
        ),
        metadata=_as("ops-admin"),
    )
    page = ledger.ListTransactions(
        pb.ListTransactionsRequest(account_id=account, kinds=[pb.TRANSACTION_KIND_GRANT]),
        metadata=_as("ops-admin"),
    )
    assert "ops-admin" in [t.actor for t in page.transactions]


def test_the_worker_role_bills_and_reads_but_does_not_spend(channel: grpc.Channel) -> None:
    account = new_account()
    _open_account(channel, account)
    billing = billing_service_pb2_grpc.BillingServiceStub(channel)
    ledger = ledger_service_pb2_grpc.LedgerServiceStub(channel)
    billing.ListCreditPacks(
        billing_service_pb2.ListCreditPacksRequest(), metadata=_as("billing-worker")
    )
    ledger.Balance(pb.BalanceRequest(account_id=account), metadata=_as("billing-worker"))
    expect_error(
        lambda: ledger.Consume(
            pb.ConsumeRequest(
                account_id=account, idempotency_key=new_key(), amount_micros=1, feature="x"
            ),
            metadata=_as("billing-worker"),
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_DENIED",
    )
    # And a service may not fulfil purchases (that is the worker's, after a payment).
    expect_error(
        lambda: billing.Recharge(
            billing_service_pb2.RechargeRequest(
                account_id=account, idempotency_key=new_key(), amount_minor=5000, currency="CNY"
            ),
            metadata=_as("any-service"),
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_DENIED",
    )


def test_health_and_reflection_need_no_token(channel: grpc.Channel) -> None:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert "ledger.v1.AdminService" in names


def test_every_rpc_has_a_rule() -> None:
    """A method missing from the table would be admin-only: make that a decision, not an
    accident."""
    for module in (
        admin_service_pb2,
        billing_service_pb2,
        pb,
        report_service_pb2,
    ):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                assert f"/{service.full_name}/{method.name}" in RULES


# --- TLS and mutual TLS -----------------------------------------------------------------------


@contextmanager
def _mutual_tls_server(
    settings: Settings, clock: OffsetClock, tmp_path: Path
) -> Iterator[tuple[Any, Any]]:
    """A server requiring client certificates signed by a new CA, with CALLERS; the CA's,
    the server's and a client's certificate and key written in tmp_path (ca.pem,
    server.pem/.key, client.pem/.key). Yields the server and the certificates."""
    certs = make_certs(tmp_path)
    files = {
        "server.pem": certs.server_cert,
        "server.key": certs.server_key,
        "ca.pem": certs.ca,
        "client.pem": certs.client_cert,
        "client.key": certs.client_key,
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with serving(
        settings,
        clock,
        callers=CALLERS.callers,
        tls_cert_file=str(tmp_path / "server.pem"),
        tls_key_file=str(tmp_path / "server.key"),
        tls_client_ca_file=str(tmp_path / "ca.pem"),
    ) as server:
        yield server, certs


def test_mutual_tls_refuses_a_client_without_a_certificate(
    settings: Settings, clock: OffsetClock, tmp_path: Path
) -> None:
    with _mutual_tls_server(settings, clock, tmp_path) as (server, certs):
        request = health_pb2.HealthCheckRequest()
        # No client certificate: the handshake fails, no call reaches a handler.
        without = grpc.ssl_channel_credentials(root_certificates=certs.ca)
        with grpc.secure_channel(server.address, without) as channel:
            code = status_code(lambda: health_pb2_grpc.HealthStub(channel).Check(request))
        assert code == grpc.StatusCode.UNAVAILABLE
        # Plaintext: refused too.
        with grpc.insecure_channel(server.address) as channel:
            code = status_code(lambda: health_pb2_grpc.HealthStub(channel).Check(request))
        assert code == grpc.StatusCode.UNAVAILABLE

        # With a certificate signed by the CA: served.
        account = new_account("studio:")
        with_cert = grpc.ssl_channel_credentials(
            root_certificates=certs.ca,
            private_key=certs.client_key,
            certificate_chain=certs.client_cert,
        )
        with grpc.secure_channel(server.address, with_cert) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(request)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            opened = _open_account(channel, account)
        # The typed client, with a certificate and a service token.
        tls = TLS(
            root_certificates=certs.ca,
            client_certificate=certs.client_cert,
            client_private_key=certs.client_key,
        )
        credentials = Credentials(token=CALLERS.tokens["image-studio"], tls=tls)
        with LedgerClient(server.address, credentials=credentials) as client:
            consumed = client.consume(account, CREDIT, feature="chat")
            assert consumed.balance.balance_micros == opened - CREDIT
        # A certificate is not a caller: without a token still UNAUTHENTICATED.
        no_token = Credentials(tls=tls)
        with (
            LedgerClient(
                server.address, credentials=no_token, retry=RetryPolicy(max_attempts=1)
            ) as client,
            pytest.raises(Unauthenticated),
        ):
            client.balance(account)


def test_the_cli_presents_a_client_certificate_to_a_mutual_tls_server(
    settings: Settings, clock: OffsetClock, tmp_path: Path
) -> None:
    """The CLI read only LEDGER_TLS_CA_FILE, so against a server requiring client
    certificates every command failed 'is the ledger server running?' (helper-150's
    review). LEDGER_TLS_CLIENT_CERT_FILE and LEDGER_TLS_CLIENT_KEY_FILE go together."""
    with _mutual_tls_server(settings, clock, tmp_path) as (server, _):
        account = new_account()
        base = {
            **{k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")},
            "LEDGER_TOKEN": CALLERS.tokens["ops-admin"],
            "LEDGER_TLS_CA_FILE": str(tmp_path / "ca.pem"),
        }
        mutual = {
            "LEDGER_TLS_CLIENT_CERT_FILE": str(tmp_path / "client.pem"),
            "LEDGER_TLS_CLIENT_KEY_FILE": str(tmp_path / "client.key"),
        }

        def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "ledger_server.cli", "--address", server.address, *args],
                capture_output=True,
                text=True,
                env={**base, **env},
                timeout=60,
                check=False,
            )

        def balance() -> int:
            shown = cli(mutual, "balance", account, "--json")
            assert shown.returncode == 0, shown.stderr
            return int(json.loads(shown.stdout)["balance_micros"])

        # Two grants: the first also brings whatever sign-up bonus the settings give.
        first = cli(mutual, "grant", account, "2.5", "--reason", "first over mutual TLS")
        assert first.returncode == 0, first.stderr
        after_first = balance()
        second = cli(mutual, "grant", account, "2.5", "--reason", "second over mutual TLS")
        assert second.returncode == 0, second.stderr
        assert balance() - after_first == 2_500_000
        without = cli({}, "balance", account)
        assert without.returncode == 3, without.stderr  # the handshake fails
        half = cli({"LEDGER_TLS_CLIENT_CERT_FILE": str(tmp_path / "client.pem")}, "balance", "a")
        assert half.returncode == 2
        assert "LEDGER_TLS_CLIENT_KEY_FILE" in half.stderr
        missing = cli(
            {**mutual, "LEDGER_TLS_CLIENT_KEY_FILE": str(tmp_path / "none")}, "balance", "a"
        )
        assert missing.returncode == 2
        assert f"LEDGER_TLS_CLIENT_KEY_FILE: cannot read {tmp_path / 'none'}" in missing.stderr


def test_tls_without_client_certificates(
    settings: Settings, clock: OffsetClock, tmp_path: Path
) -> None:
    certs = make_certs(tmp_path)
    (tmp_path / "server.pem").write_bytes(certs.server_cert)
    (tmp_path / "server.key").write_bytes(certs.server_key)
    with serving(
        settings,
        clock,
        tls_cert_file=str(tmp_path / "server.pem"),
        tls_key_file=str(tmp_path / "server.key"),
    ) as server:
        credentials = grpc.ssl_channel_credentials(root_certificates=certs.ca)
        with grpc.secure_channel(server.address, credentials) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_tls_settings_must_be_complete(settings: Settings, clock: OffsetClock) -> None:
    for changes in [
        {"tls_cert_file": "/nonexistent/server.pem"},
        {"tls_client_ca_file": "/nonexistent/ca.pem"},
        {"tls_cert_file": "/nonexistent/server.pem", "tls_key_file": "/nonexistent/key"},
    ]:
        with pytest.raises(RuntimeError) as failed:
            ServerThread(replace(settings, **changes), clock).start()
        assert isinstance(failed.value.__cause__, SecurityError)


# --- secure by default ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _env(**values: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LEDGER_AUTH_TOKENS", "LEDGER_TLS_", "LEDGER_GRPC_ADDR"))
    }
    env.update(values)
    return env


def _bad_tls_files(tmp_path: Path) -> list[tuple[str, str, dict[str, str]]]:
    """(the variable to be named, its wrong file, the TLS files)."""
    certs = make_certs(tmp_path)
    files = {
        "server.pem": certs.server_cert,
        "server.key": certs.server_key,
        "client.key": certs.client_key,  # another certificate's key
        "garbage.pem": b"not a certificate\n",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    cert, key, other_key, garbage = (str(tmp_path / name) for name in files)
    encrypted = str(tmp_path / "encrypted.key")
    subprocess.run(
        ["openssl", "pkey", "-in", key, "-aes128", "-passout", "pass:secret", "-out", encrypted],
        check=True,
        capture_output=True,
    )
    return [
        ("LEDGER_TLS_CERT_FILE", garbage, {"cert": garbage, "key": key}),
        ("LEDGER_TLS_KEY_FILE", other_key, {"cert": cert, "key": other_key}),
        ("LEDGER_TLS_KEY_FILE", cert, {"cert": cert, "key": cert}),
        ("LEDGER_TLS_KEY_FILE", garbage, {"cert": cert, "key": garbage}),
        ("LEDGER_TLS_KEY_FILE", encrypted, {"cert": cert, "key": encrypted}),
        ("LEDGER_TLS_CLIENT_CA_FILE", garbage, {"cert": cert, "key": key, "client_ca": garbage}),
    ]


def test_tls_files_that_are_not_pem_or_do_not_match_are_refused_naming_them(
    settings: Settings, clock: OffsetClock, tmp_path: Path
) -> None:
    """gRPC checks the files only when it adds the port, and then fails with "Failed to bind
    to address": they are checked with the configuration, naming the variable and file."""
    for variable, wrong, files in _bad_tls_files(tmp_path):
        changes = {f"tls_{name}_file": path for name, path in files.items()}
        with pytest.raises(RuntimeError) as failed:
            ServerThread(replace(settings, **changes), clock).start()
        cause = failed.value.__cause__
        assert isinstance(cause, SecurityError), (variable, files, failed.value)
        assert str(cause).startswith(f"{variable} {wrong} "), (variable, str(cause))


def test_a_server_with_a_wrong_tls_file_exits_2_before_writing_anything(
    fresh_database_url: str, tmp_path: Path
) -> None:
    variable, wrong, files = _bad_tls_files(tmp_path)[1]  # a key of another certificate
    result = subprocess.run(
        [sys.executable, "-m", "ledger_server", "serve"],
        env=_env(
            DATABASE_URL=fresh_database_url,  # not migrated: serve would migrate it first
            LEDGER_GRPC_ADDR=f"127.0.0.1:{_free_port()}",
            LEDGER_TLS_CERT_FILE=files["cert"],
            LEDGER_TLS_KEY_FILE=files["key"],
        ),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"configuration error: {variable} {wrong} "), result.stderr
    assert "Traceback" not in result.stderr and "TLS on" not in result.stderr
    with psycopg.connect(fresh_database_url) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ).fetchone()
    assert tables == (0,)


def test_without_tokens_the_server_refuses_a_non_loopback_address(ledger_db_url: str) -> None:
    port = _free_port()
    result = subprocess.run(
        [sys.executable, "-m", "ledger_server", "serve"],
        env=_env(
            DATABASE_URL=ledger_db_url,
            LEDGER_GRPC_ADDR=f"0.0.0.0:{port}",
            LEDGER_MIGRATE_ON_START="false",
        ),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 2, result.stderr
    assert f"refusing to listen on 0.0.0.0:{port} without authentication" in result.stderr
    assert "LEDGER_AUTH_TOKENS_FILE" in result.stderr


def test_the_server_process_logs_its_security_posture_once(ledger_db_url: str) -> None:
    """`python -m ledger_server serve` checks the configuration before starting anything and
    running_server checks it again; the posture is logged once (helper-83: every line twice)."""
    unsecured = {
        key: ""
        for key in (
            "LEDGER_AUTH_TOKENS_FILE",
            "LEDGER_AUTH_TOKENS",
            "LEDGER_TLS_CERT_FILE",
            "LEDGER_TLS_KEY_FILE",
            "LEDGER_TLS_CLIENT_CA_FILE",
        )
    }
    server = ServerProcess(ledger_db_url, env=unsecured).start()
    server.stop()
    log = "".join(server.log)
    assert log.count("running UNAUTHENTICATED for local development") == 1, log
    assert log.count("TLS off (plaintext gRPC)") == 1, log


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("localhost:50051", True),
        ("127.0.0.1:50051", True),
        ("127.0.0.2:0", True),
        ("[::1]:50051", True),
        ("unix:/tmp/ledger.sock", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        (":50051", False),
        ("10.0.0.5:50051", False),
        ("ledger.internal:50051", False),
    ],
)
def test_which_addresses_need_tokens(address: str, allowed: bool) -> None:
    if allowed:
        check_listen_address(address, ())
    else:
        with pytest.raises(SecurityError, match="refusing to listen"):
            check_listen_address(address, ())
    check_listen_address(address, CALLERS.callers)  # with callers anything goes


class _Aborted(Exception):
    pass


class _FakeContext:
    def __init__(self, peer: str) -> None:
        self._peer = peer
        self.status: Any = None

    def peer(self) -> str:
        return self._peer

    async def abort_with_status(self, status: Any) -> None:
        self.status = status
        raise _Aborted


@pytest.mark.parametrize(
    ("peer", "served"),
    [
        ("ipv4:127.0.0.1:5555", True),
        ("ipv6:[::1]:5555", True),
        ("ipv6:%5B::1%5D:5555", True),  # as grpc reports it
        ("ipv6:%5B2001:db8::1%5D:5555", False),
        ("ipv6:[::ffff:127.0.0.1]:5555", True),
        ("unix:/tmp/x.sock", True),
        ("ipv4:10.1.2.3:5555", False),
        ("ipv6:[2001:db8::1]:5555", False),
    ],
)
def test_without_tokens_each_call_must_come_from_loopback(peer: str, served: bool) -> None:
    """Defence in depth behind the listen address: each unary call's peer is checked."""
    assert is_loopback_peer(peer) is served

    async def handler(request: Any, context: Any) -> str:
        return "served"

    wrapped = loopback_only(handler)
    context = _FakeContext(peer)
    try:
        result = asyncio.run(wrapped(None, context))
    except _Aborted:
        result = None
    if served:
        assert result == "served"
    else:
        assert result is None
        assert context.status.code == grpc.StatusCode.UNAUTHENTICATED
        details = dict(context.status.trailing_metadata)["grpc-status-details-bin"]
        assert b"LOOPBACK_ONLY" in status_pb2.Status.FromString(details).details[0].value


# --- configuration ----------------------------------------------------------------------------


def test_hash_token_cli() -> None:
    token = CALLERS.tokens["ops-admin"]
    result = subprocess.run(
        [sys.executable, "-m", "ledger_server", "hash-token"],
        input=token + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=_env(),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == hash_token(token)
    assert token not in result.stdout + result.stderr


def test_callers_file_json_and_toml(tmp_path: Path, ledger_db_url: str) -> None:
    digest = hash_token("a-long-random-token-for-the-configuration-test")
    toml_file = tmp_path / "callers.toml"
    toml_file.write_text(
        f'[[callers]]\nname = "studio"\nrole = "service"\ntoken_sha256 = "{digest}"\n'
        'account_prefix = "studio:"\n'
    )
    settings = Settings.from_env(
        {"DATABASE_URL": ledger_db_url, "LEDGER_AUTH_TOKENS_FILE": str(toml_file)}
    )
    [caller] = settings.callers
    assert (caller.name, caller.role.value, caller.account_prefix) == (
        "studio",
        "service",
        "studio:",
    )
    assert digest not in repr(caller)
    json_file = tmp_path / "callers.json"
    json_file.write_text(json.dumps([{"name": "ops", "role": "admin", "token_sha256": digest}]))
    settings = Settings.from_env(
        {"DATABASE_URL": ledger_db_url, "LEDGER_AUTH_TOKENS_FILE": str(json_file)}
    )
    assert [c.name for c in settings.callers] == ["ops"]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "a", "role": "admin", "token": "plaintext"}, "never the token"),
        ({"name": "a", "role": "root", "token_sha256": "0" * 64}, "role must be one of"),
        ({"name": "a", "role": "admin", "token_sha256": "abc"}, "64 hex digits"),
        (
            {"name": "a", "role": "admin", "token_sha256": "0" * 64, "account_prefix": "x"},
            "service role only",
        ),
        (
            # "studio" would admit "studio2:..." and "studiox:...", other tenants' accounts.
            {"name": "a", "role": "service", "token_sha256": "0" * 64, "account_prefix": "studio"},
            "must end with a separator",
        ),
        (
            {"name": "a", "role": "service", "token_sha256": "0" * 64, "account_prefix": "s t:"},
            "must be the start of an account id",
        ),
        ({"name": "", "role": "admin", "token_sha256": "0" * 64}, "name must be"),
    ],
)
def test_bad_caller_configuration_is_refused(
    entry: dict[str, str], message: str, ledger_db_url: str
) -> None:
    with pytest.raises(ConfigError, match=message) as refused:
        Settings.from_env(
            {"DATABASE_URL": ledger_db_url, "LEDGER_AUTH_TOKENS": json.dumps([entry])}
        )
    assert "plaintext" not in str(refused.value)


# --- tokens are never logged ------------------------------------------------------------------


def test_tokens_are_in_no_log_line(
    settings: Settings, clock: OffsetClock, caplog: pytest.LogCaptureFixture
) -> None:
    callers: Callers = make_callers(
        {"name": "logged-admin", "role": "admin"},
        {"name": "logged-service", "role": "service", "account_prefix": "studio:"},
    )
    wrong = "Bearer " + "x" * 43  # looks like a token, is none
    seen: list[str] = []
    caplog.set_level(logging.DEBUG)
    with (
        serving(settings, clock, callers=callers.callers) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        ledger = ledger_service_pb2_grpc.LedgerServiceStub(channel)
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        account = new_account("studio:")
        calls = [
            # valid tokens: success, domain errors, permission denied, scope
            lambda: ledger.CreateAccount(
                pb.CreateAccountRequest(account_id=account, idempotency_key=new_key()),
                metadata=callers.metadata("logged-service"),
            ),
            lambda: ledger.Consume(
                pb.ConsumeRequest(
                    account_id=account,
                    idempotency_key=new_key(),
                    amount_micros=10**12,
                    feature="chat",
                ),
                metadata=callers.metadata("logged-service"),
            ),
            lambda: ledger.Balance(
                pb.BalanceRequest(account_id="nobody"),
                metadata=callers.metadata("logged-admin"),
            ),
            lambda: admin.ListSettings(
                admin_service_pb2.ListSettingsRequest(),
                metadata=callers.metadata("logged-service"),
            ),
            lambda: ledger.Balance(
                pb.BalanceRequest(account_id="other:1"),
                metadata=callers.metadata("logged-service"),
            ),
            lambda: ledger.Balance(
                pb.BalanceRequest(account_id="bad id with spaces"),
                metadata=callers.metadata("logged-admin"),
            ),
            # invalid ones
            lambda: ledger.Balance(
                pb.BalanceRequest(account_id=account), metadata=(("authorization", wrong),)
            ),
            lambda: ledger.Balance(
                pb.BalanceRequest(account_id=account),
                metadata=(("authorization", callers.tokens["logged-admin"]),),  # no scheme
            ),
        ]
        for call in calls:
            try:
                call()
            except grpc.RpcError as error:
                seen.append(f"{error.details()} {error.trailing_metadata()}")  # type: ignore[attr-defined]
    secrets_ = [*callers.tokens.values(), wrong.removeprefix("Bearer ")]
    lines = [record.getMessage() for record in caplog.records]
    lines += [str(record.exc_text or "") for record in caplog.records]
    lines += [repr(record.__dict__) for record in caplog.records]
    assert any("authentication on" in line for line in lines)  # logs were captured
    assert len(seen) == 7
    for secret in secrets_:
        assert not [line for line in lines if secret in line]
        assert not [reply for reply in seen if secret in reply]
