"""Once the server is up, what startup built is moved out of the garbage collector's sight.

A full (oldest-generation) collection walks every object the collector tracks, and most of
them were made at startup (modules, protobuf descriptors, the pool, the servicers) and live
as long as the process. Under load CPython runs one every 10-15 s here, and each paused the
event loop for ~35 ms, every call in flight waiting with it. `gc.freeze()` puts what exists
now in a permanent generation that collections skip (the gc module's documented use for
long-lived startup objects); full collections then took ~0.3 ms (BENCHMARKS.md, session 10).
What startup left as garbage is collected first, so none of it is kept for good."""

from __future__ import annotations

import gc


def freeze() -> int:
    """Collects, then freezes everything left; returns how many objects are now frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
