"""faust's Kafka transport with per-message delivery that creates no tasks in the common case.

faust's consumer hands every fetched record to the streams with
``await self.wait_first(callback(message), self.suspend_flow.wait())``: delivery gives up when
the flow is suspended (a rebalance) or the consumer stops. ``Service.wait_first`` wraps each
awaitable, and the consumer's own stopped and crashed events, in a task and waits on all four;
so every record costs four tasks, an ``asyncio.wait`` and three cancellations. In a py-spy
profile of the worker at 1,000 events/s that drain loop held ~16 % of its GIL samples.

Delivering a record almost never waits: the callback puts it into the bulk buffer below (or a
stream's in-memory queue), which has room unless the agent is far behind. :class:`Consumer` therefore
runs the callback inline up to its first suspension. If it finishes there and nothing asked
delivery to stop, that is the result ``wait_first`` would have returned, without a task. If it
suspends (a full buffer), the started callback goes to faust's own ``wait_first`` unchanged in
meaning: it races the suspend/stop events and is cancelled if one of them comes first.

``wait_first`` is called on the consumer by that drain loop only (faust-streaming is pinned to
0.15.x; ``tests/streams/test_transport.py`` checks the call site is still the one described).

Bulk delivery (:class:`BulkBuffer`, :class:`Conductor`): faust hands each record to a stream on
its own: the conductor takes a lock, checks flow control and the producer buffer, builds an event
and puts it in the stream's queue; the stream takes it out again, sets its current event, calls
its sensors and processors; and each event is acknowledged through its message's reference
count. In a GIL profile of the worker at 10,000 events/s that per-record path held ~40 % of the
samples. For a topic the agent takes in batches, :meth:`Conductor.deliver_in_bulk` registers a
buffer instead: the conductor appends the record's message to it (after the flow-control check,
and waiting while it is full), and the agent takes lists of them
(``streams/batching.py``) and acknowledges each message to the consumer once its batch is done,
so faust commits exactly what it would have. The agent skips messages fetched before the last
rebalance (their generation, as faust's stream does), and faust's flow control empties the
buffer when a rebalance starts, as it empties the streams' queues.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any

import faust
from faust.transport import conductor as faust_conductor
from faust.transport.drivers import aiokafka as faust_aiokafka
from mode.services import WaitResults

__all__ = ["App", "BulkBuffer", "Conductor", "Consumer", "Transport"]


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


class BulkBuffer:
    """The fetched, not yet taken records of one topic, as faust's messages (see the module doc).

    ``ready`` is set while it holds any, ``full`` while it holds a batch (``batch_max``); the
    conductor waits while it holds ``maxsize`` (the consumer's fetching then waits too).
    """

    def __init__(self, batch_max: int, maxsize: int) -> None:
        self.batch_max = batch_max
        self.maxsize = max(maxsize, batch_max)
        self.messages: list[Any] = []
        self.ready = asyncio.Event()
        self.full = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    def __len__(self) -> int:
        return len(self.messages)

    def put(self, message: Any) -> None:
        self.messages.append(message)
        n = len(self.messages)
        if n == 1:
            self.ready.set()
        if n >= self.batch_max:
            self.full.set()
            if n >= self.maxsize:
                self._room.clear()

    async def wait_for_room(self) -> None:
        await self._room.wait()

    def take(self, n: int) -> list[Any]:
        """The oldest ``n`` messages (fewer if it holds fewer), in fetch order."""
        out = self.messages[:n]
        del self.messages[:n]
        self._levels()
        return out

    def put_back(self, messages: list[Any]) -> None:
        """Return a taken batch to the front, in its order (it failed: the next take retries it
        before any later record, so nothing after it is acknowledged first)."""
        self.messages[:0] = messages
        self._levels()

    def clear(self) -> None:
        """Drop what it holds (faust's flow control calls this when a rebalance starts)."""
        self.messages.clear()
        self._levels()

    def _levels(self) -> None:
        n = len(self.messages)
        _set(self.ready, n > 0)
        _set(self.full, n >= self.batch_max)
        _set(self._room, n < self.maxsize)


def _set(event: asyncio.Event, on: bool) -> None:
    if on:
        event.set()
    else:
        event.clear()


class Conductor(faust_conductor.Conductor):
    """faust's conductor; the topics registered with :meth:`deliver_in_bulk` go to a
    :class:`BulkBuffer` instead of their streams' queues (see the module doc)."""

    def __init__(self, app: Any, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._bulk: dict[str, BulkBuffer] = {}

    def deliver_in_bulk(self, topic: str, batch_max: int, maxsize: int) -> BulkBuffer:
        """The buffer the records of ``topic`` go to from now on."""
        buffer = self._bulk[topic] = BulkBuffer(batch_max, maxsize)
        # emptied when a rebalance starts (flow control only calls clear() on what it manages)
        self.app.flow_control.manage_queue(buffer)  # type: ignore[arg-type]
        return buffer

    def bulk_buffer(self, topic: str) -> BulkBuffer | None:
        return self._bulk.get(topic)

    def _build_handler(self, tp: Any, channels: Any) -> Any:
        buffer = self._bulk.get(tp.topic)
        if buffer is None:
            return super()._build_handler(tp, channels)
        acquire_flow_control = self.app.flow_control.acquire
        put = buffer.put

        async def on_message(message: Any) -> None:
            # suspended while a rebalance runs; faust's own delivery also waits for its producer's
            # buffer, which the worker does not use (its producers are confluent-kafka's)
            await acquire_flow_control()
            put(message)
            if len(buffer) >= buffer.maxsize:
                await buffer.wait_for_room()

        return on_message


class Transport(faust_aiokafka.Transport):
    Consumer = Consumer
    Conductor = Conductor


class App(faust.App):
    """faust.App on :class:`Transport` (consumer side; the producer transport is faust's)."""

    def _new_transport(self) -> Transport:
        return Transport(self.conf.broker_consumer, self)
