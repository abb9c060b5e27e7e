"""The stream worker's demand hook: run the monitor on each batch, publish its alerts.

The lead wires it into ``streams.app.default_hooks`` with one line::

    from alerts.hook import demand_hooks
    hooks += demand_hooks(ctx)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from alerts.models import AnomalyAlert
from alerts.monitor import DemandMonitor
from alerts.publish import publish_alerts
from streamrec.events import Event

__all__ = ["DemandHook", "demand_hooks"]

log = logging.getLogger(__name__)


class DemandHook:
    """``async hook(applied_events, changed_users, store)``: monitor a batch, publish alerts.

    The monitor's Redis work and the Kafka flush run in the default executor so the worker's
    event loop keeps heart-beating. A failure propagates (the pipeline logs it and goes on; the
    monitor is idempotent, so the next batch's events are counted normally).
    """

    def __init__(
        self,
        monitor: DemandMonitor,
        item_category: Mapping[str, str],
        publish: Callable[[Sequence[AnomalyAlert]], Any] | None = None,
    ) -> None:
        self.monitor = monitor
        self.item_category = item_category
        self.publish = publish

    def run(self, events: Sequence[Event]) -> list[AnomalyAlert]:
        """Synchronous body: count, close due windows, publish what was raised or cleared."""
        alerts = self.monitor.process(events, self.item_category)
        if alerts:
            for a in alerts:
                log.info(
                    "demand %s %s %s %r: observed %.1f expected %.2f score %.1f",
                    a.level, a.kind, a.state, a.key, a.observed, a.expected, a.score,
                )  # fmt: skip
            if self.publish is not None:
                self.publish(alerts)
        return alerts

    async def __call__(self, events: Sequence[Event], changed_users: set[str], store: Any) -> None:
        if not events:
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.run, list(events))


def _item_category(items: Any) -> dict[str, str]:
    ids = getattr(items, "ids", None)
    cats = getattr(items, "categories", None)
    if ids is None or cats is None:
        return {}
    return {str(i): str(c or "") for i, c in zip(ids, cats, strict=True)}


def demand_hooks(ctx: Any) -> list[Callable[[Sequence[Event], set[str], Any], Awaitable[None]]]:
    """Hooks for a worker context (``streams.app.WorkerContext``): the demand monitor.

    Categories come from the catalog index (``ctx.items.ids`` / ``.categories``); without them
    an event's own ``category`` field is used. Alerts go to ``settings.topics.alerts``. The
    monitor is left in ``ctx.extras["demand_monitor"]``.
    """
    from confluent_kafka import Producer

    s = ctx.settings
    monitor = DemandMonitor(s, ctx.redis)
    item_category = _item_category(ctx.items)
    if not item_category:
        log.warning(
            "item vectors %s have no categories: demand counted per event category only",
            type(ctx.items).__name__,
        )
    producer = Producer(
        {**s.kafka.librdkafka_config(), "linger.ms": 5, "acks": "all", "enable.idempotence": True}
    )
    topic = s.topics.alerts

    def publish(alerts: Sequence[AnomalyAlert]) -> None:
        publish_alerts(producer, topic, alerts)

    ctx.extras["demand_monitor"] = monitor
    return [DemandHook(monitor, item_category, publish)]
