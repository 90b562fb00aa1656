"""Structured logs: one JSON object per line on stderr, with the time, level, logger,
message, the request id of the call or job in progress, and the event's own fields
(``log.info("...", extra={"rpc_method": ..., "code": ...})``).

Nothing here prints request metadata: the per-call log line (observability/rpc.py) has
chosen fields only. As a second line of defence the formatter masks values under
secret-looking keys and any ``Bearer <token>`` in a message, so a token that slips into a log
line is not readable.

``LEDGER_LOG_FORMAT`` (``json``, or ``text`` for a human at a terminal) and
``LEDGER_LOG_LEVEL`` (``INFO``) choose the output of ``python -m ledger_server`` and of the
workers."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import traceback
from datetime import UTC, datetime
from typing import Any, TextIO

from ledger_server.observability import request_id

# Attributes every LogRecord has: the rest came in through `extra=`.
_STANDARD = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None)).keys()
    | {"message", "asctime", "taskName"}
)
_SECRET_KEY = re.compile(r"authorization|token|password|secret|api_key|cookie", re.I)
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+")
REDACTED = "[redacted]"


def redact(text: str) -> str:
    return _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)


def _clean(key: str, value: Any) -> Any:
    if _SECRET_KEY.search(key):
        return REDACTED
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bool | int | float) or value is None:
        return value
    return redact(str(value))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        current = request_id.get()
        if current is not None:
            entry["request_id"] = current
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key not in entry:
                entry[key] = _clean(key, value)
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = redact("".join(traceback.format_exception(*record.exc_info)))
        elif record.exc_text:
            entry["exception"] = redact(record.exc_text)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = redact(super().format(record))
        current = request_id.get()
        return f"{line} [request_id={current}]" if current else line


def setup_logging(
    fmt: str | None = None, level: str | None = None, stream: TextIO | None = None
) -> None:
    """Replaces the root logger's handlers with one writing to ``stream`` (stderr)."""
    fmt = (fmt or os.environ.get("LEDGER_LOG_FORMAT", "") or "json").lower()
    level = (level or os.environ.get("LEDGER_LOG_LEVEL", "") or "INFO").upper()
    if fmt not in ("json", "text"):
        raise ValueError(f"LEDGER_LOG_FORMAT must be json or text, got {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
