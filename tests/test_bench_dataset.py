"""The bench's dataset writes what the ledger writes (bench/dataset.py): the audit finds it
clean, and each charge of the long journal has the idempotency key a Consume stores with
it, whose stored answer names that charge and the balance after it. Loaded small, into a
database of its own (the load empties the ledger tables)."""

from __future__ import annotations

import psycopg

from bench import dataset
from ledger_server.audit import audit_database
from ledger_server.db.migrate import migrate


def test_a_small_dataset_is_clean_and_each_charge_has_its_key(fresh_database_url: str) -> None:
    migrate(fresh_database_url)
    sizes = dataset.Sizes(accounts=20, journal_entries=50, many_lots=30)
    dataset.load(fresh_database_url, sizes, fresh=False, may_wipe=True)
    assert audit_database(fresh_database_url) == []

    with psycopg.connect(fresh_database_url) as conn:
        charges = conn.execute(
            """
            SELECT t.transaction_id, k.operation, k.response ->> 'transaction_id',
                   (k.response -> 'balance' ->> 'balance_micros')::bigint
              FROM journal_transactions t
              LEFT JOIN idempotency_keys k
                     ON k.account_id = t.account_id
                    AND k.idempotency_key = t.reservation_id::text
             WHERE t.account_id = %s AND t.kind = 'charge'
             ORDER BY t.transaction_id
            """,
            (dataset.JOURNAL,),
        ).fetchall()
        balance = conn.execute(
            "SELECT balance_micros FROM accounts WHERE account_id = %s", (dataset.JOURNAL,)
        ).fetchone()
    assert len(charges) == sizes.journal_entries - 1
    assert all(op == "consume" and answered == str(txn) for txn, op, answered, _ in charges)
    assert balance is not None and charges[-1][3] == balance[0]


def test_a_dataset_of_other_sizes_is_wiped_and_loaded_again(fresh_database_url: str) -> None:
    """The wipe empties the journal, which refuses TRUNCATE (migration 0039): it lifts that
    for its own transaction only, so the audit finds the triggers enabled again after."""
    migrate(fresh_database_url)
    dataset.load(fresh_database_url, dataset.Sizes(20, 10, 3), fresh=False, may_wipe=True)
    dataset.load(fresh_database_url, dataset.Sizes(10, 20, 3), fresh=False, may_wipe=True)
    assert audit_database(fresh_database_url) == []
    with psycopg.connect(fresh_database_url) as conn:
        entries = conn.execute(
            "SELECT count(*) FROM journal_transactions WHERE account_id = %s", (dataset.JOURNAL,)
        ).fetchone()
        accounts = conn.execute(
            "SELECT count(*) FROM accounts WHERE account_id LIKE %s",
            (dataset.ACCOUNT_PREFIX + "%",),
        ).fetchone()
    assert (entries, accounts) == ((20,), (10,))  # the first load's are gone
