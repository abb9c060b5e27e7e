"""Time-limited demand factors in Redis: written by the monitor, read by the scorer.

One hash of the active factors, under the monitor's hash tag ``{<prefix>:dm}`` so that the
monitor writes it in the same transaction as its state (one slot, also on Redis Cluster)::

    {<prefix>:dm}:fx    i:<item_id>  → "1.5 1764859200000"   item surge (boost) or drop (damping)
                        c:<category> → "0.5 1764859200000"   category surge or drop

Each value is the factor and the time (Unix ms) it lapses: ``alerts.effect_ttl_s`` after the
monitor last wrote it (it refreshes every active alert at each window it closes); a field is
deleted when its alert clears, and a lapsed one counts as absent (a stopped monitor's boosts
end on their own). The scorer reads the whole hash, one small HGETALL per scoring round
whatever the number of candidates: it holds only the few keys with an active alert.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from alerts.detector import CATEGORY_PREFIX, ITEM_PREFIX, SURGE
from streamrec.settings import Settings

__all__ = ["DemandEffectWriter", "RedisDemandAdjustments", "StaticDemandAdjustments", "effects_key"]


def effects_key(prefix: str) -> str:
    """Redis key of the hash of active demand factors (fields ``i:<item>``, ``c:<category>``)."""
    return f"{{{prefix}:dm}}:fx"


class DemandEffectWriter:
    """Writes the factors of active alerts (with TTL) and deletes those of cleared ones."""

    def __init__(self, settings: Settings) -> None:
        self.prefix = settings.redis.prefix
        self.cfg = settings.alerts

    def factor(self, kind: int) -> float:
        return self.cfg.boost if kind == SURGE else self.cfg.damping

    def queue(
        self, pipe: Any, active: Iterable[tuple[str, int]], cleared: Iterable[str], now_ms: int | None = None
    ) -> None:
        """Add the writes to a Redis pipeline: the factors of ``active`` (key, kind), lapsing
        ``effect_ttl_s`` from ``now_ms`` (default: now), and the removal of ``cleared``."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        until = now_ms + 1000 * max(1, int(self.cfg.effect_ttl_s))
        key = effects_key(self.prefix)
        fields = {k: f"{self.factor(kind)!r} {until}" for k, kind in active}
        if fields:
            pipe.hset(key, mapping=fields)
        gone = [k for k in cleared if k not in fields]
        if gone:
            pipe.hdel(key, *gone)


class RedisDemandAdjustments:
    """:class:`streamrec.interfaces.DemandAdjustments` read from Redis (one HGETALL per call,
    of the active factors only: its cost does not grow with the candidates).

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
        if n == 0:  # nothing to look up: no Redis round trip
            return np.ones(0, np.float64), []
        return _combine(item_ids, categories, *self.active())

    def active(self, now_ms: int | None = None) -> tuple[dict[str, float], dict[str, float]]:
        """({item: factor}, {category: factor}) of the alerts active now (lapsed ones left out)."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        items: dict[str, float] = {}
        cats: dict[str, float] = {}
        for field, value in self.redis.hgetall(effects_key(self.prefix)).items():
            key = field.decode() if isinstance(field, bytes) else str(field)
            factor, _, until = (value.decode() if isinstance(value, bytes) else str(value)).partition(" ")
            if until and int(until) <= now_ms:
                continue
            if key.startswith(ITEM_PREFIX):
                items[key[len(ITEM_PREFIX) :]] = float(factor)
            elif key.startswith(CATEGORY_PREFIX):
                cats[key[len(CATEGORY_PREFIX) :]] = float(factor)
        return items, cats


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

    def active(self) -> tuple[dict[str, float], dict[str, float]]:
        return self.items, self.categories


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
