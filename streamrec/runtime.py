"""Process-level tuning shared by the worker and its scoring process.

:func:`settle_heap` runs once a process has loaded what it keeps for its lifetime (catalog,
model sessions, faust's services): those objects move to the collector's permanent generation
(``gc.freeze``), so the full collections that a steady stream of short-lived objects (events,
Redis replies, lists) triggers no longer walk them, and the young generation is collected less
often. Hot-path objects are mostly acyclic and freed by reference counting, so this only
trims the collector's pauses and CPU; memory is still reclaimed.
"""

from __future__ import annotations

import gc

__all__ = ["settle_heap"]

# Allocations between young-generation collections (CPython's default is 700).
YOUNG_THRESHOLD = 20_000


def settle_heap() -> None:
    gc.collect()
    gc.freeze()
    _, mid, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, mid, old)
