"""Quickstart: an AI image feature paying with credits.

    python quickstart.py [HOST:PORT]      (or LEDGER_TARGET=HOST:PORT)

Against a server with callers configured, LEDGER_TOKEN must be an admin's: Grant is an
admin call (a service token gets PERMISSION_DENIED on it).

Opens a fresh account by granting it 10 credits (the server adds its sign-up bonus to an
account's first grant: 100 credits by default, so the balance printed at the end is 108.50),
runs one generation that succeeds (reserve 2 credits, commit the real cost of 1.5), one that
fails (the hold is released, nothing charged), and one that the account cannot afford.
Needs only the credit-ledger-client package.
"""

from __future__ import annotations

import os
import sys
import uuid

from ledger_client import (
    MICROS_PER_CREDIT,
    Credentials,
    InsufficientCredits,
    LedgerClient,
)


def credits(micros: int) -> str:
    return f"{micros / MICROS_PER_CREDIT:.2f}"


class GenerationFailed(Exception):
    pass


def generate_image(prompt: str) -> int:
    """Stands in for the model call; returns what it really cost, in micro-credits."""
    if "fail" in prompt:
        raise GenerationFailed(prompt)
    return 1_500_000


def main() -> int:
    target = (
        sys.argv[1] if len(sys.argv) > 1 else os.environ.get("LEDGER_TARGET", "localhost:50051")
    )
    credentials = Credentials(token=os.environ.get("LEDGER_TOKEN") or None)
    account = f"quickstart-{uuid.uuid4().hex[:12]}"
    print(f"account {account}")

    with LedgerClient(target, credentials=credentials) as client:
        client.grant(account, 10 * MICROS_PER_CREDIT, "purchase", external_ref="order-1")

        # Reserve before the generation, commit the real cost, release on failure.
        with client.reservation(account, 2 * MICROS_PER_CREDIT, feature="image.generate") as hold:
            hold.set_actual(generate_image("a lighthouse at dusk"))
        print(f"charged {credits(hold.reservation.committed_micros)}")

        try:
            with client.reservation(account, 2 * MICROS_PER_CREDIT, feature="image.generate"):
                generate_image("this one will fail")
        except GenerationFailed:
            print("generation failed: hold released, nothing charged")

        try:  # more than the account has
            available = client.balance(account).available_micros
            client.consume(account, available + MICROS_PER_CREDIT, feature="video.generate")
        except InsufficientCredits as error:
            print(f"insufficient credits: {credits(error.available_micros)} available")

        balance = client.balance(account)
        print(f"balance {credits(balance.balance_micros)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
