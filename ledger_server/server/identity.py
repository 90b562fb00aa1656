"""Who is calling: recorded as the actor of admin changes and grants.

With callers configured (LEDGER_AUTH_TOKENS_FILE), the caller is the name of the token the
call authenticated with, and the `x-ledger-actor` metadata is ignored. Without (local
development), the caller names itself in `x-ledger-actor`; callers that don't are
"anonymous"."""

from __future__ import annotations

import re
from typing import Any

import grpc

from ledger_server.security import current_principal

ACTOR_METADATA_KEY = "x-ledger-actor"
ANONYMOUS = "anonymous"
_ACTOR = re.compile(r"[\x21-\x7e]{1,128}")


def caller_identity(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    principal = current_principal()
    if principal is not None:
        return principal.name
    for key, value in context.invocation_metadata() or ():
        if key == ACTOR_METADATA_KEY and isinstance(value, str) and _ACTOR.fullmatch(value):
            return value
    return ANONYMOUS
