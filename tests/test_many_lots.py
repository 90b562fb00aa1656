"""A call that draws on more lots than one journal entry can number (posting numbers and a
reservation's lot numbers are smallint: 32,768 at most) is refused FAILED_PRECONDITION
TOO_MANY_LOTS with the most one call can move, and changes nothing. It overflowed into
BALANCE_LIMIT ("beyond what the ledger can hold") on an account holding a few credits."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timedelta

import grpc
import psycopg
import pytest
from psycopg.types.json import Jsonb

from ledger.v1 import admin_service_pb2 as admin_pb
from ledger.v1 import admin_service_pb2_grpc
from ledger.v1 import ledger_service_pb2 as pb
from ledger_client import LedgerClient, TooManyLots
from ledger_server.clock import OffsetClock
from ledger_server.db.errors import DatabaseFailure, translate_failure
from support.ledger import CREDIT, Ledger, expect_error, new_account, new_key
from support.scoped_audit import ScopedAudit

FAILED = grpc.StatusCode.FAILED_PRECONDITION
MOST_LOTS = 32_767  # numbered 0 on, a charge's revenue posted after them
LOT = 10  # micros in each lot added
PER_ENTRY = 30_000  # lots a GRANT entry of _add_lots adds (posting numbers are smallint)


def _add_lots(
    url: str,
    account: str,
    count: int,
    now: datetime,
    *,
    kind: str = "main",
    expires_at: datetime | None = None,
    apart: timedelta = timedelta(),
) -> None:
    """``count`` lots of LOT micros in one statement (33,000 Grant calls take minutes), a
    GRANT entry for every PER_ENTRY of them. ``apart``: each lot expires that much after
    the one before."""
    source = "purchase" if kind == "main" else "referral"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "WITH txn AS ("
            "  INSERT INTO journal_transactions (account_id, kind, amount_micros, created_at)"
            "  SELECT %(a)s, 'grant', %(m)s * least(%(per)s, %(n)s - e * %(per)s), %(now)s"
            "    FROM generate_series(0, (%(n)s - 1) / %(per)s) e ORDER BY e"
            "  RETURNING transaction_id"
            "), entry AS ("
            "  SELECT transaction_id, row_number() OVER (ORDER BY transaction_id) - 1 AS e"
            "    FROM txn"
            "), lot AS ("
            "  INSERT INTO lots (account_id, source, balance_kind, amount_micros, remaining_micros,"
            "                    priority, expires_at, created_at, grant_transaction_id)"
            "  SELECT %(a)s, %(s)s, %(k)s, %(m)s, %(m)s, 100,"
            "         %(exp)s::timestamptz + %(apart)s * i, %(now)s, entry.transaction_id"
            "    FROM generate_series(0, %(n)s - 1) i JOIN entry ON entry.e = i / %(per)s"
            "  RETURNING lot_id, grant_transaction_id"
            "), posted AS ("
            "  INSERT INTO postings (account_id, transaction_id, posting_no, ledger_account,"
            "                        lot_id, source, amount_micros)"
            "  SELECT %(a)s, grant_transaction_id,"
            "         row_number() OVER (PARTITION BY grant_transaction_id ORDER BY lot_id) - 1,"
            "         'account:' || %(k)s, lot_id, %(s)s, %(m)s"
            "    FROM lot"
            "  UNION ALL"
            "  SELECT %(a)s, grant_transaction_id, %(per)s, 'issuance:' || %(s)s, NULL, %(s)s,"
            "         -%(m)s * count(*) FROM lot GROUP BY grant_transaction_id"
            ")"
            "UPDATE accounts"
            "   SET balance_micros = balance_micros + CASE %(k)s WHEN 'main' THEN %(total)s"
            "                                        ELSE 0 END,"
            "       reward_balance_micros = reward_balance_micros"
            "                               + CASE %(k)s WHEN 'reward' THEN %(total)s ELSE 0 END,"
            "       next_maintenance_at = least(next_maintenance_at, %(exp)s)"
            " WHERE account_id = %(a)s",
            {"a": account, "m": LOT, "n": count, "per": PER_ENTRY, "now": now, "s": source,
             "k": kind, "exp": expires_at, "apart": apart, "total": LOT * count},
        )  # fmt: skip


Audit = Callable[[list[str]], None]


@pytest.fixture
def audit(ledger_db_url: str) -> Iterator[Audit]:
    """The audit of the test's accounts only: the whole session's grows with these lots."""
    scoped = ScopedAudit(ledger_db_url)

    def check(accounts: list[str]) -> None:
        scoped.scope(accounts)
        assert scoped.violations() == []

    try:
        yield check
    finally:
        scoped.close()


def _account(ledger: Ledger) -> str:
    account = new_account("many-lots")
    ledger.grant(account, micros=LOT)  # opens it (with what the sign-up gives)
    return account


def _too_many(call: Callable[[], object], requested: int) -> tuple[int, int]:
    info = expect_error(call, FAILED, "TOO_MANY_LOTS")
    assert info.metadata["requested_micros"] == str(requested)
    return int(info.metadata["max_lots"]), int(info.metadata["max_amount_micros"])


def test_a_charge_over_too_many_lots_is_refused_with_the_most_one_call_takes(
    ledger: Ledger, client: LedgerClient, ledger_db_url: str, clock: OffsetClock, audit: Audit
) -> None:
    account, other = _account(ledger), _account(ledger)
    _add_lots(ledger_db_url, account, MOST_LOTS + 1, clock.now())
    everything = ledger.balance(account).available_micros
    most_lots, most = _too_many(lambda: ledger.reserve(account, everything), everything)
    assert most_lots == MOST_LOTS and 0 < most < everything
    assert _too_many(lambda: ledger.consume(account, everything), everything) == (MOST_LOTS, most)
    with pytest.raises(TooManyLots) as refused:  # the client's type, with what to split by
        client.consume(account, everything)
    assert (refused.value.max_lots, refused.value.max_amount_micros) == (MOST_LOTS, most)
    after = ledger.balance(account)  # nothing held, nothing spent
    assert (after.available_micros, after.held_micros) == (everything, 0)

    # The group commit's batch (0007_coalesced.sql) refuses that call alone: the calls
    # beside it, on its account and on another, go through.
    now = clock.now()
    requests = [
        {"op": "consume", "account": acct, "key": new_key(), "hash": "01", "amount": amount,
         "now": now.isoformat()}
        for acct, amount in [(account, LOT), (account, everything - LOT), (other, LOT)]
    ]  # fmt: skip
    with psycopg.connect(ledger_db_url, autocommit=True) as conn:
        row = conn.execute("SELECT ledger_consume_batch(%s, %s)", (Jsonb(requests), now)).fetchone()
        assert row is not None
        took, refused, took_other = row[0]
        assert set(took) == set(took_other) == {"ok"}, row
        error = translate_failure(DatabaseFailure(**refused["error"]))
        assert error is not None and error.reason == "TOO_MANY_LOTS", refused
        assert error.metadata["max_lots"] == str(MOST_LOTS)
        most = int(error.metadata["max_amount_micros"])
        # What the error names goes through in one call. In SQL: 32,767 lots can take
        # longer than the server's statement time-out on a busy machine.
        row = conn.execute(
            "SELECT ledger_consume(%s, %s, '\\x01', %s, NULL, '', '', %s)",
            (account, new_key(), most, clock.now()),
        ).fetchone()
    assert row is not None and len(row[0]["reservation"]["lots"]) == MOST_LOTS
    assert ledger.balance(account).available_micros == everything - LOT - most
    audit([account, other])


def test_a_refund_over_too_many_lots_expired_since_says_how_much_one_call_refunds(
    ledger: Ledger, ledger_db_url: str, clock: OffsetClock, audit: Audit
) -> None:
    """A refund into a lot expired since posts three times (back, out, breakage): 10,923
    such lots overflowed the refund's entry."""
    account = _account(ledger)
    lots = MOST_LOTS // 3 + 10
    now = clock.now()
    _add_lots(ledger_db_url, account, lots, now, expires_at=now + timedelta(hours=1))
    charged = ledger.consume(account, lots * LOT)  # these lots expire first: taken first
    reservation = charged.reservation.reservation_id
    clock.advance(timedelta(hours=2))
    # In SQL, as the server calls it but without its statement time-out: a Refund that plans
    # over 10,932 lots takes seconds, past the time-out on a loaded machine (what is refused
    # here is the posting count, not the time).
    refund = "SELECT ledger_refund(%s, %s, %s, '\\x01', %s, '', %s)"
    with psycopg.connect(ledger_db_url, autocommit=True) as conn:
        # The tables just grew by tens of thousands of rows, which autovacuum has not
        # analysed yet: planned over the suite's earlier statistics, the refund took 35 s.
        conn.execute("ANALYZE lots, reservation_lots, postings")
        with pytest.raises(psycopg.Error) as refused:
            conn.execute(refund, (account, reservation, new_key(), None, clock.now()))
        error = translate_failure(
            DatabaseFailure(
                refused.value.sqlstate or "",
                refused.value.diag.message_primary or "",
                refused.value.diag.message_detail,
            )
        )
        assert error is not None and error.reason == "TOO_MANY_LOTS", refused.value
        assert error.metadata["requested_micros"] == str(lots * LOT)
        # Three postings for each of 10,922 lots, the revenue's after them: 0 to 32,766.
        assert (error.metadata["max_lots"], error.metadata["max_amount_micros"]) == (
            str(MOST_LOTS // 3),
            str(MOST_LOTS // 3 * LOT),
        )
        row = conn.execute(refund, (account, reservation, new_key(), 5 * LOT, clock.now()))
        answer = row.fetchone()
    assert answer is not None and answer[0]["expired_micros"] == 5 * LOT
    audit([account])


def test_a_reward_transfer_over_too_many_lots_says_how_much_one_call_moves(
    ledger: Ledger, ledger_db_url: str, clock: OffsetClock, audit: Audit
) -> None:
    """Reward lots of as many expiries post twice each (a main lot per expiry, then the
    reward lot): 16,385 of them overflowed the transfer's entry."""
    account = _account(ledger)
    lots = (MOST_LOTS + 1) // 2 + 5
    now = clock.now()
    _add_lots(ledger_db_url, account, lots, now, kind="reward", expires_at=now + timedelta(days=9),
              apart=timedelta(seconds=1))  # fmt: skip

    def transfer(micros: int | None = None) -> pb.TransferRewardResponse:
        request = pb.TransferRewardRequest(account_id=account, idempotency_key=new_key())
        if micros is not None:
            request.amount_micros = micros
        return ledger.stub.TransferReward(request)

    most_lots, most = _too_many(transfer, lots * LOT)
    assert (most_lots, most) == ((MOST_LOTS + 1) // 2, (MOST_LOTS + 1) // 2 * LOT)
    assert ledger.balance(account).reward_balance_micros == lots * LOT
    # Within the most, a transfer goes through (a small one: each expiry costs a new lot).
    assert transfer(3 * LOT).transferred_micros == 3 * LOT
    audit([account])


def test_a_debt_is_repaid_in_entries_of_bounded_size(
    ledger: Ledger,
    admin: admin_service_pb2_grpc.AdminServiceStub,
    ledger_db_url: str,
    clock: OffsetClock,
    audit: Audit,
) -> None:
    """Holds timed out together can free more lots than one repayment entry numbers (one
    posting each, the overdraft lot's after them), and the repayment runs in the
    maintenance every call on the account runs first: one entry failed them all. One
    TRANSFER per p_lots_per_entry lots, here 2."""
    account = _account(ledger)
    admin.SetOverdraftLimit(
        admin_pb.SetOverdraftLimitRequest(
            account_id=account, idempotency_key=new_key(), overdraft_limit_micros=CREDIT,
            reason="many lots",
        )
    )  # fmt: skip
    ledger.consume(account, ledger.balance(account).available_micros)  # all of it: a debt
    now = clock.now()
    _add_lots(ledger_db_url, account, 5, now)  # credits beside the debt, as a release frees
    with psycopg.connect(ledger_db_url, autocommit=True) as conn:
        conn.execute(
            "SELECT ledger_settle_overdraft(%s, %s, p_lots_per_entry => 2)", (account, now)
        )
        entries = conn.execute(
            "SELECT t.amount_micros, count(p.*)::int FROM journal_transactions t"
            "  JOIN postings p USING (account_id, transaction_id)"
            " WHERE t.account_id = %s AND t.kind = 'transfer'"
            " GROUP BY t.transaction_id, t.amount_micros ORDER BY t.transaction_id",
            (account,),
        ).fetchall()
        assert entries == [(2 * LOT, 3), (2 * LOT, 3), (LOT, 2)]
        default = conn.execute(
            "SELECT pg_get_function_arguments('ledger_settle_overdraft'::regproc)"
        ).fetchone()
        assert default is not None and "p_lots_per_entry integer DEFAULT 32767" in default[0]
    audit([account])
