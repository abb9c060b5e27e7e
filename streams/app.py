"""The faust application of the stream worker, built from settings.

``create_app(settings)`` returns a :class:`faust.App` with

* the events topic (raw bytes key and value, so malformed input reaches our validator
  instead of failing in faust's deserializer), ``topics.partitions`` partitions;
* one consumer group (``kafka.consumer_group`` is the faust app id); offsets are committed
  every ``stream.commit_interval_s`` for events the agent acknowledged after processing;
* the agent of ``streams/agents.py`` (batches of ``stream.batch_max`` / ``stream.batch_within_s``);
* faust's web server on ``web_port``: ``GET /healthz``, ``GET /readyz`` and the pull endpoint
  (``streams/web.py``);
* the worker's services (``streams/context.py``), built in a thread when the worker starts;
* Prometheus gauges: ``streamrec_worker_up``, ``streamrec_consumer_lag``,
  ``streamrec_rebalances_total``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import faust

from streamrec.runtime import settle_heap
from streamrec.settings import Settings
from streams import metrics, transport
from streams.agents import register_agents
from streams.context import DEFAULT_ENCODER, DEFAULT_ITEMS, WorkerState, build_context
from streams.faults import REDIS, describe
from streams.web import register_views

log = logging.getLogger(__name__)


def _faust_app(s: Settings) -> faust.App:
    return transport.App(
        s.kafka.consumer_group,
        broker=s.kafka.faust_broker_url(),
        broker_credentials=s.kafka.faust_broker_credentials(),
        datadir=str(s.state_dir / "faust"),
        store="memory://",
        autodiscover=False,
        topic_partitions=s.topics.partitions,
        topic_replication_factor=s.topics.replication_factor,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=s.stream.commit_interval_s,
        broker_max_poll_records=s.stream.max_poll_records,
        broker_session_timeout=s.stream.consumer_session_timeout_s,
        broker_heartbeat_interval=min(3.0, s.stream.consumer_session_timeout_s / 3),
        stream_wait_empty=False,
        web_enabled=True,
        web_port=s.web_port,
        web_bind=s.stream.web_bind,
        web_host="localhost",
        producer_acks=-1,
    )


def create_app(
    settings: Settings,
    *,
    items_factory: str | None = DEFAULT_ITEMS,
    encoder_factory: str | None = DEFAULT_ENCODER,
) -> faust.App:
    """The worker's faust app. ``app.streamrec_state`` holds its :class:`WorkerState`."""
    s = settings
    s.state_dir.mkdir(parents=True, exist_ok=True)
    app = _faust_app(s)
    state = WorkerState()
    app.streamrec_state = state  # type: ignore[attr-defined]
    events_topic = app.topic(
        s.topics.events,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=s.topics.partitions,
    )
    register_agents(app, events_topic, state, s)
    register_views(app, state, s)
    _register_lifecycle(app, state, s, items_factory, encoder_factory)
    return app


def _register_lifecycle(
    app: faust.App, state: WorkerState, s: Settings, items_factory: str | None, encoder_factory: str | None
) -> None:
    """Loading the services at start, rebalance and lag metrics, shutdown."""

    @app.task
    async def load_components() -> None:
        loop = asyncio.get_running_loop()
        try:
            ctx = await loop.run_in_executor(None, lambda: build_context(s, items_factory, encoder_factory))
        except Exception as exc:
            state.error = exc
            log.critical("worker components failed to load: %s", exc)
            await app.crash(exc)
            return
        state.ctx = ctx
        settle_heap()  # the loaded components live as long as the worker: out of the collector's way
        if ctx.push is not None:
            state.backoffs.append(ctx.push.pusher.backoff)  # /readyz shows what a failing push waits for
        state.loaded.set()
        metrics.worker_up.set(1)
        if state.assigned is not None:
            # users of our partitions changed before a crash and never pushed get theirs now
            await recover_owed(state)
        log.info(
            "worker ready: items %s (dim %s, model %s), encoder %s, %d hooks",
            type(ctx.items).__name__,
            ctx.items.dim,
            ctx.items.model_version,
            type(ctx.encoder).__name__ if ctx.encoder else "none",
            len(ctx.pipeline.hooks),
        )

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]  # faust's stubs: sync signature only
    async def on_assigned(sender: Any = None, assigned: Any = None, **kwargs: Any) -> None:
        metrics.rebalances.inc()
        state.assigned = {
            f"{tp.topic}:{tp.partition}" for tp in (assigned or ()) if tp.topic == s.topics.events
        }
        if state.ctx is not None:  # ownership changed: re-read the dead-letter high-water marks
            state.ctx.dead_letters.forget()
            await recover_owed(state)  # and push what a previous owner of ours left owed
        log.info("partitions assigned: %s", sorted((tp.topic, tp.partition) for tp in (assigned or ())))

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]  # faust's stubs: sync signature only
    async def on_revoked(sender: Any = None, revoked: Any = None, **kwargs: Any) -> None:
        # Only a partition's owner pushes its users: what is not pushed yet goes to the next owner.
        state.assigned = set()
        if state.ctx is not None and state.ctx.push is not None:
            await state.ctx.push.pusher.revoke()

    @app.timer(s.stream.lag_interval_s)
    async def update_lag() -> None:
        update_consumer_lag(app, state)

    @app.timer(1.0)
    async def probe_redis() -> None:
        """Readiness turns red within a second of Redis going away, even with no events flowing."""
        if state.ctx is not None:
            await probe(state, s)

    @app.on_before_shutdown.connect  # type: ignore[arg-type]  # faust's stubs: sync signature only
    async def on_shutdown(sender: Any = None, **kwargs: Any) -> None:
        metrics.worker_up.set(0)
        if state.ctx is not None:
            await state.ctx.close()


async def probe(state: WorkerState, s: Settings) -> None:
    """PING Redis through the worker's client; ``state.waits["redis"]`` while it does not answer."""
    assert state.ctx is not None
    try:
        await asyncio.get_running_loop().run_in_executor(None, state.ctx.store.redis.ping)
    except Exception as exc:
        if "redis" not in state.waits:
            log.warning("Redis does not answer PING: %s: %s", type(exc).__name__, exc)
        state.waits["redis"] = describe(REDIS, s)
        metrics.dependency_up.labels(REDIS).set(0)
        return
    if state.waits.pop("redis", None) is not None:
        log.warning("Redis answers PING again")
        # What the outage left owed gets its push now, not at the next restart: a push whose
        # delivery confirmation could not clear it, a profile write cut off mid-pipeline
        # (its retry skips the users already written, so no hook names them again).
        state.recovery_due = True
    if state.recovery_due or time.monotonic() - state.last_sweep >= s.stream.owed_sweep_s:
        await recover_owed(state)
    metrics.dependency_up.labels(REDIS).set(1)


async def recover_owed(state: WorkerState) -> None:
    """Take up the owed pushes of the partitions this worker owns (``pusher.recover``): at
    start, at each assignment, when Redis answers again, and every ``stream.owed_sweep_s`` (a
    safety net for a change no hook named). Redis down at that moment (a rebalance during an
    outage) does not stop the worker: the probe tries again each second until it goes through."""
    if state.ctx is None or state.ctx.push is None or state.assigned is None:
        return
    state.last_sweep = time.monotonic()
    pusher = state.ctx.push.pusher
    pusher.owned = state.assigned  # what its lists are checked against when published
    try:
        await pusher.recover()
    except Exception as exc:
        if not state.recovery_due:
            log.warning(
                "owed pushes not taken up yet (%s: %s); retried every second", type(exc).__name__, exc
            )
        state.recovery_due = True
    else:
        state.recovery_due = False


def update_consumer_lag(app: faust.App, state: WorkerState) -> None:
    """``streamrec_consumer_lag{topic,partition}`` = end offset − next offset to process."""
    consumer = app.consumer
    if consumer is None:
        return
    processed = state.ctx.pipeline.positions if state.ctx is not None else {}
    committed = getattr(consumer, "_committed_offset", {}) or {}
    for tp in consumer.assignment():
        high = consumer.highwater(tp)
        if high is None:
            continue
        nxt = processed.get((tp.topic, tp.partition))
        nxt = nxt + 1 if nxt is not None else committed.get(tp)
        if nxt is None:
            continue
        metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(max(0, int(high) - int(nxt)))
