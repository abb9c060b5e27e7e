"""Batches of a faust stream that close as soon as nothing more is buffered.

faust's ``Stream.take(max, within)`` waits the full ``within`` whenever fewer than ``max``
events arrived: at low load every event then waits ``within`` (100 ms by default) before it
is processed. :func:`eager_batches` yields as soon as the events already fetched into the
stream are in the buffer: it waits for the first event, lets the stream hand over what it
already holds (a few event-loop turns, bounded by ``max_wait_s``), and yields. Under load the
batches grow by themselves, up to ``max_``, because events keep arriving while one batch is
processed.

Events are not acknowledged here (like ``noack_take``): the caller acks them after the batch
is durable. This uses faust's stream processor hooks (``add_processor``, passive consuming),
as ``Stream.noack_take`` does; faust-streaming is pinned to 0.15.x.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

__all__ = ["BatchWindow", "eager_batches"]

# Event-loop turns without a new event after which the buffer counts as drained.
_QUIET_TURNS = 2


async def eager_batches(
    stream: Any, max_: int, max_wait_s: float, backlog_wait_s: float | None = None
) -> AsyncIterator[list[Any]]:
    """Yield lists of faust events (not acknowledged) from ``stream``; see the module docstring.

    A batch still growing at its deadline means a backlog: the next one may wait twice as
    long, up to ``backlog_wait_s`` (bigger batches, fewer Redis round trips per event); a batch
    that closed because the buffer ran dry resets the wait to ``max_wait_s``.
    """
    window = BatchWindow(max_wait_s, backlog_wait_s)
    buffer: list[Any] = []
    ready = asyncio.Event()  # at least one event buffered
    full = asyncio.Event()
    consumed = asyncio.Event()
    reading: asyncio.Future[None] | None = None
    saved_acks = stream.enable_acks

    async def add_to_buffer(value: Any) -> Any:
        nonlocal reading
        if reading is not None:  # the consumer is reading the buffer: wait until it is done
            try:
                await reading
            finally:
                reading = None
        event = stream.current_event
        if event is None:
            raise RuntimeError("faust stream has no current event")
        buffer.append(event)
        ready.set()
        if len(buffer) >= max_:
            full.set()
            consumed.clear()
            await stream.wait(consumed)  # never more than max_ events per batch
        return value

    stream.enable_acks = False
    stream.add_processor(add_to_buffer)
    stream._enable_passive(aiter(stream.channel))
    try:
        while not stream.should_stop:
            await stream.wait_for_stopped(ready, timeout=1.0)
            if not buffer:
                continue
            window.update(await _drain(buffer, full, window.wait_s))
            reading = asyncio.get_running_loop().create_future()
            try:
                yield list(buffer)
            finally:
                buffer.clear()
                ready.clear()
                full.clear()
                if not reading.done():
                    reading.set_result(None)
                consumed.set()
    finally:
        stream.enable_acks = saved_acks
        stream._processors.remove(add_to_buffer)


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
