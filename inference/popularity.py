"""Decayed popularity per item and per category in Redis: the cold-start fallback.

Forward decay (Cormode et al., 2009): an event of weight w at event time t adds
``w · 2^((t - t0) / half_life)`` to the item's score in a sorted set, so older events
weigh less without ever rewriting old entries; ranking by the stored score equals
ranking by Σ w · 2^(-(now - t) / half_life). The landmark t0 is fixed; float64 holds
the scores for about ±1000 half-lives around it (±19 years with the 7-day default).
One pipeline per batch of events; reads are one ZREVRANGE.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

from streamrec.events import Event, EventType
from streamrec.settings import Settings

# 2020-01-01: the landmark of the forward decay.
LANDMARK_MS = 1_577_836_800_000


class RedisPopularity:
    """Writer and reader of decayed popularity (implements scoring.PopularitySource)."""

    def __init__(self, settings: Settings, redis_client, half_life_s: float = 7 * 24 * 3600.0) -> None:
        self.r = redis_client
        self.prefix = settings.redis.prefix
        self.half_life_ms = half_life_s * 1000.0
        p = settings.profile
        self.weights = {
            EventType.VIEW: p.weight_view,
            EventType.CLICK: p.weight_click,
            EventType.ADD_TO_CART: p.weight_add_to_cart,
            EventType.PURCHASE: p.weight_purchase,
        }
        # All popularity keys share one hash tag: one slot in Redis Cluster, one pipeline.
        self._tag = f"{{{self.prefix}:pop}}"

    def _key(self, category: str | None = None) -> str:
        return f"{self._tag}:all" if not category else f"{self._tag}:cat:{category}"

    def record(self, events: Sequence[Event], item_category: Mapping[str, str] | None = None) -> int:
        """Add a batch of events (one pipeline). Returns how many counted."""
        item_category = item_category or {}
        add: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        n = 0
        for ev in events:
            w = self.weights.get(ev.type)
            if not w or not ev.item_id:
                continue
            x = w * 2.0 ** ((ev.ts - LANDMARK_MS) / self.half_life_ms)
            add[self._key()][ev.item_id] += x
            cat = ev.category or item_category.get(ev.item_id)
            if cat:
                add[self._key(cat)][ev.item_id] += x
            n += 1
        if not add:
            return 0
        with self.r.pipeline(transaction=False) as pipe:
            for key, incs in add.items():
                for item, x in incs.items():
                    pipe.zincrby(key, x, item)
            pipe.execute()
        return n

    def top(self, k: int, category: str | None = None) -> list[tuple[str, float]]:
        rows = self.r.zrevrange(self._key(category), 0, max(k - 1, 0), withscores=True)
        if not rows:
            return []
        scores = np.array([s for _, s in rows], np.float64)
        # Report scores relative to the top item (scale-free, comparable across calls).
        rel = scores / scores[0] if scores[0] > 0 else scores
        return [
            (m.decode() if isinstance(m, bytes) else m, float(s)) for (m, _), s in zip(rows, rel, strict=True)
        ]

    def seed(self, item_ids: Sequence[str], counts: Sequence[float], ts_ms: int,
             categories: Mapping[str, str] | None = None) -> None:  # fmt: skip
        """Bulk-load popularity (e.g. from the training period) as if counted at ``ts_ms``."""
        scale = 2.0 ** ((ts_ms - LANDMARK_MS) / self.half_life_ms)
        if not math.isfinite(scale):
            raise ValueError("ts_ms too far from the landmark")
        with self.r.pipeline(transaction=False) as pipe:
            pipe.zadd(self._key(), {i: float(c) * scale for i, c in zip(item_ids, counts, strict=True)})
            if categories:
                for i, c in zip(item_ids, counts, strict=True):
                    if categories.get(i):
                        pipe.zincrby(self._key(categories[i]), float(c) * scale, i)
            pipe.execute()
