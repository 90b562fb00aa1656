"""A list_transactions row becomes the Transaction the API documents (pure mapping: the
page's SQL is covered by the pagination and client tests)."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from ledger.v1 import ledger_service_pb2 as pb
from ledger.v1 import types_pb2
from ledger_server.ledger import mapping

USAGE = {
    "feature": "chat",
    "model": "gpt-x",
    "cost_micros": 7_000,
    "lines": [
        {"unit": "input_tokens", "quantity": 1_000, "unit_price_micros": 7, "unit_size": 1,
         "multiplier_ppm": 1_000_000, "price_version": "v3", "multiplier_version": None},
    ],
}  # fmt: skip


def _row(**overrides: Any) -> tuple[Any, ...]:
    row: dict[str, Any] = {
        "transaction_id": 41, "account_id": "acct-1", "kind": "charge", "amount_micros": -7_000,
        "reservation_id": "0b6f6a4e-3c2f-4f59-9d55-6a8a3d1e2c10", "feature": "chat",
        "model": "gpt-x", "usage": USAGE, "comment": "a reply", "actor": None,
        "external_ref": None, "created_micros": 1_763_700_000_123_456, "status": "succeeded",
        "posting_accounts": ["account:main", "account:main", "revenue"],
        "posting_lots": [12, 13, None], "posting_sources": ["daily", "purchase", None],
        "posting_amounts": [-2_000, -5_000, 7_000], "posting_memos": [None, "promo", None],
    }  # fmt: skip
    row.update(overrides)
    return tuple(row.values())


def _filled(row: tuple[Any, ...]) -> pb.Transaction:
    page = pb.ListTransactionsResponse()
    mapping.fill_transaction(page.transactions.add(), row)
    return page.transactions[0]


def test_a_charge_with_usage_and_postings() -> None:
    expected = pb.Transaction(
        transaction_id="41",
        account_id="acct-1",
        kind=pb.TRANSACTION_KIND_CHARGE,
        status=pb.TRANSACTION_STATUS_SUCCEEDED,
        amount_micros=-7_000,
        reservation_id="0b6f6a4e-3c2f-4f59-9d55-6a8a3d1e2c10",
        feature="chat",
        model="gpt-x",
        comment="a reply",
        usage=types_pb2.PricedUsage(
            feature="chat",
            model="gpt-x",
            cost_micros=7_000,
            lines=[
                types_pb2.PriceLine(
                    unit=types_pb2.USAGE_UNIT_INPUT_TOKENS,
                    quantity=1_000,
                    unit_price_micros=7,
                    unit_size=1,
                    multiplier_ppm=1_000_000,
                    price_version="v3",
                )
            ],
        ),
        postings=[
            pb.Posting(
                ledger_account="account:main",
                lot_id="12",
                source=types_pb2.CREDIT_SOURCE_DAILY,
                amount_micros=-2_000,
            ),
            pb.Posting(
                ledger_account="account:main",
                lot_id="13",
                source=types_pb2.CREDIT_SOURCE_PURCHASE,
                amount_micros=-5_000,
                memo="promo",
            ),
            pb.Posting(ledger_account="revenue", amount_micros=7_000),
        ],
        create_time=Timestamp(seconds=1_763_700_000, nanos=123_456_000),
    )
    assert _filled(_row()) == expected


def test_a_grant_without_postings_or_usage() -> None:
    row = _row(
        kind="grant", amount_micros=5_000, reservation_id=None, feature=None, model=None,
        usage=None, comment=None, actor="admin:ops", external_ref="ticket-9",
        posting_accounts=None, posting_lots=None, posting_sources=None, posting_amounts=None,
        posting_memos=None,
    )  # fmt: skip
    assert _filled(row) == pb.Transaction(
        transaction_id="41",
        account_id="acct-1",
        kind=pb.TRANSACTION_KIND_GRANT,
        status=pb.TRANSACTION_STATUS_SUCCEEDED,
        amount_micros=5_000,
        actor="admin:ops",
        external_ref="ticket-9",
        create_time=Timestamp(seconds=1_763_700_000, nanos=123_456_000),
    )


def test_posting_arrays_that_do_not_line_up_are_refused() -> None:
    with pytest.raises(ValueError):
        _filled(_row(posting_memos=[None]))
    with pytest.raises(ValueError):  # postings without their ledger accounts
        _filled(_row(posting_accounts=None))


@pytest.mark.parametrize("value", [v for _, v in types_pb2.CreditSource.items() if v])
def test_every_credit_source_reads_back_from_its_database_name(
    value: types_pb2.CreditSource.ValueType,
) -> None:
    assert mapping.source_from_db(mapping.source_to_db(value)) == value


def test_no_source_is_unspecified() -> None:
    assert mapping.source_from_db(None) == types_pb2.CREDIT_SOURCE_UNSPECIFIED
    assert mapping.source_from_db("") == types_pb2.CREDIT_SOURCE_UNSPECIFIED


@pytest.mark.parametrize(
    "micros", [1_763_700_000_123_456, 0, 1, -1, -999_999, -1_000_000, -1_500_000, 10**15 + 7]
)
def test_a_timestamp_is_set_as_from_microseconds_sets_it(micros: int) -> None:
    """Times before 1970 too: whole seconds rounded down, nanos in [0, 1e9)."""
    expected = Timestamp()
    expected.FromMicroseconds(micros)
    filled = Timestamp()
    mapping.set_timestamp(filled, micros)
    assert filled == expected
    assert 0 <= filled.nanos < 1_000_000_000
