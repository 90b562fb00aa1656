"""Typed Python client for the credit-ledger gRPC service.

The generated messages and stubs live in the ``ledger.v1`` package next to this one.
"""

__all__: list[str] = []
