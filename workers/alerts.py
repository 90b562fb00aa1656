"""The low-balance alert email job. The alert row in PostgreSQL is the truth: this job
sends the email of a pending alert and records the outcome; the sweeper re-queues
alerts whose email is still pending, so a lost job or Redis loses no alert. A job holds
a lock on its alert from before sending until the outcome is recorded, so a second job
of the same alert passes it over. Delivery is at least once: a crash between sending and
recording can send it twice.

A failed attempt is retried by RQ (FAST_ATTEMPTS of them in about 13 minutes). After
those, an alert whose last failure was transient (the server unreachable, too slow for the
session's time limit, or answering 4xx) stays pending, parked: the sweeper tries it again
once its last attempt is PARKED_RETRY_SECONDS old, up to MAX_ATTEMPTS in all (about two
days); the attempt that reaches MAX_ATTEMPTS fails it for good, and says so in the log. Any
other failure is permanent and fails it after the fast attempts: a 5xx answer such as a
rejected recipient, an address the email library cannot write, and a misconfiguration (the
SMTP host's name unknown to DNS, a certificate that does not verify, STARTTLS not offered).
Before, a transient failure was retried hourly for ever, and DNS and TLS failures were all
transient: a mistyped host name or a relay's bad certificate kept every alert pending, its
job re-queued every hour, with nothing in the data to say it would never be sent."""

from __future__ import annotations

import contextlib
import logging
import smtplib
import socket
import ssl
import threading
import time
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import TYPE_CHECKING, Any

import psycopg
from rq.timeouts import BaseTimeoutException

from ledger_server.db.queries import query
from workers.db import connection
from workers.settings import SmtpSettings

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

log = logging.getLogger(__name__)

CREDIT = 1_000_000
# RQ's first run and its first four retries (RETRY_INTERVALS: 10 + 30 + 120 + 600 s).
FAST_ATTEMPTS = 5
PARKED_RETRY_SECONDS = 3600
# The fast attempts and 48 hourly ones: an SMTP outage of two days. An alert's email later
# than that tells little, and one never sent must show as failed, not pending for ever.
MAX_ATTEMPTS = FAST_ATTEMPTS + 48
# The longest one wait on the SMTP server may take (to connect, for a reply); the session
# as a whole is bounded by SmtpSettings.session_seconds, and the waits shrink as it ends.
SMTP_READ_TIMEOUT_SECONDS = 30.0


def _credits(micros: int) -> str:
    return f"{micros / CREDIT:,.6f}".rstrip("0").rstrip(".")


def _message(
    account_id: str, email_to: str, threshold: int, balance: int, at: datetime
) -> EmailMessage:
    message = EmailMessage()
    message["From"] = SmtpSettings.from_env().sender
    message["To"] = email_to
    message["Subject"] = f"Low credit balance: {account_id}"
    message.set_content(
        f"The credit balance of account {account_id} fell to {_credits(balance)} credits,"
        f" below its alert threshold of {_credits(threshold)} credits"
        f" ({at:%Y-%m-%d %H:%M:%S} UTC).\n\n"
        "You will get no further alert until the balance has gone back above the threshold.\n"
    )
    return message


class _Session(smtplib.SMTP):
    """An SMTP session that ends at `deadline` (time.monotonic()) however slowly the server
    answers. smtplib's time-out bounds each wait on the socket alone, so a server answering
    every 25 s kept a send going for minutes, past RQ's job time-out (whose exception was
    then recorded as a permanent failure). Each command and reply gets the time left (at
    most SMTP_READ_TIMEOUT_SECONDS); a watchdog shuts the socket at the deadline for what
    that cannot bound (a reply dripping in byte by byte, a TLS handshake)."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        # The reply to the email's final "." gets the rest of the session, not the 30 s
        # of the other replies: the server has the whole email by then, and a relay that
        # scans it before answering took longer, the send counted as failed and the email
        # went again, up to MAX_ATTEMPTS times (helper-167). RFC 5321 4.5.3.2.6 allows
        # that reply 10 minutes.
        self._awaiting_final_reply = False
        super().__init__()  # connect() apart: the deadline is set before it runs

    def time_left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the SMTP session's time is up")
        return left if self._awaiting_final_reply else min(left, SMTP_READ_TIMEOUT_SECONDS)

    def connect(
        self, host: str = "localhost", port: int = 0, source_address: Any = None
    ) -> tuple[int, bytes]:
        self.timeout = self.time_left()  # smtplib connects with self.timeout
        # The name STARTTLS checks the certificate against: smtplib takes it from the
        # constructor's host only, which connects at once, before the deadline is set.
        self._host = host
        return super().connect(host, port, source_address)

    def _shrink(self) -> None:
        if self.sock is not None:
            self.sock.settimeout(self.time_left())

    def send(self, s: ReadableBuffer | str) -> None:
        self._shrink()
        super().send(s)
        # smtplib.data() sends the (dot-quoted) email and its terminator in one piece;
        # quoting leaves no other line of a single "." in it.
        self._awaiting_final_reply = isinstance(s, bytes) and s.endswith(b"\r\n.\r\n")

    def getreply(self) -> tuple[int, bytes]:
        self._shrink()
        try:
            return super().getreply()
        finally:
            self._awaiting_final_reply = False

    def cut(self) -> None:
        """The watchdog: wakes a wait on the socket, which then fails."""
        sock = self.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _send(message: EmailMessage) -> None:
    smtp = SmtpSettings.from_env()
    client = _Session(time.monotonic() + smtp.session_seconds)
    watchdog = threading.Timer(smtp.session_seconds, client.cut)
    watchdog.daemon = True
    watchdog.start()
    try:
        client.connect(smtp.host, smtp.port)
        if smtp.starttls:
            # Verified: smtplib's own default context checks neither the certificate nor
            # the host name, so anyone on the path could take the login and the email.
            client.starttls(context=_tls_context(smtp))
        if smtp.username:
            client.login(smtp.username, smtp.password)
        client.send_message(message)
        # The server has taken the email: a refused or lost QUIT (a server shutting down
        # answers 421) is no failure to send it, and a retry would send it again.
        with contextlib.suppress(OSError, smtplib.SMTPException):
            client.quit()
    except OSError as error:
        # The server's answers (4xx, 5xx) stand; a wait or a connection that failed as the
        # session's time ran out is the time limit, named so (transient).
        answered = isinstance(error, smtplib.SMTPException) and not isinstance(
            error, smtplib.SMTPServerDisconnected
        )
        if not answered and time.monotonic() >= client.deadline - 0.01:
            raise TimeoutError(
                f"the SMTP session took longer than {smtp.session_seconds:g} s"
                f" ({type(error).__name__}: {error})"
            ) from error
        raise
    finally:
        watchdog.cancel()
        client.close()


class SmtpMisconfigured(Exception):
    """The SMTP settings cannot work as they are (a LEDGER_SMTP_CA_FILE that cannot be
    read): permanent, not an OSError retried for two days."""


def _tls_context(smtp: SmtpSettings) -> ssl.SSLContext:
    """The system's trusted certificates, or LEDGER_SMTP_CA_FILE's (a private relay's CA);
    the certificate must name LEDGER_SMTP_HOST."""
    try:
        return ssl.create_default_context(cafile=smtp.ca_file or None)
    except ssl.SSLError:
        raise  # a file that is not PEM: permanent (transient())
    except OSError as error:
        raise SmtpMisconfigured(f"LEDGER_SMTP_CA_FILE cannot be read: {error}") from error


def send_low_balance_email(account_id: str, alert_id: int) -> str:
    ids = {"account_id": account_id, "alert_id": alert_id}
    with connection() as conn:  # autocommit: no transaction is open while SMTP talks
        claim = conn.execute(query("claim_alert_email"), ids).fetchone()
        if not (claim and claim[0]):
            return "being sent by another job"
        try:
            return _send_claimed(conn, ids)
        finally:
            conn.execute(query("release_alert_email"), ids)


def _send_claimed(conn: psycopg.Connection[Any], ids: dict[str, Any]) -> str:
    row = conn.execute(query("alert_for_email"), ids).fetchone()
    if row is None:
        return "no such alert"
    email_to, status, threshold, balance, created_at = row
    if status != "pending":
        return f"already {status}"
    failure: Exception | None = None
    try:
        _send(_message(ids["account_id"], email_to, threshold, balance, created_at))
    # Any error, not only the network's and SMTP's: the email library raises assorted ones
    # on an address it cannot write (one stored before the server checked for them), and
    # an attempt not recorded would be retried for ever instead of failing.
    except Exception as error:
        failure = error
    described = None if failure is None else f"{type(failure).__name__}: {failure}"
    recorded = conn.execute(
        query("record_alert_email"),
        {
            **ids,
            "status": "sent" if failure is None else "pending",
            "error": described,
            "transient": failure is not None and transient(failure),
            "fast_attempts": FAST_ATTEMPTS,
            "max_attempts": MAX_ATTEMPTS,
            "now": datetime.now(UTC),
        },
    ).fetchone()
    if recorded is not None and recorded[0] == "failed":
        log.error(
            "the low-balance alert email %s of account %s failed for good after %d attempts"
            " (no further attempt): %s",
            ids["alert_id"],
            ids["account_id"],
            recorded[1],
            described,
        )
    if failure is not None:
        raise failure  # RQ retries with backoff, then keeps it in the failed registry
    return f"sent to {email_to}"


# What getaddrinfo answers when DNS says the name does not exist (NXDOMAIN, or no address
# of it): the configured host is wrong, and stays wrong. A resolver that could not be
# reached or failed (EAI_AGAIN, EAI_FAIL) may answer later.
_NO_SUCH_NAME = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}
# TLS failures that are the connection's, not the configuration's: it was closed or reset
# during the handshake.
_TLS_CUT = (ssl.SSLEOFError, ssl.SSLSyscallError, ssl.SSLZeroReturnError)


def transient(error: Exception) -> bool:
    """Whether a later attempt may succeed: the server could not be reached, dropped the
    connection or timed out, or answered 4xx (RFC 5321's transient replies); RQ's job
    time-out, raised inside the send, is a time-out too (the session's own limit is meant to
    come first). A 5xx answer, SMTP errors of our own making (STARTTLS or AUTH not
    offered), a host name DNS says does not exist and a TLS handshake that fails on its
    terms (a certificate that does not verify or names another host, no protocol or cipher
    in common: ssl.SSLError but a connection cut) will recur until someone fixes them."""
    if isinstance(error, BaseTimeoutException):
        return True
    if isinstance(error, socket.gaierror):
        return error.errno not in _NO_SUCH_NAME
    if isinstance(error, ssl.SSLError):
        return isinstance(error, _TLS_CUT)
    if isinstance(error, smtplib.SMTPRecipientsRefused):
        return all(400 <= code < 500 for code, _ in error.recipients.values())
    if isinstance(error, smtplib.SMTPResponseException):
        return 400 <= error.smtp_code < 500
    if isinstance(error, smtplib.SMTPServerDisconnected):
        return True
    if isinstance(error, smtplib.SMTPException):
        return False
    return isinstance(error, OSError)  # refused, reset, unreachable, timed out
