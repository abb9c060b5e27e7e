"""Bulk delivery of the events topic: the consumer appends faust's messages to one buffer, the
agent takes lists of them; flow control, backpressure and rebalances keep faust's meaning."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from faust.types import TP
from faust.types.tuples import Message

from streams import transport
from streams.app import create_app
from streams.batching import bulk_batches


def _message(offset: int, topic: str = "events", generation: int = 0) -> Message:
    return Message(topic, 0, offset, 0.0, 0, [], b"k", b"v%d" % offset, None, generation_id=generation)


def test_a_buffer_signals_records_a_full_batch_and_no_room_and_gives_them_back_in_order():
    async def run() -> None:
        buf = transport.BulkBuffer(batch_max=3, maxsize=5)
        assert not buf.ready.is_set() and not buf.full.is_set()
        for i in range(5):
            buf.put(i)
        assert buf.ready.is_set() and buf.full.is_set()
        assert not await _finishes(buf.wait_for_room())  # at maxsize: the conductor's delivery waits
        assert buf.take(3) == [0, 1, 2]
        assert buf.ready.is_set() and not buf.full.is_set()  # 2 left: less than a batch
        assert await _finishes(buf.wait_for_room())
        buf.clear()
        assert len(buf) == 0 and not buf.ready.is_set()

    asyncio.run(run())
    assert transport.BulkBuffer(batch_max=10, maxsize=4).maxsize == 10  # always room for a batch


async def _finishes(aw: Any, timeout: float = 0.05) -> bool:
    try:
        await asyncio.wait_for(aw, timeout)
    except TimeoutError:
        return False
    return True


def test_the_worker_s_events_topic_goes_to_a_bulk_buffer_without_faust_s_per_record_event(settings):
    app = create_app(settings, encoder_factory=None)
    assert isinstance(app.topics, transport.Conductor)
    buf = app.topics.bulk_buffer(settings.topics.events)
    assert isinstance(buf, transport.BulkBuffer)
    assert buf.batch_max == settings.stream.batch_max

    async def run() -> None:
        topic = app.agents["streamrec.events"].channel

        def no_decode(*args: Any, **kwargs: Any) -> None:
            raise AssertionError("a record of the events topic was decoded into a faust event")

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(topic, "decode", no_decode)
            deliver = app.topics._build_handler(TP(settings.topics.events, 0), {topic})
            app.flow_control.resume()
            msgs = [_message(i, settings.topics.events) for i in range(3)]
            for m in msgs:
                await deliver(m)
        assert buf.messages == msgs  # the messages themselves, in fetch order
        # another topic keeps faust's own delivery: its records never reach the buffer
        other = app.topics._build_handler(TP("other-topic", 0), set())
        await other(_message(9, "other-topic"))
        assert buf.messages == msgs

    asyncio.run(run())


def test_a_delivery_waits_while_the_flow_is_suspended_or_the_buffer_is_full(settings):
    async def run() -> None:
        app = create_app(settings, encoder_factory=None)  # on the loop: faust binds its events to it
        buf = app.topics.bulk_buffer(settings.topics.events)
        buf.batch_max, buf.maxsize = 1, 2  # small, for the test
        deliver = app.topics._build_handler(TP(settings.topics.events, 0), set())
        app.flow_control.suspend()  # a rebalance runs
        first = asyncio.ensure_future(deliver(_message(0)))
        assert not await _finishes(asyncio.shield(first))
        assert len(buf) == 0
        app.flow_control.resume()
        await asyncio.wait_for(first, 1)
        # the drain loop awaits each delivery: the one that fills the buffer waits for room
        second = asyncio.ensure_future(deliver(_message(1)))
        await asyncio.sleep(0.02)
        assert not second.done() and len(buf) == 2
        assert [m.offset for m in buf.take(1)] == [0]
        await asyncio.wait_for(second, 1)
        assert [m.offset for m in buf.messages] == [1]
        app.flow_control.suspend()
        app.flow_control.clear()  # what faust does when a rebalance starts: the buffer empties
        assert len(buf) == 0

    asyncio.run(run())


class _Stream:
    """What bulk_batches needs of the agent's stream."""

    def __init__(self) -> None:
        self.should_stop = False

    async def wait_for_stopped(self, event: asyncio.Event, timeout: float) -> None:
        await _finishes(event.wait(), timeout)


def test_bulk_batches_close_when_the_buffer_stops_growing_hold_at_most_max_and_skip_stale_messages():
    async def run() -> list[list[int]]:
        buf = transport.BulkBuffer(batch_max=4, maxsize=100)
        stream = _Stream()
        batches: list[list[int]] = []

        async def consume() -> None:
            async for batch in bulk_batches(buf, stream, 4, 0.5, 1.0, current=lambda m: m.generation_id == 1):
                batches.append([m.offset for m in batch])

        task = asyncio.ensure_future(consume())
        for i in range(6):  # one fetch: 6 records, the first two from before a rebalance
            buf.put(_message(i, generation=0 if i < 2 else 1))
        await asyncio.sleep(0.05)
        buf.put(_message(6, generation=1))  # a later fetch
        await asyncio.sleep(0.05)
        stream.should_stop = True
        await asyncio.wait_for(task, 2)
        return batches

    batches = asyncio.run(run())
    # the first batch closed at max (4 taken, the 2 stale ones left out), the rest right after,
    # the later record in a batch of its own, without waiting the 0.5 s window
    assert batches == [[2, 3], [4, 5], [6]]


def test_a_buffer_already_more_than_a_batch_behind_gives_a_backlog_batch():
    async def run(puts: list[int]) -> list[list[int]]:
        buf = transport.BulkBuffer(batch_max=4, maxsize=100)
        stream = _Stream()
        batches: list[list[int]] = []

        async def consume() -> None:
            async for batch in bulk_batches(buf, stream, 4, 0.5, 1.0, backlog_max=8):
                batches.append([m.offset for m in batch])

        offset = 0
        for n in puts:  # one fetch of n records, then the agent takes what is buffered
            for _ in range(n):
                buf.put(_message(offset))
                offset += 1
            task = asyncio.ensure_future(consume())
            await asyncio.sleep(0.05)
            stream.should_stop = True
            await asyncio.wait_for(task, 2)
            stream.should_stop = False
        return batches

    # 11 buffered (more than a batch of 4): one backlog batch of 8, then the 3 left
    assert asyncio.run(run([11])) == [list(range(8)), [8, 9, 10]]
    # exactly a batch buffered: the ordinary batch; 5 buffered: all 5 at once
    assert asyncio.run(run([4, 5])) == [[0, 1, 2, 3], [4, 5, 6, 7, 8]]


def test_a_failed_batch_goes_back_to_the_front_of_the_buffer_in_its_order():
    async def run() -> None:
        buf = transport.BulkBuffer(batch_max=2, maxsize=3)
        for i in range(5):
            buf.put(i)
        taken = buf.take(2)
        assert not await _finishes(buf.wait_for_room())  # still 3: full
        buf.take(1)
        assert await _finishes(buf.wait_for_room())
        buf.put_back(taken)
        assert buf.messages == [0, 1, 3, 4]
        assert buf.ready.is_set() and buf.full.is_set()
        assert not await _finishes(buf.wait_for_room())  # back at maxsize: the delivery waits again

    asyncio.run(run())


def test_the_agent_takes_only_messages_of_this_consumer_generation_while_the_flow_runs(settings):
    from streams.agents import is_current

    async def run() -> None:
        app = create_app(settings, encoder_factory=None)
        app.flow_control.resume()
        gen = app.consumer_generation_id
        assert is_current(app, _message(1, generation=gen))
        assert not is_current(app, _message(1, generation=gen + 1))  # fetched before the rebalance
        app.flow_control.suspend()  # a rebalance runs
        assert not is_current(app, _message(1, generation=gen))

    asyncio.run(run())


def test_a_batch_that_keeps_failing_is_put_back_unacknowledged_and_the_worker_crashes(settings):
    # A restarted agent (faust's supervisor) or the next owner takes it again first: an offset
    # after it is never acknowledged before it, so no commit skips it.
    from types import SimpleNamespace

    s = settings.override(stream={"failure_retry_s": 0.0})

    class Failing:
        async def apply(self, records: Any) -> Any:
            raise ConnectionError("Redis is down")

    async def run() -> tuple[list[int], list[BaseException], list[Any]]:
        app = create_app(s, encoder_factory=None)
        state = app.streamrec_state
        state.ctx = SimpleNamespace(pipeline=Failing())
        state.loaded.set()
        app.flow_control.resume()
        buf = app.topics.bulk_buffer(s.topics.events)
        gen = app.consumer_generation_id
        for i in range(3):
            buf.put(_message(i, s.topics.events, generation=gen))
        crashed: list[BaseException] = []
        acked: list[Any] = []

        async def crash(exc: BaseException) -> None:
            crashed.append(exc)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(app, "crash", crash)
            mp.setattr(app.consumer, "ack", acked.append)
            agent = app.agents["streamrec.events"]
            with pytest.raises(ConnectionError):
                await asyncio.wait_for(agent.fun(_Stream()), 5)
        return [m.offset for m in buf.messages], crashed, acked

    left, crashed, acked = asyncio.run(run())
    assert left == [0, 1, 2]  # the whole batch, back in its order
    assert len(crashed) == 1 and isinstance(crashed[0], ConnectionError)
    assert acked == []
