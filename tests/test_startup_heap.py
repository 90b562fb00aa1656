"""Startup's objects are frozen out of the collector's full collections (server/startup_heap.py)."""

from __future__ import annotations

import gc

from ledger_server.server import startup_heap


class _LongLived:
    pass


def test_what_exists_at_freeze_is_kept_out_of_collections_and_garbage_is_not_kept() -> None:
    kept = _LongLived()
    garbage = [_LongLived()]
    garbage.append(garbage)  # a cycle: only the collector frees it
    garbage_id = id(garbage)
    del garbage
    try:
        frozen = startup_heap.freeze()
        assert frozen == gc.get_freeze_count() > 0
        tracked = gc.get_objects()  # the generations collections walk
        assert not any(obj is kept for obj in tracked)
        assert all(id(obj) != garbage_id for obj in tracked)
    finally:
        gc.unfreeze()  # back to the oldest generation, for the rest of the test session
    assert any(obj is kept for obj in gc.get_objects())
