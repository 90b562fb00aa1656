"""The set-based Consume, Reserve, Commit and Release of a batch
(sql/functions/0008_take_set.sql, 0009_commit_set.sql, 0010_release_set.sql) leave every
account exactly as ledger_consume, ledger_reserve, ledger_commit and ledger_release, call by
call, would have left it, and take only the calls that are sure to succeed."""

from __future__ import annotations

import random
import threading
import time
import uuid
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest
from google.protobuf.duration_pb2 import Duration
from psycopg.types.json import Jsonb

from ledger.v1 import admin_service_pb2 as admin_pb
from ledger.v1 import ledger_service_pb2 as pb
from ledger.v1 import types_pb2
from support.ledger import CREDIT, Ledger, new_account, new_key

SOURCES = [
    types_pb2.CREDIT_SOURCE_SIGNUP,
    types_pb2.CREDIT_SOURCE_DAILY,
    types_pb2.CREDIT_SOURCE_MONTHLY_FREE,
    types_pb2.CREDIT_SOURCE_PURCHASE,
    types_pb2.CREDIT_SOURCE_ADMIN,
]
# Keys of a stored answer that name a row: compared by which row, not by its number.
ID_KEYS = {"lot_id", "transaction_id", "charge_transaction_id", "reservation_id"}
HOLD_UNTIL = "2999-01-01T00:00:00+00:00"
TIME_KEYS = {"as_of", "created_at", "expires_at", "finalized_at"}


def _fund(ledger: Ledger, account: str, rng: random.Random, feature: str) -> list[str]:
    """A few lots of mixed sources and expiries and a few holds across them, one of them
    priced by the rate card (feature). Returns the holds' reservation ids."""
    for _ in range(rng.randint(1, 6)):
        expiry = rng.choice([None, 3600, 7200, 86400])
        ledger.grant(
            account,
            micros=rng.randint(1, 40) * CREDIT + rng.randint(0, CREDIT),
            source=rng.choice(SOURCES),
            **({} if expiry is None else {"expires_in": Duration(seconds=expiry)}),
        )
    held = []
    for _ in range(rng.randint(1, 4)):
        available = ledger.balance(account).available_micros
        if available >= CREDIT and rng.random() < 0.4:  # 1,000 tokens cost 1 credit
            usage = types_pb2.Usage(
                feature=feature,
                model="m1",
                quantities=[
                    types_pb2.UsageQuantity(
                        unit=types_pb2.USAGE_UNIT_TOKENS, quantity=rng.randint(1, 1000)
                    )
                ],
            )
            reserved = ledger.stub.Reserve(
                pb.ReserveRequest(account_id=account, idempotency_key=new_key(), usage=usage)
            )
        else:
            reserved = ledger.reserve(
                account,
                rng.randint(1, available // 3 + 1),
                feature=rng.choice(["", "chat"]),
                comment=rng.choice(["", "held"]),
            )
        held.append(reserved.reservation.reservation_id)
    return held


def _requests(
    ledger: Ledger, accounts: list[str], held: dict[str, list[str]], rng: random.Random
) -> list[dict[str, object]]:
    """Consumes and Reserves, or Commits or Releases of the account's holds, for the
    accounts in an interleaved arrival order, each account's within its available credits."""
    calls: list[dict[str, object]] = []
    for number, account in enumerate(accounts):
        roll = rng.random()
        if roll < 0.25:
            holds = held[account]
            for call, place in enumerate(rng.sample(range(len(holds)), rng.randint(1, len(holds)))):
                calls.append(
                    {"op": "release", "account": account, "key": f"k{number}-{call}",
                     "hash": "ab", "reservation_id": holds[place],
                     "reason": rng.choice(["", "a reason"]), "job_failed": rng.random() < 0.5}
                )  # fmt: skip
            continue
        if roll < 0.55:
            holds = held[account]
            for call, place in enumerate(rng.sample(range(len(holds)), rng.randint(1, len(holds)))):
                reservation = ledger.stub.GetReservation(
                    pb.GetReservationRequest(account_id=account, reservation_id=holds[place])
                ).reservation
                amount = rng.choice(
                    [0, reservation.held_micros, rng.randint(0, reservation.held_micros)]
                )
                calls.append(
                    {"op": "commit", "account": account, "key": f"k{number}-{call}",
                     "hash": "ab", "amount": amount, "usage": None,
                     "comment": rng.choice(["", "a note"]), "reservation_id": holds[place]}
                )  # fmt: skip
            continue
        left = ledger.balance(account).available_micros
        for call in range(rng.randint(1, 5)):
            amount = rng.randint(1, max(1, left // 2))
            if amount > left:
                break
            left -= amount
            calls.append(
                {"op": rng.choice(["consume", "reserve"]), "account": account,
                 "key": f"k{number}-{call}", "hash": "ab", "amount": amount, "usage": None,
                 "feature": rng.choice(["", "chat"]), "comment": rng.choice(["", "a note"]),
                 "expires_at": HOLD_UNTIL}
            )  # fmt: skip
    rng.shuffle(calls)
    return calls


def _moment_after(conn: psycopg.Connection[Any], accounts: list[str]) -> datetime:
    row = conn.execute(
        "SELECT max(created_at) + interval '1 second' FROM journal_transactions"
        " WHERE account_id = ANY (%s)",
        (accounts,),
    ).fetchone()
    assert row is not None
    moment: datetime = row[0]
    return moment


def _canonical(value: Any, ids: dict[str, str], now_micros: int) -> Any:
    """A stored answer with row numbers replaced by which row they name."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key in ID_KEYS and item not in (None, ""):
                out[key] = ids.setdefault(str(item), f"{key}#{len(ids)}")
            elif key in TIME_KEYS and isinstance(item, int):
                out[key] = "now" if item == now_micros else "earlier"
            elif key == "account_id":
                out[key] = "account"
            else:
                out[key] = _canonical(item, ids, now_micros)
        return out
    if isinstance(value, list):
        return [_canonical(item, ids, now_micros) for item in value]
    return value


def _snapshot(conn: psycopg.Connection[Any], account: str, now: datetime) -> dict[str, Any]:
    """Everything a Consume writes for the account, with its row numbers replaced by the
    row's place (lots by lot_id, entries by transaction_id) and times by whether they are
    the batch's moment."""
    lots: dict[Any, str] = {}
    entries: dict[Any, str] = {}
    reservations: dict[Any, str] = {}
    params = {"account": account, "now": now}

    def rows(sql: str) -> list[tuple[Any, ...]]:
        return conn.execute(sql, params).fetchall()

    lot_rows = rows(
        "SELECT lot_id, source, balance_kind, amount_micros, remaining_micros, held_micros,"
        " depleted FROM lots WHERE account_id = %(account)s ORDER BY lot_id"
    )
    for place, lot in enumerate(lot_rows):
        lots[lot[0]] = f"lot#{place}"
    journal = rows(
        "SELECT transaction_id, kind, amount_micros, reservation_id, feature, model, comment,"
        " usage, created_at = %(now)s FROM journal_transactions"
        " WHERE account_id = %(account)s ORDER BY transaction_id"
    )
    for place, entry in enumerate(journal):
        entries[entry[0]] = f"transaction#{place}"
        if entry[3] is not None:
            reservations.setdefault(entry[3], f"reservation#{place}")

    def named(row: tuple[Any, ...], ids: dict[int, dict[Any, str]]) -> list[Any]:
        """The row with the values of columns ``ids`` (by position) replaced by name."""
        return [ids[i].get(v, v) if i in ids else v for i, v in enumerate(row)]

    def table(sql: str, ids: dict[int, dict[Any, str]]) -> list[list[Any]]:
        return sorted((named(row, ids) for row in rows(sql)), key=repr)

    answer_ids = {str(lot_id): name for lot_id, name in lots.items()}
    micros = round(now.timestamp() * 1_000_000)
    return {
        "account": rows(
            "SELECT balance_micros, held_micros, reward_balance_micros,"
            " next_maintenance_at > %(now)s FROM accounts WHERE account_id = %(account)s"
        ),
        "lots": [named(lot, {0: lots}) for lot in lot_rows],
        "journal": [named(entry, {0: entries, 3: reservations}) for entry in journal],
        "postings": table(
            "SELECT transaction_id, posting_no, ledger_account, lot_id, source, amount_micros,"
            " memo FROM postings WHERE account_id = %(account)s",
            {0: entries, 3: lots},
        ),
        "reservations": table(
            "SELECT reservation_id, status, held_micros, committed_micros, refunded_micros,"
            " expires_at = %(now)s, created_at = %(now)s, finalized_at = %(now)s, feature,"
            " model, comment, usage, charge_transaction_id, hold_transaction_id"
            " FROM reservations WHERE account_id = %(account)s",
            {0: reservations, 12: entries, 13: entries},
        ),
        "reservation_lots": table(
            "SELECT reservation_id, lot_id, seq, held_micros, committed_micros, refunded_micros,"
            " refund_expired_micros FROM reservation_lots WHERE account_id = %(account)s",
            {0: reservations, 1: lots},
        ),
        "answers": [
            (key, operation, bytes(digest), _canonical(response, answer_ids, micros))
            for key, operation, digest, response in rows(
                "SELECT idempotency_key, operation, request_hash, response FROM idempotency_keys"
                " WHERE account_id = %(account)s AND idempotency_key ~ '^k[0-9]+-[0-9]+$'"
                " ORDER BY idempotency_key"
            )
        ],
    }


@pytest.mark.parametrize("seed", range(8))
def test_the_set_leaves_every_account_as_the_calls_one_by_one_would(
    ledger: Ledger, admin: Any, ledger_db_url: str, seed: int
) -> None:
    rng = random.Random(seed)
    feature = f"priced-{uuid.uuid4().hex[:8]}"
    admin.SetPrice(
        admin_pb.SetPriceRequest(
            price=admin_pb.Price(feature=feature, model="m1", unit=types_pb2.USAGE_UNIT_TOKENS,
                                 unit_size=1, unit_price_micros=CREDIT // 1000),
            idempotency_key=new_key(),
        )
    )  # fmt: skip
    count = rng.randint(1, 4)
    by_set = [new_account(f"set{seed}-{n}") for n in range(count)]
    one_by_one = [new_account(f"one{seed}-{n}") for n in range(count)]
    held: dict[str, list[str]] = {}
    for pair in zip(by_set, one_by_one, strict=True):
        funding = rng.getstate()
        for account in pair:  # the same lots, holds and calls for both
            rng.setstate(funding)
            held[account] = _fund(ledger, account, rng, feature)
    calls_state = rng.getstate()
    set_calls = _requests(ledger, by_set, held, rng)
    rng.setstate(calls_state)
    single_calls = _requests(ledger, one_by_one, held, rng)
    with psycopg.connect(ledger_db_url, autocommit=True) as conn:
        # No low-balance alert: a call raising one goes one by one (the test below).
        conn.execute(
            "UPDATE accounts SET low_balance_threshold_micros = 0 WHERE account_id = ANY (%s)",
            (by_set + one_by_one,),
        )
        now = _moment_after(conn, by_set + one_by_one)
        row = conn.execute("SELECT ledger_take_set(%s, %s)", (Jsonb(set_calls), now)).fetchone()
        assert row is not None
        assert all(result is not None and "ok" in result for result in row[0])
        with conn.transaction():  # what ledger_consume_batch does when the set takes none
            in_batch_order = sorted(
                range(len(single_calls)),
                key=lambda n: (str(single_calls[n]["account"]).encode(), n),
            )
            answers: list[Any] = [None] * len(single_calls)
            for n in in_batch_order:
                call = single_calls[n]
                answers[n] = conn.execute(
                    "SELECT ledger_batch_call(%s, %s)", (Jsonb(call), now)
                ).fetchone()[0]  # type: ignore[index]
        micros = round(now.timestamp() * 1_000_000)
        for result, answer in zip(row[0], answers, strict=True):
            assert result["ok"]["replayed"] is False
            assert _canonical(result["ok"], {}, micros).keys() == answer.keys()
        for mine, theirs in zip(by_set, one_by_one, strict=True):
            assert _snapshot(conn, mine, now) == _snapshot(conn, theirs, now)


def test_a_usage_priced_hold_committed_by_an_amount_journals_no_usage_by_set_or_alone(
    ledger: Ledger, admin: Any, ledger_db_url: str
) -> None:
    """The charge of an amount was not priced by the rate card: neither path copies the
    hold's estimate onto it (helper-55); the reservation keeps the estimate."""
    feature = f"priced-{uuid.uuid4().hex[:8]}"
    admin.SetPrice(
        admin_pb.SetPriceRequest(
            price=admin_pb.Price(feature=feature, unit=types_pb2.USAGE_UNIT_TOKENS,
                                 unit_size=1, unit_price_micros=CREDIT // 1000),
            idempotency_key=new_key(),
        )
    )  # fmt: skip
    by_set, alone = new_account("usage-by-set"), new_account("usage-alone")
    held = {}
    for account in (by_set, alone):
        ledger.grant(account, 10)
        usage = types_pb2.Usage(
            feature=feature,
            quantities=[types_pb2.UsageQuantity(unit=types_pb2.USAGE_UNIT_TOKENS, quantity=4000)],
        )
        held[account] = ledger.stub.Reserve(
            pb.ReserveRequest(account_id=account, idempotency_key=new_key(), usage=usage,
                              ttl=Duration(seconds=86400))
        ).reservation.reservation_id  # fmt: skip

    def commit(account: str) -> dict[str, object]:
        return {"op": "commit", "account": account, "key": "k0-0", "hash": "ab",
                "amount": CREDIT, "usage": None, "comment": "",
                "reservation_id": held[account]}  # fmt: skip

    with psycopg.connect(ledger_db_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE accounts SET low_balance_threshold_micros = 0 WHERE account_id = ANY (%s)",
            ([by_set, alone],),
        )
        now = _moment_after(conn, [by_set, alone])
        row = conn.execute(
            "SELECT ledger_take_set(%s, %s)", (Jsonb([commit(by_set)]), now)
        ).fetchone()
        assert row is not None and row[0][0] is not None and "ok" in row[0][0], row  # taken
        conn.execute("SELECT ledger_batch_call(%s, %s)", (Jsonb(commit(alone)), now))
        assert _snapshot(conn, by_set, now) == _snapshot(conn, alone, now)
        for account in (by_set, alone):
            charged = conn.execute(
                "SELECT j.amount_micros, j.usage, v.usage ->> 'cost_micros'"
                " FROM journal_transactions j JOIN reservations v USING (account_id)"
                " WHERE j.account_id = %s AND j.kind = 'charge'"
                " AND v.reservation_id = j.reservation_id",
                (account,),
            ).fetchall()
            assert charged == [(-CREDIT, None, str(4 * CREDIT))], account


def test_the_set_records_each_call_at_the_time_it_was_received(
    ledger: Ledger, ledger_db_url: str
) -> None:
    """The set paths judge at the batch's latest time but record each call's own, as the
    call alone would: the journal entry, the reservation, the stored answer and its
    balance's as_of."""
    spender, committer = new_account("at-spender"), new_account("at-committer")
    releaser = new_account("at-releaser")
    accounts = [spender, committer, releaser]
    for account in accounts:
        ledger.grant(account, 10)
    day = Duration(seconds=86400)
    hold = ledger.reserve(committer, 3 * CREDIT, ttl=day).reservation
    failed_job = ledger.reserve(releaser, 2 * CREDIT, ttl=day).reservation
    with psycopg.connect(ledger_db_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE accounts SET low_balance_threshold_micros = 0 WHERE account_id = ANY (%s)",
            (accounts,),
        )
        start = _moment_after(conn, accounts)
        at = [start + timedelta(milliseconds=ms) for ms in (0, 40, 70, 90)]
        calls = [
            {"op": "consume", "account": spender, "key": "k0-0", "hash": "ab",
             "amount": CREDIT, "usage": None, "feature": "", "comment": "",
             "now": at[0].isoformat()},
            {"op": "reserve", "account": spender, "key": "k0-1", "hash": "ab",
             "amount": CREDIT, "usage": None, "feature": "", "comment": "",
             "expires_at": HOLD_UNTIL, "now": at[1].isoformat()},
            {"op": "commit", "account": committer, "key": "k1-0", "hash": "ab",
             "amount": CREDIT, "usage": None, "comment": "",
             "reservation_id": hold.reservation_id, "now": at[2].isoformat()},
            {"op": "release", "account": releaser, "key": "k2-0", "hash": "ab",
             "reservation_id": failed_job.reservation_id, "reason": "", "job_failed": True,
             "now": at[3].isoformat()},
        ]  # fmt: skip
        latest = at[3] + timedelta(milliseconds=5)
        row = conn.execute("SELECT ledger_take_set(%s, %s)", (Jsonb(calls), latest)).fetchone()
        assert row is not None and all("ok" in result for result in row[0]), row
        answers = [result["ok"] for result in row[0]]
        consumed, reserved, _, _ = answers
        entries = conn.execute(
            "SELECT kind, reservation_id::text, created_at FROM journal_transactions"
            " WHERE account_id = ANY (%s) AND created_at >= %s",
            (accounts, start),
        ).fetchall()
        reservations = conn.execute(
            "SELECT reservation_id::text, created_at, finalized_at FROM reservations"
            " WHERE reservation_id = ANY (%s::uuid[])",
            ([answer["reservation"]["reservation_id"] for answer in answers],),
        ).fetchall()
        stored = dict(
            conn.execute(
                "SELECT idempotency_key, created_at FROM idempotency_keys"
                " WHERE account_id = ANY (%s) AND idempotency_key LIKE 'k%%'",
                (accounts,),
            ).fetchall()
        )
    assert sorted(entries, key=lambda entry: entry[2]) == [
        ("charge", consumed["reservation"]["reservation_id"], at[0]),
        ("hold", reserved["reservation"]["reservation_id"], at[1]),
        ("charge", hold.reservation_id, at[2]),
        ("release", failed_job.reservation_id, at[3]),
    ]
    by_id = {r[0]: r[1:] for r in reservations}
    assert by_id[consumed["reservation"]["reservation_id"]] == (at[0], at[0])
    assert by_id[reserved["reservation"]["reservation_id"]] == (at[1], None)
    assert by_id[hold.reservation_id][1] == at[2]  # finalized by the Commit
    assert by_id[failed_job.reservation_id][1] == at[3]  # and by the Release
    assert stored == {"k0-0": at[0], "k0-1": at[1], "k1-0": at[2], "k2-0": at[3]}
    assert [answer["balance"]["as_of"] for answer in answers] == [
        round(moment.timestamp() * 1_000_000) for moment in at
    ]


def test_the_set_takes_only_calls_sure_to_succeed(ledger: Ledger, ledger_db_url: str) -> None:
    """Each account below has one reason for its calls to go one by one; the last two have
    none. Those left changed nothing; the batch function then answers them alone."""
    accounts = {
        reason: new_account(f"left-{reason}")
        for reason in ("short", "replayed", "twice", "priced", "commit", "due", "alert",
                       "many-lots", "unknown", "over-held", "settled-twice", "priced-commit",
                       "not-pending", "no-such-hold", "held-lot-expired", "commit-alert",
                       "short-hold", "taken", "commits-taken")
    }  # fmt: skip
    for reason, account in accounts.items():
        if reason == "unknown":
            continue
        if reason == "many-lots":
            for _ in range(65):
                ledger.grant(account, 1)
        else:
            ledger.grant(account, 10)
    ledger.grant(accounts["due"], 1, expires_in=Duration(seconds=3600))
    # Held first (nearest expiry), expired when the batch runs, its hold still pending.
    ledger.grant(accounts["held-lot-expired"], 1, expires_in=Duration(seconds=3600))
    used = new_key()
    ledger.consume(accounts["replayed"], CREDIT, key=used)
    day = Duration(seconds=86400)  # the holds outlast the batch's moment

    def hold(reason: str, credits: float = 1) -> str:
        held = ledger.reserve(accounts[reason], round(credits * CREDIT), ttl=day)
        return held.reservation.reservation_id

    holds = {reason: hold(reason) for reason in (
        "commit", "over-held", "settled-twice", "priced-commit", "not-pending",
        "held-lot-expired")}  # fmt: skip
    holds["commit-alert"] = hold("commit-alert", 9.5)
    holds["commits-taken"], second_hold = hold("commits-taken", 2), hold("commits-taken", 3)
    ledger.commit(accounts["not-pending"], holds["not-pending"], CREDIT)

    def call(reason: str, amount: float = 1, **fields: object) -> dict[str, object]:
        return {"account": accounts[reason], "key": new_key(), "hash": "ab",
                "amount": round(amount * CREDIT), "usage": None, "feature": "", "comment": "",
                **fields}  # fmt: skip

    def commit(reason: str, amount: float = 1, **fields: object) -> dict[str, object]:
        return call(reason, amount, **{"op": "commit", "reservation_id": holds[reason], **fields})

    twice = new_key()
    requests = [
        call("short", 6), call("short", 5),  # 11 of 10: the second is refused
        call("replayed", key=used),
        call("twice", key=twice), call("twice", key=twice),
        call("priced", usage={"feature": "chat", "quantities": {"tokens": 1}}),
        call("commit"), commit("commit"),
        call("due"),
        call("alert", 9.5),
        call("many-lots", 65),
        call("unknown"),
        commit("over-held", 1.5),
        commit("settled-twice", 0.5), commit("settled-twice", 0.5),
        commit("priced-commit", usage={"quantities": [{"unit": "tokens", "quantity": 1}]}),
        commit("not-pending"),
        call("no-such-hold", op="commit", reservation_id=str(uuid.uuid4())),
        commit("held-lot-expired", 0.5),
        commit("commit-alert", 9.5),
        call("taken", 2), call("taken", 3, op="reserve", expires_at=HOLD_UNTIL),
        commit("commits-taken", 1.5), commit("commits-taken", 3, reservation_id=second_hold),
    ]  # fmt: skip
    with psycopg.connect(ledger_db_url, autocommit=True) as conn:
        # One alert threshold, on the accounts meant to raise an alert.
        conn.execute(
            "UPDATE accounts SET low_balance_threshold_micros ="
            " CASE WHEN account_id = ANY (%s) THEN %s ELSE 0 END WHERE account_id = ANY (%s)",
            ([accounts["alert"], accounts["commit-alert"]], CREDIT, list(accounts.values())),
        )
        now = _moment_after(conn, list(accounts.values())) + timedelta(hours=2)
        # A hold of the batch times out before a later call on its account: alone, that
        # call would first release it (helper-53).
        requests[:0] = [
            call("short-hold", op="reserve", now=(now - timedelta(milliseconds=20)).isoformat(),
                 expires_at=(now - timedelta(milliseconds=15)).isoformat()),
            call("short-hold"),
        ]  # fmt: skip
        # What a call at `now` does first: the expired lot's unheld credits expire, and
        # nothing is due on the account until its hold times out.
        conn.execute("SELECT ledger_lock_account(%s, %s)", (accounts["held-lot-expired"], now))
        before = {
            reason: _snapshot(conn, account, now)
            for reason, account in accounts.items()
            if not reason.endswith("taken")
        }
        row = conn.execute("SELECT ledger_take_set(%s, %s)", (Jsonb(requests), now)).fetchone()
        assert row is not None
        taken = [n for n, result in enumerate(row[0]) if result is not None]
        assert taken == list(range(len(requests) - 4, len(requests)))
        for reason, snapshot in before.items():
            assert _snapshot(conn, accounts[reason], now) == snapshot, reason
        consumed, reserved, first, second = (result["ok"] for result in row[0][-4:])
        assert consumed["balance"]["balance_micros"] == 8 * CREDIT
        assert reserved["reservation"]["status"] == "pending"
        assert (reserved["balance"]["balance_micros"], reserved["balance"]["held_micros"]) == (
            8 * CREDIT,
            3 * CREDIT,
        )
        assert (first["reservation"]["status"], first["reservation"]["committed_micros"]) == (
            "committed",
            1.5 * CREDIT,
        )
        assert (first["balance"]["balance_micros"], first["balance"]["held_micros"]) == (
            8.5 * CREDIT,
            3 * CREDIT,
        )
        assert (second["balance"]["balance_micros"], second["balance"]["held_micros"]) == (
            5.5 * CREDIT,
            0,
        )


def test_the_release_set_takes_only_calls_sure_to_succeed(
    ledger: Ledger, admin: Any, ledger_db_url: str
) -> None:
    """As above for Releases: each account but the last has one reason for its calls to go
    one by one, and those changed nothing."""
    reasons = ("replayed", "twice", "not-pending", "no-such-hold", "held-lot-expired", "due",
               "timed-out", "beside-consume", "overdraft", "taken")  # fmt: skip
    accounts = {reason: new_account(f"release-{reason}") for reason in reasons}
    day = Duration(seconds=86400)
    holds: dict[str, str] = {}
    for reason, account in accounts.items():
        if reason == "held-lot-expired":  # held first (nearest expiry), expired by the batch
            ledger.grant(account, 1, expires_in=Duration(seconds=3600))
        ledger.grant(account, 10)
        ttl = Duration(seconds=60) if reason == "timed-out" else day
        holds[reason] = ledger.reserve(account, CREDIT, ttl=ttl).reservation.reservation_id
    # Not held, expired by the batch: the account has maintenance due.
    ledger.grant(accounts["due"], 1, expires_in=Duration(seconds=3600))
    # Priced by a model: its release is listed under that model too, as alone.
    feature = f"priced-{uuid.uuid4().hex[:8]}"
    admin.SetPrice(
        admin_pb.SetPriceRequest(
            price=admin_pb.Price(feature=feature, model="m1", unit=types_pb2.USAGE_UNIT_TOKENS,
                                 unit_size=1, unit_price_micros=CREDIT // 1000),
            idempotency_key=new_key(),
        )
    )  # fmt: skip
    usage = types_pb2.Usage(
        feature=feature,
        model="m1",
        quantities=[types_pb2.UsageQuantity(unit=types_pb2.USAGE_UNIT_TOKENS, quantity=2000)],
    )
    second_hold = ledger.stub.Reserve(
        pb.ReserveRequest(account_id=accounts["taken"], idempotency_key=new_key(), usage=usage,
                          ttl=day)
    ).reservation  # fmt: skip
    ledger.commit(accounts["not-pending"], holds["not-pending"], CREDIT)
    admin.SetOverdraftLimit(
        admin_pb.SetOverdraftLimitRequest(
            account_id=accounts["overdraft"], overdraft_limit_micros=CREDIT, reason="test",
            idempotency_key=new_key(),
        )
    )  # fmt: skip
    used = new_key()
    ledger.consume(accounts["replayed"], CREDIT, key=used)

    def release(why: str, **fields: object) -> dict[str, object]:
        return {"op": "release", "account": accounts[why], "key": new_key(), "hash": "ab",
                "reservation_id": holds[why], "reason": "", "job_failed": False,
                **fields}  # fmt: skip

    requests = [
        release("replayed", key=used),
        release("twice"), release("twice"),
        release("not-pending"),
        release("no-such-hold", reservation_id=str(uuid.uuid4())),
        release("held-lot-expired"),
        release("due"),
        release("timed-out"),
        release("overdraft"),
        release("beside-consume"),
        {"account": accounts["beside-consume"], "key": new_key(), "hash": "ab",
         "amount": CREDIT, "usage": None, "feature": "", "comment": ""},
        release("taken", job_failed=True),
        release("taken", reservation_id=second_hold.reservation_id, reason="cancelled"),
    ]  # fmt: skip
    with psycopg.connect(ledger_db_url, autocommit=True) as conn:
        now = _moment_after(conn, list(accounts.values())) + timedelta(hours=2)
        conn.execute("SELECT ledger_lock_account(%s, %s)", (accounts["held-lot-expired"], now))
        before = {
            reason: _snapshot(conn, account, now)
            for reason, account in accounts.items()
            if reason != "taken"
        }
        row = conn.execute("SELECT ledger_take_set(%s, %s)", (Jsonb(requests), now)).fetchone()
        assert row is not None
        taken = [n for n, result in enumerate(row[0]) if result is not None]
        assert taken == [len(requests) - 2, len(requests) - 1]
        for reason, snapshot in before.items():
            assert _snapshot(conn, accounts[reason], now) == snapshot, reason
        failed, released = (result["ok"] for result in row[0][-2:])
        comments = conn.execute(
            "SELECT comment, model FROM journal_transactions"
            " WHERE account_id = %s AND kind = 'release' ORDER BY transaction_id",
            (accounts["taken"],),
        ).fetchall()
    assert (failed["reservation"]["status"], released["reservation"]["status"]) == (
        "failed",
        "released",
    )
    assert (failed["balance"]["held_micros"], released["balance"]["held_micros"]) == (
        2 * CREDIT,
        0,
    )
    assert comments == [("job failed", None), ("cancelled", "m1")]
    balance = ledger.balance(accounts["taken"])
    assert (balance.balance_micros, balance.held_micros) == (10 * CREDIT, 0)


def test_the_sets_judge_at_the_latest_time_a_call_was_received(
    ledger: Ledger, ledger_db_url: str
) -> None:
    """A call received after another hold of its account timed out is not taken, even
    when the batch's own time is earlier: alone, it would first release that hold."""
    account = new_account("late-call")
    ledger.grant(account, 10)
    ledger.reserve(account, CREDIT, ttl=Duration(seconds=60))  # times out within a minute
    later = ledger.reserve(account, CREDIT, ttl=Duration(seconds=86400)).reservation
    with psycopg.connect(ledger_db_url, autocommit=True) as conn:
        batch_time = _moment_after(conn, [account])
        release = {"op": "release", "account": account, "key": new_key(), "hash": "ab",
                   "reservation_id": later.reservation_id, "reason": "", "job_failed": False,
                   "now": (batch_time + timedelta(minutes=2)).isoformat()}  # fmt: skip
        row = conn.execute(
            "SELECT ledger_take_set(%s, %s)", (Jsonb([release]), batch_time)
        ).fetchone()
    assert row is not None and row[0] == [None]
    assert ledger.balance(account).held_micros == 2 * CREDIT


def test_a_batch_draws_its_journal_ids_once_it_holds_the_accounts(
    ledger: Ledger, ledger_db_url: str
) -> None:
    """ListTransactions pages by journal id, newest first: an account's ids must grow in
    commit order. A batch that waits for an account's lock while another call on it commits
    must not have taken its ids before that call did."""
    account = new_account("ordered")
    ledger.grant(account, 10)
    request = {"account": account, "key": new_key(), "hash": "ab", "amount": CREDIT,
               "usage": None, "feature": "", "comment": ""}  # fmt: skip
    taken: list[Any] = []

    def run_batch() -> None:
        with psycopg.connect(ledger_db_url, autocommit=True) as conn:
            row = conn.execute("SELECT ledger_take_set(%s, now())", (Jsonb([request]),))
            taken.append(row.fetchone())

    with psycopg.connect(ledger_db_url) as holder:
        holder.execute("SELECT 1 FROM accounts WHERE account_id = %s FOR UPDATE", (account,))
        batch = threading.Thread(target=run_batch)
        batch.start()
        deadline = time.monotonic() + 30
        with psycopg.connect(ledger_db_url, autocommit=True) as watcher:
            while not watcher.execute(
                "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND query LIKE 'SELECT ledger_take_set%%'"
            ).fetchone():
                assert time.monotonic() < deadline, "the batch never waited for the lock"
                time.sleep(0.02)
        # While the batch waits: another call on the account takes a journal id and commits.
        holder.execute(
            "SELECT ledger_grant(%s, %s, '\\x01', 1000000, 'purchase', NULL, 'main', '', '', "
            "NULL, now())",
            (account, new_key()),
        )
        holder.commit()
    batch.join(30)
    [[results]] = taken
    assert results[0] is not None  # the set took the charge
    kinds = [t.kind for t in ledger.transactions(account)]  # newest first, by id
    assert kinds[:2] == [pb.TRANSACTION_KIND_CHARGE, pb.TRANSACTION_KIND_GRANT]
