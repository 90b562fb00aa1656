"""The bench dataset, loaded with set-based SQL that writes exactly what the ledger
functions write (a GRANT transaction with its lot and two balanced postings per lot; a
CHARGE with its committed reservation, reservation lot and postings per journal entry),
so `python -m ledger_server audit` stays clean. Each part is loaded once and reused by
later runs on the same database (BENCH_FRESH=1 reloads).

Accounts:
  bench-acct-000000..   the random-account scenarios: 5 lots each, mixed sources/expiries
  bench-hot             one account under all the load (topped up before each run)
  bench-journal         one account with a long journal (1,000,000 entries)
  bench-lots-10000      10,000 live lots
  bench-lots-5          5 live lots
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from psycopg.rows import TupleRow

Conn = psycopg.Connection[TupleRow]

CREDIT = 1_000_000
HOT = "bench-hot"
JOURNAL = "bench-journal"
MANY_LOTS = "bench-lots-10000"
FEW_LOTS = "bench-lots-5"
ACCOUNT_PREFIX = "bench-acct-"


def account_id(i: int) -> str:
    return f"{ACCOUNT_PREFIX}{i:06d}"


@dataclass(frozen=True)
class Sizes:
    accounts: int
    journal_entries: int
    many_lots: int


# A plan row per lot to grant: (account_id, k, source, amount, expires_at). Loaded into
# the temp table bench_plan, then turned into transactions, lots and postings.
_PLAN_TABLE = """
CREATE TEMP TABLE bench_plan (
    account_id text, k int, source text, amount bigint, expires_at timestamptz
) ON COMMIT DROP
"""

# Five lots per account, in the shapes production sees: a small daily reward (spent
# first, so early charges span two lots), expiring sign-up and promotion credits, a
# subscription period and permanent purchased credits.
_RANDOM_ACCOUNTS_PLAN = """
INSERT INTO bench_plan
SELECT 'bench-acct-' || lpad(i::text, 6, '0'), k, src.source, src.amount,
       CASE WHEN src.days IS NULL THEN NULL
            ELSE now() + make_interval(days => src.days + (i * 7 + k) %% src.spread) END
  FROM generate_series(0, %(n)s - 1) i
 CROSS JOIN (VALUES (0, 'daily',        50000::bigint,        NULL::int, 1),
                    (1, 'signup',       100000000::bigint,    7,         23),
                    (2, 'promotion',    100000000::bigint,    30,        60),
                    (3, 'subscription', 500000000::bigint,    30,        335),
                    (4, 'purchase',     1000000000::bigint,   NULL,      1))
       AS src (k, source, amount, days, spread)
"""


def _grant_plan(conn: Conn) -> int:
    """Writes bench_plan as GRANT transactions: for each row a transaction, a lot and
    two postings (account side and issuance), then the accounts' balances and next
    maintenance time (the nearest expiry). The accounts must exist."""
    conn.execute("ANALYZE bench_plan")  # else the planner takes the temp table for empty
    conn.execute(
        """
        INSERT INTO journal_transactions (account_id, kind, amount_micros, comment,
                                          external_ref, created_at)
        SELECT account_id, 'grant', amount, 'bench load', 'bench-lot-' || k,
               now() - interval '1 day'
          FROM bench_plan
        """
    )
    conn.execute(
        """
        INSERT INTO lots (account_id, source, balance_kind, amount_micros, remaining_micros,
                          priority, expires_at, created_at, external_ref, grant_transaction_id)
        SELECT p.account_id, p.source, 'main', p.amount, p.amount, cs.priority, p.expires_at,
               t.created_at, t.external_ref, t.transaction_id
          FROM bench_plan p
          JOIN credit_sources cs ON cs.source = p.source
          JOIN journal_transactions t
            ON t.account_id = p.account_id AND t.external_ref = 'bench-lot-' || p.k
           AND t.kind = 'grant'
        """
    )
    conn.execute(
        """
        INSERT INTO postings (account_id, transaction_id, posting_no, ledger_account, lot_id,
                              source, amount_micros)
        SELECT l.account_id, l.grant_transaction_id, 0, 'account:main', l.lot_id, l.source,
               l.amount_micros
          FROM lots l WHERE l.account_id IN (SELECT DISTINCT account_id FROM bench_plan)
        UNION ALL
        SELECT l.account_id, l.grant_transaction_id, 1, 'issuance:' || l.source, NULL,
               l.source, -l.amount_micros
          FROM lots l WHERE l.account_id IN (SELECT DISTINCT account_id FROM bench_plan)
        """
    )
    cur = conn.execute(
        """
        UPDATE accounts a
           SET balance_micros = s.total, next_maintenance_at = s.next_expiry
          FROM (SELECT account_id, sum(remaining_micros) AS total,
                       min(expires_at) FILTER (WHERE remaining_micros > 0) AS next_expiry
                  FROM lots WHERE account_id IN (SELECT DISTINCT account_id FROM bench_plan)
                 GROUP BY account_id) s
         WHERE a.account_id = s.account_id
        """
    )
    return cur.rowcount


def _create_accounts(conn: Conn, ids_sql: str, params: dict[str, object]) -> None:
    conn.execute(
        f"INSERT INTO accounts (account_id, created_at) SELECT id, now() - interval '1 day' "
        f"FROM ({ids_sql}) ids (id)",
        params,
    )


def _exists(conn: Conn, account: str) -> bool:
    return (
        conn.execute("SELECT 1 FROM accounts WHERE account_id = %s", (account,)).fetchone()
        is not None
    )


def _fast_session(conn: Conn) -> None:
    """Loading only: no waiting for WAL flush; foreign-key triggers off when allowed
    (superuser) since the rows are consistent by construction and the audit checks them."""
    conn.execute("SET synchronous_commit = off")
    with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
        conn.execute("SET session_replication_role = replica")


def load_random_accounts(conn: Conn, n: int) -> bool:
    if _exists(conn, account_id(n - 1)):
        return False
    with conn.transaction():
        _create_accounts(
            conn,
            "SELECT 'bench-acct-' || lpad(i::text, 6, '0') FROM generate_series(0, %(n)s - 1) i",
            {"n": n},
        )
        conn.execute(_PLAN_TABLE)
        conn.execute(_RANDOM_ACCOUNTS_PLAN, {"n": n})
        _grant_plan(conn)
    return True


def load_lot_accounts(conn: Conn, many: int) -> bool:
    """bench-lots-<many> (that many live lots, mixed expiries) and bench-lots-5, plus the
    hot account (5 large lots)."""
    if _exists(conn, MANY_LOTS):
        return False
    with conn.transaction():
        _create_accounts(
            conn, "VALUES (%(a)s), (%(b)s), (%(c)s)", {"a": MANY_LOTS, "b": FEW_LOTS, "c": HOT}
        )
        conn.execute(_PLAN_TABLE)
        conn.execute(
            """
            INSERT INTO bench_plan
            SELECT %(many_id)s, i, CASE WHEN i %% 3 = 0 THEN 'promotion' ELSE 'purchase' END,
                   10000000, CASE WHEN i %% 3 = 0 THEN now() + make_interval(days => 10 + i %% 300)
                                 ELSE NULL END
              FROM generate_series(0, %(many)s - 1) i
            UNION ALL
            SELECT acct, i, 'purchase', 100000 * 1000000::bigint, NULL
              FROM generate_series(0, 4) i CROSS JOIN (VALUES (%(few)s), (%(hot)s)) a (acct)
            """,
            {"many_id": MANY_LOTS, "many": many, "few": FEW_LOTS, "hot": HOT},
        )
        _grant_plan(conn)
    return True


def top_up(conn: Conn, account: str, minimum_micros: int) -> None:
    """Grants through the ledger function itself when the account runs low."""
    row = conn.execute(
        "SELECT balance_micros - held_micros FROM accounts WHERE account_id = %s", (account,)
    ).fetchone()
    if row is not None and row[0] >= minimum_micros:
        return
    conn.execute(
        "SELECT ledger_grant(%s, gen_random_uuid()::text, '\\x00'::bytea, %s, 'purchase', NULL,"
        " 'main', '', 'bench top-up', 'bench', now())",
        (account, minimum_micros * 2),
    )


def settle(conn: Conn, account: str) -> None:
    """Applies what is due on the account (the holds an earlier run left to time out) the way
    the sweeper would, before the measured window: a scenario then measures its own calls,
    not the release of an earlier run's backlog inside its first call."""
    conn.execute("SELECT ledger_balance(%s, now())", (account,))


def load_journal(conn: Conn, entries: int) -> bool:
    """bench-journal: one purchase lot and entries - 1 charges of 0.001 credits, each as a
    Consume writes it (transaction, committed reservation, reservation lot, 2 postings,
    idempotency key)."""
    if _exists(conn, JOURNAL):
        return False
    charges = entries - 1
    charge = 1000
    granted = charges * charge + 1000 * CREDIT
    with conn.transaction():
        _create_accounts(conn, "VALUES (%(a)s)", {"a": JOURNAL})
        conn.execute(_PLAN_TABLE)
        conn.execute(
            "INSERT INTO bench_plan VALUES (%s, 0, 'purchase', %s, NULL)",
            (JOURNAL, granted),
        )
        _grant_plan(conn)
        lot_id = conn.execute(
            "SELECT lot_id FROM lots WHERE account_id = %s", (JOURNAL,)
        ).fetchone()
        assert lot_id is not None
        # A block of transaction ids of our own, in time order, so the journal's keyset
        # (newest first by transaction_id) matches created_at like the real one.
        seq = conn.execute(
            "SELECT pg_get_serial_sequence('journal_transactions', 'transaction_id')"
        ).fetchone()
        assert seq is not None
        base_row = conn.execute("SELECT nextval(%s)", (seq[0],)).fetchone()
        assert base_row is not None
        base = int(base_row[0])
        conn.execute("SELECT setval(%s, %s)", (seq[0], base + charges))
        conn.execute(
            """
            CREATE TEMP TABLE bench_charges ON COMMIT DROP AS
            SELECT %(base)s + n AS txn, gen_random_uuid() AS rid,
                   now() - interval '1 day' + n * interval '10 ms' AS ts
              FROM generate_series(1, %(charges)s) n
            """,
            {"base": base, "charges": charges},
        )
        params = {"acct": JOURNAL, "lot": lot_id[0], "amount": charge}
        conn.execute(
            """
            INSERT INTO journal_transactions (transaction_id, account_id, kind, amount_micros,
                                              reservation_id, feature, created_at)
            OVERRIDING SYSTEM VALUE
            SELECT txn, %(acct)s, 'charge', -%(amount)s, rid, 'bench', ts FROM bench_charges
            """,
            params,
        )
        conn.execute(
            """
            INSERT INTO reservations (account_id, reservation_id, status, held_micros,
                                      committed_micros, expires_at, created_at, finalized_at,
                                      feature, charge_transaction_id)
            SELECT %(acct)s, rid, 'committed', %(amount)s, %(amount)s, ts, ts, ts, 'bench', txn
              FROM bench_charges
            """,
            params,
        )
        conn.execute(
            """
            INSERT INTO reservation_lots (account_id, reservation_id, lot_id, seq, held_micros,
                                          committed_micros)
            SELECT %(acct)s, rid, %(lot)s, 0, %(amount)s, %(amount)s FROM bench_charges
            """,
            params,
        )
        conn.execute(
            """
            INSERT INTO postings (account_id, transaction_id, posting_no, ledger_account, lot_id,
                                  source, amount_micros)
            SELECT %(acct)s, txn, 0, 'account:main', %(lot)s, 'purchase', -%(amount)s
              FROM bench_charges
            UNION ALL
            SELECT %(acct)s, txn, 1, 'revenue:bench', NULL, NULL, %(amount)s FROM bench_charges
            """,
            params,
        )
        # Each charge's idempotency key with its stored answer, as a Consume stores them. An
        # empty table here, analyzed as empty by the load's VACUUM, had the server's cached
        # plans look keys up by a sequential scan until autovacuum analyzed it again (about
        # a minute into the run; session 20).
        conn.execute(
            """
            INSERT INTO idempotency_keys (account_id, idempotency_key, operation, request_hash,
                                          response, created_at)
            SELECT %(acct)s::text, rid::text, 'consume', sha256(rid::text::bytea),
                   jsonb_build_object(
                       'transaction_id', txn::text, 'low_balance_alert_id', NULL,
                       'reservation', jsonb_build_object(
                           'account_id', %(acct)s::text, 'reservation_id', rid::text,
                           'status', 'committed', 'feature', 'bench', 'model', '',
                           'comment', '', 'usage', NULL, 'held_micros', %(amount)s::bigint,
                           'committed_micros', %(amount)s::bigint, 'refunded_micros', 0,
                           'charge_transaction_id', txn::text, 'created_at', micros,
                           'expires_at', micros, 'finalized_at', micros,
                           'lots', jsonb_build_array(jsonb_build_object(
                               'lot_id', %(lot)s::text, 'source', 'purchase',
                               'held_micros', %(amount)s::bigint,
                               'committed_micros', %(amount)s::bigint,
                               'refunded_micros', 0, 'refund_expired_micros', 0))),
                       'balance', jsonb_build_object(
                           'account_id', %(acct)s::text, 'as_of', micros, 'held_micros', 0,
                           'balance_micros', after, 'available_micros', after,
                           'reward_balance_micros', 0)),
                   ts
              FROM (SELECT c.*, (extract(epoch FROM ts) * 1000000)::bigint AS micros,
                           %(granted)s::bigint
                               - (txn - %(base)s::bigint) * %(amount)s::bigint AS after
                      FROM bench_charges c) c
            """,
            {**params, "granted": granted, "base": base},
        )
        spent = charges * charge
        conn.execute(
            "UPDATE lots SET remaining_micros = remaining_micros - %s WHERE account_id = %s",
            (spent, JOURNAL),
        )
        conn.execute(
            "UPDATE accounts SET balance_micros = balance_micros - %s WHERE account_id = %s",
            (spent, JOURNAL),
        )
    return True


def oldest_transactions(conn: Conn, account: str, n: int) -> int:
    """The transaction id just above the account's n oldest: the `before` of the far page."""
    row = conn.execute(
        "SELECT transaction_id FROM journal_transactions WHERE account_id = %s"
        " ORDER BY transaction_id LIMIT 1 OFFSET %s",
        (account, n),
    ).fetchone()
    assert row is not None
    return int(row[0])


def _loaded_sizes(conn: Conn) -> Sizes:
    def count(sql: str, arg: str) -> int:
        row = conn.execute(sql, (arg,)).fetchone()
        return int(row[0]) if row else 0

    return Sizes(
        accounts=count(
            "SELECT count(*) FROM accounts WHERE account_id LIKE %s", ACCOUNT_PREFIX + "%"
        ),
        journal_entries=count(
            "SELECT count(*) FROM journal_transactions WHERE account_id = %s", JOURNAL
        ),
        many_lots=count("SELECT count(*) FROM lots WHERE account_id = %s", MANY_LOTS),
    )


def load(database_url: str, sizes: Sizes, fresh: bool, may_wipe: bool) -> dict[str, float]:
    """Loads what is missing; returns seconds per part (0 when it was already there). A
    dataset of other sizes (a quick run's) is replaced when ``may_wipe``."""
    timings: dict[str, float] = {}
    with psycopg.connect(database_url, autocommit=True) as conn:
        loaded = _loaded_sizes(conn)
        mismatch = [
            name for name, have in loaded.__dict__.items() if have and have != getattr(sizes, name)
        ]
        if mismatch and not fresh:
            if not may_wipe:
                raise SystemExit(
                    f"bench: the database holds a bench dataset of other sizes ({loaded});"
                    " use an empty database"
                )
            print(f"bench: dataset sizes differ ({loaded}); reloading", flush=True)
            fresh = True
        if fresh:
            wipe(conn)
        _fast_session(conn)
        steps: tuple[tuple[str, Callable[[], bool]], ...] = (
            ("random_accounts", lambda: load_random_accounts(conn, sizes.accounts)),
            ("lot_accounts", lambda: load_lot_accounts(conn, sizes.many_lots)),
            ("journal", lambda: load_journal(conn, sizes.journal_entries)),
        )
        for name, step in steps:
            began = time.perf_counter()
            did_load = step()
            timings[name] = round(time.perf_counter() - began, 2) if did_load else 0.0
        conn.execute("SET session_replication_role = DEFAULT")
        began = time.perf_counter()
        conn.execute("VACUUM (ANALYZE)")
        timings["vacuum_analyze"] = round(time.perf_counter() - began, 2)
    return timings


def checkpoint(conn: Conn) -> float | None:
    """Writes the dirty pages out before the measured windows (returns the seconds it took,
    None where the role may not), so the first rows do not share the disk and the cores with
    the checkpoint that a load of a million entries, or an earlier run, set going."""
    began = time.perf_counter()
    try:
        conn.execute("CHECKPOINT")
    except psycopg.errors.InsufficientPrivilege:
        return None
    return round(time.perf_counter() - began, 2)


# The journal refuses TRUNCATE (migration 0039): the wipe lifts that for its own
# transaction only, as the tables' owner, so no session sees the triggers off.
_JOURNAL_TRUNCATE_TRIGGERS = (
    ("journal_transactions", "journal_transactions_no_truncate"),
    ("postings", "postings_no_truncate"),
)


def wipe(conn: Conn) -> None:
    """Empties the ledger tables of the bench database (only ever the bench's own)."""
    with conn.transaction():
        for table, trigger in _JOURNAL_TRUNCATE_TRIGGERS:
            conn.execute(f"ALTER TABLE {table} DISABLE TRIGGER {trigger}")
        conn.execute(
            "TRUNCATE accounts, lots, journal_transactions, postings, reservations,"
            " reservation_lots, idempotency_keys, low_balance_alerts, daily_claims,"
            " daily_reward_runs, monthly_allowances, purchases, redemptions, subscriptions CASCADE"
        )
        for table, trigger in _JOURNAL_TRUNCATE_TRIGGERS:
            conn.execute(f"ALTER TABLE {table} ENABLE TRIGGER {trigger}")
