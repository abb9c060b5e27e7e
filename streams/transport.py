"""faust's Kafka transport with per-message delivery that creates no tasks in the common case.

faust's consumer hands every fetched record to the streams with
``await self.wait_first(callback(message), self.suspend_flow.wait())``: delivery gives up when
the flow is suspended (a rebalance) or the consumer stops. ``Service.wait_first`` wraps each
awaitable, and the consumer's own stopped and crashed events, in a task and waits on all four;
so every record costs four tasks, an ``asyncio.wait`` and three cancellations. In a py-spy
profile of the worker at 1,000 events/s that drain loop held ~16 % of its GIL samples.

Delivering a record almost never waits: the callback puts the event into the stream's
in-memory queue, which has room unless the agent is far behind. :class:`Consumer` therefore
runs the callback inline up to its first suspension. If it finishes there and nothing asked
delivery to stop, that is the result ``wait_first`` would have returned, without a task. If it
suspends (a full queue), the started callback goes to faust's own ``wait_first`` unchanged in
meaning: it races the suspend/stop events and is cancelled if one of them comes first.

``wait_first`` is called on the consumer by that drain loop only (faust-streaming is pinned to
0.15.x; ``tests/streams/test_transport.py`` checks the call site is still the one described).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka
from mode.services import WaitResults

__all__ = ["App", "Consumer", "Transport"]


class _Resume:
    """Awaitable that finishes a coroutine already stepped once, which suspended on ``pending``.

    It does what an asyncio task does for a coroutine: hands the future the coroutine awaits to
    the task that awaits this object, and when that task wakes, sends the result (or throws the
    cancellation) back into the coroutine.
    """

    __slots__ = ("coro", "pending", "started")

    def __init__(self, coro: Coroutine[Any, Any, Any], pending: Any) -> None:
        self.coro = coro
        self.pending = pending
        self.started = False  # a task awaits this: it owns the coroutine from here on

    def __await__(self) -> Generator[Any, None, Any]:
        self.started = True
        pending = self.pending
        while True:
            try:
                yield pending
            except BaseException as exc:  # cancelled (or thrown into) while waiting: forward it
                try:
                    pending = self.coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
                continue
            try:
                pending = self.coro.send(None)
            except StopIteration as stop:
                return stop.value


def _close(awaitables: tuple[Any, ...]) -> None:
    for a in awaitables:
        if asyncio.iscoroutine(a):
            a.close()  # never started: no "was never awaited" warning


class Consumer(faust_aiokafka.Consumer):
    """faust's aiokafka consumer whose record delivery runs inline when it does not wait."""

    async def wait_first(self, *coros: Any, timeout: Any = None) -> WaitResults:
        first = coros[0] if coros else None
        if (
            timeout is not None
            or not asyncio.iscoroutine(first)
            or self.suspend_flow.is_set()
            or self._stopped.is_set()
            or self._crashed.is_set()
        ):
            return await super().wait_first(*coros, timeout=timeout)
        try:
            pending = first.send(None)
        except StopIteration as done:  # delivered without waiting: what wait_first would return
            _close(coros[1:])
            return WaitResults([first], [done.value], False)
        except BaseException:
            _close(coros[1:])
            raise
        resume = _Resume(first, pending)
        try:
            return await super().wait_first(resume, *coros[1:])
        finally:
            if not resume.started:  # its task was cancelled before its first step: end the callback
                first.close()  # (GeneratorExit at its await: a queue putter is removed, a lock released)


class Transport(faust_aiokafka.Transport):
    Consumer = Consumer


class App(faust.App):
    """faust.App on :class:`Transport` (consumer side; the producer transport is faust's)."""

    def _new_transport(self) -> Transport:
        return Transport(self.conf.broker_consumer, self)
