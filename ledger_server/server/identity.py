"""Who is calling: recorded as the actor of admin changes and grants.

Until per-caller tokens exist, the caller names itself in the `x-ledger-actor`
metadata; callers that don't are "anonymous"."""

from __future__ import annotations

import re
from typing import Any

import grpc

ACTOR_METADATA_KEY = "x-ledger-actor"
ANONYMOUS = "anonymous"
_ACTOR = re.compile(r"^[\x21-\x7e]{1,128}$")


def caller_identity(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == ACTOR_METADATA_KEY and isinstance(value, str) and _ACTOR.match(value):
            return value
    return ANONYMOUS
