"""Yes/no environment variables are read as the run-time settings read theirs: 1, true,
yes, on / 0, false, no, off in any case, anything else a configuration error naming the
variable. Two were read loosely (helper-150's review): `LEDGER_SMTP_STARTTLS=on` left
STARTTLS off (the relay's password went in plain text) and `LEDGER_MIGRATE_ON_START=off`
migrated (README's rolling deploy runs old servers with it off)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ledger_server.config import ConfigError, Settings
from workers.settings import SmtpSettings

BASE = {"DATABASE_URL": "postgresql://localhost/x"}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("", True), ("on", True), ("TRUE", True), (" yes ", True), ("1", True),
     ("off", False), ("False", False), ("no", False), ("0", False)],
)  # fmt: skip
def test_migrate_on_start_reads_the_settings_words(raw: str, expected: bool) -> None:
    settings = Settings.from_env({**BASE, "LEDGER_MIGRATE_ON_START": raw})
    assert settings.migrate_on_start is expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("", False), ("on", True), ("Yes", True), ("1", True), ("off", False), ("no", False)],
)
def test_smtp_starttls_reads_the_settings_words(raw: str, expected: bool) -> None:
    assert SmtpSettings.from_env({"LEDGER_SMTP_STARTTLS": raw}).starttls is expected


@pytest.mark.parametrize("raw", ["y", "n", "disabled", "maybe"])
def test_an_unreadable_yes_or_no_is_a_configuration_error(raw: str) -> None:
    with pytest.raises(ConfigError, match="LEDGER_MIGRATE_ON_START must be one of"):
        Settings.from_env({**BASE, "LEDGER_MIGRATE_ON_START": raw})
    with pytest.raises(ConfigError, match="LEDGER_SMTP_STARTTLS must be one of"):
        SmtpSettings.from_env({"LEDGER_SMTP_STARTTLS": raw})


def test_a_worker_with_unreadable_email_settings_does_not_start() -> None:
    """The alert emails' settings are read by each email's job: a worker started with
    LEDGER_SMTP_STARTTLS=y ran, and failed every alert email for good (helper-155's
    review). It stops at its start now, naming the variable."""
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")},
        "REDIS_URL": "redis://127.0.0.1:1/0",  # never reached
        "DATABASE_URL": "postgresql://127.0.0.1:1/none",
        "LEDGER_SMTP_STARTTLS": "y",
    }
    started = subprocess.run(
        [sys.executable, "-m", "workers", "worker", "--burst"],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
        check=False,
    )
    assert started.returncode == 2, started.stderr
    assert "configuration error: LEDGER_SMTP_STARTTLS must be one of" in started.stderr
