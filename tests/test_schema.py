"""A fresh migrate gives the expected schema: tables, named invariants, functions;
migrating again changes nothing; the journal is append-only."""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg
import pytest

from ledger_server import runtime_settings
from ledger_server.db import migrate as migrations
from ledger_server.db.queries import query
from support.ledger import Ledger, new_account

EXPECTED_TABLES = {
    "accounts",
    "admin_requests",
    "checkout_sessions",
    "checkout_stripe_attempts",
    "credit_packs",
    "credit_sources",
    "daily_claims",
    "daily_reward_runs",
    "idempotency_keys",
    "invoice_payments",
    "journal_transactions",
    "lots",
    "low_balance_alerts",
    "model_multipliers",
    "monthly_allowances",
    "payment_events",
    "postings",
    "prices",
    "purchases",
    "redemption_batches",
    "redemption_codes",
    "redemptions",
    "reservation_lots",
    "reservations",
    "schema_functions",
    "schema_migrations",
    "setting_changes",
    "settings",
    "subscription_accounts",
    "subscription_plans",
    "subscriptions",
}

# The invariants the ledger relies on, by name: the error boundary and the docs
# refer to these names, so renaming one is a contract change.
EXPECTED_CONSTRAINTS = {
    "purchases_bonus_clawed_back_within_bonus",
    "purchases_clawed_back_within_credits",
    "purchases_claw_back_owed_nonnegative",
    "checkout_sessions_one_per_key",
    "checkout_sessions_sold_amounts",
    "checkout_sessions_amount_nonnegative",
    "checkout_sessions_kind_target",
    "checkout_sessions_kind_known",
    "checkout_sessions_plan_fk",
    "checkout_sessions_pack_fk",
    "checkout_stripe_attempts_positive",
    "payment_events_processed_when_done",
    "payment_events_attempts_nonnegative",
    "payment_events_status_known",
    "payment_events_event_id_format",
    "accounts_account_id_length",
    "accounts_alert_email_format",
    "accounts_balance_nonnegative",
    "accounts_held_within_balance",
    "accounts_low_balance_threshold_nonnegative",
    "accounts_overdraft_limit_nonnegative",
    "accounts_not_self_referred",
    "accounts_referral_code_unique",
    "accounts_reward_balance_nonnegative",
    "credit_packs_credits_positive",
    "credit_packs_currency_format",
    "credit_packs_id_format",
    "credit_packs_price_nonnegative",
    "credit_sources_source_format",
    "daily_claims_lot_fk",
    "daily_claims_once_per_day",
    "daily_reward_runs_one_per_day",
    "daily_reward_runs_terms_together",
    "idempotency_keys_key_length",
    "idempotency_keys_one_per_account",
    "journal_transactions_account_fk",
    "journal_transactions_kind_known",
    "lots_account_fk",
    "lots_amount_positive",
    "lots_balance_kind_known",
    "lots_expired_within_amount",
    "lots_held_within_remaining",
    "lots_parent_fk",
    "lots_remaining_nonnegative",
    "lots_remaining_within_amount",
    "lots_source_fk",
    "low_balance_alerts_account_fk",
    "low_balance_alerts_below_threshold",
    "low_balance_alerts_email_status_known",
    "model_multipliers_model_format",
    "model_multipliers_nonnegative",
    "monthly_allowances_first_of_month",
    "monthly_allowances_lot_fk",
    "monthly_allowances_once_per_month",
    "postings_amount_nonzero",
    "postings_customer_side_has_lot",
    "postings_lot_fk",
    "postings_transaction_fk",
    "prices_feature_format",
    "prices_model_format",
    "prices_unit_known",
    "prices_unit_price_nonnegative",
    "prices_unit_size_positive",
    "purchases_bonus_lot_fk",
    "purchases_kind_known",
    "purchases_lot_fk",
    "purchases_one_per_external_ref",
    "purchases_pack_fk",
    "purchases_period_only_of_subscriptions",
    "purchases_plan_fk",
    "redemption_batches_account_prefix_format",
    "redemption_batches_amount_positive",
    "redemption_batches_code_count_range",
    "redemption_batches_max_redemptions_positive",
    "redemption_codes_batch_fk",
    "redemption_codes_format",
    "redemption_codes_within_limit",
    "redemptions_code_fk",
    "redemptions_lot_fk",
    "redemptions_once_per_account",
    "reservation_lots_committed_within_held",
    "reservation_lots_held_positive",
    "reservation_lots_lot_fk",
    "reservation_lots_refund_expired_within_refunded",
    "reservation_lots_refunded_within_committed",
    "reservation_lots_reservation_fk",
    "reservations_account_fk",
    "reservations_committed_within_held",
    "reservations_finalized_when_done",
    "reservations_held_nonnegative",
    "reservations_refunded_within_committed",
    "reservations_status_known",
    "setting_changes_source_known",
    "settings_source_known",
    "subscription_accounts_one_per_subscription",
    "subscription_plans_credits_nonnegative",
    "subscription_plans_currency_format",
    "subscription_plans_id_format",
    "subscription_plans_period_count_positive",
    "subscription_plans_period_unit_known",
    "subscription_plans_price_nonnegative",
    "subscriptions_account_fk",
    "subscriptions_period_ordered",
    "subscriptions_plan_fk",
}

EXPECTED_FUNCTIONS = {
    "ledger_balance",
    "ledger_commit",
    "ledger_consume",
    "ledger_get_reservation",
    "ledger_grant",
    "ledger_refund",
    "ledger_release",
    "ledger_reserve",
    "ledger_create_account",
    "ledger_claim_daily_reward",
    "ledger_claim_daily_reward_of_day",
    "ledger_settle_claw_backs",
    "ledger_redeem",
    "ledger_transfer_reward",
    "ledger_purchase_pack",
    "ledger_recharge",
    "ledger_start_subscription_period",
    "ledger_change_subscription_plan",
    "ledger_end_subscription",
    "ledger_overdraft_refund_returns",
    "ledger_adjust_balance",
    "ledger_set_overdraft_limit",
    "ledger_settle_overdraft",
    "ledger_fulfil_checkout",
    "ledger_create_redemption_batch_for_admin_request",
    "ledger_make_redemption_batch",
    "ledger_create_redemption_batch",  # the previous release's form, for a rolling deploy
}


# Every index on the two tables each charge appends to, with its access method: an index
# there costs every Consume (the BRIN ones nearly nothing, migrations 0018 and 0019).
EXPECTED_JOURNAL_INDEXES = {
    ("journal_transactions", "journal_transactions_account_time", "btree"),
    ("journal_transactions", "journal_transactions_id_created", "brin"),
    ("journal_transactions", "journal_transactions_newest_first", "btree"),
    ("journal_transactions", "journal_transactions_pkey", "btree"),
    ("journal_transactions", "journal_transactions_reservation", "btree"),
    ("postings", "postings_lot", "btree"),
    ("postings", "postings_pkey", "btree"),
    ("postings", "postings_transaction", "brin"),
}


def test_fresh_migrate_gives_the_expected_schema(fresh_database_url: str) -> None:
    applied = migrations.migrate(fresh_database_url)
    assert applied == [m.name for m in migrations.migrations()] + [
        f.name for f in migrations.function_files()
    ]
    with psycopg.connect(fresh_database_url) as conn:
        tables = {
            r[0]
            for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            ).fetchall()
        }
        assert tables == EXPECTED_TABLES
        constraints = {
            r[0]
            for r in conn.execute(
                """SELECT c.conname FROM pg_constraint c
                     JOIN pg_namespace n ON n.oid = c.connamespace
                    WHERE n.nspname = 'public' AND c.contype IN ('c', 'u', 'f')
                       OR (n.nspname = 'public' AND c.contype = 'p'
                           AND c.conname NOT LIKE '%_pkey')"""
            ).fetchall()
        }
        assert constraints == EXPECTED_CONSTRAINTS
        functions = {
            r[0]
            for r in conn.execute(
                "SELECT proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                "WHERE n.nspname = 'public'"
            ).fetchall()
        }
        assert functions >= EXPECTED_FUNCTIONS
        journal_indexes = set(
            conn.execute(
                """SELECT t.relname::text, i.relname::text, am.amname::text FROM pg_index x
                     JOIN pg_class i ON i.oid = x.indexrelid
                     JOIN pg_class t ON t.oid = x.indrelid
                     JOIN pg_am am ON am.oid = i.relam
                    WHERE t.relname IN ('journal_transactions', 'postings')"""
            ).fetchall()
        )
        assert journal_indexes == EXPECTED_JOURNAL_INDEXES
        sources = {r[0] for r in conn.execute("SELECT source FROM credit_sources").fetchall()}
        assert "daily" in sources and "purchase" in sources
    assert migrations.migrate(fresh_database_url) == []


def test_migration_0019_builds_again_an_index_a_failed_concurrent_build_left(
    fresh_database_url: str,
) -> None:
    """README: build 0019's index with CREATE INDEX CONCURRENTLY before migrating a large
    ledger. A build that failed leaves an invalid index of that name, which IF NOT EXISTS
    would take for the index while the migration drops 0018's: the journal would keep no
    usable BRIN index. Here the database is put back as it was before 0019, with such an
    invalid index, and migrated again."""
    migrations.migrate(fresh_database_url)
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        conn.execute(
            "CREATE INDEX journal_transactions_created ON journal_transactions"
            " USING brin (created_at) WITH (autosummarize = on)"
        )
        conn.execute(
            "UPDATE pg_index SET indisvalid = false"
            " WHERE indexrelid = 'journal_transactions_id_created'::regclass"
        )
        conn.execute("DELETE FROM schema_migrations WHERE version = 19")
    assert migrations.migrate(fresh_database_url) == ["0019_journal_walk_end.sql"]
    with psycopg.connect(fresh_database_url) as conn:
        valid = conn.execute(
            "SELECT indisvalid FROM pg_index"
            " WHERE indexrelid = 'journal_transactions_id_created'::regclass"
        ).fetchone()
        replaced = conn.execute("SELECT to_regclass('journal_transactions_created')").fetchone()
    assert valid == (True,)
    assert replaced == (None,)


def test_account_ids_and_idempotency_keys_compare_by_their_bytes(
    fresh_database_url: str,
) -> None:
    """Every account id column and the ledger's idempotency key are in the "C" collation: the
    database's own (a libc locale) would make each comparison in an index probe or a sort
    call strcoll (migration 0010)."""
    migrations.migrate(fresh_database_url)
    with psycopg.connect(fresh_database_url) as conn:
        columns = conn.execute(
            """SELECT c.relname, a.attname, coalesce(l.collname, '(default)')
                 FROM pg_attribute a
                 JOIN pg_class c ON c.oid = a.attrelid AND c.relkind = 'r'
                 JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'public'
                 LEFT JOIN pg_collation l ON l.oid = a.attcollation
                  AND a.attcollation <> (SELECT oid FROM pg_collation WHERE collname = 'default')
                WHERE (a.attname IN ('account_id', 'referred_by')
                       OR (c.relname, a.attname) = ('idempotency_keys', 'idempotency_key'))
                  AND NOT a.attisdropped"""
        ).fetchall()
    assert len(columns) == 19
    assert [column for column in columns if column[2] != "C"] == []


def test_an_edited_migration_is_refused(fresh_database_url: str) -> None:
    migrations.migrate(fresh_database_url)
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        conn.execute("UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1")
    with pytest.raises(migrations.MigrationError, match="changed after it was applied"):
        migrations.migrate(fresh_database_url)


def test_a_release_older_than_the_database_leaves_its_functions_alone(
    fresh_database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """During a rolling deploy a server of the old release that restarts migrates too. The
    database holds a migration it does not know, so its functions are the newer release's
    (which keeps the forms old servers call): it must not put its own back."""
    migrations.migrate(fresh_database_url)
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO schema_migrations (version, name, checksum)"
            " VALUES (9999, '9999_from_a_newer_release.sql', 'newer')"
        )
        conn.execute("UPDATE schema_functions SET checksum = 'newer'")
    assert migrations.migrate(fresh_database_url) == []
    with psycopg.connect(fresh_database_url) as conn:
        checksums = conn.execute("SELECT DISTINCT checksum FROM schema_functions").fetchall()
    assert checksums == [("newer",)]
    assert "9999_from_a_newer_release.sql" in caplog.text


def test_the_journal_is_append_only(ledger_db_url: str, ledger: Ledger) -> None:
    ledger.grant(new_account(), 1)  # at least one transaction with postings to try to change
    with psycopg.connect(ledger_db_url) as conn:
        for statement in (
            "UPDATE journal_transactions SET amount_micros = 0 WHERE transaction_id = "
            "(SELECT min(transaction_id) FROM journal_transactions)",
            "DELETE FROM postings "
            "WHERE transaction_id = (SELECT min(transaction_id) FROM postings)",
        ):
            with pytest.raises(psycopg.Error) as raised:
                conn.execute(statement)
            assert raised.value.sqlstate == "LE100"
            conn.rollback()


# The append-only tables' triggers: UPDATE and DELETE refused row by row, TRUNCATE (which
# fires no row trigger) by statement (migration 0039). The audit checks them (audit.sql).
APPEND_ONLY_TABLES = (
    "journal_transactions",
    "model_multipliers",
    "postings",
    "prices",
    "setting_changes",
)
EXPECTED_APPEND_ONLY_TRIGGERS = {
    (table, f"{table}_{suffix}", events)
    for table in APPEND_ONLY_TABLES
    for suffix, events in (("append_only", "DELETE,UPDATE"), ("no_truncate", "TRUNCATE"))
}


def test_the_append_only_tables_refuse_truncate(fresh_database_url: str) -> None:
    """`TRUNCATE postings` emptied the journal: the row triggers never fire for it. A
    TRUNCATE ... CASCADE from a table the journal references reaches it too."""
    migrations.migrate(fresh_database_url)
    with psycopg.connect(fresh_database_url) as conn:
        triggers = set(
            conn.execute(
                """SELECT t.relname::text, g.tgname::text,
                          string_agg(e.event, ',' ORDER BY e.event)
                     FROM pg_trigger g
                     JOIN pg_class t ON t.oid = g.tgrelid
                     JOIN pg_proc f ON f.oid = g.tgfoid
                     JOIN (VALUES (8, 'DELETE'), (16, 'UPDATE'), (32, 'TRUNCATE'), (4, 'INSERT'))
                          AS e(bit, event) ON g.tgtype & e.bit <> 0
                    WHERE f.proname = 'ledger_reject_journal_change' AND g.tgtype & 2 <> 0
                    GROUP BY 1, 2"""
            ).fetchall()
        )
        assert triggers == EXPECTED_APPEND_ONLY_TRIGGERS
        # CASCADE: journal_transactions alone is refused anyway, postings referencing it.
        for statement in [f"TRUNCATE {table} CASCADE" for table in APPEND_ONLY_TABLES] + [
            "TRUNCATE accounts CASCADE"
        ]:
            with pytest.raises(psycopg.Error) as raised:
                conn.execute(statement)
            assert raised.value.sqlstate == "LE100", statement
            conn.rollback()


def test_balance_constraints_hold_in_the_database(ledger_db_url: str) -> None:
    with psycopg.connect(ledger_db_url) as conn:
        with pytest.raises(psycopg.errors.CheckViolation) as raised:
            conn.execute(
                "INSERT INTO accounts (account_id, balance_micros, created_at) "
                "VALUES ('negative-balance', -1, now())"
            )
        assert raised.value.diag.constraint_name == "accounts_balance_nonnegative"


def test_a_charge_updates_its_lot_without_new_index_entries(fresh_database_url: str) -> None:
    """A lot index that names remaining_micros (as a column or in its predicate) makes
    every charge write a new entry into it; with the depleted flag in its place the lot's
    update stays on its page (HOT) until the lot runs out."""
    migrations.migrate(fresh_database_url)
    now = datetime.now(UTC)
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        runtime_settings.sync_environment_defaults(
            conn, runtime_settings.environment_defaults(), now
        )
        conn.execute(  # the purchase lot alone
            "UPDATE settings SET value = 'false'::jsonb"
            " WHERE key IN ('signup.enabled', 'monthly_free.enabled')"
        )
        conn.execute(
            "SELECT ledger_grant('hot-lot', 'grant', '\\x00', 100, 'purchase', NULL, 'main',"
            " '', '', 'test', %s)",
            (now,),
        )
    with psycopg.connect(fresh_database_url) as conn:
        for i in range(3):
            conn.execute(
                "SELECT ledger_consume('hot-lot', %s, '\\x00', 10, NULL, '', '', %s)",
                (f"charge-{i}", now),
            )
        conn.execute(  # runs it out: the flag changes, the lot leaves the indexes
            "SELECT ledger_consume('hot-lot', 'last', '\\x00', 70, NULL, '', '', %s)", (now,)
        )
        row = conn.execute(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables WHERE relname = 'lots'"
        ).fetchone()
        remaining = conn.execute("SELECT remaining_micros FROM lots").fetchall()
    assert remaining == [(0,)]
    assert row == (4, 3)


def test_migrating_writes_the_settings_the_database_lacks_and_no_other(
    fresh_database_url: str,
) -> None:
    """A release's new setting is written when it migrates (`ledger migrate`), before any of
    its servers starts: the previous release's servers run its functions meanwhile, which
    read it (helper-93: every former subscriber's GetAccount was INTERNAL). A setting that
    is there keeps its value, an administrator's or another environment's."""
    migrations.migrate(fresh_database_url)
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        conn.execute("DELETE FROM settings WHERE key = 'subscription.renewal_grace_days'")
        conn.execute(
            "UPDATE settings SET value = '5'::jsonb, source = 'admin'"
            " WHERE key = 'signup.expire_days'"
        )
    migrations.migrate(fresh_database_url)
    with psycopg.connect(fresh_database_url) as conn:
        values = dict(conn.execute("SELECT key, value FROM settings").fetchall())
        assert values["subscription.renewal_grace_days"] == 14
        assert values["signup.expire_days"] == 5
        assert set(values) == {d.key for d in runtime_settings.DEFINITIONS}
        # What the functions read (ledger_subscribed), with no server started.
        setting = conn.execute("SELECT ledger_setting('subscription.renewal_grace_days')")
        assert setting.fetchone() == (14,)
        row = conn.execute(
            "SELECT count(*) FROM setting_changes WHERE key = 'subscription.renewal_grace_days'"
        ).fetchone()
        assert row is not None and row[0] == 2  # the first migrate's, and the one put back


def test_the_payments_of_an_invoice_are_found_by_an_index(fresh_database_url: str) -> None:
    """payments_reaching runs for every paid invoice, checkout and plan change (to wake the
    refunds handled before them): it must not read every invoice payment ever recorded
    (the primary key starts with the payment, not the invoice)."""
    migrations.migrate(fresh_database_url)
    with psycopg.connect(fresh_database_url) as conn:
        conn.execute(
            "INSERT INTO invoice_payments SELECT 'pi_' || g, 'in_' || g, now()"
            "  FROM generate_series(1, 20000) g"
        )
        conn.execute("ANALYZE invoice_payments")
        plan = "\n".join(
            str(row[0])
            for row in conn.execute(
                b"EXPLAIN " + query("payments_reaching"), {"refs": ["in_5", "pi_1"]}
            ).fetchall()
        )
    assert "invoice_payments_by_invoice" in plan, plan
    assert "Seq Scan on invoice_payments" not in plan, plan
