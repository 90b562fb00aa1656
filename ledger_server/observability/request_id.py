"""The request id of the call (or job) in progress, kept in a contextvar: each gRPC call's
observability step (observability/rpc.py) sets it from the caller's `x-request-id` metadata
(or makes one up), the JSON log formatter prints it, and jobs enqueued while it is set carry
it in their meta, so a worker's log lines name the call that caused them."""

from __future__ import annotations

import contextvars
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

METADATA_KEY = "x-request-id"
JOB_META_KEY = "request_id"

# What we accept from a caller: printable ASCII, no spaces, bounded (it ends up in logs).
_ACCEPTABLE = re.compile(r"[A-Za-z0-9._:/@+=-]{1,128}")

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def new() -> str:
    return os.urandom(16).hex()  # as random as uuid4().hex, a quarter of the cost


def accept(value: object) -> str | None:
    """The caller's request id if it is safe to log and echo back, else None."""
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if isinstance(value, str) and _ACCEPTABLE.fullmatch(value):
        return value
    return None


def get() -> str | None:
    return _current.get()


def set_current(value: str | None) -> contextvars.Token[str | None]:
    return _current.set(value)


def reset(token: contextvars.Token[str | None]) -> None:
    _current.reset(token)


@contextmanager
def bound(value: str | None) -> Iterator[str | None]:
    """Sets the request id for the block (a job, a test)."""
    token = _current.set(value)
    try:
        yield value
    finally:
        _current.reset(token)


def job_meta() -> dict[str, str]:
    """The meta to store on a job enqueued now: the current request id, if any."""
    value = _current.get()
    return {JOB_META_KEY: value} if value else {}
