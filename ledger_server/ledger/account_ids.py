"""What an account id is, and what may scope accounts by the start of their id (a service's
tenant, a redemption batch's). Pure: read by request validation and by the callers'
configuration (ledger_server/security.py)."""

from __future__ import annotations

import re

# The characters of an account id that are not letters or digits.
ACCOUNT_ID_SEPARATORS = "._:@/+=-"
ACCOUNT_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


def account_prefix_problem(value: str) -> str | None:
    """Why ``value`` cannot scope accounts by prefix, or None. A prefix ends with a
    separator: "acme" would also admit "acme2:..." and "acmecorp:...", other tenants'
    accounts, where "acme:" admits acme's only."""
    if not ACCOUNT_ID.fullmatch(value) or len(value) == 128:  # it would admit itself only
        return "must be the start of an account id: 1 to 127 of letters, digits and . _ : @ / + = -"
    if value[-1] not in ACCOUNT_ID_SEPARATORS:
        return (
            f"must end with a separator (one of {' '.join(ACCOUNT_ID_SEPARATORS)}), "
            f"e.g. {value + ':'!r}: {value!r} would also admit accounts such as {value + '2:x'!r}"
        )
    return None
