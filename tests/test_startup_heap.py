"""Startup's objects are frozen out of the collector's full collections (server/startup_heap.py)."""

from __future__ import annotations

import gc
import weakref

from ledger_server.server import startup_heap


class _LongLived:
    pass


def test_what_exists_at_freeze_is_kept_out_of_collections_and_garbage_is_not_kept() -> None:
    kept = _LongLived()
    garbage = _LongLived()
    garbage.cycle = garbage  # type: ignore[attr-defined]  # only the collector frees a cycle
    garbage_ref = weakref.ref(garbage)
    del garbage
    try:
        frozen = startup_heap.freeze()
        # Other threads of the test session may free a frozen object meanwhile (it leaves
        # the permanent generation then); none can add one.
        assert 0 < gc.get_freeze_count() <= frozen
        assert garbage_ref() is None  # collected before the freeze, not frozen for good
        assert not any(obj is kept for obj in gc.get_objects())  # what collections walk
    finally:
        gc.unfreeze()  # back to the oldest generation, for the rest of the test session
    assert any(obj is kept for obj in gc.get_objects())
