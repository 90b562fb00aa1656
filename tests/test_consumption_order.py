"""Seed 000's consumption order: daily credits first, then credits with an expiry
(nearest first), then permanent credits; ties by creation time."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from google.protobuf.duration_pb2 import Duration

from ledger.v1 import types_pb2
from ledger_server import runtime_settings
from ledger_server.config import ConfigError
from ledger_server.db.migrate import migrate
from support.ledger import CREDIT, Ledger, new_account

DAY = 86400


def _lots_of_every_kind(ledger: Ledger, account: str) -> dict[str, str]:
    """Granted in an order that is not the consumption order."""
    permanent = ledger.grant(account, 40, source=types_pb2.CREDIT_SOURCE_PURCHASE).lot.lot_id
    later = ledger.grant(
        account, 30, source=types_pb2.CREDIT_SOURCE_SIGNUP, expires_in=Duration(seconds=30 * DAY)
    ).lot.lot_id
    soon = ledger.grant(
        account,
        20,
        source=types_pb2.CREDIT_SOURCE_MONTHLY_FREE,
        expires_in=Duration(seconds=2 * DAY),
    ).lot.lot_id
    daily = ledger.grant(
        account, 10, source=types_pb2.CREDIT_SOURCE_DAILY, expires_in=Duration(seconds=40 * DAY)
    ).lot.lot_id
    return {"daily": daily, "soon": soon, "later": later, "permanent": permanent}


def test_list_lots_shows_consumption_order(ledger: Ledger) -> None:
    account = new_account()
    lots = _lots_of_every_kind(ledger, account)
    assert [lot.lot_id for lot in ledger.lots(account)] == [
        lots["daily"],
        lots["soon"],
        lots["later"],
        lots["permanent"],
    ]


def test_consume_takes_lots_in_seed_000_order(ledger: Ledger, assert_audit_clean: object) -> None:
    account = new_account()
    lots = _lots_of_every_kind(ledger, account)

    first = ledger.consume(account, 25 * CREDIT).reservation.lots
    assert [(p.lot_id, p.committed_micros) for p in first] == [
        (lots["daily"], 10 * CREDIT),
        (lots["soon"], 15 * CREDIT),
    ]
    second = ledger.consume(account, 40 * CREDIT).reservation.lots
    assert [(p.lot_id, p.committed_micros) for p in second] == [
        (lots["soon"], 5 * CREDIT),
        (lots["later"], 30 * CREDIT),
        (lots["permanent"], 5 * CREDIT),
    ]
    assert [p.source for p in second] == [
        types_pb2.CREDIT_SOURCE_MONTHLY_FREE,
        types_pb2.CREDIT_SOURCE_SIGNUP,
        types_pb2.CREDIT_SOURCE_PURCHASE,
    ]
    remaining = {lot.lot_id: lot.remaining_micros for lot in ledger.lots(account)}
    assert remaining == {lots["permanent"]: 35 * CREDIT}
    assert_audit_clean()  # type: ignore[operator]


def test_reserve_then_partial_commit_follows_the_same_order(
    ledger: Ledger, assert_audit_clean: object
) -> None:
    account = new_account()
    lots = _lots_of_every_kind(ledger, account)

    reservation = ledger.reserve(account, 40 * CREDIT).reservation
    assert [(p.lot_id, p.held_micros) for p in reservation.lots] == [
        (lots["daily"], 10 * CREDIT),
        (lots["soon"], 20 * CREDIT),
        (lots["later"], 10 * CREDIT),
    ]
    committed = ledger.commit(account, reservation.reservation_id, 25 * CREDIT).reservation
    assert [(p.lot_id, p.committed_micros) for p in committed.lots] == [
        (lots["daily"], 10 * CREDIT),
        (lots["soon"], 15 * CREDIT),
        (lots["later"], 0),
    ]
    remaining = {
        lot.lot_id: (lot.remaining_micros, lot.held_micros) for lot in ledger.lots(account)
    }
    assert remaining == {
        lots["soon"]: (5 * CREDIT, 0),
        lots["later"]: (30 * CREDIT, 0),
        lots["permanent"]: (40 * CREDIT, 0),
    }
    assert ledger.balance(account).available_micros == 75 * CREDIT
    assert_audit_clean()  # type: ignore[operator]


def test_ties_go_to_the_older_lot(ledger: Ledger) -> None:
    account = new_account()
    older = ledger.grant(account, 5, source=types_pb2.CREDIT_SOURCE_PURCHASE).lot.lot_id
    newer = ledger.grant(account, 5, source=types_pb2.CREDIT_SOURCE_ADMIN).lot.lot_id
    taken = ledger.consume(account, 6 * CREDIT).reservation.lots
    assert [(p.lot_id, p.committed_micros) for p in taken] == [
        (older, 5 * CREDIT),
        (newer, 1 * CREDIT),
    ]


def test_reward_balance_is_not_spendable(ledger: Ledger) -> None:
    account = new_account()
    ledger.grant(account, 10, source=types_pb2.CREDIT_SOURCE_PURCHASE)
    ledger.grant(
        account,
        50,
        source=types_pb2.CREDIT_SOURCE_REFERRAL,
        balance_kind=types_pb2.BALANCE_KIND_REWARD,
    )
    balance = ledger.balance(account)
    assert balance.reward_balance_micros == 50 * CREDIT
    assert balance.available_micros == 10 * CREDIT


def test_the_order_by_source_is_configurable_for_lots_granted_after(
    ledger: Ledger, configure: Any
) -> None:
    """DESIGN.md section 4: the order is held in one place and configurable per source
    (setting consumption.priorities, changed by an audited admin call)."""
    account = new_account()
    before = ledger.grant(account, 10, source=types_pb2.CREDIT_SOURCE_PROMOTION).lot.lot_id
    purchase = ledger.grant(account, 10, source=types_pb2.CREDIT_SOURCE_PURCHASE).lot.lot_id
    configure("consumption.priorities", {"promotion": 50})
    after = ledger.grant(account, 10, source=types_pb2.CREDIT_SOURCE_PROMOTION).lot.lot_id
    # The new promotion lot goes first; the one granted before keeps its place.
    assert [lot.lot_id for lot in ledger.lots(account)] == [after, before, purchase]
    ledger.consume(account, 15 * CREDIT)
    remaining = {lot.lot_id: lot.remaining_micros for lot in ledger.lots(account)}
    assert remaining == {before: 5 * CREDIT, purchase: 10 * CREDIT}


def test_the_order_by_source_can_come_from_the_environment() -> None:
    env = {"LEDGER_CONSUMPTION_PRIORITIES": '{"promotion": 50, "purchase": 200}'}
    defaults = runtime_settings.environment_defaults(env)
    assert defaults["consumption.priorities"] == {"promotion": 50, "purchase": 200}
    for wrong in ('["promotion"]', '{"overdraft": 1}', "{not json"):
        with pytest.raises(ConfigError, match="LEDGER_CONSUMPTION_PRIORITIES"):
            runtime_settings.environment_defaults({"LEDGER_CONSUMPTION_PRIORITIES": wrong})


def test_settings_written_before_the_key_existed_grant_in_the_ledgers_order(
    fresh_database_url: str,
) -> None:
    """A database whose settings a server of the previous release wrote (no
    consumption.priorities yet) still grants, in the ledger's own order."""
    migrate(fresh_database_url)
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        runtime_settings.sync_environment_defaults(
            conn, runtime_settings.environment_defaults(), datetime.now(UTC)
        )
        conn.execute("DELETE FROM settings WHERE key = 'consumption.priorities'")
        conn.execute(
            "SELECT ledger_grant('older', 'g1', '\\x01', 10000000, 'promotion', NULL, 'main', "
            "'', '', NULL, now())"
        )
        row = conn.execute("SELECT priority FROM lots WHERE account_id = 'older'").fetchone()
    assert row == (100,)
