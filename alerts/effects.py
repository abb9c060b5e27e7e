"""Time-limited demand factors in Redis: written by the monitor, read by the scorer.

One string key per anomalous key, all under the monitor's hash tag ``{<prefix>:dm}`` so that
a single MGET reads any set of them and the monitor writes them in the same transaction as its
state (one slot, also on Redis Cluster)::

    {<prefix>:dm}:fx:i:<item_id>     "1.5"   item surge (boost) or drop (damping)
    {<prefix>:dm}:fx:c:<category>    "1.5"   category surge or drop

Each key expires after ``alerts.effect_ttl_s`` unless the monitor refreshes it (it does at
every window it closes while the alert is active) and is deleted when the alert clears.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from alerts.detector import CATEGORY_PREFIX, ITEM_PREFIX, SURGE
from streamrec.settings import Settings

__all__ = ["DemandEffectWriter", "RedisDemandAdjustments", "StaticDemandAdjustments", "effect_key"]


def effect_key(prefix: str, key: str) -> str:
    """Redis key of the factor of a demand key (``i:<item>`` or ``c:<category>``)."""
    return f"{{{prefix}:dm}}:fx:{key}"


class DemandEffectWriter:
    """Writes the factors of active alerts (with TTL) and deletes those of cleared ones."""

    def __init__(self, settings: Settings) -> None:
        self.prefix = settings.redis.prefix
        self.cfg = settings.alerts

    def factor(self, kind: int) -> float:
        return self.cfg.boost if kind == SURGE else self.cfg.damping

    def queue(self, pipe: Any, active: Iterable[tuple[str, int]], cleared: Iterable[str]) -> None:
        """Add the writes to a Redis pipeline: SET EX for ``active`` (key, kind), DEL for ``cleared``."""
        ttl = max(1, int(self.cfg.effect_ttl_s))
        for key, kind in active:
            pipe.set(effect_key(self.prefix, key), repr(self.factor(kind)), ex=ttl)
        gone = [effect_key(self.prefix, k) for k in cleared]
        if gone:
            pipe.delete(*gone)


class RedisDemandAdjustments:
    """:class:`streamrec.interfaces.DemandAdjustments` read from Redis (one MGET per call).

    The factor of an item is its own factor times its category's (1.0 when none). The reason is
    ``trending`` when the item itself surges, else ``trending_in:<category>`` when its category
    surges, else None (a damped item gets no reason: it just ranks lower).
    """

    def __init__(self, settings: Settings, redis_client: Any) -> None:
        self.prefix = settings.redis.prefix
        self.redis = redis_client

    def factors(
        self, item_ids: Sequence[str], categories: Sequence[str]
    ) -> tuple[np.ndarray, list[str | None]]:
        n = len(item_ids)
        if len(categories) != n:
            raise ValueError(f"factors: {n} item ids but {len(categories)} categories (one per item)")
        out = np.ones(n, np.float64)
        reasons: list[str | None] = [None] * n
        if n == 0:
            return out, reasons
        uniq_items = list(dict.fromkeys(item_ids))
        uniq_cats = [c for c in dict.fromkeys(categories) if c]
        keys = [effect_key(self.prefix, ITEM_PREFIX + i) for i in uniq_items]
        keys += [effect_key(self.prefix, CATEGORY_PREFIX + c) for c in uniq_cats]
        values = self.redis.mget(keys)
        item_f = {i: float(v) for i, v in zip(uniq_items, values[: len(uniq_items)], strict=True) if v}
        cat_f = {c: float(v) for c, v in zip(uniq_cats, values[len(uniq_items) :], strict=True) if v}
        return _combine(item_ids, categories, item_f, cat_f)


class StaticDemandAdjustments:
    """The in-memory equivalent of :class:`RedisDemandAdjustments` (evaluations, tests): the
    factors of the active alerts, given as {item: factor} and {category: factor}."""

    def __init__(
        self, items: dict[str, float] | None = None, categories: dict[str, float] | None = None
    ) -> None:
        self.items = dict(items or {})
        self.categories = dict(categories or {})

    def factors(
        self, item_ids: Sequence[str], categories: Sequence[str]
    ) -> tuple[np.ndarray, list[str | None]]:
        if len(categories) != len(item_ids):
            raise ValueError(
                f"factors: {len(item_ids)} item ids but {len(categories)} categories (one per item)"
            )
        return _combine(item_ids, categories, self.items, self.categories)


def _combine(
    item_ids: Sequence[str], categories: Sequence[str], item_f: dict[str, float], cat_f: dict[str, float]
) -> tuple[np.ndarray, list[str | None]]:
    """Item factor x category factor and the trend reason of each item."""
    n = len(item_ids)
    out = np.ones(n, np.float64)
    reasons: list[str | None] = [None] * n
    if not item_f and not cat_f:
        return out, reasons
    for j, (item, cat) in enumerate(zip(item_ids, categories, strict=True)):
        fi = item_f.get(item, 1.0)
        fc = cat_f.get(cat, 1.0) if cat else 1.0
        out[j] = fi * fc
        if fi > 1.0:
            reasons[j] = "trending"
        elif fc > 1.0:
            reasons[j] = f"trending_in:{cat}"
    return out, reasons
