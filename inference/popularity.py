"""Decayed popularity per item and per category in Redis: the cold-start fallback.

Forward decay (Cormode et al., 2009): an event of weight w at event time t adds
``w · 2^((t - L) / half_life)`` to the item's score in a sorted set, where L is a landmark
time, so older events weigh less without rewriting old entries; ranking by the stored score
equals ranking by Σ w · 2^(-(now - t) / half_life). The landmark is stored in Redis; when
events run more than ``MAX_HALF_LIVES`` half-lives past it, a Lua script moves it forward and
rescales every popularity key atomically, so the scores never overflow float64.
One round trip per batch of events (a script: increments computed against this process's copy
of the landmark are rescaled to the stored one if another writer moved it, and the stored one
is returned to refresh the copy); reads are one ZREVRANGE.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

from streamrec.events import Event, EventType
from streamrec.settings import Settings

# Exponents stay below 2^MAX_HALF_LIVES (float64 holds up to ~2^1023).
MAX_HALF_LIVES = 400.0

# KEYS[1] landmark key, KEYS[2] set of popularity keys. ARGV[1] new landmark (ms), ARGV[2] half-life (ms).
_SHIFT_LUA = """
local old = tonumber(redis.call('GET', KEYS[1]) or '-1')
local new = tonumber(ARGV[1])
if old >= 0 and new <= old then return old end
redis.call('SET', KEYS[1], ARGV[1])
if old >= 0 then
  local factor = math.pow(2, -(new - old) / tonumber(ARGV[2]))
  for _, key in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    redis.call('ZUNIONSTORE', key, 1, key, 'WEIGHTS', factor)
  end
end
return new
"""


# KEYS[1] landmark key, KEYS[2] set of popularity keys. ARGV[1] the landmark the increments were
# computed against, ARGV[2] half-life (ms), ARGV[3] number of keys, then the keys, then per key
# its number of (item, increment) pairs and the pairs. Sets the landmark when there is none;
# returns the stored landmark.
_RECORD_LUA = """
local used = tonumber(ARGV[1])
local cur = tonumber(redis.call('GET', KEYS[1]) or '-1')
if cur < 0 then
  redis.call('SET', KEYS[1], ARGV[1])
  cur = used
end
local factor = 1
if cur ~= used then factor = math.pow(2, (used - cur) / tonumber(ARGV[2])) end
local nk = tonumber(ARGV[3])
local i = 4 + nk
for k = 1, nk do
  local key = ARGV[3 + k]
  redis.call('SADD', KEYS[2], key)
  local n = tonumber(ARGV[i])
  i = i + 1
  for _ = 1, n do
    if factor == 1 then
      redis.call('ZINCRBY', key, ARGV[i + 1], ARGV[i])
    else
      redis.call('ZINCRBY', key, string.format('%.17g', tonumber(ARGV[i + 1]) * factor), ARGV[i])
    end
    i = i + 2
  end
end
return tostring(cur)
"""


class RedisPopularity:
    """Writer and reader of decayed popularity (implements scoring.PopularitySource)."""

    def __init__(self, settings: Settings, redis_client) -> None:
        self.r = redis_client
        self.prefix = settings.redis.prefix
        self.half_life_ms = settings.scoring.popularity_half_life_s * 1000.0
        p = settings.profile
        self.weights = {
            EventType.VIEW: p.weight_view,
            EventType.CLICK: p.weight_click,
            EventType.ADD_TO_CART: p.weight_add_to_cart,
            EventType.PURCHASE: p.weight_purchase,
        }
        # All popularity keys share one hash tag: one slot in Redis Cluster, one pipeline.
        self._tag = f"{{{self.prefix}:pop}}"
        self._landmark_key = f"{self._tag}:landmark"
        self._keys_key = f"{self._tag}:keys"
        self._shift = self.r.register_script(_SHIFT_LUA)
        self._record = self.r.register_script(_RECORD_LUA)
        self._landmark_copy: float | None = None  # the stored landmark as last seen (record refreshes it)

    def _landmark(self, events_ts: Sequence[int], cached: bool = False) -> float:
        """The landmark to use for these events, moved forward (with a rescale) when needed.

        ``cached``: start from this process's copy when it has one (no round trip; the caller's
        write rescales if another writer moved the stored landmark since)."""
        hl = self.half_life_ms
        landmark = self._landmark_copy if cached else None
        if landmark is None:
            raw = self.r.get(self._landmark_key)
            if raw is None:
                first = int(min(events_ts))
                landmark = float(self._shift(keys=[self._landmark_key, self._keys_key], args=[first, hl]))
                self._landmark_copy = landmark
                return landmark
            landmark = float(raw)
        newest = max(events_ts)
        if (newest - landmark) / hl > MAX_HALF_LIVES:
            landmark = float(self._shift(keys=[self._landmark_key, self._keys_key], args=[int(newest), hl]))
        self._landmark_copy = landmark
        return landmark

    def _key(self, category: str | None = None) -> str:
        return f"{self._tag}:all" if not category else f"{self._tag}:cat:{category}"

    def record(self, events: Sequence[Event], item_category: Mapping[str, str] | None = None) -> int:
        """Add a batch of events (one pipeline). Returns how many counted."""
        item_category = item_category or {}
        counted = [ev for ev in events if self.weights.get(ev.type) and ev.item_id]
        if not counted:
            return 0
        landmark = self._landmark([ev.ts for ev in counted], cached=True)
        add: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        n = 0
        for ev in counted:
            item = ev.item_id
            assert item is not None  # `counted` keeps events with an item only
            w = self.weights[ev.type]
            x = w * 2.0 ** ((ev.ts - landmark) / self.half_life_ms)
            add[self._key()][item] += x
            cat = ev.category or item_category.get(item)
            if cat:
                add[self._key(cat)][item] += x
            n += 1
        if not add:
            return 0
        args: list[str | int | float] = [repr(landmark), repr(self.half_life_ms), len(add), *add.keys()]
        for incs in add.values():
            args.append(len(incs))
            for item, x in incs.items():
                args += [item, repr(x)]
        stored = self._record(keys=[self._landmark_key, self._keys_key], args=args)
        self._landmark_copy = float(stored)
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

    def seed(
        self,
        item_ids: Sequence[str],
        counts: Sequence[float],
        ts_ms: int,
        categories: Mapping[str, str] | None = None,
    ) -> None:
        """Bulk-load popularity (e.g. from the training period) as if counted at ``ts_ms``."""
        scale = 2.0 ** ((ts_ms - self._landmark([ts_ms])) / self.half_life_ms)
        keys = {self._key()}
        with self.r.pipeline(transaction=False) as pipe:
            pipe.zadd(self._key(), {i: float(c) * scale for i, c in zip(item_ids, counts, strict=True)})
            if categories:
                for i, c in zip(item_ids, counts, strict=True):
                    if categories.get(i):
                        keys.add(self._key(categories[i]))
                        pipe.zincrby(self._key(categories[i]), float(c) * scale, i)
            pipe.sadd(self._keys_key, *keys)
            pipe.execute()
