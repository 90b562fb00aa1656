"""Once the server is up, what startup built is moved out of the garbage collector's sight.

A full (oldest-generation) collection walks every object the collector tracks, and most of
them were made at startup (modules, protobuf descriptors, the pool, the servicers) and live
as long as the process. Measured on the bench server in session 10 (CPython 3.11, Balance
and Consume at concurrency 16; BENCHMARKS.md item 27): a full collection ran every 10-15 s
and paused the event loop for 29-36 ms, every call in flight waiting with it. `gc.freeze()`
puts what exists now in a permanent generation that collections skip; afterwards full
collections ran about as often and took ~0.3 ms.

What is collected first is not frozen. What is frozen and later becomes garbage (a startup
connection the pool replaces, say) is never freed: a bounded, one-time amount."""

from __future__ import annotations

import gc


def freeze() -> int:
    """Collects, then freezes everything left; returns how many objects are now frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
