"""The low-balance alert email job. The alert row in PostgreSQL is the truth: this job
sends the email of a pending alert and records the outcome; the sweeper re-queues
alerts whose email is still pending, so a lost job or Redis loses no alert. Delivery
is at least once: a crash between sending and recording can send it twice."""

from __future__ import annotations

import smtplib
from datetime import UTC, datetime
from email.message import EmailMessage

from ledger_server.db.queries import query
from workers.db import connection
from workers.settings import SmtpSettings

CREDIT = 1_000_000


def _credits(micros: int) -> str:
    return f"{micros / CREDIT:,.6f}".rstrip("0").rstrip(".")


def send_low_balance_email(account_id: str, alert_id: int) -> str:
    with connection() as conn:
        row = conn.execute(
            query("alert_for_email"), {"account_id": account_id, "alert_id": alert_id}
        ).fetchone()
    if row is None:
        return "no such alert"
    email_to, status, threshold, balance, created_at = row
    if status != "pending":
        return f"already {status}"
    message = EmailMessage()
    smtp = SmtpSettings.from_env()
    message["From"] = smtp.sender
    message["To"] = email_to
    message["Subject"] = f"Low credit balance: {account_id}"
    message.set_content(
        f"The credit balance of account {account_id} fell to {_credits(balance)} credits,"
        f" below its alert threshold of {_credits(threshold)} credits"
        f" ({created_at:%Y-%m-%d %H:%M:%S} UTC).\n\n"
        "You will get no further alert until the balance has gone back above the threshold.\n"
    )
    try:
        with smtplib.SMTP(smtp.host, smtp.port, timeout=30) as client:
            if smtp.starttls:
                client.starttls()
            if smtp.username:
                client.login(smtp.username, smtp.password)
            client.send_message(message)
    except (OSError, smtplib.SMTPException) as error:
        with connection() as conn:
            conn.execute(
                query("record_alert_email"),
                {
                    "account_id": account_id,
                    "alert_id": alert_id,
                    "status": "pending",
                    "error": f"{type(error).__name__}: {error}",
                    "now": datetime.now(UTC),
                },
            )
        raise  # RQ retries with backoff, then keeps it in the failed registry
    with connection() as conn:
        conn.execute(
            query("record_alert_email"),
            {
                "account_id": account_id,
                "alert_id": alert_id,
                "status": "sent",
                "error": None,
                "now": datetime.now(UTC),
            },
        )
    return f"sent to {email_to}"
