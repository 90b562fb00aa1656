"""The CLI's subcommands. Each takes the parsed arguments and a Session (stubs,
metadata, output), makes its calls and prints; gRPC errors are handled by main."""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, TextIO, TypeVar

import grpc
from google.protobuf import json_format, struct_pb2

from ledger.v1 import admin_service_pb2 as admin_pb
from ledger.v1 import (
    admin_service_pb2_grpc,
    ledger_service_pb2_grpc,
    report_service_pb2_grpc,
    types_pb2,
)
from ledger.v1 import ledger_service_pb2 as ledger_pb
from ledger.v1 import report_service_pb2 as report_pb
from ledger_client import TLS
from ledger_server.cli import output
from ledger_server.cli.output import UsageError, credits, enum_name, when

ACTOR_METADATA_KEY = "x-ledger-actor"  # ledger_server.server.identity


def _read(env: Mapping[str, str], name: str) -> bytes | None:
    path = env.get(name, "")
    if not path:
        return None
    try:
        with open(path, "rb") as pem:
            return pem.read()
    except OSError as exc:
        raise UsageError(f"{name}: cannot read {path}: {exc.strerror}") from exc


def _tls_credentials(env: Mapping[str, str]) -> grpc.ChannelCredentials | None:
    """TLS when a CA or a client certificate is configured (the CA: LEDGER_TLS_CA_FILE, else
    the system's roots); a client certificate and its key (both or neither) for a server
    that requires mutual TLS (LEDGER_TLS_CLIENT_CA_FILE), which closed the CLI's
    connections before (helper-150's review)."""
    ca_file = env.get("LEDGER_TLS_CA_FILE", "")
    cert_file = env.get("LEDGER_TLS_CLIENT_CERT_FILE", "")
    key_file = env.get("LEDGER_TLS_CLIENT_KEY_FILE", "")
    if bool(cert_file) != bool(key_file):
        raise UsageError(
            "LEDGER_TLS_CLIENT_CERT_FILE and LEDGER_TLS_CLIENT_KEY_FILE go together (mutual TLS)"
        )
    if not (ca_file or cert_file):
        return None
    return TLS(
        root_certificates=_read(env, "LEDGER_TLS_CA_FILE"),
        client_certificate=_read(env, "LEDGER_TLS_CLIENT_CERT_FILE"),
        client_private_key=_read(env, "LEDGER_TLS_CLIENT_KEY_FILE"),
    ).channel_credentials()


@dataclass
class Session:
    address: str
    actor: str
    timeout: float
    json: bool
    out: TextIO = field(default_factory=lambda: sys.stdout)
    _channel: grpc.Channel | None = None

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            # Credentials come from the environment only, so a token is never on a
            # command line (shell history, ps).
            credentials = _tls_credentials(os.environ)
            if credentials is not None:
                self._channel = grpc.secure_channel(self.address, credentials)
            else:
                self._channel = grpc.insecure_channel(self.address)
        return self._channel

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()

    @cached_property
    def ledger(self) -> ledger_service_pb2_grpc.LedgerServiceStub:
        return ledger_service_pb2_grpc.LedgerServiceStub(self.channel)

    @cached_property
    def admin(self) -> admin_service_pb2_grpc.AdminServiceStub:
        return admin_service_pb2_grpc.AdminServiceStub(self.channel)

    @cached_property
    def reports(self) -> report_service_pb2_grpc.ReportServiceStub:
        return report_service_pb2_grpc.ReportServiceStub(self.channel)

    def call(self, method: Callable[..., Any], request: Any) -> Any:
        metadata = [(ACTOR_METADATA_KEY, self.actor)]
        token = os.environ.get("LEDGER_TOKEN", "")
        if token:
            metadata.append(("authorization", f"Bearer {token}"))
        return method(request, timeout=self.timeout, metadata=metadata)


Command = Callable[[argparse.Namespace, Session], int]


def _key(args: argparse.Namespace, session: Session) -> str:
    """The idempotency key: --key, else a new one, told to the operator so that a
    retry of the same change can reuse it."""
    key: str = args.idempotency_key or f"cli-{uuid.uuid4().hex}"
    if not args.idempotency_key and not session.json:
        print(
            f"idempotency key: {key} (pass --key {key} to retry this exact change)", file=sys.stderr
        )
    return key


def _timestamp_arg(text: str, option: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{option}: {text!r} is not a time such as 2026-03-01T12:00:00Z") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _balance_fields(
    balance: types_pb2.AccountBalance | ledger_pb.BalanceResponse,
) -> list[tuple[str, str]]:
    pairs = [
        ("balance", credits(balance.balance_micros)),
        ("available", credits(balance.available_micros)),
        ("held", credits(balance.held_micros)),
        ("reward balance", credits(balance.reward_balance_micros)),
    ]
    if balance.overdraft_limit_micros or balance.debt_micros:
        pairs += [
            ("overdraft limit", credits(balance.overdraft_limit_micros)),
            ("debt", credits(balance.debt_micros)),
        ]
    return pairs


def _source(value: int) -> str:
    return enum_name(
        types_pb2.CreditSource.Name, types_pb2.CreditSource.ValueType(value), "CREDIT_SOURCE_"
    )


# --- reads ---------------------------------------------------------------------------------


def balance(args: argparse.Namespace, session: Session) -> int:
    response = session.call(
        session.ledger.Balance, ledger_pb.BalanceRequest(account_id=args.account)
    )
    if session.json:
        output.print_json(response, session.out)
    else:
        output.fields([("account", response.account_id), *_balance_fields(response)], session.out)
    return 0


def lots(args: argparse.Namespace, session: Session) -> int:
    found: list[types_pb2.Lot] = []
    token = ""
    while True:
        page = session.call(
            session.ledger.ListLots,
            ledger_pb.ListLotsRequest(
                account_id=args.account,
                page_size=1000,
                page_token=token,
                include_inactive=args.all,
            ),
        )
        found.extend(page.lots)
        token = page.next_page_token
        if not token:
            break
    if session.json:
        output.print_json(ledger_pb.ListLotsResponse(lots=found), session.out)
        return 0
    output.table(
        [
            "lot",
            "source",
            "balance",
            ">amount",
            ">remaining",
            ">held",
            ">expired",
            "expires",
            "created",
        ],
        [
            [
                lot.lot_id,
                _source(lot.source),
                enum_name(types_pb2.BalanceKind.Name, lot.balance_kind, "BALANCE_KIND_"),
                credits(lot.amount_micros),
                credits(lot.remaining_micros),
                credits(lot.held_micros),
                credits(lot.expired_micros),
                when(lot.expires_at) or "never",
                when(lot.created_at),
            ]
            for lot in found
        ],
        session.out,
    )
    return 0


def _journal_filters(
    args: argparse.Namespace,
    request: ledger_pb.ListTransactionsRequest | report_pb.ListJournalRequest,
) -> None:
    """The filters `transactions` and `journal` share: kinds, feature and time range."""
    request.feature = args.feature
    for kind in args.kind:
        try:
            request.kinds.append(
                ledger_pb.TransactionKind.Value(f"TRANSACTION_KIND_{kind.upper()}")
            )
        except ValueError:
            raise UsageError(f"--kind: unknown transaction kind {kind!r}") from None
    if args.since:
        request.start_time.FromDatetime(_timestamp_arg(args.since, "--since"))
    if args.until:
        request.end_time.FromDatetime(_timestamp_arg(args.until, "--until"))


def _print_entries(
    session: Session,
    entries: Sequence[ledger_pb.Transaction],
    next_page_token: str,
    with_account: bool,
) -> None:
    account = ["account"] if with_account else []
    output.table(
        ["id", *account, "time", "kind", "status", ">credits", "feature", "paid from", "comment"],
        [
            [
                t.transaction_id,
                *([t.account_id] if with_account else []),
                when(t.create_time),
                enum_name(ledger_pb.TransactionKind.Name, t.kind, "TRANSACTION_KIND_"),
                enum_name(ledger_pb.TransactionStatus.Name, t.status, "TRANSACTION_STATUS_"),
                credits(t.amount_micros),
                t.feature,
                ", ".join(
                    f"{_source(p.source)}#{p.lot_id} {credits(p.amount_micros)}"
                    for p in t.postings
                    if p.lot_id
                ),
                t.comment,
            ]
            for t in entries
        ],
        session.out,
    )
    if next_page_token:
        print(f"more: --page-token {next_page_token}", file=session.out)


def transactions(args: argparse.Namespace, session: Session) -> int:
    """An account's journal, newest first. Filtered by kind or feature, a page reads a
    bounded stretch of a long journal and may come back short, even empty, with a token."""
    request = ledger_pb.ListTransactionsRequest(account_id=args.account)
    rpc = session.ledger.ListTransactions
    return _list_entries(args, session, rpc, request, ledger_pb.ListTransactionsResponse, False)


def journal(args: argparse.Namespace, session: Session) -> int:
    """Every account's journal (or one account's), newest first. A page of every
    account's log reads a bounded stretch of the journal and may come back short, even
    empty, with a token."""
    request = report_pb.ListJournalRequest(account_id=args.account or "")
    rpc = session.reports.ListJournal
    return _list_entries(args, session, rpc, request, report_pb.ListJournalResponse, True)


JournalPage = TypeVar(
    "JournalPage", ledger_pb.ListTransactionsResponse, report_pb.ListJournalResponse
)


def _list_entries(
    args: argparse.Namespace,
    session: Session,
    rpc: Callable[..., JournalPage],
    request: ledger_pb.ListTransactionsRequest | report_pb.ListJournalRequest,
    page_type: type[JournalPage],
    with_account: bool,
) -> int:
    """The filters of `transactions` and `journal`, then pages from --page-token on until
    they hold --limit entries or the walk ends, printed with the token to continue from."""
    if args.limit < 1:
        raise UsageError("--limit: must be at least 1")
    _journal_filters(args, request)
    listed = page_type(next_page_token=args.page_token)
    while len(listed.transactions) < args.limit:
        request.page_size = args.limit - len(listed.transactions)
        request.page_token = listed.next_page_token
        response = session.call(rpc, request)
        listed.transactions.extend(response.transactions)
        listed.next_page_token = response.next_page_token
        if not listed.next_page_token:
            break
    if session.json:
        output.print_json(listed, session.out)
    else:
        _print_entries(session, listed.transactions, listed.next_page_token, with_account)
    return 0


def reservation(args: argparse.Namespace, session: Session) -> int:
    response = session.call(
        session.ledger.GetReservation,
        ledger_pb.GetReservationRequest(account_id=args.account, reservation_id=args.reservation),
    )
    if session.json:
        output.print_json(response, session.out)
        return 0
    r = response.reservation
    output.fields(
        [
            ("reservation", r.reservation_id),
            ("account", r.account_id),
            (
                "status",
                enum_name(ledger_pb.ReservationStatus.Name, r.status, "RESERVATION_STATUS_"),
            ),
            ("held", credits(r.held_micros)),
            ("committed", credits(r.committed_micros)),
            ("refunded", credits(r.refunded_micros)),
            ("feature", r.feature),
            ("created", when(r.created_at)),
            ("expires", when(r.expires_at)),
            ("finalized", when(r.finalized_at)),
        ],
        session.out,
    )
    output.table(
        ["lot", "source", ">held", ">committed", ">refunded"],
        [
            [
                lot.lot_id,
                _source(lot.source),
                credits(lot.held_micros),
                credits(lot.committed_micros),
                credits(lot.refunded_micros),
            ]
            for lot in r.lots
        ],
        session.out,
    )
    return 0


def _amounts_row(label: str, a: report_pb.SummaryAmounts) -> list[str]:
    return [
        label,
        *(
            credits(getattr(a, name))
            for name in (
                "opening_micros",
                "allocated_micros",
                "consumed_micros",
                "adjusted_micros",
                "refunded_micros",
                "expired_micros",
                "transferred_micros",
                "remaining_micros",
            )
        ),
    ]


def summary(args: argparse.Namespace, session: Session) -> int:
    request = report_pb.GetSummaryRequest(account_id=args.account or "")
    if args.day:
        request.day = args.day
    elif args.month:
        request.month = args.month
    else:
        if not (args.since and args.until):
            raise UsageError("give --day, --month, or both --since and --until")
        request.range.start_time.FromDatetime(_timestamp_arg(args.since, "--since"))
        request.range.end_time.FromDatetime(_timestamp_arg(args.until, "--until"))
    response = session.call(session.reports.GetSummary, request)
    if session.json:
        output.print_json(response, session.out)
        return 0
    print(
        f"{response.account_id or 'all accounts'}: {when(response.start_time)} to "
        f"{when(response.end_time)} UTC (days and months in {response.time_zone})",
        file=session.out,
    )
    headers = ["credits", ">opening", ">allocated", ">consumed", ">adjusted", ">refunded",
               ">expired", ">transferred", ">remaining"]  # fmt: skip
    rows = [
        _amounts_row("free", response.free),
        _amounts_row("purchased", response.purchased),
        _amounts_row("total", response.total),
    ]
    rows += [_amounts_row(f"  {_source(s.source)}", s.amounts) for s in response.sources]
    output.table(headers, rows, session.out)
    usage = [(u.feature, u.model, u) for u in response.usage]
    if response.other_usage_pairs:
        # The pairs past the first 1,000 the server lists, added up.
        usage.append((f"({response.other_usage_pairs:,} others)", "", response.other_usage))
    if usage:
        print(file=session.out)
        output.table(
            ["feature", "model", ">charges", ">consumed", ">refunded"],
            [
                [feature, model, u.charges, credits(u.consumed_micros), credits(u.refunded_micros)]
                for feature, model, u in usage
            ],
            session.out,
        )
    return 0


# --- changes --------------------------------------------------------------------------------


def grant(args: argparse.Namespace, session: Session) -> int:
    request = admin_pb.GrantCreditsRequest(
        account_id=args.account,
        idempotency_key=_key(args, session),
        amount_micros=output.parse_credits(args.credits),
        reason=args.reason,
    )
    if args.expires_in_days is not None:
        request.expires_in.FromSeconds(output.parse_days(args.expires_in_days, "--expires-in-days"))
    response = session.call(session.admin.GrantCredits, request)
    if session.json:
        output.print_json(response, session.out)
    else:
        output.fields(
            [
                ("granted", credits(response.lot.amount_micros)),
                ("lot", response.lot.lot_id),
                ("transaction", response.transaction_id),
                ("expires", when(response.lot.expires_at) or "never"),
                *_balance_fields(response.balance),
            ],
            session.out,
        )
    return 0


def adjust(args: argparse.Namespace, session: Session) -> int:
    response = session.call(
        session.admin.AdjustBalance,
        admin_pb.AdjustBalanceRequest(
            account_id=args.account,
            idempotency_key=_key(args, session),
            amount_micros=output.parse_credits(args.credits),
            reason=args.reason,
        ),
    )
    if session.json:
        output.print_json(response, session.out)
    else:
        output.fields(
            [
                ("debited", credits(output.parse_credits(args.credits))),
                ("transaction", response.transaction_id),
                *_balance_fields(response.balance),
            ],
            session.out,
        )
    return 0


def overdraft(args: argparse.Namespace, session: Session) -> int:
    response = session.call(
        session.admin.SetOverdraftLimit,
        admin_pb.SetOverdraftLimitRequest(
            account_id=args.account,
            idempotency_key=_key(args, session),
            overdraft_limit_micros=output.parse_credits(args.credits),
            reason=args.reason,
        ),
    )
    if session.json:
        output.print_json(response, session.out)
    else:
        output.fields(
            [
                ("transaction", response.transaction_id or "(the limit was unchanged)"),
                *_balance_fields(response.balance),
            ],
            session.out,
        )
    return 0


def _batch(batch: admin_pb.RedemptionBatch, session: Session) -> None:
    output.fields(
        [
            ("batch", batch.batch_id),
            ("credits per code", credits(batch.amount_micros)),
            ("codes", batch.code_count),
            ("redemptions per code", batch.max_redemptions_per_code),
            ("redemptions", batch.redemption_count),
            ("codes expire", when(batch.code_expire_time) or "never"),
            (
                "credits last",
                f"{batch.credit_lifetime.seconds // 86400} days"
                if batch.HasField("credit_lifetime")
                else "forever",
            ),
            ("accounts", f"{batch.account_prefix}..." if batch.account_prefix else "any"),
            ("disabled", "yes" if batch.disabled else "no"),
            ("note", batch.note),
            ("created by", batch.created_by),
            ("created", when(batch.create_time)),
        ],
        session.out,
    )


def codes_create(args: argparse.Namespace, session: Session) -> int:
    request = admin_pb.CreateRedemptionBatchRequest(
        idempotency_key=_key(args, session),
        amount_micros=output.parse_credits(args.credits, "--credits"),
        code_count=args.count,
        max_redemptions_per_code=args.max_per_code,
        note=args.note,
        account_prefix=args.account_prefix,
    )
    if args.codes_expire:
        request.code_expire_time.FromDatetime(_timestamp_arg(args.codes_expire, "--codes-expire"))
    if args.credit_days is not None:
        request.credit_lifetime.FromSeconds(output.parse_days(args.credit_days, "--credit-days"))
    response = session.call(session.admin.CreateRedemptionBatch, request)
    if session.json:
        output.print_json(response, session.out)
        return 0
    _batch(response.batch, session)
    print(file=session.out)
    for code in response.codes:
        print(code, file=session.out)
    return 0


def codes_show(args: argparse.Namespace, session: Session) -> int:
    response = session.call(
        session.admin.GetRedemptionBatch, admin_pb.GetRedemptionBatchRequest(batch_id=args.batch)
    )
    if session.json:
        output.print_json(response, session.out)
    else:
        _batch(response.batch, session)
    return 0


def codes_disable(args: argparse.Namespace, session: Session) -> int:
    response = session.call(
        session.admin.DisableRedemptionBatch,
        admin_pb.DisableRedemptionBatchRequest(
            batch_id=args.batch, reason=args.reason, idempotency_key=_key(args, session)
        ),
    )
    if session.json:
        output.print_json(response, session.out)
    else:
        _batch(response.batch, session)
    return 0


def _whole(data: Any) -> Any:
    """google.protobuf.Value numbers are floats: show 4500, not 4500.0."""
    if isinstance(data, float) and data.is_integer():
        return int(data)
    if isinstance(data, list):
        return [_whole(item) for item in data]
    if isinstance(data, dict):
        return {key: _whole(item) for key, item in data.items()}
    return data


def _value_text(value: struct_pb2.Value) -> str:
    return json.dumps(_whole(json_format.MessageToDict(value)))


def config_list(args: argparse.Namespace, session: Session) -> int:
    response = session.call(session.admin.ListSettings, admin_pb.ListSettingsRequest())
    if session.json:
        output.print_json(response, session.out)
        return 0
    output.table(
        ["key", "value", "default", "source", "changed by", "changed"],
        [
            [
                s.key,
                _value_text(s.value),
                _value_text(s.default_value),
                enum_name(admin_pb.SettingSource.Name, s.source, "SETTING_SOURCE_"),
                s.updated_by,
                when(s.update_time),
            ]
            for s in response.settings
        ],
        session.out,
    )
    return 0


def _parse_value(text: str) -> struct_pb2.Value:
    """JSON when it parses (true, 100, [..], "x"), else the text as a string."""
    try:
        data = json.loads(text)
    except ValueError:
        data = text
    value = struct_pb2.Value()
    json_format.ParseDict(data, value)
    return value


def _setting_changed(response: admin_pb.UpdateSettingResponse, session: Session) -> int:
    if session.json:
        output.print_json(response, session.out)
    else:
        s = response.setting
        source = enum_name(admin_pb.SettingSource.Name, s.source, "SETTING_SOURCE_")
        print(f"{s.key} = {_value_text(s.value)} ({source})", file=session.out)
    return 0


def config_set(args: argparse.Namespace, session: Session) -> int:
    response = session.call(
        session.admin.UpdateSetting,
        admin_pb.UpdateSettingRequest(
            key=args.key,
            value=_parse_value(args.value),
            reason=args.reason,
            idempotency_key=_key(args, session),
        ),
    )
    return _setting_changed(response, session)


def config_reset(args: argparse.Namespace, session: Session) -> int:
    response = session.call(
        session.admin.UpdateSetting,
        admin_pb.UpdateSettingRequest(
            key=args.key, reset=True, reason=args.reason, idempotency_key=_key(args, session)
        ),
    )
    return _setting_changed(response, session)


# --- database commands (DATABASE_URL, no server needed) --------------------------------------


def audit(args: argparse.Namespace, session: Session) -> int:
    from ledger_server.audit import AuditCannotRun, audit_database

    try:
        violations = audit_database(args.database_url)
    except AuditCannotRun as exc:
        output.print_error({"code": "FAILED_PRECONDITION", "message": str(exc)}, session.json)
        return 3  # as for a database out of reach (cli/__init__.py): the audit did not run
    if session.json:
        output.print_json(
            {
                "clean": not violations,
                "violations": [
                    {"check": v.check, "account_id": v.account_id, "detail": v.detail}
                    for v in violations
                ],
            },
            session.out,
        )
    elif violations:
        output.table(
            ["check", "account", "detail"],
            [[v.check, v.account_id, v.detail] for v in violations],
            session.out,
        )
        print(f"audit FAILED: {len(violations)} violation(s)", file=sys.stderr)
    else:
        print("audit clean: every invariant holds", file=session.out)
    return 1 if violations else 0


def migrate(args: argparse.Namespace, session: Session) -> int:
    from ledger_server.db.migrate import migrate as apply

    applied = apply(args.database_url)
    if session.json:
        output.print_json({"applied": applied}, session.out)
    else:
        print(
            "applied: " + ", ".join(applied) if applied else "schema is up to date",
            file=session.out,
        )
    return 0
