"""The faust application of the stream worker, built from settings.

``create_app(settings)`` returns a :class:`faust.App` with

* the events topic (raw bytes key and value, so malformed input reaches our validator
  instead of failing in faust's deserializer), ``topics.partitions`` partitions;
* one consumer group (``kafka.consumer_group`` is the faust app id); offsets are committed
  every ``stream.commit_interval_s`` for events the agent acknowledged after processing;
* the agent of ``streams/agents.py`` (batches of ``stream.batch_max`` / ``stream.batch_within_s``);
* faust's web server on ``web_port`` with ``GET /healthz`` (the process runs) and
  ``GET /readyz`` (components loaded, not rebalancing, agent not crashed);
* the worker's components (catalog, encoder, Redis, dead-letter producer, pipeline, hooks),
  loaded in a thread when the worker starts (:class:`WorkerContext`);
* Prometheus gauges: ``streamrec_worker_up``, ``streamrec_consumer_lag``,
  ``streamrec_rebalances_total``.

To run something after every batch (recommendation push, demand monitor), add it in
:func:`default_hooks`: one line.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import faust

from profiles.store import ProfileStore
from streamrec.interfaces import ItemVectors, TextEncoder
from streamrec.settings import Settings
from streams import metrics
from streams.pipeline import EventPipeline, Hook
from streams.validation import KafkaDeadLetterSink, Validator
from streams.web import register_views

log = logging.getLogger(__name__)

DEFAULT_ITEMS = "inference.catalog:load_catalog"
DEFAULT_ENCODER = "inference.encoder:load_encoder"


@dataclass
class WorkerContext:
    """Everything a running worker holds; hooks are built from it."""

    settings: Settings
    items: ItemVectors
    encoder: TextEncoder | None
    redis: Any
    store: ProfileStore
    dead_letters: KafkaDeadLetterSink
    pipeline: EventPipeline
    app: faust.App | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def default_hooks(ctx: WorkerContext) -> list[Hook]:
    """The hooks run after each batch's profiles are applied, in order.

    Each is ``async hook(applied_events, changed_user_ids, store)``. Add one with one line,
    e.g. ``hooks.append(RecommendationPusher(...))``.
    """
    from alerts.hook import demand_hooks
    from streams.recommend import recommendation_hooks

    hooks: list[Hook] = []
    hooks += demand_hooks(ctx)  # windowed demand, spike/drop detection, boosts, alerts topic
    hooks += recommendation_hooks(ctx)  # cold-start popularity + push of fresh top-K
    return hooks


def load_factory(spec: str) -> Callable[[Settings], Any]:
    """``"module:attribute"`` → the callable it names (the worker's plug-in points)."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"expected 'module:callable', got {spec!r}")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load {spec!r}: {exc}") from exc


def build_context(
    settings: Settings,
    items_factory: str | None = DEFAULT_ITEMS,
    encoder_factory: str | None = DEFAULT_ENCODER,
    hooks_factory: Callable[[WorkerContext], list[Hook]] = default_hooks,
) -> WorkerContext:
    """Load the catalog and encoder, connect Redis and the dead-letter producer, build the pipeline.

    ``items_factory``/``encoder_factory`` name ``callable(settings)``; ``encoder_factory=None``
    runs without a text encoder (search events then keep their query text without a vector).
    """
    items = load_factory(items_factory or DEFAULT_ITEMS)(settings)
    if not isinstance(items, ItemVectors):
        raise TypeError(
            f"{items_factory} returned {type(items).__name__}, which does not implement ItemVectors"
        )
    encoder = load_factory(encoder_factory)(settings) if encoder_factory else None
    if encoder is not None and int(encoder.dim) != int(items.dim):
        raise ValueError(
            f"encoder dim {encoder.dim} != item vector dim {items.dim}: the catalog was not built with this "
            "encoder; re-run `streamrec index`"
        )
    redis = settings.redis.client()
    redis.ping()
    store = ProfileStore(redis, settings, items=items)
    dead = KafkaDeadLetterSink(settings)
    pipeline = EventPipeline(store, Validator(items), dead, encoder=encoder)
    ctx = WorkerContext(settings, items, encoder, redis, store, dead, pipeline)
    for hook in hooks_factory(ctx):
        pipeline.add_hook(hook)
    return ctx


class WorkerState:
    """Readiness and the loaded context, shared by the agent, web views and timers."""

    def __init__(self) -> None:
        self.ctx: WorkerContext | None = None
        self.loaded = asyncio.Event()
        self.error: BaseException | None = None
        self.batches = 0

    @property
    def pipeline(self) -> EventPipeline:
        if self.ctx is None:
            raise RuntimeError("worker components are not loaded yet")
        return self.ctx.pipeline


def create_app(
    settings: Settings,
    *,
    items_factory: str | None = DEFAULT_ITEMS,
    encoder_factory: str | None = DEFAULT_ENCODER,
    hooks_factory: Callable[[WorkerContext], list[Hook]] = default_hooks,
) -> faust.App:
    """The worker's faust app. ``app.streamrec_state`` holds its :class:`WorkerState`."""
    from streams.agents import register_agents

    s = settings
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
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
        broker_session_timeout=s.stream.session_timeout_s,
        broker_heartbeat_interval=min(3.0, s.stream.session_timeout_s / 3),
        stream_wait_empty=False,
        web_enabled=True,
        web_port=s.web_port,
        web_bind=s.stream.web_bind,
        web_host="localhost",
        producer_acks=-1,
    )
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
    register_agents(app, events_topic, state, settings)
    register_views(app, state)

    @app.task
    async def load_components() -> None:
        loop = asyncio.get_running_loop()
        try:
            ctx = await loop.run_in_executor(
                None, lambda: build_context(s, items_factory, encoder_factory, hooks_factory)
            )
        except Exception as exc:
            state.error = exc
            log.critical("worker components failed to load: %s", exc)
            await app.crash(exc)
            return
        ctx.app = app
        state.ctx = ctx
        state.loaded.set()
        metrics.worker_up.set(1)
        log.info(
            "worker ready: items %s (dim %s, model %s), encoder %s, %d hooks",
            getattr(ctx.items, "__class__", type(ctx.items)).__name__,
            ctx.items.dim,
            ctx.items.model_version,
            type(ctx.encoder).__name__ if ctx.encoder else "none",
            len(ctx.pipeline.hooks),
        )

    @app.page("/healthz")
    async def healthz(web, request):
        crashed = bool(getattr(app, "crashed", False)) or state.error is not None
        body = {"status": "failed" if crashed else "ok", "error": str(state.error) if state.error else None}
        return web.json(body, status=500 if crashed else 200)

    @app.page("/readyz")
    async def readyz(web, request):
        ready = state.loaded.is_set() and state.error is None and not app.rebalancing
        body = {
            "ready": ready,
            "components_loaded": state.loaded.is_set(),
            "rebalancing": bool(app.rebalancing),
            "assigned_partitions": sorted(
                tp.partition
                for tp in (app.consumer.assignment() if app.consumer is not None else ())
                if tp.topic == s.topics.events
            ),
            "batches": state.batches,
        }
        return web.json(body, status=200 if ready else 503)

    @app.on_partitions_assigned.connect
    async def on_assigned(sender: Any = None, assigned: Any = None, **kwargs: Any) -> None:
        metrics.rebalances.inc()
        log.info("partitions assigned: %s", sorted((tp.topic, tp.partition) for tp in (assigned or ())))

    @app.timer(s.stream.lag_interval_s)
    async def update_lag() -> None:
        update_consumer_lag(app, state)

    @app.on_before_shutdown.connect
    async def on_shutdown(sender: Any = None, **kwargs: Any) -> None:
        metrics.worker_up.set(0)
        if state.ctx is not None:
            from streams.recommend import shutdown_recommendations

            await shutdown_recommendations(state.ctx)

    return app


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
