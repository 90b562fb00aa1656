"""The idempotency keys the ledger's workers make themselves, in an account's own key
namespace, where clients choose theirs too. A client that took one first, by chance or on
purpose, would make the worker's call a replay of the client's request or a refusal: the
day's automatic reward lost for good, a Stripe payment never credited (helper-56). So no
client key may start with these prefixes (validation.idempotency_key); the workers call SQL
directly and never meet that check."""

from __future__ import annotations

AUTO_DAILY_KEY_PREFIX = "auto-daily:"  # workers/sweepers.py, + the ledger day
STRIPE_EVENT_KEY_PREFIX = "stripe:"  # workers/payments.py, + the Stripe event id
RESERVED_KEY_PREFIXES = (AUTO_DAILY_KEY_PREFIX, STRIPE_EVENT_KEY_PREFIX)
