"""Yes/no environment variables are read as the run-time settings read theirs: 1, true,
yes, on / 0, false, no, off in any case, anything else a configuration error naming the
variable. Two were read loosely (helper-150's review): `LEDGER_SMTP_STARTTLS=on` left
STARTTLS off (the relay's password went in plain text) and `LEDGER_MIGRATE_ON_START=off`
migrated (README's rolling deploy runs old servers with it off)."""

from __future__ import annotations

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
