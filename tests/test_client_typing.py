"""The client's types as a product's code meets them: user code type-checked with
``mypy --strict`` (the project's settings) passes usage counted into a ``dict[str, int]``
variable, keyed by enum values, or a literal mixing both, to every call that takes one,
sync and async; a usage of the wrong shape is still refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

USER_CODE = """
from ledger.v1 import types_pb2
from ledger_client import AsyncLedgerClient, LedgerClient, UsageUnitLike


def charge(ledger: LedgerClient, account: str, tokens: int) -> None:
    usage: dict[str, int] = {"output_tokens": tokens}
    ledger.consume(account, usage=usage, feature="chat", model="pro")
    ledger.estimate("chat", usage, model="pro")
    with ledger.reservation(account, usage=usage, feature="chat", model="pro") as hold:
        hold.set_actual_usage(usage)
    by_value: dict[types_pb2.UsageUnit.ValueType, int] = {types_pb2.USAGE_UNIT_INPUT_TOKENS: 1}
    ledger.estimate("chat", by_value)
    either: dict[UsageUnitLike, int] = {"output_tokens": tokens}
    ledger.consume(account, usage=either, feature="chat")
    ledger.consume(
        account, usage={"output_tokens": 1, types_pb2.USAGE_UNIT_INPUT_TOKENS: 2}, feature="chat"
    )
    ledger.consume(account, usage={"output_tokens": "1"}, feature="chat")  # type: ignore[dict-item]
    counts: dict[int, int] = {1: tokens}
    ledger.estimate("chat", counts)  # type: ignore[arg-type]


async def charge_async(ledger: AsyncLedgerClient, account: str, tokens: int) -> None:
    usage: dict[str, int] = {"output_tokens": tokens}
    await ledger.consume(account, usage=usage, feature="chat", model="pro")
    await ledger.estimate("chat", usage, model="pro")
    async with ledger.reservation(account, usage=usage, feature="chat", model="pro") as hold:
        hold.set_actual_usage(usage)
"""


def test_user_code_passes_usage_dicts_under_mypy_strict(tmp_path: Path) -> None:
    source = tmp_path / "user_code.py"
    source.write_text(USER_CODE)
    # Run from the project root for its mypy settings (strict, the client's sources); strict
    # warns of an unused "type: ignore", so the refused lines must stay refused.
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"), str(source)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
