"""How a worker is assembled: every service it builds, typed, in one place.

:func:`build_context` is the one screen to read::

    catalog, encoder          plug-ins named "module:callable" (default: the served model folder)
    redis, producer           one Redis client, one Kafka producer (streamrec.kafka) for every topic
    store                     profiles in Redis (profiles/)
    dead letters, pipeline    validation → dead-letter topic, profiles applied, then the hooks:
      demand hook             windowed demand, spike/drop detection, alerts topic (alerts/)
      popularity, pusher      cold-start popularity, fresh top-K to the results topic (streams/recommend.py)

The faust app (``streams/app.py``) runs :func:`build_context` in a thread at start and keeps
the result in :class:`WorkerState`, which the agent, the web views and the timers share.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from alerts.hook import DemandHook, demand_hook, item_categories
from alerts.publish import AlertPublisher
from inference.tuning import with_model_scoring
from profiles.store import ProfileStore
from streamrec.interfaces import Catalog, ItemVectors, TextEncoder
from streamrec.kafka import KafkaProducer
from streamrec.plugins import load_factory
from streamrec.settings import Settings
from streams.explorer import Explorer, build_explorer
from streams.faults import Backoff
from streams.pipeline import EventPipeline
from streams.recommend import PushPath, build_push_path
from streams.validation import KafkaDeadLetterSink, Validator, dead_letter_tail_reader

__all__ = [
    "DEFAULT_ENCODER",
    "DEFAULT_ITEMS",
    "WorkerContext",
    "WorkerState",
    "build_context",
    "load_factory",
]

log = logging.getLogger(__name__)

DEFAULT_ITEMS = "inference.catalog:load_catalog"
DEFAULT_ENCODER = "inference.encoder:load_encoder"


@dataclass
class WorkerContext:
    """Everything a running worker holds."""

    settings: Settings
    items: ItemVectors
    encoder: TextEncoder | None
    redis: Any  # redis.Redis
    producer: KafkaProducer
    store: ProfileStore
    dead_letters: KafkaDeadLetterSink
    pipeline: EventPipeline
    demand: DemandHook
    push: PushPath | None  # None when the catalog plug-in has no top-k index (test plug-ins)
    explorer: Explorer | None = None  # the live explorer's recorder and push feed (streams/explorer.py)

    async def close(self) -> None:
        """Publish pending recommendations and flush the producer (worker shutdown)."""
        if self.push is not None:
            await self.push.close()
        await asyncio.get_running_loop().run_in_executor(None, self.producer.flush, 10.0)


def _load_plugins(
    settings: Settings, items_factory: str | None, encoder_factory: str | None
) -> tuple[ItemVectors, TextEncoder | None]:
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
    return items, encoder


def build_context(
    settings: Settings,
    items_factory: str | None = DEFAULT_ITEMS,
    encoder_factory: str | None = DEFAULT_ENCODER,
) -> WorkerContext:
    """Load the plug-ins, connect Redis and Kafka, build the pipeline and its hooks.

    ``items_factory``/``encoder_factory`` name ``callable(settings)``; ``encoder_factory=None``
    runs without a text encoder (search events then keep their query text without a vector).
    """
    s = with_model_scoring(settings)  # the weights `streamrec tune` chose for the served folder
    items, encoder = _load_plugins(s, items_factory, encoder_factory)
    redis = s.redis.client()
    redis.ping()
    producer = KafkaProducer(s)
    store = ProfileStore(redis, s, items=items)
    dead_letters = KafkaDeadLetterSink(producer, s.topics.dead_letter, tail_reader=dead_letter_tail_reader(s))
    pipeline = EventPipeline(store, Validator(items), dead_letters, encoder=encoder)

    item_category = item_categories(items)  # one map for the demand hook and the popularity recorder
    demand = demand_hook(s, redis, item_category, AlertPublisher(producer, s.topics.alerts))
    pipeline.add_hook(demand)
    explorer = build_explorer(s, items)
    pipeline.add_hook(explorer.recorder)
    push = None
    if isinstance(items, Catalog):
        push = build_push_path(
            s, items, store, redis, encoder, producer, item_category, items_factory or DEFAULT_ITEMS
        )
        for hook in push.hooks:
            pipeline.add_hook(hook)
        push.pusher.listeners.append(explorer.feed)
    else:
        log.warning("item vectors %s have no top-k index: recommendations disabled", type(items).__name__)
    return WorkerContext(
        s, items, encoder, redis, producer, store, dead_letters, pipeline, demand, push, explorer
    )


class WorkerState:
    """Readiness and the loaded context, shared by the agent, web views and timers."""

    def __init__(self) -> None:
        self.ctx: WorkerContext | None = None
        self.loaded = asyncio.Event()
        self.error: BaseException | None = None
        self.batches = 0
        # What the worker waits for now: the Redis probe's entry, and every retrying component's
        # Backoff (the agent's, the pusher's), each "Redis at ... (STREAMREC_REDIS_URL)" or None.
        self.waits: dict[str, str] = {}
        self.backoffs: list[Backoff] = []
        # "topic:partition" of the events topic owned now (None until the first assignment).
        self.assigned: set[str] | None = None
        self.recovery_due = False  # owed pushes not taken up yet (Redis was down): the probe retries
        self.last_sweep = 0.0  # monotonic time owed pushes were last taken up

    def waiting_for(self) -> list[str]:
        """The services the worker waits for now (``/readyz``), each with the setting naming it."""
        return sorted({*self.waits.values(), *(b.waiting_for for b in self.backoffs if b.waiting_for)})

    @property
    def pipeline(self) -> EventPipeline:
        if self.ctx is None:
            raise RuntimeError("worker components are not loaded yet")
        return self.ctx.pipeline
