"""Run-time settings of the credit sources: each has an environment-variable default
and can be changed through AdminService.UpdateSetting. Values live in PostgreSQL
(table settings), so every server and worker sees a change at once and the SQL
functions read them in the same transaction as the effect."""

from __future__ import annotations

import json
import logging
import os
import re
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from email import errors
from email.message import EmailMessage
from typing import Any

import psycopg
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb

from ledger.v1 import types_pb2
from ledger_server.config import FALSE_WORDS, TRUE_WORDS, ConfigError
from ledger_server.db.queries import query
from ledger_server.ledger.validation import MAX_AMOUNT_MICROS

Json = Any

log = logging.getLogger(__name__)


def _integral(value: Json) -> Json:
    """JSON numbers from google.protobuf.Value are floats: whole ones become ints."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integral(item) for item in value]
    if isinstance(value, dict):
        return {key: _integral(item) for key, item in value.items()}
    return value


def _amount_micros(value: Json) -> str | None:
    """An amount the ledger grants or compares: past MAX_AMOUNT_MICROS the SQL that reads it
    (a bigint) fails, or a second grant overflows the balance, on every later call."""
    if not 0 <= value <= MAX_AMOUNT_MICROS:
        return f"must be 0 to {MAX_AMOUNT_MICROS} micros"
    return None


def _rate_micros(value: Json) -> str | None:
    """A rate every recharge multiplies by: at 0 a recharge would buy nothing, a lot of 0
    credits the ledger refuses (every Recharge and recharge checkout would fail)."""
    if not 1 <= value <= MAX_AMOUNT_MICROS:
        return f"must be 1 to {MAX_AMOUNT_MICROS} micros"
    return None


def _amount_minor(value: Json) -> str | None:
    """A price in minor currency units, read as a bigint on every recharge."""
    if not 0 <= value <= MAX_AMOUNT_MICROS:
        return f"must be 0 to {MAX_AMOUNT_MICROS} minor units"
    return None


# A lot lives at most this long (validation.MAX_LOT_LIFETIME): beyond it an expiry passes
# the year 9999, which PostgreSQL stores but a protobuf Timestamp cannot carry.
MAX_LIFETIME_DAYS = 36_500


def _lifetime_days(value: Json) -> str | None:
    if not 0 <= value <= MAX_LIFETIME_DAYS:
        return f"must be 0 to {MAX_LIFETIME_DAYS} days"
    return None


MAX_GRACE_DAYS = 365


def _grace_days(value: Json) -> str | None:
    if not 0 <= value <= MAX_GRACE_DAYS:
        return f"must be 0 to {MAX_GRACE_DAYS} days"
    return None


def _timezone(value: Json) -> str | None:
    try:
        zoneinfo.ZoneInfo(value)
    # OSError: a name too long for a file name (the zone database is files)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        return "must be an IANA time zone such as UTC or Asia/Shanghai"
    return None


# No spaces or control characters (NUL cannot be stored), at most RFC 5321's 254 characters.
_EMAIL = re.compile(r"[^@\s\x00-\x1f\x7f\ud800-\udfff]+@[^@\s\x00-\x1f\x7f\ud800-\udfff]+")


def _email_or_empty(value: Json) -> str | None:
    if value == "" or (len(value) <= 254 and _EMAIL.fullmatch(value) and _writable(value)):
        return None
    return "must be an email address, or empty"


def _writable(address: str) -> bool:
    """Whether the alert email job can write the address as its To header: one address,
    the one given. Python's email library accepts many strings the pattern lets through
    ('ops@[', 'b@,"') and then fails building the header, on every attempt to send."""
    message = EmailMessage()
    try:
        message["To"] = address
        header = message["To"]
        written = [each.addr_spec for each in header.addresses]
    except (AttributeError, IndexError, TypeError, ValueError):
        return False
    # A non-ASCII local part needs a server with SMTPUTF8, which the job reports if absent.
    defects = [d for d in header.defects if not isinstance(d, errors.NonASCIILocalPartDefect)]
    return written == [address] and not defects


# Every credit source but the overdraft, whose lot must stay the last one used.
_PRIORITY_SOURCES = frozenset(
    name.removeprefix("CREDIT_SOURCE_").lower()
    for name, _ in types_pb2.CreditSource.items()
    if name not in ("CREDIT_SOURCE_UNSPECIFIED", "CREDIT_SOURCE_OVERDRAFT")
)
_MAX_PRIORITY = 32_766  # a smallint, below the overdraft lot's 32,767


def _priorities(value: Json) -> str | None:
    unknown = sorted(set(value) - _PRIORITY_SOURCES)
    if unknown:
        return f"names no credit source it may set: {', '.join(unknown)}"
    for source, priority in value.items():
        if isinstance(priority, bool) or not isinstance(priority, int):
            return f"{source}: must be an integer"
        if not 0 <= priority <= _MAX_PRIORITY:
            return f"{source}: must be 0 to {_MAX_PRIORITY}"
    return None


def _currency(value: Json) -> str | None:
    return None if re.fullmatch(r"[A-Z]{3}", value) else "must be ISO 4217"


def _bonus_tiers(value: Json) -> str | None:
    """Each bound is read as a bigint on every recharge: past it, every recharge would fail."""
    if not isinstance(value, list):
        return "must be a list of {min_minor, bonus_micros}"
    for tier in value:
        if (
            not isinstance(tier, dict)
            or set(tier) != {"min_minor", "bonus_micros"}
            or not all(isinstance(tier[k], int) and not isinstance(tier[k], bool) for k in tier)
            or not 0 <= tier["min_minor"] <= MAX_AMOUNT_MICROS
            or not 0 <= tier["bonus_micros"] <= MAX_AMOUNT_MICROS
        ):
            return (
                "each tier must be {min_minor, bonus_micros} with integers"
                f" from 0 to {MAX_AMOUNT_MICROS}"
            )
    # Two tiers from one amount: which bonus applies would be the database's choice.
    if len({tier["min_minor"] for tier in value}) != len(value):
        return "each tier's min_minor must differ from the others'"
    return None


@dataclass(frozen=True)
class SettingDefinition:
    key: str
    env_var: str
    kind: type
    default: Json
    description: str
    check: Callable[[Json], str | None] | None = None

    def parse_env(self, raw: str) -> Json:
        try:
            if self.kind is bool:
                lowered = raw.strip().lower()
                if lowered not in TRUE_WORDS + FALSE_WORDS:
                    raise ValueError(raw)
                return lowered in TRUE_WORDS
            if self.kind is int:
                return int(raw)
            if self.kind in (list, dict):
                parsed = json.loads(raw)
                if not isinstance(parsed, self.kind):
                    raise ValueError(raw)
                return parsed
            return raw
        except ValueError as exc:
            raise ConfigError(
                f"{self.env_var}: cannot read {raw!r} as {self.kind.__name__}"
            ) from exc

    def violation(self, value: Json) -> str | None:
        """Why value is not acceptable for this setting, or None."""
        if self.kind is int:
            # JSON numbers arrive as floats from google.protobuf.Value.
            if isinstance(value, bool) or not isinstance(value, int | float):
                return "must be an integer"
            if isinstance(value, float) and not value.is_integer():
                return "must be an integer"
        elif self.kind is bool:
            if not isinstance(value, bool):
                return "must be true or false"
        elif self.kind is str:
            if not isinstance(value, str):
                return "must be a string"
        elif self.kind is list and not isinstance(value, list):
            return "must be a list"
        elif self.kind is dict and not isinstance(value, dict):
            return "must be an object"
        return self.check(self.normalize(value)) if self.check else None

    def normalize(self, value: Json) -> Json:
        return _integral(value) if self.kind in (int, list, dict) else value


CREDIT = 1_000_000

DEFINITIONS: tuple[SettingDefinition, ...] = (
    SettingDefinition(
        "signup.enabled",
        "LEDGER_SIGNUP_BONUS_ENABLED",
        bool,
        True,
        "grant a sign-up bonus when an account opens",
    ),
    SettingDefinition(
        "signup.amount_micros",
        "LEDGER_SIGNUP_BONUS_MICROS",
        int,
        100 * CREDIT,
        "sign-up bonus",
        _amount_micros,
    ),
    SettingDefinition(
        "signup.expire_days",
        "LEDGER_SIGNUP_BONUS_EXPIRE_DAYS",
        int,
        30,
        "days until the sign-up bonus expires (at most 36,500); 0 = never",
        _lifetime_days,
    ),
    SettingDefinition(
        "daily.enabled",
        "LEDGER_DAILY_REWARD_ENABLED",
        bool,
        True,
        "let accounts claim a daily reward",
    ),
    SettingDefinition(
        "daily.amount_micros",
        "LEDGER_DAILY_REWARD_MICROS",
        int,
        10 * CREDIT,
        "daily reward",
        _amount_micros,
    ),
    SettingDefinition(
        "daily.expire_days",
        "LEDGER_DAILY_REWARD_EXPIRE_DAYS",
        int,
        0,
        "days until a daily reward expires (at most 36,500); 0 = never",
        _lifetime_days,
    ),
    SettingDefinition(
        "daily.automatic",
        "LEDGER_DAILY_REWARD_AUTOMATIC",
        bool,
        False,
        "the scheduler grants the daily reward to every account instead of waiting for a claim",
    ),
    SettingDefinition(
        "ledger.timezone",
        "LEDGER_TIMEZONE",
        str,
        "UTC",
        "time zone of the days (daily reward) and months (monthly allowance)",
        _timezone,
    ),
    SettingDefinition(
        "monthly_free.enabled",
        "LEDGER_MONTHLY_FREE_ENABLED",
        bool,
        False,
        "grant a free allowance each calendar month, expiring at the month's end",
    ),
    SettingDefinition(
        "monthly_free.amount_micros",
        "LEDGER_MONTHLY_FREE_MICROS",
        int,
        1500 * CREDIT,
        "monthly free allowance",
        _amount_micros,
    ),
    SettingDefinition(
        "purchase.allow_free_users",
        "LEDGER_ALLOW_FREE_USER_PURCHASE",
        bool,
        False,
        "let accounts without an active subscription buy credit packs",
    ),
    SettingDefinition(
        "subscription.renewal_grace_days",
        "LEDGER_SUBSCRIPTION_RENEWAL_GRACE_DAYS",
        int,
        14,
        "days a subscription stays the account's after its period ended while its renewal"
        " is being paid (set it to the payment provider's retry schedule); a deleted"
        " subscription ends at once",
        _grace_days,
    ),
    SettingDefinition(
        "recharge.currency",
        "LEDGER_RECHARGE_CURRENCY",
        str,
        "CNY",
        "currency of custom-amount recharges",
        _currency,
    ),
    SettingDefinition(
        "recharge.micros_per_minor_unit",
        "LEDGER_RECHARGE_MICROS_PER_MINOR_UNIT",
        int,
        10_000,
        "micro-credits per minor currency unit (10000: 1 credit per 1.00)",
        _rate_micros,
    ),
    SettingDefinition(
        "recharge.minimum_minor",
        "LEDGER_RECHARGE_MINIMUM_MINOR",
        int,
        3000,
        "smallest recharge, in minor units",
        _amount_minor,
    ),
    SettingDefinition(
        "recharge.bonus_tiers",
        "LEDGER_RECHARGE_BONUS_TIERS",
        list,
        [
            {"min_minor": 30_000, "bonus_micros": 30 * CREDIT},
            {"min_minor": 100_000, "bonus_micros": 150 * CREDIT},
        ],
        "bonus credits per recharge amount (JSON); the highest tier reached applies",
        _bonus_tiers,
    ),
    SettingDefinition(
        "referral.enabled",
        "LEDGER_REFERRAL_ENABLED",
        bool,
        True,
        "reward the inviter when an account signs up with a referral code",
    ),
    SettingDefinition(
        "referral.reward_micros",
        "LEDGER_REFERRAL_REWARD_MICROS",
        int,
        10 * CREDIT,
        "referral reward, paid into the inviter's reward balance",
        _amount_micros,
    ),
    SettingDefinition(
        "alerts.low_balance_threshold_micros",
        "LEDGER_LOW_BALANCE_THRESHOLD_MICROS",
        int,
        10 * CREDIT,
        "default low-balance threshold: a charge taking the balance below it raises one alert;"
        " 0 = no alerts",
        _amount_micros,
    ),
    SettingDefinition(
        "alerts.email_to",
        "LEDGER_ALERT_EMAIL_TO",
        str,
        "",
        "where low-balance alerts are emailed when the account has no address of its own;"
        " empty = record alerts without email",
        _email_or_empty,
    ),
    SettingDefinition(
        "consumption.priorities",
        "LEDGER_CONSUMPTION_PRIORITIES",
        dict,
        {},
        'consumption priority by credit source (JSON, e.g. {"promotion": 50}): lower goes'
        " first, then the nearest expiry; for lots granted after the change. A source not"
        " named keeps the ledger's own (daily 0, every other 100)",
        _priorities,
    ),
)

BY_KEY: dict[str, SettingDefinition] = {d.key: d for d in DEFINITIONS}


def environment_defaults(env: Mapping[str, str] | None = None) -> dict[str, Json]:
    """Each setting's default: its environment variable when set, else the built-in."""
    env = os.environ if env is None else env
    values: dict[str, Json] = {}
    for definition in DEFINITIONS:
        raw = env.get(definition.env_var)
        value = definition.default if raw in (None, "") else definition.parse_env(raw)
        violation = definition.violation(value)
        if violation is not None:
            raise ConfigError(f"{definition.env_var}: {violation}")
        values[definition.key] = definition.normalize(value)
    return values


def set_in_environment(env: Mapping[str, str] | None = None) -> frozenset[str]:
    """The settings whose environment variable is set (an empty one counts as unset)."""
    env = os.environ if env is None else env
    return frozenset(d.key for d in DEFINITIONS if env.get(d.env_var, "") != "")


def check_with_database(
    conn: psycopg.Connection[TupleRow], defaults: Mapping[str, Json], explicit: frozenset[str]
) -> None:
    """Raises ConfigError for a variable PostgreSQL refuses. Python's zone database knows
    names that PostgreSQL's does not (right/UTC, posixrules), and PostgreSQL's computes the
    days: such a zone failed the server's start with a database error, or was stored by a
    migration and failed every opening, claim and month start after. Nor does PostgreSQL
    read CET, EET, MET or WET as the zones of those names (ledger_put_setting refuses them)."""
    if "ledger.timezone" not in explicit:
        return  # the built-in UTC: no need to read the whole zone database
    zone = defaults["ledger.timezone"]
    row = conn.execute(query("timezone_known"), {"name": zone}).fetchone()
    if row is None or not row[0]:
        raise ConfigError(f"LEDGER_TIMEZONE: PostgreSQL does not know the time zone {zone!r}")
    if row[1]:  # CET, EET, MET, WET: ledger_zone_read_as_abbreviation (0002_sources.sql)
        raise ConfigError(
            f"LEDGER_TIMEZONE: PostgreSQL reads {zone} as a time-zone abbreviation, a fixed"
            " offset without the summer time of the zone of that name: name the zone by a"
            " city, such as Europe/Paris"
        )


def add_missing_defaults(
    conn: psycopg.Connection[TupleRow],
    defaults: Mapping[str, Json],
    now: datetime,
    reason: str = "added by a migration",
) -> None:
    """Writes the defaults of the settings the database lacks, and only those: run on
    migrating, before any server of the release starts (the functions read them)."""
    for key, value in defaults.items():
        conn.execute(
            query("add_missing_setting"),
            {"key": key, "value": Jsonb(value), "now": now, "reason": reason},
        )


def write_environment_defaults(
    conn: psycopg.Connection[TupleRow],
    defaults: Mapping[str, Json],
    explicit: frozenset[str],
    now: datetime,
) -> None:
    """A server's start: each setting whose variable is set (explicit) takes the variable's
    value unless an administrator changed it; every other setting keeps what is stored and
    gets its built-in default only if none is. Writing the built-in for an unset variable
    let any process started without the variables (a worker, another server) undo the
    configured value (the settings review: a burst worker put the sign-up bonus back to
    100 credits). Only the gRPC server and `migrate` write; workers only read."""
    with conn.transaction():
        rows = conn.execute(query("lock_settings"), {"keys": list(defaults)}).fetchall()
        stored = {str(key): (value, str(source)) for key, value, source in rows}
        for key, value in defaults.items():
            if key not in explicit:
                add_missing_defaults(conn, {key: value}, now, "added at a server's start")
                continue
            old_value, old_source = stored.get(key, (value, "environment"))
            # A stored built-in is most likely a process's without the variable (migrate,
            # usually): only another value set by a variable means the servers disagree.
            if old_source == "environment" and old_value not in (value, BY_KEY[key].default):
                log.warning(
                    "%s sets %s to %s, replacing %s that another process stored from its"
                    " environment: servers started with different values overwrite each"
                    " other's at every start",
                    BY_KEY[key].env_var,
                    key,
                    json.dumps(value),
                    json.dumps(old_value),
                )
            conn.execute(query("put_setting"), _environment_write(key, value, now))


def _environment_write(key: str, value: Json, now: datetime) -> dict[str, object]:
    return {
        "key": key,
        "value": Jsonb(value),
        "source": "environment",
        "actor": "environment",
        "reason": None,
        "now": now,
        "over_admin": False,
    }


def sync_environment_defaults(
    conn: psycopg.Connection[TupleRow], defaults: Mapping[str, Json], now: datetime
) -> None:
    """Writes these values into every setting no administrator has changed, whatever is
    stored: a known baseline for tests and benchmarks. No process calls it at start-up
    (write_environment_defaults: an unset variable must not undo another's value)."""
    with conn.transaction():
        for key, value in defaults.items():
            conn.execute(query("put_setting"), _environment_write(key, value, now))
