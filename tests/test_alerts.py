"""Low-balance alerts (issue 5): a charge that crosses the threshold records one alert
and queues one email, read back here from a real local SMTP server; charges below the
threshold raise nothing more until the balance has gone back above it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.message import EmailMessage, Message
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from aiosmtpd.controller import Controller
from google.protobuf.duration_pb2 import Duration
from rq import Queue
from rq.job import Job, JobStatus
from rq.timeouts import JobTimeoutException

from ledger.v1 import admin_service_pb2 as admin_pb
from ledger.v1 import admin_service_pb2_grpc, ledger_service_pb2_grpc
from ledger.v1 import ledger_service_pb2 as pb
from ledger_server.clock import OffsetClock
from ledger_server.config import Settings
from ledger_server.db.migrate import migrate
from ledger_server.runtime_settings import environment_defaults, sync_environment_defaults
from support.certs import make_certs
from support.ledger import CREDIT, Ledger, expect_error, new_account, new_key
from support.server import ServerThread
from support.workers import run_burst_workers
from workers import alerts, sweepers
from workers import db as worker_db
from workers.queues import DEFAULT_QUEUE, REDIS_TIMEOUT_SECONDS, enqueue, redis_connection
from workers.settings import SmtpSettings


class Inbox:
    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(message_from_bytes(envelope.content))
        return "250 OK"

    def to(self, account: str) -> list[Message]:
        return [m for m in self.messages if account in str(m["Subject"])]


class ClosingInbox(Inbox):
    """Takes every message, then answers QUIT 421: a server shutting down."""

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        return "421 closing"


class HoldingInbox(Inbox):
    """Holds every message at DATA until released: a slow SMTP server."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived = threading.Event()
        self.release = threading.Event()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.arrived.set()
        await asyncio.to_thread(self.release.wait)
        return await super().handle_DATA(server, session, envelope)


class RefusingInbox(Inbox):
    """Answers every recipient with `reply`: 451, a server short of resources for now;
    550, a recipient it rejects."""

    def __init__(self, reply: str) -> None:
        super().__init__()
        self.reply = reply

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        return self.reply


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serve(inbox: Inbox) -> Iterator[tuple[Inbox, int]]:
    port = _free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, int]]:
    yield from _serve(Inbox())


@pytest.fixture
def slow_smtp() -> Iterator[tuple[HoldingInbox, int]]:
    inbox = HoldingInbox()
    try:
        yield from _serve(inbox)  # type: ignore[misc]
    finally:
        inbox.release.set()


def _alerts(admin: Any, account: str) -> list[admin_pb.LowBalanceAlert]:
    return list(
        admin.ListLowBalanceAlerts(admin_pb.ListLowBalanceAlertsRequest(account_id=account)).alerts
    )


def _crossed_account(ledger: Ledger, admin: Any, configure: Any, name: str) -> str:
    """An account whose balance has just crossed its threshold (30 to 15 under 20), its
    alert email queued to ops@example.com."""
    configure("alerts.email_to", "ops@example.com")
    account = new_account(name)
    ledger.grant(account, 30)
    admin.SetLowBalanceAlert(
        admin_pb.SetLowBalanceAlertRequest(
            account_id=account, threshold_micros=20 * CREDIT, idempotency_key=new_key()
        )
    )
    ledger.consume(account, 15 * CREDIT)
    return account


def _alert_job_queued(redis_url: str, alert_id: int | str) -> None:
    """Waits for the email job of an alert a call raised: the server queues it in the
    background, after answering the call (ledger_server/server/alert_emails.py)."""
    redis = redis_connection(redis_url)
    for _ in range(200):
        if redis.exists(f"rq:job:alert-email-{alert_id}"):
            return
        time.sleep(0.05)
    raise AssertionError(f"the email job of alert {alert_id} was never queued")


@pytest.mark.parametrize(
    "email",
    [
        "owner\x00@example.com",
        "owner@example.com\r\nBcc: all@example.com",
        "no-at-sign",
        # Python's email library cannot write these as a To header: every send would fail.
        "ops@[",
        'b@,"',
        "ops@example.com,other@example.com",
    ],
)
def test_an_alert_address_that_is_not_one_is_refused_by_field(admin: Any, email: str) -> None:
    account = new_account("bad-email")
    expect_error(
        lambda: admin.SetLowBalanceAlert(
            admin_pb.SetLowBalanceAlertRequest(
                account_id=account,
                threshold_micros=20 * CREDIT,
                email=email,
                idempotency_key=new_key(),
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FIELD",
        "email",
    )
    expect_error(lambda: _alerts(admin, account), grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")


def test_the_alerts_of_an_account_that_does_not_exist_are_not_found(
    ledger: Ledger, admin: Any
) -> None:
    """As ListLots and ListTransactions answer: not an empty list, which reads as "no
    alerts yet" for a mistyped id."""
    missing = new_account("no-such")
    alerts_error = expect_error(
        lambda: _alerts(admin, missing), grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND"
    )
    lots_error = expect_error(
        lambda: ledger.stub.ListLots(pb.ListLotsRequest(account_id=missing)),
        grpc.StatusCode.NOT_FOUND,
        "ACCOUNT_NOT_FOUND",
    )
    assert dict(alerts_error.metadata) == dict(lots_error.metadata)
    assert alerts_error.metadata["account_id"] == missing
    ledger.grant(missing, 1)
    assert _alerts(admin, missing) == []  # an account without alerts: an empty list


def test_credits_expiring_below_the_threshold_record_an_alert(ledger: Ledger, admin: Any) -> None:
    """DESIGN.md section 7: a crossing is alerted whatever lowered the balance; here a lot
    expiring (a month's allowance at month end, say)."""
    account = new_account("expiry-alert")
    ledger.grant(account, 5)
    ledger.grant(account, 30, expires_in=Duration(seconds=1))
    admin.SetLowBalanceAlert(
        admin_pb.SetLowBalanceAlertRequest(
            account_id=account, threshold_micros=20 * CREDIT, idempotency_key=new_key()
        )
    )
    assert _alerts(admin, account) == []
    time.sleep(1.2)  # past the expiry; the next call on the account applies it
    assert ledger.balance(account).balance_micros == 5 * CREDIT
    [expiry] = ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_EXPIRY])
    [alert] = _alerts(admin, account)
    assert (alert.balance_micros, alert.transaction_id) == (5 * CREDIT, expiry.transaction_id)


def test_a_crossing_sends_one_email_and_records_one_alert(
    ledger: Ledger,
    admin: Any,
    configure: Any,
    smtp: tuple[Inbox, int],
    ledger_db_url: str,
    redis_url: str,
) -> None:
    inbox, port = smtp
    configure("alerts.email_to", "ops@example.com")
    account = new_account("low")
    ledger.grant(account, 30)
    set_alert = admin.SetLowBalanceAlert(
        admin_pb.SetLowBalanceAlertRequest(
            account_id=account, threshold_micros=20 * CREDIT, idempotency_key=new_key()
        )
    )
    assert set_alert.threshold_micros == 20 * CREDIT

    ledger.consume(account, 5 * CREDIT)  # 25: still above
    assert _alerts(admin, account) == []
    crossing = ledger.consume(account, 10 * CREDIT)  # 15: crosses 20
    for _ in range(10):  # below the threshold already: no new alert
        ledger.consume(account, CREDIT // 2)
    _alert_job_queued(redis_url, _alerts(admin, account)[0].alert_id)
    smtp_env = {"LEDGER_SMTP_HOST": "127.0.0.1", "LEDGER_SMTP_PORT": str(port)}
    run_burst_workers(ledger_db_url, redis_url, extra=smtp_env)

    [alert] = _alerts(admin, account)
    assert alert.transaction_id == crossing.transaction_id
    assert (alert.threshold_micros, alert.balance_micros) == (20 * CREDIT, 15 * CREDIT)
    assert alert.email_to == "ops@example.com"
    assert alert.email_status == admin_pb.ALERT_EMAIL_STATUS_SENT
    [email] = inbox.to(account)
    assert email["To"] == "ops@example.com"
    assert "15 credits" in email.get_payload()
    assert "20 credits" in email.get_payload()

    # Back above the threshold, then below again: the next alert, to the account's own address.
    admin.SetLowBalanceAlert(
        admin_pb.SetLowBalanceAlertRequest(
            account_id=account,
            threshold_micros=20 * CREDIT,
            email="owner@example.com",
            idempotency_key=new_key(),
        )
    )
    ledger.grant(account, 20)
    ledger.consume(account, 15 * CREDIT)
    _alert_job_queued(redis_url, _alerts(admin, account)[0].alert_id)
    run_burst_workers(ledger_db_url, redis_url, extra=smtp_env)
    assert len(_alerts(admin, account)) == 2
    assert [m["To"] for m in inbox.to(account)] == ["ops@example.com", "owner@example.com"]


def test_without_an_address_alerts_are_recorded_without_email(
    ledger: Ledger, admin: Any, configure: Any
) -> None:
    configure("alerts.email_to", "")
    configure("alerts.low_balance_threshold_micros", 8 * CREDIT)
    account = new_account("quiet")
    ledger.grant(account, 10)
    ledger.consume(account, 3 * CREDIT)
    [alert] = _alerts(admin, account)
    assert alert.email_status == admin_pb.ALERT_EMAIL_STATUS_SKIPPED
    assert alert.threshold_micros == 8 * CREDIT


def test_an_email_whose_job_was_lost_is_queued_again_by_the_sweeper(
    ledger: Ledger,
    admin: Any,
    configure: Any,
    smtp: tuple[Inbox, int],
    ledger_db_url: str,
    redis_url: str,
    clock: Any,
) -> None:
    inbox, port = smtp
    account = _crossed_account(ledger, admin, configure, "lost")
    _alert_job_queued(redis_url, _alerts(admin, account)[0].alert_id)
    redis_connection(redis_url).flushdb()  # the queued email job is gone
    job = enqueue(
        DEFAULT_QUEUE,
        sweepers.requeue_pending_alert_emails,
        0,
        clock.now().isoformat(),
        connection=redis_connection(redis_url),
    )
    smtp_env = {"LEDGER_SMTP_HOST": "127.0.0.1", "LEDGER_SMTP_PORT": str(port)}
    run_burst_workers(ledger_db_url, redis_url, extra=smtp_env)
    assert job.return_value() >= 1
    assert len(inbox.to(account)) == 1
    [alert] = _alerts(admin, account)
    assert alert.email_status == admin_pb.ALERT_EMAIL_STATUS_SENT
    with psycopg.connect(ledger_db_url) as conn:
        pending = conn.execute(
            "SELECT count(*) FROM low_balance_alerts "
            "WHERE account_id = %s AND email_status = 'pending'",
            (account,),
        ).fetchone()
    assert pending == (0,)


@pytest.fixture
def closing_smtp() -> Iterator[tuple[Inbox, int]]:
    yield from _serve(ClosingInbox())


def _send_attempts(account: str, alert_id: int, attempts: int) -> list[str]:
    """Runs the email job as RQ's retries would, each failure's error type."""
    failures = []
    for _ in range(attempts):
        try:
            alerts.send_low_balance_email(account, alert_id)
        except Exception as error:
            failures.append(type(error).__name__)
    return failures


def _email_outcome(ledger_db_url: str, account: str) -> tuple[str, int, str | None]:
    with psycopg.connect(ledger_db_url) as conn:
        row = conn.execute(
            "SELECT email_status, email_attempts, email_error FROM low_balance_alerts"
            " WHERE account_id = %s",
            (account,),
        ).fetchone()
    assert row is not None
    return row


def test_an_email_the_server_took_is_sent_once_though_its_quit_fails(
    ledger: Ledger,
    admin: Any,
    configure: Any,
    closing_smtp: tuple[Inbox, int],
    ledger_db_url: str,
    monkeypatch: Any,
) -> None:
    inbox, port = closing_smtp
    account = _crossed_account(ledger, admin, configure, "quit")
    [alert] = _alerts(admin, account)
    monkeypatch.setenv("DATABASE_URL", ledger_db_url)
    monkeypatch.setenv("LEDGER_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("LEDGER_SMTP_PORT", str(port))
    try:
        assert _send_attempts(account, alert.alert_id, 5) == []
    finally:
        worker_db.close()
    assert len(inbox.to(account)) == 1
    assert _email_outcome(ledger_db_url, account) == ("sent", 1, None)


def test_an_address_the_email_library_cannot_write_fails_after_five_attempts(
    ledger: Ledger,
    admin: Any,
    configure: Any,
    smtp: tuple[Inbox, int],
    ledger_db_url: str,
    monkeypatch: Any,
) -> None:
    """An address stored before the server refused such ones: each attempt is recorded,
    and the fifth fails the email for good (else RQ and the sweeper retry it for ever)."""
    inbox, port = smtp
    account = _crossed_account(ledger, admin, configure, "unwritable")
    [alert] = _alerts(admin, account)
    with psycopg.connect(ledger_db_url) as conn:
        conn.execute(
            "UPDATE low_balance_alerts SET email_to = 'ops@[' WHERE account_id = %s", (account,)
        )
    monkeypatch.setenv("DATABASE_URL", ledger_db_url)
    monkeypatch.setenv("LEDGER_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("LEDGER_SMTP_PORT", str(port))
    try:
        assert _send_attempts(account, alert.alert_id, 6) == ["AttributeError"] * 5
    finally:
        worker_db.close()
    status, attempts, error = _email_outcome(ledger_db_url, account)
    assert (status, attempts) == ("failed", 5)
    assert error is not None and error.startswith("AttributeError")
    assert inbox.to(account) == []


def test_an_address_the_smtp_server_rejects_fails_after_five_attempts(
    ledger: Ledger, admin: Any, configure: Any, ledger_db_url: str, monkeypatch: Any
) -> None:
    """A 5xx answer will come again: the email fails, and nothing retries it."""
    account = _crossed_account(ledger, admin, configure, "rejected")
    [alert] = _alerts(admin, account)
    monkeypatch.setenv("DATABASE_URL", ledger_db_url)
    monkeypatch.setenv("LEDGER_SMTP_HOST", "127.0.0.1")
    try:
        with contextlib.contextmanager(_serve)(RefusingInbox("550 5.1.1 no such user")) as (
            _,
            port,
        ):
            monkeypatch.setenv("LEDGER_SMTP_PORT", str(port))
            assert _send_attempts(account, alert.alert_id, 6) == ["SMTPRecipientsRefused"] * 5
    finally:
        worker_db.close()
    status, attempts, error = _email_outcome(ledger_db_url, account)
    assert (status, attempts) == ("failed", 5)
    assert error is not None and "no such user" in error


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (ConnectionRefusedError(111, "refused"), True),
        (ConnectionResetError(104, "reset"), True),
        (TimeoutError("timed out"), True),
        (smtplib.SMTPServerDisconnected("closed"), True),
        (smtplib.SMTPConnectError(421, b"busy"), True),
        (smtplib.SMTPDataError(451, b"try later"), True),
        (smtplib.SMTPRecipientsRefused({"a@b": (452, b"full")}), True),
        (smtplib.SMTPDataError(554, b"rejected"), False),
        (smtplib.SMTPSenderRefused(553, b"not allowed", "a@b"), False),
        (smtplib.SMTPRecipientsRefused({"a@b": (451, b"later"), "c@d": (550, b"no")}), False),
        (smtplib.SMTPNotSupportedError("STARTTLS extension not supported"), False),
        (AttributeError("an address the email library cannot write"), False),
        # DNS: the host's name does not exist (a mistyped LEDGER_SMTP_HOST) will recur; a
        # resolver that could not answer may answer later.
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), False),
        (socket.gaierror(socket.EAI_NODATA, "No address associated with hostname"), False),
        (socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"), True),
        (socket.gaierror(socket.EAI_FAIL, "Non-recoverable failure in name resolution"), True),
        # TLS: a certificate that does not verify, or no protocol in common, will recur; a
        # handshake cut off by the network may not.
        (ssl.SSLCertVerificationError(1, "certificate verify failed"), False),
        (ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"), False),
        (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), True),
        # RQ's job time-out raised inside the send: the server was slow, not refusing.
        (JobTimeoutException("Task exceeded maximum timeout value (180 seconds)"), True),
    ],
)
def test_which_failures_are_retried_hourly(error: Exception, transient: bool) -> None:
    assert alerts.transient(error) is transient


def test_a_ca_file_that_cannot_be_read_is_a_permanent_failure(tmp_path: Path) -> None:
    """A LEDGER_SMTP_CA_FILE that is not there raised FileNotFoundError, an OSError, which
    is transient: every alert was retried hourly for two days before it failed."""
    smtp = SmtpSettings(
        host="127.0.0.1", port=25, sender="a@b", username="", password="", starttls=True,
        ca_file=str(tmp_path / "missing-ca.pem"),
    )  # fmt: skip
    with pytest.raises(alerts.SmtpMisconfigured, match="LEDGER_SMTP_CA_FILE") as caught:
        alerts._tls_context(smtp)
    assert alerts.transient(caught.value) is False


@pytest.fixture
def tls_smtp(tmp_path: Path) -> Iterator[tuple[Inbox, int, Path]]:
    """An SMTP server offering STARTTLS with a certificate for 127.0.0.1 that a throw-away
    CA signed (no system trusts it); with the CA's file."""
    make_certs(tmp_path / "certs")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "certs" / "server.pem", tmp_path / "certs" / "server.key")
    inbox, port = Inbox(), _free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port, tls_context=context)
    controller.start()
    try:
        yield inbox, port, tmp_path / "certs" / "ca.pem"
    finally:
        controller.stop()


def test_tls_misconfiguration_fails_the_alert_after_five_attempts_and_is_logged(
    ledger: Ledger,
    admin: Any,
    configure: Any,
    tls_smtp: tuple[Inbox, int, Path],
    smtp: tuple[Inbox, int],
    ledger_db_url: str,
    monkeypatch: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """STARTTLS verified nothing (smtplib's default context): the login and the email went
    to whoever answered. Now a certificate no trusted CA signed is refused, a permanent
    failure (it recurs until someone fixes the relay or LEDGER_SMTP_CA_FILE): the alert is
    failed after RQ's five attempts and logged, rather than parked and retried hourly for
    ever as every TLS error was; so is STARTTLS that the server does not offer. With the
    relay's CA configured the email is sent over TLS."""
    tls_inbox, tls_port, ca_file = tls_smtp
    _, plain_port = smtp
    monkeypatch.setenv("DATABASE_URL", ledger_db_url)
    monkeypatch.setenv("LEDGER_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("LEDGER_SMTP_STARTTLS", "true")
    caplog.set_level(logging.ERROR, logger="workers.alerts")
    try:
        for name, port, error_type in (
            ("tls-unverified", tls_port, "SSLCertVerificationError"),
            ("tls-not-offered", plain_port, "SMTPNotSupportedError"),
        ):
            account = _crossed_account(ledger, admin, configure, name)
            [alert] = _alerts(admin, account)
            monkeypatch.setenv("LEDGER_SMTP_PORT", str(port))
            assert _send_attempts(account, alert.alert_id, 6) == [error_type] * 5
            status, attempts, error = _email_outcome(ledger_db_url, account)
            assert (status, attempts) == ("failed", 5), error
            assert error is not None and error.startswith(error_type), error
            [logged] = [r.getMessage() for r in caplog.records if account in r.getMessage()]
            assert f"alert email {alert.alert_id} of account {account} failed for good" in logged
        assert tls_inbox.messages == []

        monkeypatch.setenv("LEDGER_SMTP_PORT", str(tls_port))
        monkeypatch.setenv("LEDGER_SMTP_CA_FILE", str(ca_file))
        account = _crossed_account(ledger, admin, configure, "tls-verified")
        [alert] = _alerts(admin, account)
        assert _send_attempts(account, alert.alert_id, 1) == []
    finally:
        worker_db.close()
    assert _email_outcome(ledger_db_url, account) == ("sent", 1, None)
    assert len(tls_inbox.to(account)) == 1


def test_transient_failures_end_after_max_attempts_with_a_failed_alert(
    ledger: Ledger,
    admin: Any,
    configure: Any,
    ledger_db_url: str,
    redis_url: str,
    monkeypatch: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An alert whose SMTP server could not be reached was parked and retried hourly for
    as long as that lasted: with a relay gone for good (or a name that never resolves), for
    ever, one job a day per alert, and the alert pending in the data. Now the attempt that
    reaches MAX_ATTEMPTS fails it, logged, and the sweeper queues it no more."""
    account = _crossed_account(ledger, admin, configure, "smtp-gone")
    [alert] = _alerts(admin, account)
    with psycopg.connect(ledger_db_url, autocommit=True) as conn:
        # Its fast attempts and all but two of its hourly ones spent.
        row = conn.execute(
            "UPDATE low_balance_alerts SET email_attempts = %s, email_attempted_at = created_at"
            " WHERE account_id = %s RETURNING created_at",
            (alerts.MAX_ATTEMPTS - 2, account),
        ).fetchone()
    assert row is not None
    # Hours after the alert (the server's clock may be ahead of the workers' real time).
    later = (row[0] + timedelta(hours=3)).isoformat()
    monkeypatch.setenv("DATABASE_URL", ledger_db_url)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("LEDGER_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("LEDGER_SMTP_PORT", str(_free_port()))  # nothing listens: refused
    caplog.set_level(logging.ERROR, logger="workers.alerts")
    redis = redis_connection(redis_url)
    job_id = f"alert-email-{alert.alert_id}"

    def forget_job() -> None:
        Queue(DEFAULT_QUEUE, connection=redis).remove(job_id)
        redis.delete(f"rq:job:{job_id}")

    def swept() -> bool:
        """Whether the sweeper queues the alert (its job, lost, queued again)."""
        forget_job()
        sweepers.requeue_pending_alert_emails(60, later)
        return bool(redis.exists(f"rq:job:{job_id}"))

    def logged() -> list[str]:
        return [r.getMessage() for r in caplog.records if account in r.getMessage()]

    try:
        for attempts in (alerts.MAX_ATTEMPTS - 1, alerts.MAX_ATTEMPTS):
            assert swept()  # parked, due
            assert _send_attempts(account, alert.alert_id, 1) == ["ConnectionRefusedError"]
            if attempts < alerts.MAX_ATTEMPTS:
                assert _email_outcome(ledger_db_url, account)[:2] == ("pending", attempts)
                assert logged() == []
        status, attempts, error = _email_outcome(ledger_db_url, account)
        assert (status, attempts) == ("failed", alerts.MAX_ATTEMPTS), error
        assert error is not None and error.startswith("ConnectionRefusedError"), error
        [message] = logged()
        assert f"failed for good after {alerts.MAX_ATTEMPTS} attempts" in message
        assert not swept()
        assert [a.email_status for a in _alerts(admin, account)] == [
            admin_pb.ALERT_EMAIL_STATUS_FAILED
        ]
    finally:
        forget_job()
        worker_db.close()


def _alert_at(conn: psycopg.Connection[Any], account: str, at: datetime) -> int:
    """A crossing at `at` (30 credits to 5, under the default threshold of 10), its email
    job never queued."""
    conn.execute(
        "SELECT ledger_grant(%s, 'g', '\\x01', %s, 'purchase', NULL, 'main', '', '', NULL, %s)",
        (account, 30 * CREDIT, at),
    )
    charge = conn.execute(
        "SELECT ledger_consume(%s, 'c', '\\x02', %s, NULL, '', '', %s)", (account, 25 * CREDIT, at)
    ).fetchone()
    assert charge is not None
    return int(charge[0]["low_balance_alert_id"])


def test_an_smtp_outage_longer_than_the_fast_retries_is_retried_hourly_until_sent(
    fresh_database_url: str, redis_url: str, smtp: tuple[Inbox, int], monkeypatch: Any
) -> None:
    """README (alerts.email_to): each alert is emailed at least once. An outage outlasting
    RQ's retries (~13 minutes) left the alert failed for good; now it stays pending and the
    sweeper retries it hourly, one attempt each, passing it over until it is due so that
    the batch goes to newer alerts first. The workers' clock is real time: the sweeper is
    run with a later `as_of`, and the alerts are made in a database of their own (the
    session's server clock may have been moved ahead)."""
    migrate(fresh_database_url)
    start = datetime.now(UTC) - timedelta(minutes=5)
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        sync_environment_defaults(conn, environment_defaults(), start)
        for key, value in (("signup.enabled", "false"), ("alerts.email_to", '"ops@example.com"')):
            conn.execute(
                "SELECT ledger_put_setting(%s, %s, 'admin', 'test', 'outage', %s, true)",
                (key, value, start),
            )
        parked = _alert_at(conn, "outage-old", start + timedelta(minutes=1))
        fresh = _alert_at(conn, "outage-new", start + timedelta(minutes=2))
    inbox, up = smtp
    down = _free_port()  # nothing listens: connection refused
    redis = redis_connection(redis_url)
    for key, value in (
        ("DATABASE_URL", fresh_database_url),
        ("REDIS_URL", redis_url),
        ("LEDGER_SMTP_HOST", "127.0.0.1"),
        ("LEDGER_SMTP_PORT", str(down)),
    ):
        monkeypatch.setenv(key, value)

    def sweep(at: datetime, batch: int = 1000) -> set[str]:
        """The jobs a sweep at `at` queues (Redis flushed first: every job lost)."""
        redis.flushdb()
        sweepers.requeue_pending_alert_emails(60, at.isoformat(), batch)
        return {key.decode().removeprefix("rq:job:") for key in redis.keys("rq:job:*")}

    hour = timedelta(hours=1)
    try:
        # RQ's five fast attempts: the server refuses connections, then answers 451.
        failures = _send_attempts("outage-old", parked, 3)
        with contextlib.contextmanager(_serve)(RefusingInbox("451 4.3.0 try later")) as (_, port):
            monkeypatch.setenv("LEDGER_SMTP_PORT", str(port))
            failures += _send_attempts("outage-old", parked, 2)
        tried = datetime.now(UTC)
        assert failures == ["ConnectionRefusedError"] * 3 + ["SMTPRecipientsRefused"] * 2
        assert _email_outcome(fresh_database_url, "outage-old")[:2] == ("pending", 5)
        # Parked, not yet due: the newer alert (its job lost) has the batch.
        assert sweep(tried, batch=2) == {f"alert-email-{fresh}"}
        # Both due an hour later: the newer one first.
        assert sweep(tried + hour, batch=1) == {f"alert-email-{fresh}"}
        # An hourly attempt while SMTP is still down: one run, no fast retries.
        monkeypatch.setenv("LEDGER_SMTP_PORT", str(down))
        assert f"alert-email-{parked}" in sweep(tried + hour)
        run_burst_workers(fresh_database_url, redis_url)
        tried_again = datetime.now(UTC)
        assert Job.fetch(f"alert-email-{parked}", connection=redis).get_status() == (
            JobStatus.FAILED
        )
        assert _email_outcome(fresh_database_url, "outage-old")[:2] == ("pending", 6)
        # SMTP is back: the next hourly retry sends it, once.
        monkeypatch.setenv("LEDGER_SMTP_PORT", str(up))
        assert f"alert-email-{parked}" not in sweep(tried + hour)
        assert f"alert-email-{parked}" in sweep(tried_again + hour)
        run_burst_workers(fresh_database_url, redis_url)
    finally:
        worker_db.close()
    assert _email_outcome(fresh_database_url, "outage-old") == ("sent", 7, None)
    assert _email_outcome(fresh_database_url, "outage-new")[0] == "sent"
    assert [len(inbox.to(account)) for account in ("outage-old", "outage-new")] == [1, 1]
    assert sweep(tried_again + 3 * hour) == set()


def test_a_second_job_of_an_alert_being_sent_passes_it_over(
    ledger: Ledger,
    admin: Any,
    configure: Any,
    slow_smtp: tuple[HoldingInbox, int],
    ledger_db_url: str,
    monkeypatch: Any,
) -> None:
    """The sweeper re-queues an email whose job started long ago; if that job is still
    talking to a slow SMTP server, the new one must not send the email a second time."""
    inbox, port = slow_smtp
    account = _crossed_account(ledger, admin, configure, "slow")
    [alert] = _alerts(admin, account)
    monkeypatch.setenv("DATABASE_URL", ledger_db_url)
    monkeypatch.setenv("LEDGER_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("LEDGER_SMTP_PORT", str(port))
    answers: dict[str, str] = {}

    def job(name: str) -> None:
        answers[name] = alerts.send_low_balance_email(account, alert.alert_id)

    first = threading.Thread(target=job, args=("first",))
    second = threading.Thread(target=job, args=("second",))
    try:
        first.start()
        assert inbox.arrived.wait(30), "the first job never reached the SMTP server"
        with psycopg.connect(ledger_db_url) as conn:
            # No transaction stays open while SMTP talks (it would hold back vacuum, and an
            # idle-in-transaction time-out would lose the outcome of a sent email).
            idle = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND state LIKE 'idle in transaction%'"
            ).fetchone()
        assert idle == (0,)
        second.start()
        second.join(30)  # without the claim it would wait at DATA, beside the first
        assert not second.is_alive(), "the second job is sending the email too"
        inbox.release.set()
        first.join(30)
    finally:
        inbox.release.set()
        first.join()
        second.join()
        worker_db.close()
    assert answers == {"first": "sent to ops@example.com", "second": "being sent by another job"}
    assert len(inbox.to(account)) == 1
    [alert] = _alerts(admin, account)
    assert alert.email_status == admin_pb.ALERT_EMAIL_STATUS_SENT


class DrippingSmtp:
    """A reachable SMTP server that answers slowly, as a tarpit or an overloaded relay does:
    its greeting is `lines` lines, one every `delay` seconds (each well within smtplib's
    per-read time-out), then it answers every command at once, RCPT with `rcpt`."""

    def __init__(
        self, delay: float, lines: int, rcpt: bytes = b"250 ok", final_delay: float = 0.0
    ) -> None:
        self.delay, self.lines, self.rcpt = delay, lines, rcpt
        self.final_delay = final_delay  # before its answer to the email's final "."
        self.stopped = threading.Event()
        self.messages = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._connections.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            for line in range(self.lines - 1):
                if self.stopped.wait(self.delay):
                    return
                conn.sendall(b"220-slow greeting line %d\r\n" % line)
            conn.sendall(b"220 ready\r\n")
            reader = conn.makefile("rb")
            in_data = False
            while line_read := reader.readline():
                if in_data:
                    if line_read == b".\r\n":
                        in_data = False
                        self.messages += 1
                        if self.stopped.wait(self.final_delay):
                            return
                        conn.sendall(b"250 queued\r\n")
                    continue
                command = line_read[:4].upper()
                if command == b"RCPT":
                    conn.sendall(self.rcpt + b"\r\n")
                elif command == b"DATA":
                    in_data = True
                    conn.sendall(b"354 go on\r\n")
                elif command == b"QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                else:
                    conn.sendall(b"250 ok\r\n")

    def close(self) -> None:
        self.stopped.set()
        self._listener.close()
        for conn in self._connections:
            conn.close()


def test_a_relay_slow_to_take_the_email_is_waited_for_not_sent_to_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A relay that scans an email before its 250 took longer than the 30 s each reply
    gets: smtplib timed out, the failure was transient, and the email was sent again at
    every retry, up to 53 copies (helper-167). The reply to the final "." gets the rest of
    the session; the others keep their limit."""
    monkeypatch.setattr(alerts, "SMTP_READ_TIMEOUT_SECONDS", 0.5)
    server = DrippingSmtp(delay=0.0, lines=1, final_delay=1.5)
    monkeypatch.setenv("LEDGER_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("LEDGER_SMTP_PORT", str(server.port))
    monkeypatch.setenv("LEDGER_SMTP_SESSION_SECONDS", "10")
    message = EmailMessage()
    message["To"], message["Subject"] = "ops@example.com", "scanned slowly"
    message.set_content("a line\n.\nnot the end\n")
    try:
        alerts._send(message)
        assert server.messages == 1
        slow_greeting = DrippingSmtp(delay=1.5, lines=2)
        monkeypatch.setenv("LEDGER_SMTP_PORT", str(slow_greeting.port))
        try:
            with pytest.raises(OSError):
                alerts._send(message)
        finally:
            slow_greeting.close()
    finally:
        server.close()


def _fifth_attempt_by_a_worker(
    ledger_db_url: str,
    redis_url: str,
    account: str,
    alert_id: int | str,
    server: DrippingSmtp,
    session_seconds: int,
    job_timeout: int,
) -> tuple[tuple[str, int, str | None], float]:
    """The fifth (last fast) attempt of an alert's email, run by a real burst worker on
    `server`, the job's time-out `job_timeout` (RQ's 180 s at a test's scale). Returns the
    alert's email outcome and how long the worker took."""
    _alert_job_queued(redis_url, alert_id)
    redis = redis_connection(redis_url)
    redis.flushdb()  # the crossing's job: this test runs the attempt itself
    with psycopg.connect(ledger_db_url) as conn:
        conn.execute(
            "UPDATE low_balance_alerts SET email_attempts = 4, email_error = 'earlier'"
            " WHERE alert_id = %s",
            (alert_id,),
        )
    Queue(DEFAULT_QUEUE, connection=redis).enqueue(
        "workers.alerts.send_low_balance_email",
        account,
        alert_id,
        job_id=f"alert-email-{alert_id}",
        job_timeout=job_timeout,
    )
    env = {
        "LEDGER_SMTP_HOST": "127.0.0.1",
        "LEDGER_SMTP_PORT": str(server.port),
        "LEDGER_SMTP_SESSION_SECONDS": str(session_seconds),
    }
    started = time.monotonic()
    run_burst_workers(ledger_db_url, redis_url, extra=env)
    return _email_outcome(ledger_db_url, account), time.monotonic() - started


def test_an_smtp_server_too_slow_for_the_session_leaves_the_alert_pending(
    ledger: Ledger, admin: Any, configure: Any, ledger_db_url: str, redis_url: str
) -> None:
    """README (alerts.email_to): an alert whose server could not be reached stays pending
    until sent. A reachable server answering slowly (a line a second, each within the read
    time-out) kept the send going until RQ's job time-out, recorded as a permanent failure:
    the fifth attempt failed the alert for good. The session now ends at its own limit,
    well before the job's, and is a transient failure."""
    account = _crossed_account(ledger, admin, configure, "slow-smtp")
    [alert] = _alerts(admin, account)
    server = DrippingSmtp(delay=1.0, lines=1000)
    try:
        outcome, took = _fifth_attempt_by_a_worker(
            ledger_db_url, redis_url, account, alert.alert_id, server, 2, job_timeout=8
        )
    finally:
        server.close()
    status, attempts, error = outcome
    assert (status, attempts) == ("pending", 5), error
    assert error is not None and error.startswith(
        "TimeoutError: the SMTP session took longer than 2 s"
    ), error
    assert took < 8, "the attempt ran into the job's time-out"


def test_rqs_job_timeout_during_a_send_is_a_transient_failure(
    ledger: Ledger, admin: Any, configure: Any, ledger_db_url: str, redis_url: str
) -> None:
    """Should the job's time-out come first (a session limit set close to it, a slow
    database), the send it interrupts failed on a slow server: the alert stays pending."""
    account = _crossed_account(ledger, admin, configure, "job-timeout")
    [alert] = _alerts(admin, account)
    server = DrippingSmtp(delay=1.0, lines=1000)
    try:
        outcome, _ = _fifth_attempt_by_a_worker(
            ledger_db_url, redis_url, account, alert.alert_id, server, 60, job_timeout=3
        )
    finally:
        server.close()
    status, attempts, error = outcome
    assert (status, attempts) == ("pending", 5), error
    assert error is not None and error.startswith("JobTimeoutException"), error


def test_a_slow_smtp_server_that_rejects_the_recipient_still_fails_the_alert(
    ledger: Ledger, admin: Any, configure: Any, ledger_db_url: str, redis_url: str
) -> None:
    """Slow, but within the session's limit: its 5xx answer stands, a permanent failure."""
    account = _crossed_account(ledger, admin, configure, "slow-550")
    [alert] = _alerts(admin, account)
    server = DrippingSmtp(delay=0.3, lines=3, rcpt=b"550 5.1.1 no such user")
    try:
        outcome, _ = _fifth_attempt_by_a_worker(
            ledger_db_url, redis_url, account, alert.alert_id, server, 20, job_timeout=60
        )
    finally:
        server.close()
    status, attempts, error = outcome
    assert (status, attempts) == ("failed", 5), error
    assert error is not None and error.startswith("SMTPRecipientsRefused"), error
    assert server.messages == 0


class HungRedis:
    """A Redis that accepts connections and never answers (a stalled host, a full
    network buffer): every command waits for its time-out."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self._listener.getsockname()[1]}/0"
        self._connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._connections.append(conn)  # held open, never read nor answered

    def close(self) -> None:
        self._listener.close()
        for conn in self._connections:
            conn.close()


def test_a_crossing_charge_answers_at_once_while_redis_hangs(
    server_address: str,
    ledger_db_url: str,
    redis_url: str,
    clock: OffsetClock,
    monkeypatch: Any,
) -> None:
    """The charge answered only once its alert's email was queued: with Redis hung, after
    the Redis time-out (5 s), and a dozen crossings at once queued behind one another on
    the default executor (5 s, then 10 s), past clients' deadlines on charges PostgreSQL
    had committed. The email is queued in the background; the alert, pending in
    PostgreSQL, is queued by the sweeper."""
    hung = HungRedis()
    server = ServerThread(
        Settings(database_url=ledger_db_url, redis_url=hung.url, db_pool_max_size=16), clock
    ).start()
    channel = grpc.insecure_channel(server.address)
    try:
        ledger = Ledger(ledger_service_pb2_grpc.LedgerServiceStub(channel))
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        accounts = [new_account("hung-redis") for _ in range(12)]
        for account in accounts:
            ledger.grant(account, 30)
            admin.SetLowBalanceAlert(
                admin_pb.SetLowBalanceAlertRequest(
                    account_id=account,
                    threshold_micros=20 * CREDIT,
                    email="ops@example.com",
                    idempotency_key=new_key(),
                )
            )

        def crossing(account: str) -> float:
            started = time.monotonic()
            ledger.stub.Consume(
                pb.ConsumeRequest(
                    account_id=account, idempotency_key=new_key(), amount_micros=15 * CREDIT
                ),
                timeout=3 * REDIS_TIMEOUT_SECONDS,
            )
            return time.monotonic() - started

        assert crossing(accounts[0]) < 2, "a crossing waited on the hung Redis"
        with ThreadPoolExecutor(len(accounts) - 1) as pool:
            latencies = list(pool.map(crossing, accounts[1:]))
        assert max(latencies) < 2, sorted(latencies)
    finally:
        channel.close()
        server.stop()
        hung.close()
    with psycopg.connect(ledger_db_url) as conn:
        rows = conn.execute(
            "SELECT alert_id, email_status, email_attempts FROM low_balance_alerts"
            " WHERE account_id = ANY (%s)",
            (accounts,),
        ).fetchall()
    assert sorted((status, attempts) for _, status, attempts in rows) == [("pending", 0)] * 12
    # The sweeper's next run past the alerts' first minute queues their emails.
    monkeypatch.setenv("DATABASE_URL", ledger_db_url)
    monkeypatch.setenv("REDIS_URL", redis_url)
    redis_connection(redis_url).flushdb()
    try:
        sweepers.requeue_pending_alert_emails(60, (clock.now() + timedelta(seconds=61)).isoformat())
    finally:
        worker_db.close()
    redis = redis_connection(redis_url)
    assert all(redis.exists(f"rq:job:alert-email-{alert_id}") for alert_id, _, _ in rows)


def test_a_months_allowance_ending_as_the_next_begins_is_no_crossing(
    fresh_database_url: str,
) -> None:
    """Maintenance expires January's allowance and grants February's at the same moment:
    one check over both, so no alert; a lot expiring alone still raises one."""
    migrate(fresh_database_url)
    env = {"LEDGER_MONTHLY_FREE_ENABLED": "true", "LEDGER_SIGNUP_BONUS_ENABLED": "false"}
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        sync_environment_defaults(conn, environment_defaults(env), datetime.now(UTC))
        conn.execute(
            "SELECT ledger_create_account('monthly', 'k1', '\\x01', '', '2026-01-15 12:00+00')"
        )
        conn.execute(
            "UPDATE accounts SET low_balance_threshold_micros = 1000000000"
            " WHERE account_id = 'monthly'"
        )
        conn.execute("SELECT ledger_balance('monthly', '2026-02-01 00:00:01+00')")
        alerts = conn.execute(
            "SELECT count(*) FROM low_balance_alerts WHERE account_id = 'monthly'"
        ).fetchone()
        lots = conn.execute(
            "SELECT count(*) FROM lots WHERE account_id = 'monthly' AND source = 'monthly_free'"
        ).fetchone()
    assert lots == (2,)  # January's (expired) and February's
    assert alerts == (0,)


def test_a_hold_timed_out_at_the_months_end_raises_no_alert_as_the_allowance_renews(
    fresh_database_url: str,
) -> None:
    """The month's allowance ends as the next begins: no crossing. With a hold that timed
    out before the month's end, maintenance expired the old allowance and checked the low
    balance on its own, before the new one came: a false alert, and its email, every month
    for anyone with a hold left over (helper-62)."""
    migrate(fresh_database_url)
    opened = datetime(2030, 3, 10, tzinfo=UTC)
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        sync_environment_defaults(conn, environment_defaults(), opened)
        for key, value in (("monthly_free.enabled", "true"), ("signup.enabled", "false")):
            conn.execute(
                "SELECT ledger_put_setting(%s, %s, 'admin', 'test', 'month end', %s, true)",
                (key, value, opened),
            )
        held, plain = new_account("month-held"), new_account("month-plain")
        for account in (held, plain):
            conn.execute("SELECT ledger_open_account(%s, '', %s)", (account, opened))
        conn.execute(
            "SELECT ledger_reserve(%s, 'hold', '\\x01', %s, NULL::jsonb, %s, '', '', %s)",
            (held, 50 * CREDIT, datetime(2030, 3, 31, 23, tzinfo=UTC), opened),
        )
        renewed = datetime(2030, 4, 1, 0, 0, 1, tzinfo=UTC)
        for account in (held, plain):
            balance = conn.execute("SELECT ledger_balance(%s, %s)", (account, renewed)).fetchone()
            assert balance is not None and balance[0]["balance_micros"] == 1500 * CREDIT
        alerts_raised = conn.execute(
            "SELECT account_id FROM low_balance_alerts WHERE account_id = ANY (%s)",
            ([held, plain],),
        ).fetchall()
    assert alerts_raised == []
