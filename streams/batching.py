"""Batches of the consumer's buffered records that close as soon as nothing more is buffered.

faust's ``Stream.take(max, within)`` waits the full ``within`` whenever fewer than ``max``
events arrived: at low load every event then waits ``within`` (100 ms by default) before it
is processed. :func:`bulk_batches` yields as soon as the records already fetched are in the
buffer (``streams/transport.py``'s :class:`~streams.transport.BulkBuffer`, which the consumer
fills): it waits for the first record, lets the consumer hand over what it already holds (a few
event-loop turns, bounded by the window), and yields. Under load the batches grow by themselves,
up to ``max_``, because records keep arriving while one batch is processed; a batch still
growing at its deadline doubles the next one's window (:class:`BatchWindow`).

Records are not acknowledged here: the caller acks them after the batch is durable.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

__all__ = ["BatchWindow", "bulk_batches"]

# Event-loop turns without a new event after which the buffer counts as drained.
_QUIET_TURNS = 2


async def bulk_batches(
    buffer: Any,
    stream: Any,
    max_: int,
    max_wait_s: float,
    backlog_wait_s: float | None = None,
    current: Callable[[Any], bool] | None = None,
    backlog_max: int | None = None,
) -> AsyncIterator[list[Any]]:
    """Lists of faust messages from a :class:`streams.transport.BulkBuffer` that the consumer
    fills, each closed once the buffer stops growing, holds ``max_`` or the window is up, until
    ``stream`` (the agent's) stops. A buffer that already holds more than ``max_`` (a backlog)
    gives a batch of up to ``backlog_max``. Messages for which
    ``current`` is false (fetched before the last rebalance) are left out; not acknowledged."""
    window = BatchWindow(max_wait_s, backlog_wait_s)
    big = max(max_, backlog_max or max_)
    while not stream.should_stop:
        await stream.wait_for_stopped(buffer.ready, timeout=1.0)
        if not len(buffer):
            continue
        window.update(await _drain(buffer.messages, buffer.full, window.wait_s))
        batch = buffer.take(big if len(buffer) > max_ else max_)
        if current is not None:
            batch = [m for m in batch if current(m)]
        if batch:
            yield batch


class BatchWindow:
    """How long the next batch may gather: ``base_s``, doubled after each batch that was still
    growing at its deadline (a backlog) up to ``top_s``, back to ``base_s`` once one runs dry."""

    def __init__(self, base_s: float, top_s: float | None = None) -> None:
        self.base_s = base_s
        self.top_s = max(base_s, top_s or base_s)
        self.wait_s = base_s

    def update(self, backlog: bool) -> None:
        self.wait_s = min(self.top_s, 2 * self.wait_s) if backlog else self.base_s


async def _drain(buffer: list[Any], full: asyncio.Event, max_wait_s: float) -> bool:
    """Let the stream hand over what it holds: until the buffer stops growing, is full, or time is
    up. Returns whether time ran out while it was still growing (a backlog)."""
    deadline = time.monotonic() + max_wait_s
    quiet = 0
    size = len(buffer)
    while quiet < _QUIET_TURNS and not full.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(0)
        if len(buffer) == size:
            quiet += 1
        else:
            quiet, size = 0, len(buffer)
    return quiet < _QUIET_TURNS and not full.is_set()
