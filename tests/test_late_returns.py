"""Calls run after a call of a later time. A Commit or Release is recorded at the time
the server received it, but runs when the account is free: meanwhile a call of a later time
(a Balance read, the sweeper, another server's call) may have applied the expiry of a lot
the hold is on. That expiry took only the lot's unheld credits. What the late call gives
back to the lot must expire too, not stay in the balance until the account's next
maintenance (a day away, the hold's end), where no live lot covers it (helper-69). Each path
that gives held credits back is run: the call alone and the set of a batch
(0009_commit_set.sql, 0010_release_set.sql). A claim of the daily reward is likewise not
refused because a later call opened the account."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from google.protobuf.duration_pb2 import Duration
from psycopg.types.json import Jsonb

from ledger.v1 import types_pb2
from support.ledger import CREDIT, Ledger, new_account


def _alone(conn: psycopg.Connection[Any], call: dict[str, Any], at: datetime) -> None:
    if call["op"] == "commit":
        conn.execute(
            "SELECT ledger_commit(%s, %s, %s, '\\x01', %s, NULL, '', %s)",
            (call["account"], call["reservation_id"], call["key"], call["amount"], at),
        )
    else:
        conn.execute(
            "SELECT ledger_release(%s, %s, %s, '\\x01', '', %s)",
            (call["account"], call["reservation_id"], call["key"], at),
        )


def _in_a_set(conn: psycopg.Connection[Any], call: dict[str, Any], at: datetime) -> None:
    request = {"hash": "01", "now": at.isoformat(), "comment": "", **call}
    if call["op"] == "commit":
        request["usage"] = None
    else:
        request |= {"reason": "", "job_failed": False}
    row = conn.execute("SELECT ledger_take_set(%s, %s)", (Jsonb([request]), at)).fetchone()
    assert row is not None
    [result] = row[0]
    assert "ok" in result, result


Runner = Callable[[psycopg.Connection[Any], dict[str, Any], datetime], None]


@pytest.mark.parametrize("run", [_alone, _in_a_set], ids=["alone", "set"])
@pytest.mark.parametrize(("op", "given_back"), [("commit", 5), ("release", 8)])
def test_credits_given_back_to_a_lot_whose_expiry_was_applied_expire(
    ledger: Ledger,
    ledger_db_url: str,
    assert_audit_clean: Callable[[], None],
    run: Runner,
    op: str,
    given_back: int,
) -> None:
    account = new_account(f"late-{op}")
    expiring = ledger.grant(
        account, 10, source=types_pb2.CREDIT_SOURCE_SIGNUP, expires_in=Duration(seconds=600)
    ).lot
    ledger.grant(account, 2)  # permanent
    # Held on the lot that expires first: 8 of its 10 credits.
    hold = ledger.reserve(account, 8 * CREDIT, ttl=Duration(seconds=86400)).reservation
    with psycopg.connect(ledger_db_url, autocommit=True) as conn:
        # The set paths take no call that would raise a low-balance alert.
        conn.execute(
            "UPDATE accounts SET low_balance_threshold_micros = 0 WHERE account_id = %s",
            (account,),
        )
        row = conn.execute(
            "SELECT expires_at FROM lots WHERE account_id = %s AND lot_id = %s",
            (account, int(expiring.lot_id)),
        ).fetchone()
        assert row is not None
        expiry = row[0]
        received, applied = expiry - timedelta(seconds=1), expiry + timedelta(seconds=100)
        # A read of a later time applies the expiry: the 2 unheld credits expire.
        conn.execute("SELECT ledger_balance(%s, %s)", (account, applied))
        call = {"op": op, "account": account, "key": f"late-{op}",
                "reservation_id": hold.reservation_id, "amount": 3 * CREDIT}  # fmt: skip
        run(conn, call, received)
        conn.execute("SELECT ledger_balance(%s, %s)", (account, applied + timedelta(seconds=1)))
        balance, held = conn.execute(
            "SELECT balance_micros, held_micros FROM accounts WHERE account_id = %s", (account,)
        ).fetchone() or (None, None)
        lot = conn.execute(
            "SELECT remaining_micros, expired_micros FROM lots"
            " WHERE account_id = %s AND lot_id = %s",
            (account, int(expiring.lot_id)),
        ).fetchone()
    # Only the permanent 2 are left; what went back to the expired lot expired as well.
    assert (balance, held) == (2 * CREDIT, 0)
    assert lot == (0, (2 + given_back) * CREDIT)
    assert ledger.balance(account).available_micros == 2 * CREDIT
    assert_audit_clean()


def test_a_claim_of_its_own_day_stands_though_a_later_call_opened_the_account(
    ledger: Ledger,  # the server: it writes the settings' defaults
    ledger_db_url: str,
) -> None:
    """The claim was received a second before midnight; a Grant received after midnight
    opened the account first. The claim is of its own day, which had not ended: granted,
    not refused as a day before the account was opened (helper-74)."""
    account = new_account("late-claim")
    midnight = datetime(2031, 5, 11, tzinfo=UTC)  # the ledger's day is UTC's here
    with psycopg.connect(ledger_db_url, autocommit=True) as conn:
        conn.execute(
            "SELECT ledger_grant(%s, 'g', '\\x01', 1000000, 'purchase', NULL, 'main', '', '',"
            " NULL, %s)",
            (account, midnight + timedelta(seconds=1)),
        )
        conn.execute(
            "SELECT ledger_claim_daily_reward(%s, 'claim', '\\x02', %s)",
            (account, midnight - timedelta(seconds=1)),
        )
        claims = conn.execute(
            "SELECT claim_date FROM daily_claims WHERE account_id = %s", (account,)
        ).fetchall()
    assert claims == [((midnight - timedelta(days=1)).date(),)]
