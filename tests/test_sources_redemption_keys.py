"""CreateRedemptionBatch's idempotency keys are the administrators' ledger-wide keys
(admin_requests, README "A retry is never double-applied"). Releases before kept them in
idempotency_keys under the pseudo-account '@admin', shared with any account of that name and
apart from every other administrator's change; a retry of a batch made there still gets its
first answer, and the previous release's servers still make batches during a rolling
deploy without repeating one made by this release."""

from __future__ import annotations

import threading
from typing import Any

import grpc
import psycopg
import pytest

from ledger.v1 import admin_service_pb2 as admin_pb
from ledger.v1 import types_pb2 as t
from ledger_server.ledger.fingerprint import request_fingerprint
from support.ledger import CREDIT, Ledger, expect_error, new_key

AdminStub = Any
REPLAYED = ("ledger-idempotent-replay", "true")


def _request(key: str, amount: int = 10 * CREDIT) -> admin_pb.CreateRedemptionBatchRequest:
    return admin_pb.CreateRedemptionBatchRequest(
        idempotency_key=key, amount_micros=amount, code_count=3, note="keys"
    )


def _old_server_batch(conn: psycopg.Connection[Any], request: Any, clock: Any) -> Any:
    """CreateRedemptionBatch as a server of the previous release runs it (its query)."""
    row = conn.execute(
        """SELECT ledger_create_redemption_batch(%s::text, %s::bytea, %s::bigint, %s::int,
                  %s::int, NULL::timestamptz, NULL::interval, %s::text, 'old-server',
                  %s::timestamptz)""",
        (
            request.idempotency_key,
            request_fingerprint("create_redemption_batch", request),
            request.amount_micros,
            request.code_count,
            request.max_redemptions_per_code or 1,
            request.note,
            clock.now(),
        ),
    ).fetchone()
    assert row is not None
    return row[0]


def _batches(ledger_db_url: str) -> int:
    with psycopg.connect(ledger_db_url) as conn:
        row = conn.execute("SELECT count(*) FROM redemption_batches").fetchone()
        assert row is not None
        return int(row[0])


def _compact(codes: Any) -> list[str]:
    return sorted(code.replace("-", "") for code in codes)


def test_a_retried_batch_is_a_replay_with_the_same_codes(
    admin: AdminStub, ledger_db_url: str
) -> None:
    request = _request(new_key("batch"))
    before = _batches(ledger_db_url)
    first, call = admin.CreateRedemptionBatch.with_call(request)
    assert REPLAYED not in (call.trailing_metadata() or ())
    again, call = admin.CreateRedemptionBatch.with_call(request)
    assert again == first
    assert REPLAYED in (call.trailing_metadata() or ())
    expect_error(
        lambda: admin.CreateRedemptionBatch(_request(request.idempotency_key, 11 * CREDIT)),
        grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_KEY_REUSED",
    )
    assert _batches(ledger_db_url) == before + 1


def test_a_key_stored_as_sent_still_answers_the_retry_sent_the_same_way(
    admin: AdminStub, ledger_db_url: str
) -> None:
    """Releases before fingerprinted a batch as sent; the CLI spells out one redemption per
    code, which is now read as unset. Its retry after the upgrade is still a replay."""
    request = _request(new_key("cli-batch"))
    request.max_redemptions_per_code = 1
    first = admin.CreateRedemptionBatch(request)
    with psycopg.connect(ledger_db_url, autocommit=True) as conn:  # as the release before
        conn.execute(
            "UPDATE admin_requests SET request_hash = %s WHERE idempotency_key = %s",
            (request_fingerprint("create_redemption_batch", request), request.idempotency_key),
        )
    again, call = admin.CreateRedemptionBatch.with_call(request)
    assert again == first and REPLAYED in (call.trailing_metadata() or ())


def test_a_batch_made_before_its_key_moved_is_replayed_not_made_again(
    admin: AdminStub, ledger_db_url: str, clock: Any
) -> None:
    request = _request(new_key("old-batch"))
    with psycopg.connect(ledger_db_url, autocommit=True) as conn:
        made = _old_server_batch(conn, request, clock)
    before = _batches(ledger_db_url)

    retried, call = admin.CreateRedemptionBatch.with_call(request)
    assert REPLAYED in (call.trailing_metadata() or ())
    assert retried.batch.batch_id == made["batch"]["batch_id"]
    assert _compact(retried.codes) == _compact(made["codes"])
    # Now answered from admin_requests, the same way.
    again, call = admin.CreateRedemptionBatch.with_call(request)
    assert again == retried and REPLAYED in (call.trailing_metadata() or ())

    other = _request(new_key("old-batch"))
    with psycopg.connect(ledger_db_url, autocommit=True) as conn:
        _old_server_batch(conn, other, clock)
    before += 1
    info = expect_error(
        lambda: admin.CreateRedemptionBatch(_request(other.idempotency_key, 11 * CREDIT)),
        grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_KEY_REUSED",
    )
    assert info.metadata["original_operation"] == "create_redemption_batch"
    assert _batches(ledger_db_url) == before


def test_an_account_named_admin_keeps_its_own_keys(
    admin: AdminStub, ledger: Ledger, ledger_db_url: str
) -> None:
    """'@admin' is a valid account id; the old scope of the batches' keys was its too."""
    ledger.grant("@admin", 10)
    charged_first = new_key()
    ledger.consume("@admin", CREDIT, key=charged_first)
    admin.CreateRedemptionBatch(_request(charged_first))

    batched_first = new_key()
    admin.CreateRedemptionBatch(_request(batched_first))
    charged = ledger.consume("@admin", CREDIT, key=batched_first)
    assert charged.transaction_id
    with psycopg.connect(ledger_db_url) as conn:
        notes = conn.execute(
            "SELECT count(*) FROM idempotency_keys WHERE account_id = '@admin'"
            " AND idempotency_key = ANY(%s) AND operation = 'create_redemption_batch'",
            ([charged_first, batched_first],),
        ).fetchone()
    assert notes == (0,)  # a new batch keeps nothing under '@admin'


def test_an_old_server_refuses_a_key_this_release_holds(
    admin: AdminStub, ledger_db_url: str, clock: Any
) -> None:
    """A retry sent to a server of the previous release during a rolling deploy."""
    request = _request(new_key("batch"))
    admin.CreateRedemptionBatch(request)
    price_key = new_key()
    admin.SetPrice(
        admin_pb.SetPriceRequest(
            price=admin_pb.Price(
                feature="old-server", unit=t.USAGE_UNIT_IMAGES, unit_size=1, unit_price_micros=1
            ),
            idempotency_key=price_key,
        )
    )
    before = _batches(ledger_db_url)
    with psycopg.connect(ledger_db_url, autocommit=True) as conn:
        for refused in (request, _request(price_key)):
            with pytest.raises(psycopg.Error) as raised:
                _old_server_batch(conn, refused, clock)
            assert raised.value.sqlstate == "LE002"
    assert _batches(ledger_db_url) == before


def test_a_batch_an_old_server_is_making_is_answered_once_it_commits(
    admin: AdminStub, ledger_db_url: str, clock: Any
) -> None:
    """Both take the key's advisory lock: this release's call waits for the old server's
    transaction and then finds its batch, instead of making a second one beside it."""
    request = _request(new_key("racing"))
    before = _batches(ledger_db_url)
    answers: list[Any] = []
    with psycopg.connect(ledger_db_url) as old_server:
        made = _old_server_batch(old_server, request, clock)
        racing = threading.Thread(
            target=lambda: answers.append(admin.CreateRedemptionBatch(request))
        )
        racing.start()
        racing.join(timeout=1.0)
        assert answers == [], "the batch did not wait for the old server's"
        old_server.commit()
        racing.join(timeout=60)
    [answer] = answers
    assert answer.batch.batch_id == made["batch"]["batch_id"]
    assert _batches(ledger_db_url) == before + 1


def test_the_last_release_s_servers_make_batches_for_any_account(
    admin: AdminStub, ledger_db_url: str, clock: Any
) -> None:
    """During a rolling deploy a server of the release before account prefixes calls the
    query it knows (no prefix): the batch is made, for every account."""
    request = _request(new_key("batch"))
    with psycopg.connect(ledger_db_url) as old_server:
        row = old_server.execute(
            """SELECT ledger_create_redemption_batch_for_admin_request(
                      %s::text, %s::bytea, %s::bigint, %s::int, %s::int, NULL::timestamptz,
                      NULL::interval, %s::text, 'old-server', %s::timestamptz)""",
            (
                request.idempotency_key,
                request_fingerprint("create_redemption_batch", request),
                request.amount_micros,
                request.code_count,
                1,
                request.note,
                clock.now(),
            ),
        ).fetchone()
    assert row is not None
    made = row[0]
    assert made["replayed"] is False and made["batch"]["account_prefix"] == ""
    assert len(made["codes"]) == request.code_count
    batch = admin.GetRedemptionBatch(
        admin_pb.GetRedemptionBatchRequest(batch_id=made["batch"]["batch_id"])
    ).batch
    assert batch.account_prefix == "" and batch.created_by == "old-server"
