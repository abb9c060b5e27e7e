"""settle_heap: what was loaded leaves the collector's generations; cycles are still reclaimed."""

from __future__ import annotations

import gc
import weakref

from streamrec.runtime import YOUNG_THRESHOLD, settle_heap


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_settle_heap_freezes_what_is_loaded_and_still_collects_new_cycles() -> None:
    saved = gc.get_threshold()
    loaded = [_Node() for _ in range(1000)]
    try:
        settle_heap()
        assert gc.get_freeze_count() >= len(loaded)
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD
        a, b = _Node(), _Node()  # a cycle made after start-up is not frozen: it is collected
        a.other, b.other = b, a
        ref = weakref.ref(a)
        del a, b
        gc.collect()
        assert ref() is None
    finally:
        gc.unfreeze()
        gc.set_threshold(*saved)
