"""The faust agent: batches of the events topic → :class:`~streams.pipeline.EventPipeline`.

The consumer delivers the topic's records in bulk (``streams/transport.py``: faust's messages
appended to one buffer, without faust's per-record event, queue and stream). The agent takes
what is buffered, up to ``stream.batch_max`` events, without a fixed wait
(``streams/batching.py``: a batch closes once the buffer stops growing, at most
``stream.batch_within_s`` after its first event), applies it (validation, dead letters,
profiles) and then runs its hooks (demand, popularity, co-visitation, push) while the next
batch is applied; a batch is acknowledged once its hooks are done, and batches finish in
order. So faust commits an offset only after its event's profile write (or dead letter) is
durable. A worker killed or stopped mid-batch therefore leaves the batch uncommitted; the next
owner of the partition reads it again and the profile store skips what was already applied
(exactly-once effect); a push owed by a changed profile is recorded with the profile write, so
it is made after a crash whatever the hooks had done.

A batch that fails on infrastructure (Redis or Kafka down) is retried with backoff
(``streams/faults.py``: the log names the service and its setting, ``/readyz`` turns red with
``waiting_for``) for ``stream.failure_retry_s``; then the batch goes back to the front of the
buffer, never acknowledged, the worker crashes (faust stops it; ``/healthz`` says failed), and
the batch is redelivered to whichever worker owns its partitions next.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import faust

from streamrec.settings import Settings
from streams import metrics
from streams.batching import bulk_batches
from streams.context import WorkerState
from streams.faults import KAFKA, Backoff, dependency_of
from streams.validation import RawRecord

log = logging.getLogger(__name__)


def to_record(msg: Any) -> RawRecord:
    """A faust message (the record's bytes) as a :class:`RawRecord` with its source position."""
    value = msg.value if isinstance(msg.value, bytes | None) else None
    key = msg.key if isinstance(msg.key, bytes | None) else None
    return RawRecord(value=value, key=key, topic=msg.topic, partition=msg.partition, offset=msg.offset)


def is_current(app: faust.App, message: Any) -> bool:
    """Fetched in this consumer generation, and no rebalance running (faust's stream's test)."""
    return bool(message.generation_id == app.consumer_generation_id and app.flow_control.is_active())


def register_agents(app: faust.App, topic: faust.TopicT, state: WorkerState, settings: Settings) -> None:
    """Attach the events agent to ``app``; the events topic's records go to it in bulk."""
    cfg = settings.stream
    buffer = app.topics.deliver_in_bulk(  # type: ignore[attr-defined]  # streams.transport.Conductor
        topic.get_topic_name(),
        cfg.batch_max,
        max(app.conf.stream_buffer_maxsize, 2 * cfg.batch_max, 2 * cfg.batch_backlog_max),
    )

    # Subscribes the topic now, in the consumer's first subscription: its records reach ``buffer``.
    aiter(topic)

    @app.agent(topic, name="streamrec.events", concurrency=1)
    async def process_events(stream: faust.StreamT) -> None:
        await state.loaded.wait()
        pipeline = state.pipeline
        backoff = Backoff("event batches", settings)
        state.backoffs.append(backoff)
        # The previous batch's hooks, then its acks: they run while this batch is applied.
        finishing: asyncio.Task[None] | None = None

        async def finish(batch: list[Any], hooks: Callable[[], Awaitable[None]]) -> None:
            await hooks()  # never raises: a failing hook is logged
            ack = app.consumer.ack
            for message in batch:
                ack(message)
            state.batches += 1

        inbound = app.monitor.stream_inbound_time  # faust's stalled-stream check reads it
        try:
            async for batch in bulk_batches(
                buffer,
                stream,
                cfg.batch_max,
                cfg.batch_within_s,
                cfg.batch_backlog_within_s,
                functools.partial(is_current, app),
                cfg.batch_backlog_max,
            ):
                records = [to_record(m) for m in batch]
                now = time.monotonic()
                for tp in {m.tp for m in batch}:
                    inbound[tp] = now
                created = getattr(batch[0], "timestamp", None)  # the batch's oldest record
                if created:
                    metrics.stage_seconds.labels("kafka_to_batch").observe(
                        max(0.0, time.time() - float(created))
                    )
                deadline = time.monotonic() + cfg.failure_retry_s
                while True:
                    try:
                        _, hooks = await pipeline.apply(records)
                        break
                    except Exception as exc:
                        delay = backoff.failed(exc)
                        if dependency_of(exc) == KAFKA:
                            metrics.dependency_up.labels(KAFKA).set(0)
                        if time.monotonic() + delay > deadline:
                            log.critical(
                                "batch of %d records failed for %.0fs, stopping (it will be redelivered): %s",
                                len(records),
                                cfg.failure_retry_s,
                                exc,
                            )
                            # Back to the buffer's front, unacknowledged: nothing after it is acked
                            # first, whether faust restarts this agent or the worker stops.
                            buffer.put_back(batch)
                            await app.crash(exc)
                            raise
                        await asyncio.sleep(delay)
                backoff.succeeded()
                metrics.dependency_up.labels(KAFKA).set(
                    1
                )  # the batch's dead letters and offsets went through
                if finishing is not None:  # hooks see the batches in order; acks stay in offset order
                    await finishing
                finishing = asyncio.ensure_future(finish(batch, hooks))
        finally:
            if finishing is not None:  # stopping or rebalancing: the last batch's hooks and acks first
                await finishing
