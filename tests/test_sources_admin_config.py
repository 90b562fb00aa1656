"""AdminService: run-time settings with their audit trail, admin grants and adjustments."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf import json_format, struct_pb2
from redis import Redis

from ledger.v1 import admin_service_pb2 as admin_pb
from ledger.v1 import admin_service_pb2_grpc, ledger_service_pb2_grpc, types_pb2
from ledger.v1 import ledger_service_pb2 as pb
from ledger_server.audit import audit_database
from ledger_server.clock import OffsetClock
from ledger_server.config import Settings
from ledger_server.db.migrate import migrate
from support.ledger import CREDIT, Ledger, expect_error, new_account, new_key
from support.rq_workers import redis_db_url
from support.server import ServerThread
from support.sources import ACTOR, DAY, DEFAULT_SETTINGS, Sources, dt, py, value
from support.workers import run_burst_workers
from workers import db as worker_db

AuditCheck = Callable[[], None]
REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SETTINGS_REDIS_DB = 13  # the burst worker's queues: empty, none of the session's jobs


@pytest.fixture
def sources(stub: Any, admin: Any, billing: Any) -> Sources:
    return Sources(stub, admin, billing)


# --- settings -----------------------------------------------------------------------------------


def test_every_setting_is_listed_with_its_default(sources: Sources) -> None:
    settings = sources.settings()
    assert set(DEFAULT_SETTINGS) <= set(settings)
    for key, default in DEFAULT_SETTINGS.items():
        setting = settings[key]
        assert py(setting.default_value) == default, key
        assert setting.env_var.startswith("LEDGER_"), key
        assert setting.source in (
            admin_pb.SETTING_SOURCE_ENVIRONMENT,
            admin_pb.SETTING_SOURCE_ADMIN,
        ), key
        if key != "signup.enabled":  # the session baseline switches the bonus off
            assert py(setting.value) == default, key
    assert settings["signup.enabled"].env_var == "LEDGER_SIGNUP_BONUS_ENABLED"
    assert settings["signup.amount_micros"].env_var == "LEDGER_SIGNUP_BONUS_MICROS"
    assert settings["signup.expire_days"].env_var == "LEDGER_SIGNUP_BONUS_EXPIRE_DAYS"
    env_vars = [settings[key].env_var for key in DEFAULT_SETTINGS]
    assert len(set(env_vars)) == len(env_vars)


def test_every_setting_env_var_is_documented_in_the_readme(sources: Sources) -> None:
    readme = README.read_text(encoding="utf-8")
    missing = [s.env_var for s in sources.settings().values() if s.env_var not in readme]
    assert missing == []


def test_seed_000_config_change_takes_effect_on_the_next_grant_and_is_audited(
    sources: Sources,
    ledger: Ledger,
    configure: Any,
    clock: Any,
    assert_audit_clean: AuditCheck,
) -> None:
    configure.reset("signup.enabled")
    before = sources.create_account().signup_lot
    assert before.amount_micros == 100 * CREDIT

    key = "signup.amount_micros"
    reason = "spring promotion: 42 credits"
    try:
        changed = sources.update_setting(key, 42 * CREDIT, reason)
        assert py(changed.value) == 42 * CREDIT
        assert py(changed.default_value) == 100 * CREDIT
        assert changed.source == admin_pb.SETTING_SOURCE_ADMIN
        assert changed.updated_by == ACTOR
        assert abs(dt(changed.update_time) - clock.now()) < timedelta(seconds=30)

        # The very next sign-up gets the new amount: no restart.
        after = sources.create_account()
        assert after.signup_lot.amount_micros == 42 * CREDIT
        assert after.balance.balance_micros == 42 * CREDIT
        listed = sources.setting(key)
        assert (py(listed.value), listed.source, listed.updated_by) == (
            42 * CREDIT,
            admin_pb.SETTING_SOURCE_ADMIN,
            ACTOR,
        )

        # ... and the change is in the audit trail: who, when, old and new value, why.
        newest = sources.setting_changes(key)[0]
        assert newest.key == key
        assert py(newest.old_value) == 100 * CREDIT
        assert py(newest.new_value) == 42 * CREDIT
        assert newest.actor == ACTOR
        assert newest.reason == reason
        assert newest.source == admin_pb.SETTING_SOURCE_ADMIN
        assert abs(dt(newest.change_time) - clock.now()) < timedelta(seconds=30)
        assert newest.change_id
    finally:
        reset = sources.reset_setting(key, "promotion over")

    assert reset.source == admin_pb.SETTING_SOURCE_ENVIRONMENT
    assert py(reset.value) == 100 * CREDIT
    changes = sources.setting_changes(key)
    assert (py(changes[0].old_value), py(changes[0].new_value)) == (42 * CREDIT, 100 * CREDIT)
    assert changes[0].actor == ACTOR
    assert changes[0].reason == "promotion over"
    assert changes[1].change_id == newest.change_id  # newest first
    assert dt(changes[0].change_time) >= dt(changes[1].change_time)
    assert sources.create_account().signup_lot.amount_micros == 100 * CREDIT
    assert_audit_clean()


def test_change_history_can_be_listed_for_all_keys(sources: Sources, configure: Any) -> None:
    configure("daily.amount_micros", 11 * CREDIT)
    configure("referral.reward_micros", 12 * CREDIT)
    changes = sources.admin.ListSettingChanges(
        admin_pb.ListSettingChangesRequest(page_size=2)
    ).changes
    assert [c.key for c in changes] == ["referral.reward_micros", "daily.amount_micros"]


def _json(value: object) -> struct_pb2.Value:
    parsed = struct_pb2.Value()
    json_format.ParseDict(value, parsed)
    return parsed


def test_only_zone_names_postgresql_reads_as_an_abbreviation_of_another_offset_are_refused(
    ledger_db_url: str,
) -> None:
    """AT TIME ZONE reads CET, EET, MET and WET as fixed offsets; the zones of those names
    keep summer time. The other names that are abbreviations too mean the same either way,
    and the check leaves the session's own zone (UTC) as it was."""
    names = ["CET", "EET", "MET", "WET", "UTC", "GMT", "EST", "HST", "Europe/Paris", "Asia/Tokyo"]
    with psycopg.connect(ledger_db_url, autocommit=True) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        read_as_abbreviation = {
            name: conn.execute(
                "SELECT ledger_zone_read_as_abbreviation(%s, now())", (name,)
            ).fetchone()
            for name in names
        }
        assert conn.execute("SHOW TimeZone").fetchone() == ("UTC",)
    assert [name for name, (flag,) in read_as_abbreviation.items() if flag] == [  # type: ignore[misc]
        "CET",
        "EET",
        "MET",
        "WET",
    ]


@pytest.mark.parametrize(
    ("key", "wrong"),
    [
        ("signup.amount_micros", struct_pb2.Value(string_value="lots")),
        ("signup.enabled", struct_pb2.Value(number_value=1)),
        ("ledger.timezone", struct_pb2.Value(bool_value=True)),
        ("recharge.bonus_tiers", struct_pb2.Value(string_value="30000:30")),
        # Known to Python's zone database, not to PostgreSQL's (posixrules, too, is
        # unknown to the embedded server, but a PostgreSQL built on the system's tzdata,
        # as Debian's, knows it: the setting is then valid).
        ("ledger.timezone", struct_pb2.Value(string_value="right/UTC")),
        # Read by PostgreSQL as the abbreviation, a fixed UTC+1 without summer time
        # (helper-156's review): GMT, UTC and EST mean the same either way.
        ("ledger.timezone", struct_pb2.Value(string_value="CET")),
        ("ledger.timezone", struct_pb2.Value(string_value="WET")),
        # Expiries past the year 9999.
        ("signup.expire_days", struct_pb2.Value(number_value=3_000_000)),
        ("daily.expire_days", struct_pb2.Value(number_value=36_501)),
        # Amounts past bigint (or past what a balance can add up): every later sign-up,
        # referral or monthly allowance would fail.
        ("referral.reward_micros", struct_pb2.Value(number_value=1e19)),
        ("signup.amount_micros", struct_pb2.Value(number_value=5e18)),
        ("monthly_free.amount_micros", struct_pb2.Value(number_value=10**15 + 1)),
        # Read as bigints by every recharge's quote.
        ("recharge.minimum_minor", struct_pb2.Value(number_value=1e19)),
        ("recharge.bonus_tiers", _json([{"min_minor": 1e19, "bonus_micros": 0}])),
        ("recharge.bonus_tiers", _json([{"min_minor": 0, "bonus_micros": 1e19}])),
        ("recharge.bonus_tiers", _json([{"min_minor": True, "bonus_micros": 0}])),
        # Which bonus applies would be the database's choice.
        (
            "recharge.bonus_tiers",
            _json([{"min_minor": 500, "bonus_micros": 1}, {"min_minor": 500, "bonus_micros": 2}]),
        ),
        # A recharge would buy a lot of 0 credits, which the ledger refuses: every one fails.
        ("recharge.micros_per_minor_unit", struct_pb2.Value(number_value=0)),
        # Control characters cannot be stored (NUL) or sent (the rest).
        ("alerts.email_to", struct_pb2.Value(string_value="ops\x00@example.com")),
        ("alerts.email_to", struct_pb2.Value(string_value="ops@example.com\r\nBcc: x@y.z")),
        ("recharge.currency", struct_pb2.Value(string_value="ÅÅÅ")),
        # JSON has no NaN or infinity (protobuf's Value does).
        ("referral.reward_micros", struct_pb2.Value(number_value=float("nan"))),
        ("alerts.email_to", struct_pb2.Value(number_value=float("inf"))),
        ("recharge.bonus_tiers", _json([{"min_minor": 0, "bonus_micros": 0}, float("-inf")])),
        # Consumption priorities: known sources (not the overdraft, always last), smallints.
        ("consumption.priorities", _json({"no_such_source": 1})),
        ("consumption.priorities", _json({"overdraft": 1})),
        ("consumption.priorities", _json({"daily": 40_000})),
        ("consumption.priorities", _json({"daily": True})),
        ("consumption.priorities", _json([1, 2])),
        # Longer than a file name may be (the zone database is files).
        ("ledger.timezone", struct_pb2.Value(string_value="Europe/" + "x" * 300)),
    ],
)
def test_a_value_of_the_wrong_type_or_out_of_range_is_refused(
    sources: Sources, key: str, wrong: struct_pb2.Value
) -> None:
    before = sources.setting(key)
    history = sources.setting_changes(key)
    expect_error(
        lambda: sources.admin.UpdateSetting(
            admin_pb.UpdateSettingRequest(
                key=key, value=wrong, reason="typo", idempotency_key=new_key()
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FIELD",
        field="value",
    )
    assert sources.setting(key) == before
    assert sources.setting_changes(key) == history


def test_an_unknown_setting_is_not_found(sources: Sources) -> None:
    info = expect_error(
        lambda: sources.update_setting("no.such.setting", 1, "typo"),
        grpc.StatusCode.NOT_FOUND,
        "SETTING_NOT_FOUND",
    )
    assert info.metadata["setting"] == "no.such.setting"
    expect_error(
        lambda: sources.update_setting("", 1, "no key"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FIELD",
        "key",
    )


def test_a_setting_can_be_reset_to_its_environment_default(
    sources: Sources, configure: Any
) -> None:
    configure("daily.amount_micros", 5 * CREDIT)
    assert sources.setting("daily.amount_micros").source == admin_pb.SETTING_SOURCE_ADMIN
    reset = sources.reset_setting("daily.amount_micros")
    assert reset.source == admin_pb.SETTING_SOURCE_ENVIRONMENT
    assert py(reset.value) == py(reset.default_value) == 10 * CREDIT
    newest = sources.setting_changes("daily.amount_micros")[0]
    assert (py(newest.old_value), py(newest.new_value)) == (5 * CREDIT, 10 * CREDIT)
    assert newest.actor == ACTOR
    account = sources.create_account().account.account_id
    assert sources.claim_daily(account).lot.amount_micros == 10 * CREDIT


def test_a_structured_setting_round_trips(sources: Sources, configure: Any) -> None:
    tiers = [{"min_minor": 5000, "bonus_micros": 2 * CREDIT}]
    configure("recharge.bonus_tiers", tiers)
    assert py(sources.setting("recharge.bonus_tiers").value) == tiers
    assert value(tiers) == sources.setting("recharge.bonus_tiers").value


# --- admin grants and adjustments ---------------------------------------------------------------


def test_admin_grant_records_the_reason_and_the_admin(
    sources: Sources, ledger: Ledger, assert_audit_clean: AuditCheck
) -> None:
    account = sources.create_account().account.account_id
    key = new_key("admin-grant")
    granted = sources.grant_credits(
        account, 15 * CREDIT, "compensation for ticket #812", key=key, expires_in=10 * DAY
    )
    lot = granted.lot
    assert lot.source == types_pb2.CREDIT_SOURCE_ADMIN
    assert lot.amount_micros == lot.remaining_micros == 15 * CREDIT
    assert dt(lot.expires_at) == dt(lot.created_at) + 10 * DAY
    assert granted.balance.balance_micros == 15 * CREDIT

    (txn,) = ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_GRANT])
    assert txn.transaction_id == granted.transaction_id
    assert txn.actor == ACTOR
    assert txn.comment == "compensation for ticket #812"
    assert txn.amount_micros == 15 * CREDIT

    replay = sources.grant_credits(
        account, 15 * CREDIT, "compensation for ticket #812", key=key, expires_in=10 * DAY
    )
    assert replay.lot.lot_id == lot.lot_id
    assert ledger.balance(account).balance_micros == 15 * CREDIT
    assert_audit_clean()


def test_admin_grant_needs_a_reason(sources: Sources, ledger: Ledger) -> None:
    account = sources.create_account().account.account_id
    expect_error(
        lambda: sources.grant_credits(account, 15 * CREDIT, ""),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FIELD",
        field="reason",
    )
    assert ledger.lots(account, include_inactive=True) == []
    # The same grant through LedgerService.Grant names its reason in the comment.
    for blank in ("", "  "):
        expect_error(
            lambda blank=blank: ledger.grant(
                account, 15, source=types_pb2.CREDIT_SOURCE_ADMIN, comment=blank
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_FIELD",
            field="comment",
        )
    assert ledger.lots(account, include_inactive=True) == []
    granted = ledger.grant(account, 15, source=types_pb2.CREDIT_SOURCE_ADMIN, comment="goodwill")
    (txn,) = ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_GRANT])
    assert (txn.transaction_id, txn.comment) == (granted.transaction_id, "goodwill")


def test_adjustment_debits_in_consumption_order_and_records_the_admin(
    sources: Sources, ledger: Ledger, assert_audit_clean: AuditCheck
) -> None:
    account = sources.create_account().account.account_id
    daily = ledger.grant(account, 10, source=types_pb2.CREDIT_SOURCE_DAILY).lot
    permanent = ledger.grant(account, 20, source=types_pb2.CREDIT_SOURCE_PURCHASE).lot

    adjusted = sources.adjust(account, 15 * CREDIT, "chargeback on order 77")
    assert adjusted.balance.balance_micros == adjusted.balance.available_micros == 15 * CREDIT
    remaining = {
        lot.lot_id: lot.remaining_micros for lot in ledger.lots(account, include_inactive=True)
    }
    assert remaining == {daily.lot_id: 0, permanent.lot_id: 15 * CREDIT}

    (txn,) = ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_ADJUSTMENT])
    assert txn.transaction_id == adjusted.transaction_id
    assert txn.amount_micros == -15 * CREDIT
    assert txn.actor == ACTOR
    assert txn.comment == "chargeback on order 77"
    assert sum(p.amount_micros for p in txn.postings) == 0
    taken = {p.lot_id: p.amount_micros for p in txn.postings if p.lot_id}
    assert taken == {daily.lot_id: -10 * CREDIT, permanent.lot_id: -5 * CREDIT}
    assert_audit_clean()


def test_an_adjustment_above_the_available_credits_is_refused(
    sources: Sources, ledger: Ledger, assert_audit_clean: AuditCheck
) -> None:
    account = new_account()
    ledger.grant(account, 10)
    ledger.reserve(account, 4 * CREDIT)
    lots_before = ledger.lots(account, include_inactive=True)

    info = expect_error(
        lambda: sources.adjust(account, 7 * CREDIT, "too much"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "INSUFFICIENT_CREDITS",
    )
    assert int(info.metadata["available_micros"]) == 6 * CREDIT
    assert int(info.metadata["requested_micros"]) == 7 * CREDIT
    assert ledger.lots(account, include_inactive=True) == lots_before
    assert ledger.transactions(account, kinds=[pb.TRANSACTION_KIND_ADJUSTMENT]) == []
    balance = ledger.balance(account)
    assert (balance.balance_micros, balance.available_micros) == (10 * CREDIT, 6 * CREDIT)
    assert_audit_clean()


def test_an_adjustment_never_takes_reward_credits(
    sources: Sources, ledger: Ledger, assert_audit_clean: AuditCheck
) -> None:
    account = new_account()
    ledger.grant(account, 5)
    ledger.grant(
        account,
        50,
        source=types_pb2.CREDIT_SOURCE_REFERRAL,
        balance_kind=types_pb2.BALANCE_KIND_REWARD,
    )
    expect_error(
        lambda: sources.adjust(account, 6 * CREDIT, "more than main"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "INSUFFICIENT_CREDITS",
    )
    adjusted = sources.adjust(account, 5 * CREDIT, "all of main")
    assert adjusted.balance.balance_micros == 0
    assert adjusted.balance.reward_balance_micros == 50 * CREDIT
    assert_audit_clean()


@pytest.mark.parametrize("amount", [0, -5 * CREDIT])
def test_admin_amounts_must_be_positive(sources: Sources, amount: int) -> None:
    account = sources.create_account().account.account_id
    for call in (
        lambda: sources.grant_credits(account, amount, "bad amount"),
        lambda: sources.adjust(account, amount, "bad amount"),
    ):
        expect_error(call, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD", field="amount_micros")


def test_setting_changes_page_through_the_history(sources: Sources, configure: Any) -> None:
    for amount in (1, 2, 3):
        configure("daily.amount_micros", amount * CREDIT)
    first = sources.admin.ListSettingChanges(
        admin_pb.ListSettingChangesRequest(key="daily.amount_micros", page_size=2)
    )
    assert [py(c.new_value) for c in first.changes] == [3 * CREDIT, 2 * CREDIT]
    assert first.next_page_token
    second = sources.admin.ListSettingChanges(
        admin_pb.ListSettingChangesRequest(
            key="daily.amount_micros", page_size=2, page_token=first.next_page_token
        )
    )
    assert py(second.changes[0].new_value) == 1 * CREDIT
    seen = {c.change_id for c in first.changes} | {c.change_id for c in second.changes}
    assert len(seen) == len(first.changes) + len(second.changes)


# --- environment defaults and persistence -------------------------------------------------------


def _listed(admin: Any, metadata: Any) -> dict[str, admin_pb.Setting]:
    response = admin.ListSettings(admin_pb.ListSettingsRequest(), metadata=metadata)
    return {setting.key: setting for setting in response.settings}


def _serve(database_url: str) -> ServerThread:
    settings = Settings(database_url=database_url, db_pool_min_size=1, db_pool_max_size=4)
    return ServerThread(settings, OffsetClock()).start()


def test_environment_variables_give_the_defaults_and_admin_changes_survive_a_restart(
    fresh_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    migrate(fresh_database_url)
    metadata = (("x-ledger-actor", "ops-admin"),)
    monkeypatch.setenv("LEDGER_SIGNUP_BONUS_MICROS", "5000000")
    monkeypatch.setenv("LEDGER_SIGNUP_BONUS_EXPIRE_DAYS", "0")
    server = _serve(fresh_database_url)
    try:
        with grpc.insecure_channel(server.address) as channel:
            admin = admin_service_pb2_grpc.AdminServiceStub(channel)
            ledger_stub = ledger_service_pb2_grpc.LedgerServiceStub(channel)
            listed = _listed(admin, metadata)
            amount = listed["signup.amount_micros"]
            assert (py(amount.value), py(amount.default_value)) == (5 * CREDIT, 5 * CREDIT)
            assert amount.source == admin_pb.SETTING_SOURCE_ENVIRONMENT
            assert py(listed["signup.expire_days"].value) == 0
            created = ledger_stub.CreateAccount(
                pb.CreateAccountRequest(account_id=new_account(), idempotency_key=new_key())
            )
            assert created.signup_lot.amount_micros == 5 * CREDIT
            assert not created.signup_lot.HasField("expires_at")

            admin.UpdateSetting(
                admin_pb.UpdateSettingRequest(
                    key="signup.amount_micros",
                    value=value(9 * CREDIT),
                    reason="keep me",
                    idempotency_key=new_key(),
                ),
                metadata=metadata,
            )
    finally:
        server.stop()

    # A restart with another environment default keeps the administrator's value.
    monkeypatch.setenv("LEDGER_SIGNUP_BONUS_MICROS", "7000000")
    server = _serve(fresh_database_url)
    try:
        with grpc.insecure_channel(server.address) as channel:
            admin = admin_service_pb2_grpc.AdminServiceStub(channel)
            ledger_stub = ledger_service_pb2_grpc.LedgerServiceStub(channel)
            listed = _listed(admin, metadata)
            amount = listed["signup.amount_micros"]
            assert (py(amount.value), py(amount.default_value)) == (9 * CREDIT, 7 * CREDIT)
            assert amount.source == admin_pb.SETTING_SOURCE_ADMIN
            assert amount.updated_by == "ops-admin"
            created = ledger_stub.CreateAccount(
                pb.CreateAccountRequest(account_id=new_account(), idempotency_key=new_key())
            )
            assert created.signup_lot.amount_micros == 9 * CREDIT

            # Reset follows the (new) environment default.
            reset = admin.UpdateSetting(
                admin_pb.UpdateSettingRequest(
                    key="signup.amount_micros",
                    reset=True,
                    reason="follow the environment",
                    idempotency_key=new_key(),
                ),
                metadata=metadata,
            ).setting
            assert (py(reset.value), reset.source) == (
                7 * CREDIT,
                admin_pb.SETTING_SOURCE_ENVIRONMENT,
            )
    finally:
        server.stop()
    assert audit_database(fresh_database_url) == []


def _stored(database_url: str, key: str) -> tuple[Any, str]:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT value, source FROM settings WHERE key = %s", (key,)).fetchone()
    assert row is not None
    return row[0], row[1]


def test_a_process_without_the_variable_never_undoes_the_configured_default(
    fresh_database_url: str,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Only a server whose variable is set writes it; a worker, the webhook receiver and a
    server without it leave the stored value alone (a burst worker once reset the sign-up
    bonus to the built-in 100 credits)."""
    migrate(fresh_database_url)
    key, variable = "signup.amount_micros", "LEDGER_SIGNUP_BONUS_MICROS"
    monkeypatch.setenv(variable, "7000000")
    _serve(fresh_database_url).stop()
    assert _stored(fresh_database_url, key) == (7 * CREDIT, "environment")

    monkeypatch.delenv(variable)
    redis = redis_db_url(redis_url, SETTINGS_REDIS_DB)
    Redis.from_url(redis).flushdb()
    run_burst_workers(fresh_database_url, redis)  # a real worker, without the variable
    assert _stored(fresh_database_url, key) == (7 * CREDIT, "environment")
    monkeypatch.setenv("DATABASE_URL", fresh_database_url)
    with worker_db.connection():  # the webhook receiver's first use of the database
        pass
    worker_db.close()
    assert _stored(fresh_database_url, key) == (7 * CREDIT, "environment")

    # A server set to another value takes it, and says the servers disagree.
    monkeypatch.setenv(variable, "8000000")
    caplog.set_level(logging.WARNING, logger="ledger_server.runtime_settings")
    _serve(fresh_database_url).stop()
    assert _stored(fresh_database_url, key) == (8 * CREDIT, "environment")
    assert [r.getMessage() for r in caplog.records if variable in r.getMessage()] == [
        f"{variable} sets {key} to 8000000, replacing 7000000 that another process stored"
        " from its environment: servers started with different values overwrite each"
        " other's at every start"
    ]

    # A server without it keeps the stored value; its reset returns to the built-in one.
    monkeypatch.delenv(variable)
    server = _serve(fresh_database_url)
    try:
        with grpc.insecure_channel(server.address) as channel:
            admin = admin_service_pb2_grpc.AdminServiceStub(channel)
            listed = _listed(admin, (("x-ledger-actor", "ops-admin"),))[key]
            assert (py(listed.value), py(listed.default_value)) == (8 * CREDIT, 100 * CREDIT)
            admin.UpdateSetting(
                admin_pb.UpdateSettingRequest(
                    key=key, reset=True, reason="back to built-in", idempotency_key=new_key()
                ),
                metadata=(("x-ledger-actor", "ops-admin"),),
            )
    finally:
        server.stop()
    assert _stored(fresh_database_url, key) == (100 * CREDIT, "environment")


@pytest.mark.parametrize(
    ("command", "variable", "wrong", "error"),
    [
        ("serve", "LEDGER_SIGNUP_BONUS_MICROS", "abc", "cannot read 'abc' as int"),
        ("migrate", "LEDGER_RECHARGE_CURRENCY", "cny", "must be ISO 4217"),
        # Known to Python's zone database, not to PostgreSQL's: only the database can tell.
        ("serve", "LEDGER_TIMEZONE", "right/UTC", "PostgreSQL does not know the time zone"),
        ("migrate", "LEDGER_TIMEZONE", "right/UTC", "PostgreSQL does not know the time zone"),
        ("serve", "LEDGER_TIMEZONE", "EET", "PostgreSQL reads EET as a time-zone abbreviation"),
    ],
)
def test_a_bad_settings_variable_is_a_configuration_error(
    command: str, variable: str, wrong: str, error: str, ledger_db_url: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env.update(
        DATABASE_URL=ledger_db_url,
        LEDGER_GRPC_ADDR="127.0.0.1:0",
        LEDGER_METRICS_ADDR="",
        LEDGER_MIGRATE_ON_START="false",
        LEDGER_LOG_FORMAT="text",
    )
    env[variable] = wrong
    result = subprocess.run(
        [sys.executable, "-m", "ledger_server", command],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"configuration error: {variable}: {error}"), result.stderr
    if variable != "LEDGER_TIMEZONE":  # refused with the rest of the configuration
        assert result.stderr.strip() == last
    assert _stored(ledger_db_url, "ledger.timezone")[0] == "UTC"
