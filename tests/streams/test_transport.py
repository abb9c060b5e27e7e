"""The worker's faust transport: record delivery without tasks when it does not wait, and with
faust's own meaning (give up when the flow is suspended) when it does."""

from __future__ import annotations

import asyncio
import inspect

import faust.transport.consumer as faust_consumer

from streams import transport
from streams.app import _faust_app


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
