"""The worker's faust transport: record delivery without tasks when it does not wait, and with
faust's own meaning (give up when the flow is suspended) when it does."""

from __future__ import annotations

import asyncio
import inspect

import faust
import faust.transport.consumer as faust_consumer
import pytest
from faust.sensors import Monitor as FaustMonitor
from faust.types import TP
from faust.types.tuples import Message

from streams import transport
from streams.app import _faust_app, create_app


def _consumer() -> transport.Consumer:
    """A consumer of the worker's transport, made on the running loop (faust binds it there);
    nothing connects to Kafka."""

    async def noop(*args, **kwargs) -> None:
        return None

    app = transport.App("streamrec-test-transport", broker="kafka://127.0.0.1:1", autodiscover=False)
    return app.transport.create_consumer(
        callback=noop, on_partitions_revoked=noop, on_partitions_assigned=noop
    )


def _full_queue() -> asyncio.Queue[int]:
    """A stream's queue with no room: a delivery into it waits."""
    queue: asyncio.Queue[int] = asyncio.Queue(1)
    queue.put_nowait(0)
    return queue


def _delivering(consumer: transport.Consumer, deliver) -> asyncio.Future:
    """The drain loop's delivery of one record, as a task of its own."""
    return asyncio.ensure_future(consumer.wait_first(deliver(), consumer.suspend_flow.wait()))


def test_faust_still_delivers_each_record_through_wait_first_with_the_suspend_event():
    """The override relies on the drain loop's one call; a faust upgrade that changes it fails here."""
    src = inspect.getsource(faust_consumer.Consumer._drain_messages)
    assert "await self.wait_first(" in src and "callback(message), self.suspend_flow.wait()" in src
    assert src.count("wait_first(") == 1


def test_the_worker_app_consumes_with_this_transport(settings):
    app = _faust_app(settings)
    assert app.transport.Consumer is transport.Consumer


def test_a_delivery_that_does_not_wait_returns_at_once_without_tasks():
    async def run():
        consumer = _consumer()

        async def deliver() -> int:
            return 7

        before = len(asyncio.all_tasks())
        suspend = consumer.suspend_flow.wait()
        result = await consumer.wait_first(deliver(), suspend)
        return result, len(asyncio.all_tasks()) - before, suspend.cr_frame

    result, new_tasks, suspend_frame = asyncio.run(run())
    assert result.results == [7] and not result.stopped
    assert new_tasks == 0
    assert suspend_frame is None  # the unused event wait was closed, not left pending


def test_a_delivery_that_waits_finishes_when_the_queue_has_room():
    async def run():
        consumer = _consumer()
        queue = _full_queue()

        async def deliver() -> str:
            await queue.put(1)
            return "delivered"

        waiting = _delivering(consumer, deliver)
        await asyncio.sleep(0.01)
        assert not waiting.done()
        assert queue.get_nowait() == 0
        result = await waiting
        return result, list(queue._queue)

    result, queued = asyncio.run(run())
    assert result.results == ["delivered"] and not result.stopped
    assert queued == [1]


def test_a_waiting_delivery_is_cancelled_when_the_flow_is_suspended():
    """A rebalance suspends the flow: the blocked delivery gives up, as with faust's wait_first,
    and leaves nothing behind in the queue (no putter, no record)."""

    async def run():
        consumer = _consumer()
        queue = _full_queue()
        seen: list[str] = []

        async def deliver() -> None:
            try:
                await queue.put(1)
                seen.append("delivered")
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise

        waiting = _delivering(consumer, deliver)
        await asyncio.sleep(0.01)
        consumer.suspend_flow.set()
        result = await waiting
        await asyncio.sleep(0.01)
        return result, seen, list(queue._queue), len(queue._putters)

    result, seen, queued, putters = asyncio.run(run())
    assert result.results == [True]  # the suspend event won
    assert seen == ["cancelled"]
    assert queued == [0] and putters == 0


def test_a_suspended_flow_takes_faust_s_path_from_the_start():
    async def run():
        consumer = _consumer()
        consumer.suspend_flow.set()

        async def deliver() -> None:
            await asyncio.sleep(10)

        return await consumer.wait_first(deliver(), consumer.suspend_flow.wait())

    result = asyncio.run(run())
    assert result.results == [True]  # returned on the event, the delivery was cancelled


def test_a_delivery_that_raises_raises_and_one_that_only_yields_returns():
    async def run():
        consumer = _consumer()

        async def broken() -> None:
            raise ValueError("bad record")

        async def yields() -> int:
            await asyncio.sleep(0)  # a bare yield to the loop, no future
            return 5

        suspend = consumer.suspend_flow.wait()
        try:
            await consumer.wait_first(broken(), suspend)
        except ValueError as exc:
            raised = str(exc)
        result = await consumer.wait_first(yields(), consumer.suspend_flow.wait())
        return raised, suspend.cr_frame, result.results

    raised, suspend_frame, results = asyncio.run(run())
    assert raised == "bad record" and suspend_frame is None
    assert results == [5]


def test_a_drain_cancelled_while_a_delivery_waits_ends_the_delivery_at_once():
    """The consumer stopping mid-delivery (its drain task cancelled), before or after the waiting
    delivery's task first ran: the delivery ends and leaves no putter in the queue."""

    async def run(turns: int) -> tuple[list[str], int]:
        consumer = _consumer()
        queue = _full_queue()
        seen: list[str] = []

        async def deliver() -> None:
            try:
                await queue.put(1)
            finally:
                seen.append("ended")

        drain = _delivering(consumer, deliver)
        for _ in range(turns):
            await asyncio.sleep(0)
        drain.cancel()
        try:
            await drain
        except asyncio.CancelledError:
            pass
        await asyncio.sleep(0.01)
        return seen, len(queue._putters)

    for turns in (1, 5):
        seen, putters = asyncio.run(run(turns))
        assert seen == ["ended"] and putters == 0, turns


def _record(key: bytes | None, value: bytes | None) -> Message:
    return Message("events", 0, 5, 0.0, 0, [], key, value, None)


def test_the_events_topic_decodes_records_to_their_bytes_without_a_codec_lookup(settings):
    """The worker's events topic gives the events faust's raw codec would, without asking the
    serializer registry for each record."""
    app = create_app(settings, encoder_factory=None)
    topic = app.agents["streamrec.events"].channel
    assert isinstance(topic.schema, transport.RawSchema)
    reference = faust.Schema(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")

    def no_lookup(*args, **kwargs):
        raise AssertionError("a codec was looked up for a record")

    async def decode_all() -> list[tuple[object, object, object, object]]:
        expected = reference.compile(app)
        out = []
        for key, value in [(b"17850", b'{"user_id": "17850"}'), (None, b"\xff not json"), (b"k", None)]:
            msg = _record(key, value)
            want = await expected(msg)
            with pytest.MonkeyPatch.context() as mp:  # a decode compiled now would call these
                mp.setattr(app.serializers, "loads_key", no_lookup)
                mp.setattr(app.serializers, "loads_value", no_lookup)
                got = await topic.schema.compile(app)(msg)
            assert got.message is msg
            out.append((got.key, got.value, want.key, want.value))
        return out

    for key, value, want_key, want_value in asyncio.run(decode_all()):
        assert (key, value) == (want_key, want_value)


def test_the_worker_app_s_monitor_keeps_no_per_record_statistics(settings):
    app = _faust_app(settings)
    assert isinstance(app.monitor, transport.Monitor)
    tp = TP("events", 0)
    msg = _record(b"k", b"v")
    quiet, faust_own = app.monitor, FaustMonitor()
    quiet.on_message_in(tp, 5, msg)
    state = quiet.on_stream_event_in(tp, 5, app.stream([]), None)
    quiet.on_stream_event_out(tp, 5, app.stream([]), None, state)
    quiet.on_message_out(tp, 5, msg)
    faust_own.on_message_in(tp, 5, msg)
    assert faust_own.messages_received_total == 1  # what faust's own monitor does per record
    assert quiet.messages_received_total == 0 and quiet.events_total == 0 and not quiet.events_runtime
    assert quiet.stream_inbound_time[tp] > 0  # faust's stalled-stream check reads it
    quiet.on_commit_completed(None, quiet.time() - 0.5)  # the rest of faust's statistics are kept
    assert list(quiet.commit_latency) == [pytest.approx(0.5, abs=0.4)]
