"""The stream worker's demand hook: run the monitor on each batch, publish its alerts.

``streams/context.py`` builds it with :func:`demand_hook` and adds it to the pipeline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from alerts.models import AnomalyAlert
from alerts.monitor import DemandMonitor
from streamrec.events import Event
from streamrec.settings import Settings

__all__ = ["DemandHook", "demand_hook", "item_categories"]

log = logging.getLogger(__name__)


class DemandHook:
    """Pipeline hook (:class:`streamrec.interfaces.BlockingHook`): monitor a batch, publish alerts.

    The pipeline runs it in its worker thread with the other blocking hooks, so the worker's
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
                    *(a.level, a.kind, a.state, a.key, a.observed, a.expected, a.score),
                )
            if self.publish is not None:
                self.publish(alerts)
        return alerts

    def run_blocking(self, events: Sequence[Event], changed_users: set[str]) -> None:
        """The pipeline's entry (:class:`streamrec.interfaces.BlockingHook`), in its worker thread."""
        if events:
            self.run(list(events))


def item_categories(items: Any) -> dict[str, str]:
    """item id → category from a catalog's ``ids`` / ``categories`` ({} when it has none)."""
    ids = getattr(items, "ids", None)
    cats = getattr(items, "categories", None)
    if ids is None or cats is None:
        return {}
    return {str(i): str(c or "") for i, c in zip(ids, cats, strict=True)}


def demand_hook(
    settings: Settings,
    redis_client: Any,
    item_category: Mapping[str, str],
    publish: Callable[[Sequence[AnomalyAlert]], Any] | None,
) -> DemandHook:
    """The demand monitor over ``redis_client`` as a pipeline hook; alerts go to ``publish``.

    Without categories (``item_category`` empty) an event's own ``category`` field is used.
    """
    if not item_category:
        log.warning("the catalog has no categories: demand counted per event category only")
    return DemandHook(DemandMonitor(settings, redis_client), item_category, publish)
