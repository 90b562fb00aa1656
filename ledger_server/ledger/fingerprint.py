"""What makes two requests "the same" for idempotency: the operation and every
field except the idempotency key, serialized deterministically, each field as the ledger
reads it. A retry may write a field another way the ledger takes as equal (an id in upper
case, a code with spaces, the value an unset field means spelled out): it is the same
request. Handlers name such fields in `as_read`, with the form clients usually send, so
that a request in that form keeps the fingerprint releases before stored for it."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from google.protobuf.message import Message

AsRead = Mapping[str, object]


def request_fingerprint(operation: str, request: Message, as_read: AsRead | None = None) -> bytes:
    """`as_read` maps a field's path ("price.unit_size") to its value as read; None or
    the field's default clears it. A path into a message the request does not hold names
    nothing to read."""
    copy = type(request)()
    copy.CopyFrom(request)
    copy.ClearField("idempotency_key")
    for path, value in (as_read or {}).items():
        *parents, name = path.split(".")
        target = _holder(copy, parents)
        if target is None:
            continue
        if value is None:
            target.ClearField(name)
        else:
            setattr(target, name, value)
    digest = hashlib.sha256(operation.encode())
    digest.update(b"\x00")
    digest.update(copy.SerializeToString(deterministic=True))
    return digest.digest()


def _holder(message: Message, parents: list[str]) -> Message | None:
    for parent in parents:
        if not message.HasField(parent):
            return None
        message = getattr(message, parent)
    return message


def unset_if_default(value: int, default: int) -> int:
    """A number or enum as read when unset means `default`: the default spelled out reads
    as unset, the form clients usually send."""
    return 0 if value == default else value
