"""The audit finds every broken invariant, and is clean on a healthy ledger."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

import psycopg

from ledger.v1 import types_pb2
from ledger_server.audit import audit_database
from ledger_server.db.migrate import migrate
from ledger_server.runtime_settings import environment_defaults, sync_environment_defaults
from support.ledger import CREDIT, Ledger, new_account


def _fill(database_url: str) -> None:
    """A small healthy ledger written through the SQL functions directly."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        sync_environment_defaults(conn, environment_defaults(), datetime.now(UTC))
        conn.execute(
            "SELECT ledger_grant('audited', 'g1', '\\x01', 10000000, 'purchase', NULL, 'main', "
            "'', '', NULL, now())"
        )
        conn.execute(
            "SELECT ledger_consume('audited', 'c1', '\\x02', 4000000, NULL, 'chat', '', now())"
        )
        conn.execute(
            "SELECT ledger_reserve('audited', 'r1', '\\x03', 1000000, NULL, "
            "now() + interval '1 hour', 'chat', '', now())"
        )


def test_a_healthy_ledger_audits_clean(ledger: Ledger, ledger_db_url: str) -> None:
    account = new_account()
    ledger.grant(account, 10, source=types_pb2.CREDIT_SOURCE_SIGNUP)
    ledger.consume(account, 3 * CREDIT)
    assert audit_database(ledger_db_url) == []


def test_each_broken_invariant_is_reported(fresh_database_url: str) -> None:
    migrate(fresh_database_url)
    _fill(fresh_database_url)
    assert audit_database(fresh_database_url) == []
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE lots SET remaining_micros = remaining_micros - 1 WHERE account_id = 'audited'"
        )
        found = {v.check for v in audit_database(fresh_database_url)}
        assert {"balance_vs_lots", "lot_vs_postings"} <= found

        conn.execute(
            "UPDATE lots SET remaining_micros = remaining_micros + 1 WHERE account_id = 'audited'"
        )
        conn.execute(
            "UPDATE accounts SET balance_micros = balance_micros + 5 WHERE account_id = 'audited'"
        )
        found = {v.check for v in audit_database(fresh_database_url)}
        assert {"balance_vs_lots", "balance_vs_postings"} <= found
        conn.execute(
            "UPDATE accounts SET balance_micros = balance_micros - 5 WHERE account_id = 'audited'"
        )
        assert audit_database(fresh_database_url) == []

        conn.execute(
            "INSERT INTO postings (account_id, transaction_id, posting_no, ledger_account, "
            "amount_micros) SELECT account_id, transaction_id, 99, 'revenue', 7 "
            "FROM journal_transactions WHERE account_id = 'audited' AND kind = 'charge'"
        )
        found = {v.check for v in audit_database(fresh_database_url)}
        assert "unbalanced_transaction" in found


def test_held_credits_must_agree(fresh_database_url: str) -> None:
    migrate(fresh_database_url)
    _fill(fresh_database_url)
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        conn.execute("UPDATE accounts SET held_micros = 0 WHERE account_id = 'audited'")
    found = {v.check for v in audit_database(fresh_database_url)}
    assert "held_vs_lots" in found


def test_an_inviter_must_be_another_account(fresh_database_url: str) -> None:
    """No foreign key guards referred_by (migration 0034): the audit does."""
    migrate(fresh_database_url)
    _fill(fresh_database_url)
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        conn.execute("UPDATE accounts SET referred_by = 'nobody' WHERE account_id = 'audited'")
        (found,) = audit_database(fresh_database_url)
        assert (found.check, found.detail) == (
            "referred_by_not_another_account",
            "referred by nobody, which is no account",
        )
        conn.execute("ALTER TABLE accounts DROP CONSTRAINT accounts_not_self_referred")
        conn.execute("UPDATE accounts SET referred_by = account_id")
        (found,) = audit_database(fresh_database_url)
        assert found.detail == "referred by audited, itself"
        conn.execute("UPDATE accounts SET referred_by = NULL")
    assert audit_database(fresh_database_url) == []


def test_the_audit_command_exit_code(fresh_database_url: str) -> None:
    env = {"DATABASE_URL": fresh_database_url, "PATH": "/usr/bin:/bin"}
    # Not migrated, or out of reach: 3 and one line, never 1 (violations) with a traceback.
    for url in (fresh_database_url, "postgresql://nobody@127.0.0.1:1/none?connect_timeout=2"):
        failed = subprocess.run(
            [sys.executable, "-m", "ledger_server", "audit"],
            env={**env, "DATABASE_URL": url},
            capture_output=True,
            text=True,
        )
        assert (failed.returncode, failed.stdout) == (3, ""), failed.stderr
        assert failed.stderr.startswith("audit could not run: ")
        assert failed.stderr.count("\n") == 1, failed.stderr
    migrate(fresh_database_url)
    _fill(fresh_database_url)
    clean = subprocess.run(
        [sys.executable, "-m", "ledger_server", "audit"], env=env, capture_output=True, text=True
    )
    assert clean.returncode == 0, clean.stderr
    assert "audit clean" in clean.stdout
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        conn.execute("UPDATE lots SET remaining_micros = remaining_micros - 1")
    broken = subprocess.run(
        [sys.executable, "-m", "ledger_server", "audit"], env=env, capture_output=True, text=True
    )
    assert broken.returncode == 1
    assert "balance_vs_lots" in broken.stdout


def test_overdraft_invariants_are_audited(fresh_database_url: str) -> None:
    """The overdraft lot matches the limit and what the 'overdraft' account granted it,
    and a debt never stands beside spendable credits (tests/test_overdraft.py)."""
    migrate(fresh_database_url)
    _fill(fresh_database_url)
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        conn.execute(
            "SELECT ledger_set_overdraft_limit('audited', 'k', '\\x05', 5000000, 'r', 'a', now())"
        )
        conn.execute(
            "SELECT ledger_consume('audited', 'c2', '\\x04', 107000000, NULL, 'chat', '', now())"
        )
        # All but the credit held spent, and 2 of the overdraft.
        assert audit_database(fresh_database_url) == []

        conn.execute("UPDATE accounts SET overdraft_limit_micros = 6000000")
        assert {v.check for v in audit_database(fresh_database_url)} == {"overdraft_vs_limit"}
        conn.execute("UPDATE accounts SET overdraft_limit_micros = 5000000")

        # A hold given back behind the ledger's back: its credits and the debt side by side.
        conn.execute("UPDATE lots SET held_micros = 0 WHERE source = 'signup'")
        conn.execute("UPDATE accounts SET held_micros = 0")
        conn.execute("UPDATE reservations SET status = 'released', finalized_at = now()")
        assert {v.check for v in audit_database(fresh_database_url)} == {"debt_beside_credits"}


# --- stored figures against the journal ---------------------------------------------------


def _fill_history(database_url: str) -> str:
    """_fill, then what writes the figures the journal must account for: a lot expired, a
    refund into it (expired at once), a paid recharge partly spent and refunded (its unspent
    credits clawed back, the rest owed and taken when a Refund gave some back), and an
    overdraft limit. Returns the reservation of the charge that spent the recharge."""
    _fill(database_url)
    later = "now() + interval '2 days'"
    with psycopg.connect(database_url, autocommit=True) as conn:

        def call(sql: str, *args: object) -> Any:
            return conn.execute(sql, args).fetchone()[0]  # type: ignore[index]

        call(
            "SELECT ledger_grant('audited', 'p1', '\\x11', 2000000, 'promotion', "
            "now() + interval '1 day', 'main', '', '', NULL, now())"
        )
        promoted = call(
            "SELECT ledger_consume('audited', 'c2', '\\x12', 1500000, NULL, 'chat', '', now())"
        )
        # Two days on: the promotion's 500,000 unspent expire, and the refund into it too.
        call(
            f"SELECT ledger_refund('audited', %s::uuid, 'f1', '\\x13', 500000, 'r', {later})",
            promoted["reservation"]["reservation_id"],
        )
        call(
            f"SELECT ledger_recharge('audited', 'rc1', '\\x14', 30000, 'cny', 'pi_audit', {later})"
        )
        # Everything else (96 + 10) and 100 of the recharge's 300.
        spent = call(
            f"SELECT ledger_consume('audited', 'c3', '\\x15', 206000000, NULL, 'chat', '', {later})"
        )
        call(
            "SELECT ledger_claw_back_purchase('audited', 'cb1', '\\x16', ARRAY['pi_audit'], "
            f"30000, 30000, 'refunded', {later})"
        )
        reservation: str = spent["reservation"]["reservation_id"]
        call(
            f"SELECT ledger_refund('audited', %s::uuid, 'f2', '\\x17', 50000000, 'r', {later})",
            reservation,
        )
        call(
            "SELECT ledger_set_overdraft_limit('audited', 'o1', '\\x18', 5000000, 'r', 'a', "
            f"{later})"
        )
        clawed = conn.execute(
            "SELECT clawed_back_micros, claw_back_owed_micros FROM purchases"
        ).fetchone()
        assert clawed == (250000000, 50000000)  # 200 unspent, then 50 of the 100 owed
        expired = conn.execute(
            "SELECT expired_micros FROM lots WHERE source = 'promotion'"
        ).fetchone()
        assert expired == (1000000,)
    return reservation


def _found(database_url: str) -> set[str]:
    return {v.check for v in audit_database(database_url)}


def test_expired_credits_agree_with_the_journal(fresh_database_url: str) -> None:
    migrate(fresh_database_url)
    _fill_history(fresh_database_url)
    assert audit_database(fresh_database_url) == []
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE lots SET expired_micros = expired_micros - 1 WHERE source = 'promotion'"
        )
    assert _found(fresh_database_url) == {"lot_expired_vs_journal"}


def test_expiry_entries_come_after_their_lots_expire(fresh_database_url: str) -> None:
    migrate(fresh_database_url)
    _fill_history(fresh_database_url)
    assert audit_database(fresh_database_url) == []
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE lots SET expires_at = expires_at + interval '3 days' WHERE source = 'promotion'"
        )
        assert _found(fresh_database_url) == {"expiry_before_lot_expires"}
        conn.execute("UPDATE lots SET expires_at = NULL WHERE source = 'promotion'")
        assert _found(fresh_database_url) == {"expiry_before_lot_expires"}


def test_overdraft_entries_touch_only_the_overdraft_lot(fresh_database_url: str) -> None:
    migrate(fresh_database_url)
    _fill_history(fresh_database_url)
    assert audit_database(fresh_database_url) == []
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        # The journal is append-only: an entry added, balanced and netting to nothing, so
        # that no other check sees it.
        conn.execute(
            """
            WITH entry AS (
                INSERT INTO journal_transactions (account_id, kind, amount_micros, created_at)
                VALUES ('audited', 'overdraft', 0, now()) RETURNING transaction_id)
            INSERT INTO postings (account_id, transaction_id, posting_no, ledger_account,
                                  lot_id, source, amount_micros)
            SELECT 'audited', e.transaction_id, n, 'account:main', l.lot_id, l.source, a
              FROM entry e, lots l, (VALUES (0, 1), (1, -1)) AS p(n, a)
             WHERE l.source = 'purchase'
            """
        )
    assert _found(fresh_database_url) == {"overdraft_entry_off_overdraft_lot"}


def test_what_a_reservations_lots_committed_agrees_with_its_charge(
    fresh_database_url: str,
) -> None:
    migrate(fresh_database_url)
    reservation = _fill_history(fresh_database_url)
    assert audit_database(fresh_database_url) == []
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        # The reservation's own figure follows, so only the journal disagrees.
        conn.execute(
            "UPDATE reservation_lots SET committed_micros = committed_micros - 1 "
            "WHERE reservation_id = %s AND seq = 0",
            (reservation,),
        )
        conn.execute(
            "UPDATE reservations SET committed_micros = committed_micros - 1 "
            "WHERE reservation_id = %s",
            (reservation,),
        )
        assert _found(fresh_database_url) == {"reservation_lot_vs_charge"}
        # The reservation's figure alone: its lots' sum, now pinned to the journal, disagrees.
        conn.execute(
            "UPDATE reservation_lots SET committed_micros = committed_micros + 1 "
            "WHERE reservation_id = %s AND seq = 0",
            (reservation,),
        )
        assert _found(fresh_database_url) == {"reservation_lots_vs_reservation"}


def test_what_a_reservation_refunded_agrees_with_its_refunds(fresh_database_url: str) -> None:
    migrate(fresh_database_url)
    reservation = _fill_history(fresh_database_url)
    assert audit_database(fresh_database_url) == []
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        # Its lots' figures follow, so only the journal disagrees.
        for table in ("reservations", "reservation_lots"):
            conn.execute(
                f"UPDATE {table} SET refunded_micros = refunded_micros + 1 "
                "WHERE reservation_id = %s AND refunded_micros > 0",
                (reservation,),
            )
    # Its lots' too, each against the refunds into it.
    assert _found(fresh_database_url) == {
        "reservation_refunded_vs_journal",
        "reservation_lot_refunds_vs_journal",
    }


def test_what_each_lot_of_a_reservation_got_back_agrees_with_its_refunds(
    fresh_database_url: str,
) -> None:
    """Per lot: a credit of a refund moved to another lot of the reservation leaves every
    sum right, yet the next refund would give back to the wrong lot."""
    migrate(fresh_database_url)
    reservation = _fill_history(fresh_database_url)
    assert audit_database(fresh_database_url) == []
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        lots = conn.execute(
            "SELECT lot_id, refunded_micros FROM reservation_lots WHERE reservation_id = %s "
            "AND committed_micros - refunded_micros >= 1000000 ORDER BY refunded_micros DESC",
            (reservation,),
        ).fetchall()
        assert lots[0][1] >= 1000000 and len(lots) >= 2
        move = (
            "UPDATE reservation_lots SET refunded_micros = refunded_micros "
            "+ CASE lot_id WHEN %s THEN -1000000 ELSE 1000000 END "
            "WHERE reservation_id = %s AND lot_id IN (%s, %s)"
        )
        conn.execute(move, (lots[0][0], reservation, lots[0][0], lots[1][0]))
        assert _found(fresh_database_url) == {"reservation_lot_refunds_vs_journal"}
        conn.execute(move, (lots[1][0], reservation, lots[0][0], lots[1][0]))
        assert audit_database(fresh_database_url) == []
        # What expired at once, of the refund into the promotion's expired lot.
        conn.execute(
            "UPDATE reservation_lots SET refund_expired_micros = refund_expired_micros - 1 "
            "WHERE refund_expired_micros > 0"
        )
        assert _found(fresh_database_url) == {"reservation_lot_refunds_vs_journal"}


def test_what_a_payments_refund_clawed_back_agrees_with_its_adjustments(
    fresh_database_url: str,
) -> None:
    migrate(fresh_database_url)
    _fill_history(fresh_database_url)
    assert audit_database(fresh_database_url) == []
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        conn.execute("UPDATE purchases SET clawed_back_micros = clawed_back_micros - 1")
        assert _found(fresh_database_url) == {"purchase_claw_back_vs_journal"}
        conn.execute("UPDATE purchases SET clawed_back_micros = clawed_back_micros + 1")
        assert audit_database(fresh_database_url) == []
        conn.execute("UPDATE purchases SET bonus_clawed_back_micros = bonus_clawed_back_micros - 1")
        assert _found(fresh_database_url) == {"purchase_claw_back_vs_journal"}


def test_a_lot_refunded_into_twice_at_once_after_it_expired(fresh_database_url: str) -> None:
    """One refund gives an expired lot both its own share of the charge and what the
    overdraft, repaid by that lot, had no room for: both expire at once, and only the first
    is what the reservation's lot got back (reservation_lots.refund_expired_micros)."""
    migrate(fresh_database_url)
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        sync_environment_defaults(conn, environment_defaults(), datetime.now(UTC))

        def call(sql: str, *args: object) -> Any:
            return conn.execute(sql, args).fetchone()[0]  # type: ignore[index]

        call(
            "SELECT ledger_grant('od', 'g', '\\x01', 10000000, 'promotion', "
            "now() + interval '1 day', 'main', '', '', NULL, now())"
        )
        call("SELECT ledger_set_overdraft_limit('od', 'o', '\\x02', 50000000, 'r', 'a', now())")
        first = call("SELECT ledger_consume('od', 'c1', '\\x03', 5000000, NULL, 'chat', '', now())")
        # The promotion's other 5, the signup's 100 and 20 of the overdraft.
        drawn = call(
            "SELECT ledger_consume('od', 'c2', '\\x04', 125000000, NULL, 'chat', '', now())"
        )
        # Its 5 back in the promotion repay 5 of the debt.
        call(
            "SELECT ledger_refund('od', %s::uuid, 'f1', '\\x05', NULL, 'r', now())",
            first["reservation"]["reservation_id"],
        )
        refund = call(
            "SELECT ledger_refund('od', %s::uuid, 'f2', '\\x06', NULL, 'r', "
            "now() + interval '2 days')",
            drawn["reservation"]["reservation_id"],
        )
        assert (refund["refunded_micros"], refund["expired_micros"]) == (125000000, 10000000)
    assert audit_database(fresh_database_url) == []


# --- what no stored figure shows -------------------------------------------------------------


def test_hold_and_release_entries_move_no_lot_credits(fresh_database_url: str) -> None:
    """No SQL function posts to a lot under a HOLD or RELEASE entry (a hold only marks a lot's
    credits held): lot postings there are credits moved past every check of amounts, which
    exempts those kinds (their amount is what was held or given back)."""
    migrate(fresh_database_url)
    _fill(fresh_database_url)
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        # Seven credits minted into the purchase lot under r1's hold, lots and balance along.
        conn.execute(
            """
            INSERT INTO postings (account_id, transaction_id, posting_no, ledger_account,
                                  lot_id, source, amount_micros)
            SELECT t.account_id, t.transaction_id, p.n, p.ledger_account,
                   CASE WHEN p.n = 0 THEN l.lot_id END, 'purchase', p.amount
              FROM journal_transactions t, lots l,
                   (VALUES (0, 'account:main', 7000000), (1, 'issuance:purchase', -7000000))
                       AS p(n, ledger_account, amount)
             WHERE t.kind = 'hold' AND l.source = 'purchase'
            """
        )
        conn.execute(
            "UPDATE lots SET remaining_micros = remaining_micros + 7000000, "
            "amount_micros = amount_micros + 7000000 WHERE source = 'purchase'"
        )
        conn.execute("UPDATE accounts SET balance_micros = balance_micros + 7000000")
        hold = conn.execute(
            "SELECT transaction_id FROM journal_transactions WHERE kind = 'hold'"
        ).fetchone()
        (found,) = audit_database(fresh_database_url)
        assert (found.check, found.detail) == (
            "hold_or_release_posts_to_lots",
            f"transaction {hold[0]} (hold): 1 lot posting(s), moving 7000000 in and 0 out",  # type: ignore[index]
        )

        # A release moving a credit out of the lot and back in changes no sum at all.
        conn.execute(
            "SELECT ledger_release('audited', reservation_id, 'x1', '\\x06', 'r', now()) "
            "FROM reservations WHERE status = 'pending'"
        )
        conn.execute(
            """
            INSERT INTO postings (account_id, transaction_id, posting_no, ledger_account,
                                  lot_id, source, amount_micros)
            SELECT t.account_id, t.transaction_id, 90 + p.n, 'account:main', l.lot_id,
                   'purchase', p.amount
              FROM journal_transactions t, lots l,
                   (VALUES (0, 1000000), (1, -1000000)) AS p(n, amount)
             WHERE t.kind = 'release' AND l.source = 'purchase'
            """
        )
    found = audit_database(fresh_database_url)
    assert [(v.check, v.detail.split(": ")[1]) for v in found] == [
        ("hold_or_release_posts_to_lots", "1 lot posting(s), moving 7000000 in and 0 out"),
        ("hold_or_release_posts_to_lots", "2 lot posting(s), moving 1000000 in and 1000000 out"),
    ]


def test_a_lots_source_agrees_with_its_postings(fresh_database_url: str) -> None:
    """Reports count a lot's credits under its source, paid or free (reports.sql): a purchase
    lot relabelled 'admin' showed its credits as free, and a negative opening balance of paid
    ones, with every sum still right."""
    migrate(fresh_database_url)
    _fill(fresh_database_url)
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        conn.execute("UPDATE lots SET source = 'admin' WHERE source = 'purchase'")
        lot = conn.execute("SELECT lot_id FROM lots WHERE source = 'admin'").fetchone()
    (found,) = audit_database(fresh_database_url)
    assert (found.check, found.account_id, found.detail) == (
        "lot_source_vs_postings",
        "audited",
        f"lot {lot[0]}: source admin, its postings purchase",  # type: ignore[index]
    )


def test_the_append_only_triggers_are_audited(fresh_database_url: str) -> None:
    """Dropped or disabled, a trigger that keeps the journal append-only lets its history be
    changed or emptied, and then every other check passes on what is left."""
    migrate(fresh_database_url)
    _fill(fresh_database_url)
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        for alter, state in (
            ("DISABLE TRIGGER", "disabled"),
            ("ENABLE REPLICA TRIGGER", "disabled"),  # fires only where replicas apply changes
        ):
            conn.execute(f"ALTER TABLE postings {alter} postings_no_truncate")
            (found,) = audit_database(fresh_database_url)
            assert (found.check, found.account_id, found.detail) == (
                "append_only_trigger",
                "",
                f"postings_no_truncate on postings: {state}",
            )
        conn.execute("ALTER TABLE postings ENABLE TRIGGER postings_no_truncate")
        assert audit_database(fresh_database_url) == []
        conn.execute("DROP TRIGGER journal_transactions_append_only ON journal_transactions")
        conn.execute(
            "CREATE TRIGGER journal_transactions_append_only BEFORE DELETE "
            "ON journal_transactions FOR EACH ROW EXECUTE FUNCTION ledger_reject_journal_change()"
        )
        conn.execute("DROP TRIGGER setting_changes_append_only ON setting_changes")
    assert [str(v) for v in audit_database(fresh_database_url)] == [
        "append_only_trigger [] journal_transactions_append_only on journal_transactions: "
        "changed (not a BEFORE UPDATE OR DELETE row trigger of ledger_reject_journal_change)",
        "append_only_trigger [] setting_changes_append_only on setting_changes: missing",
    ]
