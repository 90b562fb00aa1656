"""The operator CLI `ledger` (issue 6, must-show 5), run as a subprocess the way an
operator runs it: `audit` exits non-zero when an invariant is broken and zero when
clean; balance, grant, adjust, transactions, journal, reservations, codes, summary and
config against the session's server, human tables and --json; errors and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import psycopg
import pytest

from ledger.v1 import ledger_service_pb2 as ledger_pb
from ledger_server.cli.output import UsageError, enum_name, parse_credits, parse_days
from ledger_server.runtime_settings import environment_defaults, sync_environment_defaults
from ledger_server.server import journal_pages
from support.ledger import CREDIT, Ledger, new_account

ACTOR = "ops-alice"


def run_cli(
    args: Sequence[str], address: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {
        k: v for k, v in os.environ.items() if k not in ("LEDGER_ADDRESS", "DATABASE_URL")
    }
    environment.update(env or {})
    options = ["--address", address, "--actor", ACTOR] if address else []
    return subprocess.run(
        [sys.executable, "-m", "ledger_server.cli", *options, *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
        check=False,
    )


Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def cli(server_address: str) -> Cli:
    def call(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(args, server_address)

    return call


def ok_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --- audit and migrate: DATABASE_URL, no server -------------------------------------------------


def test_audit_exits_zero_when_clean_and_non_zero_when_an_invariant_is_broken(
    fresh_database_url: str,
) -> None:
    env = {"DATABASE_URL": fresh_database_url}
    migrated = run_cli(["migrate"], env=env)
    assert migrated.returncode == 0, migrated.stderr
    assert "applied: 0001_" in migrated.stdout
    assert run_cli(["migrate"], env=env).stdout.strip() == "schema is up to date"

    now = datetime.now().astimezone()
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        sync_environment_defaults(conn, environment_defaults(), now)
        for n, account in enumerate(("alice", "bob")):
            conn.execute(
                "SELECT ledger_grant(%s, %s, '\\x00', %s, 'purchase', NULL, 'main',"
                " NULL, NULL, NULL, %s)",
                (account, f"g{n}", 10 * CREDIT, now),
            )

    clean = run_cli(["audit"], env=env)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "audit clean" in clean.stdout
    assert ok_json(run_cli(["audit", "--json"], env=env)) == {"clean": True, "violations": []}

    # Break one invariant behind the ledger's back: a lot loses a credit no posting records.
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE lots SET remaining_micros = remaining_micros - %s WHERE account_id = 'bob'",
            (CREDIT,),
        )
    broken = run_cli(["audit"], env=env)
    assert broken.returncode == 1
    assert "lot_vs_postings" in broken.stdout and "bob" in broken.stdout
    assert "audit FAILED" in broken.stderr
    report = json.loads(run_cli(["audit", "--json"], env=env).stdout)
    assert report["clean"] is False
    assert {v["check"] for v in report["violations"]} >= {"lot_vs_postings", "balance_vs_lots"}
    assert {v["account_id"] for v in report["violations"]} == {"bob"}


def test_audit_without_a_database_is_a_usage_error_and_an_unreachable_one_is_3(
    fresh_database_url: str,
) -> None:
    assert run_cli(["audit"]).returncode == 2
    unreachable = run_cli(
        ["audit"], env={"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none?connect_timeout=2"}
    )
    assert unreachable.returncode == 3
    assert "UNAVAILABLE" in unreachable.stderr
    # Reachable but never migrated: it cannot run either (1 would read as violations found).
    unmigrated = run_cli(["audit"], env={"DATABASE_URL": fresh_database_url})
    assert (unmigrated.returncode, unmigrated.stdout) == (3, "")
    assert "not migrated" in unmigrated.stderr and "Traceback" not in unmigrated.stderr


# --- against the server ---------------------------------------------------------------------------


def test_journal_reads_on_across_short_pages_to_its_limit(
    cli: Cli, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`journal` lists every account's entries: a page of that log reads a bounded stretch
    and may come back empty with a token where a filter matches little, so the command
    reads on until it holds --limit entries or the walk ends."""
    feature = f"cli-journal-{uuid.uuid4().hex[:8]}"
    account, busy = new_account("cli-journal"), new_account("cli-journal-busy")
    ledger.grant(account, 10)
    older = ledger.consume(account, CREDIT, feature=feature).transaction_id
    for _ in range(12):
        ledger.grant(busy, 1)  # entries the filter does not match, between the two
    newer = ledger.consume(account, CREDIT, feature=feature).transaction_id
    monkeypatch.setattr(journal_pages, "SCAN_ENTRIES", 5)  # the suite's server is in-process

    listed = ok_json(cli("journal", "--feature", feature, "--json"))
    assert [t["transaction_id"] for t in listed["transactions"]] == [newer, older]
    assert "next_page_token" not in listed

    first = cli("journal", "--feature", feature, "--limit", "1")
    assert first.returncode == 0, first.stderr
    *table, more = first.stdout.splitlines()
    assert [row.split()[:2] for row in table[1:]] == [[newer, account]]
    token = more.removeprefix("more: --page-token ")
    rest = ok_json(cli("journal", "--feature", feature, "--page-token", token, "--json"))
    assert [t["transaction_id"] for t in rest["transactions"]] == [older]

    one = ok_json(cli("journal", "--account", busy, "--kind", "grant", "--json"))
    assert [t["account_id"] for t in one["transactions"]] == [busy] * 12
    assert cli("journal", "--limit", "0").returncode == 2


def test_transactions_reads_on_across_short_pages_to_its_limit(
    cli: Cli, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`transactions` filtered by feature: a page reads a bounded stretch of the account's
    journal and may come back short or empty with a token, so the command reads on until
    it holds --limit entries or the walk ends."""
    feature = f"cli-rare-{uuid.uuid4().hex[:8]}"
    account = new_account("cli-rare")
    ledger.grant(account, 10)
    older = ledger.consume(account, CREDIT, feature=feature).transaction_id
    for _ in range(12):
        ledger.grant(account, 1)  # entries the filter does not match, between the two
    newer = ledger.consume(account, CREDIT, feature=feature).transaction_id
    monkeypatch.setattr(journal_pages, "SCAN_ENTRIES", 5)  # the suite's server is in-process

    listed = ok_json(cli("transactions", account, "--feature", feature, "--json"))
    assert [t["transaction_id"] for t in listed["transactions"]] == [newer, older]
    first = ok_json(cli("transactions", account, "--feature", feature, "--limit", "1", "--json"))
    assert [t["transaction_id"] for t in first["transactions"]] == [newer]
    rest = ok_json(
        cli("transactions", account, "--feature", feature, "--page-token",
            first["next_page_token"], "--json")
    )  # fmt: skip
    assert [t["transaction_id"] for t in rest["transactions"]] == [older]
    assert cli("transactions", account, "--limit", "0").returncode == 2


def test_grant_balance_adjust_and_transactions(cli: Cli) -> None:
    account = new_account("cli")
    granted = ok_json(cli("grant", account, "12.5", "--reason", "goodwill", "--json"))
    assert granted["lot"]["amount_micros"] == str(12_500_000)
    assert granted["lot"]["source"] == "CREDIT_SOURCE_ADMIN"

    balance = cli("balance", account)
    assert balance.returncode == 0, balance.stderr
    assert balance.stdout.splitlines()[1].split() == ["balance", "12.5"]

    adjusted = cli("adjust", account, "2.25", "--reason", "correction", "--key", "fix-1")
    assert adjusted.returncode == 0, adjusted.stderr
    # The same key again is a replay, not a second debit.
    assert (
        cli("adjust", account, "2.25", "--reason", "correction", "--key", "fix-1").returncode == 0
    )
    assert ok_json(cli("balance", account, "--json"))["balance_micros"] == str(10_250_000)

    listed = ok_json(cli("transactions", account, "--json"))
    kinds = [t["kind"] for t in listed["transactions"]]
    assert kinds == ["TRANSACTION_KIND_ADJUSTMENT", "TRANSACTION_KIND_GRANT"]
    assert {t["actor"] for t in listed["transactions"]} == {ACTOR}
    table = cli("transactions", account, "--kind", "grant")
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split()[:5] == ["id", "time", "kind", "status", "credits"]
    assert "grant" in row and "12.5" in row and "goodwill" in row and "admin#" in row

    lots = cli("lots", account)
    assert lots.returncode == 0 and "admin" in lots.stdout and "10.25" in lots.stdout


def test_overdraft_limit_and_debt(cli: Cli) -> None:
    account = new_account("cli")
    ok_json(cli("grant", account, "1", "--reason", "goodwill", "--json"))
    limited = cli("overdraft", account, "5", "--reason", "trusted")
    assert limited.returncode == 0, limited.stderr
    assert ["available", "6"] in [line.split() for line in limited.stdout.splitlines()]
    assert cli("adjust", account, "3", "--reason", "correction").returncode == 0
    shown = [line.rsplit(None, 1) for line in cli("balance", account).stdout.splitlines()]
    assert ["balance", "-2"] in shown
    assert ["overdraft limit", "5"] in shown and ["debt", "2"] in shown
    refused = cli("overdraft", account, "1", "--reason", "less")
    assert refused.returncode != 0 and "OVERDRAFT_IN_USE" in refused.stderr
    kinds = [t["kind"] for t in ok_json(cli("transactions", account, "--json"))["transactions"]]
    assert "TRANSACTION_KIND_OVERDRAFT" in kinds


def test_reservations_summary_and_codes(cli: Cli, ledger: Ledger) -> None:
    account = new_account("cli")
    ledger.grant(account, 5)
    spent = ledger.consume(account, 1_500_000, feature="image")
    shown = ok_json(cli("reservations", account, spent.reservation.reservation_id, "--json"))
    assert shown["reservation"]["status"] == "RESERVATION_STATUS_COMMITTED"
    human = cli("reservations", account, spent.reservation.reservation_id)
    assert "committed" in human.stdout and "1.5" in human.stdout

    month = datetime.now().strftime("%Y-%m")
    summary = ok_json(cli("summary", account, "--since", "2000-01-01T00:00:00Z",
                          "--until", "2100-01-01T00:00:00Z", "--json"))  # fmt: skip
    assert summary["purchased"]["consumed_micros"] == str(1_500_000)
    assert summary["usage"][0]["feature"] == "image"
    assert cli("summary", account, "--month", month).returncode == 0
    assert cli("summary", account).returncode == 2  # a period is required

    created = ok_json(
        cli("codes", "create", "--credits", "3", "--count", "2", "--note", "launch", "--json")
    )
    assert len(created["codes"]) == 2
    batch = created["batch"]["batch_id"]
    assert "launch" in cli("codes", "show", batch).stdout
    disabled = ok_json(cli("codes", "disable", batch, "--reason", "leaked", "--json"))
    assert disabled["batch"]["disabled"] is True
    tenant = cli("codes", "create", "--credits", "1", "--count", "1", "--account-prefix", "acme:")
    assert "acme:..." in tenant.stdout


def test_an_enum_value_this_build_does_not_know_prints_as_its_number() -> None:
    """A newer server may answer a status this CLI's protos lack (a rolling deploy): the
    table shows the number instead of the CLI failing on it."""
    name_of = ledger_pb.ReservationStatus.Name
    failed = ledger_pb.RESERVATION_STATUS_FAILED
    assert enum_name(name_of, failed, "RESERVATION_STATUS_") == "failed"
    newer = ledger_pb.ReservationStatus.ValueType(99)
    assert enum_name(name_of, newer, "RESERVATION_STATUS_") == "99"


def test_a_comma_in_credits_separates_thousands_only() -> None:
    assert parse_credits("1,000,000.5") == 1_000_000_500_000
    assert parse_credits("12,345") == 12_345 * CREDIT
    for decimal_comma in ("1,5", "2,50", "1,0000", "1.000,5", "10,000,00", ",100"):
        with pytest.raises(UsageError, match=r"^--credits: "):
            parse_credits(decimal_comma, "--credits")


def test_amounts_and_days_a_request_cannot_carry_are_usage_errors() -> None:
    """int(nan * 86400), 1e300 days and 1e30 credits crashed the CLI with a traceback."""
    most = 2**63 - 1
    assert parse_credits("9,223,372,036,854.775807") == most
    assert parse_credits("-9223372036854.775808") == -(2**63)
    for beyond in ("9223372036854.775808", "1e13", "1e30", "-1e13"):
        with pytest.raises(UsageError, match=r"^credits: .* is out of range"):
            parse_credits(beyond)
    assert parse_days("30", "--d") == 30 * 86400
    assert parse_days("0.5", "--d") == 43200
    assert parse_days("3652500", "--d") == 315_576_000_000  # a Duration's most
    for bad in ("nan", "NaN", "sNaN", "inf", "-inf", "1e300", "3652500.1", "0", "-1", "1e-9", "x"):
        with pytest.raises(UsageError, match=r"^--d: "):
            parse_days(bad, "--d")


def test_out_of_range_numbers_exit_2_with_one_line_and_send_nothing(
    cli: Cli, ledger: Ledger
) -> None:
    account = new_account("cli-range")
    ledger.grant(account, 1)
    for args in (
        ("grant", account, "1e30", "--reason", "x"),
        ("grant", account, "5", "--reason", "x", "--expires-in-days", "nan"),
        ("grant", account, "5", "--reason", "x", "--expires-in-days", "1e300"),
        ("grant", account, "5", "--reason", "x", "--expires-in-days", "0"),
        ("adjust", account, "1e13", "--reason", "x"),
        ("codes", "create", "--credits", "1", "--count", "1", "--credit-days", "inf"),
        ("codes", "create", "--credits", "1", "--count", "99999999999"),
        ("codes", "create", "--credits", "1", "--count", "1", "--max-per-code", "3000000000"),
        ("journal", "--limit", "99999999999"),
        ("balance", account, "--timeout", "nan"),
    ):
        result = cli(*args)
        assert result.returncode == 2, (args, result.returncode, result.stderr)
        assert "Traceback" not in result.stderr, (args, result.stderr)
        errors = [line for line in result.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1, (args, result.stderr)
    assert ok_json(cli("balance", account, "--json"))["balance_micros"] == str(CREDIT)
    # Within what a request carries, the server's own maximum refuses (exit 1).
    too_much = cli("grant", account, "1e10", "--reason", "x")
    assert too_much.returncode == 1 and "INVALID_FIELD" in too_much.stderr


def test_config_list_set_and_reset(cli: Cli, configure: Any) -> None:
    key = "recharge.minimum_minor"
    settings = ok_json(cli("config", "list", "--json"))["settings"]
    before = next(s for s in settings if s["key"] == key)
    configure(key, before["value"])  # put back as it was when the test ends
    changed = cli("config", "set", key, "4500", "--reason", "pricing review")
    assert changed.returncode == 0, changed.stderr
    assert changed.stdout.strip() == f"{key} = 4500 (admin)"
    listed = cli("config", "list")
    row = next(line for line in listed.stdout.splitlines() if line.startswith(key))
    assert "4500" in row and ACTOR in row
    reset = ok_json(cli("config", "reset", key, "--reason", "back to default", "--json"))
    assert reset["setting"]["source"] == "SETTING_SOURCE_ENVIRONMENT"
    refused = cli("config", "set", key, '"lots"', "--reason", "typo")
    assert refused.returncode == 1
    assert "INVALID_ARGUMENT" in refused.stderr and "INVALID_FIELD" in refused.stderr


CODES = ["codes", "create", "--credits", "1", "--count", "2000"]


@pytest.mark.parametrize(
    ("args", "unbuffered"), [(CODES, True), (CODES, False), (["config", "list"], False)]
)
def test_output_into_a_closed_pipe_ends_quietly(
    server_address: str, args: list[str], unbuffered: bool
) -> None:
    """`ledger codes create ... | head -8` (helper-83: a BrokenPipeError traceback): the
    reader is gone before the CLI writes, so a write fails: the first (unbuffered), the one
    that overflows the buffer mid-listing (2,000 codes), or the last flush (a short output,
    which Python would otherwise meet at exit). The CLI stops without a traceback and exits
    141, as a tool killed by SIGPIPE reports in a shell."""
    environment = {
        k: v for k, v in os.environ.items() if k not in ("LEDGER_ADDRESS", "PYTHONUNBUFFERED")
    }
    if unbuffered:
        environment["PYTHONUNBUFFERED"] = "1"
    with subprocess.Popen(
        [sys.executable, "-m", "ledger_server.cli", "--address", server_address, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        process.stdout.close()  # before the CLI could have written a byte
        stderr = process.stderr.read()
        returncode = process.wait(timeout=120)
    # Only what the command says on stderr anyway (a grant's idempotency key).
    assert "Traceback" not in stderr and "Error" not in stderr, stderr
    assert returncode == 141


def test_errors_are_clear_and_exit_codes_tell_them_apart(cli: Cli, ledger: Ledger) -> None:
    account = new_account("cli")
    ledger.grant(account, 1)
    short = cli("adjust", account, "5", "--reason", "too much")
    assert short.returncode == 1
    assert "error: FAILED_PRECONDITION" in short.stderr
    assert "reason: INSUFFICIENT_CREDITS" in short.stderr
    assert "available_micros: 1000000 (1 credits)" in short.stderr
    as_json = cli("adjust", account, "5", "--reason", "too much", "--json")
    assert as_json.returncode == 1
    assert json.loads(as_json.stderr)["error"]["metadata"]["available_micros"] == "1000000"

    missing = cli("balance", new_account("nobody"))
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr

    assert cli("grant", account, "1.0000001", "--reason", "x").returncode == 2
    assert cli("grant", account, "lots", "--reason", "x").returncode == 2
    # A decimal comma is refused, never read as 250 credits (only thousands take a comma).
    comma = cli("grant", account, "2,50", "--reason", "x")
    assert comma.returncode == 2 and "credits: '2,50'" in comma.stderr
    assert cli("adjust", account, "0,5", "--reason", "x").returncode == 2
    assert ok_json(cli("balance", account, "--json"))["balance_micros"] == str(CREDIT)
    assert cli("grant", account, "1").returncode == 2  # --reason is required
    assert cli().returncode == 2

    down = run_cli(["--timeout", "3", "balance", account], "127.0.0.1:1")
    assert down.returncode == 3
    assert "UNAVAILABLE" in down.stderr or "DEADLINE_EXCEEDED" in down.stderr
