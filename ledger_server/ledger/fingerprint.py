"""What makes two requests "the same" for idempotency: the operation and every
field except the idempotency key, serialized deterministically."""

from __future__ import annotations

import hashlib

from google.protobuf.message import Message


def request_fingerprint(operation: str, request: Message) -> bytes:
    copy = type(request)()
    copy.CopyFrom(request)
    copy.ClearField("idempotency_key")
    digest = hashlib.sha256(operation.encode())
    digest.update(b"\x00")
    digest.update(copy.SerializeToString(deterministic=True))
    return digest.digest()
