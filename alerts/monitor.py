"""The demand monitor: event-time windows of weighted demand in Redis, closed and tested per batch.

Per call of :meth:`DemandMonitor.process` (one batch of valid events):

1. **Count** (one Lua script call): demand is counted in *shoppers*, weighted by what they did.
   Per tumbling window ``ts // window_s``, per key (item ``i:<item>`` and category
   ``c:<category>``) and per user, the demand is the largest weight of that user's events on
   the key (``settings.profile.weight_*``: view 1 ... purchase 6; search events count nothing);
   a key's window demand is the sum over users. One wholesale invoice of 25 lines of one
   category therefore counts as one buyer of that category, not 25 (the Online Retail data is
   full of such invoices; counting lines made every big order look like a surge), while a
   product going viral brings many distinct shoppers. Sums are aggregated inside the script,
   one ``HINCRBYFLOAT`` per distinct key and window.
2. **Close** every window whose end plus ``allowed_lateness_s`` the watermark (newest event time
   seen by any worker) has passed, in order; run the detector (``alerts.detector``) on each;
   write the effects (boost/damping factors with TTL, ``alerts.effects``), the detector state
   and the removal of the closed windows in one MULTI/EXEC transaction.

Fault tolerance and idempotency
-------------------------------
All state lives in Redis under the hash tag ``{<prefix>:dm}`` (one slot on Redis Cluster)::

    {p:dm}:w:<win>     hash   weighted demand per key of an open window (+ __w, __w2, __n totals)
    {p:dm}:u:<win>     hash   largest weight per (key, user) of an open window
    {p:dm}:open        zset   open windows (score = window index)
    {p:dm}:wm          string watermark, epoch ms
    {p:dm}:closed      string highest closed window index; events of older windows are late
    {p:dm}:state       string detector state (msgpack: baselines, sliding sums, alert per key)
    {p:dm}:lock        string held (SET NX PX) by the worker that closes windows

A worker restart or a partition rebalance therefore loses nothing: a new monitor continues from
Redis. Re-processing events after a crash does not double-count: a window's demand is a sum of
per-(key, user) *maxima*, and a max is idempotent, so an event applied twice adds nothing the
second time (the script compares with the stored maximum); an event of an already closed
window is late and ignored. We chose this over a per-partition applied offset because hooks
receive events, not positions, and because it also absorbs events a producer published twice;
its cost is one hash field per (key, user) of an *open* window (deleted when the window closes,
``window_ttl_s`` as a safety net). Closing is guarded by a lock so that several workers never run the detector on the
same window; a worker that does not get the lock leaves the closing to the one that has it.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from alerts import metrics
from alerts.detector import (
    CATEGORY_PREFIX,
    ITEM_PREFIX,
    LEVEL_ITEM,
    SURGE,
    DetectorState,
    Transition,
    close_window,
    fast_slots,
    horizon_max,
    look,
    new_state,
    peek,
    slots_per_window,
    validate_horizons,
)
from alerts.effects import DemandEffectWriter
from alerts.models import AnomalyAlert
from streamrec.events import Event, EventType
from streamrec.settings import Settings

__all__ = ["DemandMonitor", "MonitorStats", "event_weights", "transition_to_alert"]

log = logging.getLogger(__name__)

_TOTAL_W, _TOTAL_W2, _TOTAL_N = "__w", "__w2", "__n"

# KEYS: base ("{p:dm}"). ARGV[1]: JSON {"w": [slot...], "u": [user...], "i": [item...],
# "c": [category...], "x": [weight...], "ts": max event ts}, ARGV[2]: window TTL s, ARGV[3]: slots
# per window. Demand is added to the event's slot; per (window, key, user) it is the largest weight seen (a shopper who views, then buys,
# counts as a purchase; one who buys 25 lines of one category counts once for the category).
# A max is idempotent: re-processing an event never adds anything.
# Returns {counted, late, watermark, closed}; counted = events that raised some demand.
_COUNT_LUA = """
local base = KEYS[1]
local p = cjson.decode(ARGV[1])
local ttl = tonumber(ARGV[2])
local spw = tonumber(ARGV[3])
local closed = tonumber(redis.call('GET', base .. ':sclosed') or '-1')
local agg = {}
local seen = {}
local counted, late = 0, 0
local function bump(win, a, key, user, x, item_level)
  local f = key .. '|' .. user
  local sk = math.floor(win / spw) .. '|' .. f
  local old = seen[sk]
  local uh = base .. ':u:' .. math.floor(win / spw)
  if old == nil then
    old = tonumber(redis.call('HGET', uh, f) or '0')
  end
  if x <= old then
    return false
  end
  seen[sk] = x
  redis.call('HSET', uh, f, tostring(x))
  a[key] = (a[key] or 0) + (x - old)
  if item_level then
    a['__w'] = (a['__w'] or 0) + (x - old)
    a['__w2'] = (a['__w2'] or 0) + (x * x - old * old)
    if old == 0 then
      a['__n'] = (a['__n'] or 0) + 1
    end
  end
  return true
end
for j = 1, #p.w do
  local win = p.w[j]
  if win <= closed then
    late = late + 1
  else
    local a = agg[win]
    if a == nil then
      a = {}
      agg[win] = a
    end
    local up = bump(win, a, 'i:' .. p.i[j], p.u[j], p.x[j], true)
    if p.c[j] ~= '' then
      up = bump(win, a, 'c:' .. p.c[j], p.u[j], p.x[j], false) or up
    end
    if up then
      counted = counted + 1
    end
  end
end
for win, a in pairs(agg) do
  local h = base .. ':s:' .. win
  for k, v in pairs(a) do
    redis.call('HINCRBYFLOAT', h, k, tostring(v))
  end
  redis.call('EXPIRE', h, ttl)
  redis.call('EXPIRE', base .. ':u:' .. math.floor(win / spw), ttl)
  redis.call('ZADD', base .. ':sopen', win, tostring(win))
end
local wm = tonumber(redis.call('GET', base .. ':wm') or '0')
if p.ts > wm then
  wm = p.ts
  redis.call('SET', base .. ':wm', tostring(wm))
end
return {counted, late, tostring(wm), closed}
"""

# KEYS: base. ARGV[1]: highest slot index to close. Marks it closed (events of those slots
# are late from now on) and returns the open slots up to it with their hashes:
# {win1, {k, v, k, v ...}, win2, {...}, ...} in window order.
_CLOSE_LUA = """
local base = KEYS[1]
local upto = tonumber(ARGV[1])
local closed = tonumber(redis.call('GET', base .. ':sclosed') or '-1')
if upto > closed then
  redis.call('SET', base .. ':sclosed', tostring(upto))
end
local wins = redis.call('ZRANGEBYSCORE', base .. ':sopen', '-inf', upto)
local out = {}
for _, win in ipairs(wins) do
  out[#out + 1] = win
  out[#out + 1] = redis.call('HGETALL', base .. ':s:' .. win)
end
return out
"""


@dataclass
class MonitorStats:
    """What the monitor did so far (this instance)."""

    counted: int = 0  # events added to a window
    late: int = 0  # events of an already closed window (ignored)
    ignored: int = 0  # search events and events without an item
    repeats: int = 0  # events that added nothing (same shopper, key and window; re-processing)
    windows_closed: int = 0


def event_weights(settings: Settings) -> dict[EventType, float]:
    """Demand weight per event type (search: 0)."""
    p = settings.profile
    return {
        EventType.VIEW: p.weight_view,
        EventType.CLICK: p.weight_click,
        EventType.ADD_TO_CART: p.weight_add_to_cart,
        EventType.PURCHASE: p.weight_purchase,
        EventType.SEARCH: 0.0,
    }


def transition_to_alert(
    t: Transition, window_ms: int, now_ms: int | None = None, synthetic: bool = False
) -> AnomalyAlert:
    """The alert record of a detector transition."""
    key = t.key[len(ITEM_PREFIX) :] if t.level == LEVEL_ITEM else t.key[len(CATEGORY_PREFIX) :]
    return AnomalyAlert(
        key=key,
        level="item" if t.level == LEVEL_ITEM else "category",
        kind="surge" if t.kind == SURGE else "drop",
        state="raised" if t.raised else "cleared",
        observed=round(t.observed, 3),
        expected=round(t.expected, 3),
        score=round(t.score, 3),
        window_start=t.first_window * window_ms if t.start_ms is None else t.start_ms,
        window_end=(t.window + 1) * window_ms if t.end_ms is None else t.end_ms,
        raised_at=int(time.time() * 1000) if now_ms is None else now_ms,
        source=t.source,
        synthetic=synthetic,
    )


class DemandMonitor:
    """Windowed demand per item and category, spike/drop detection and its effects, in Redis.

    ``redis_client`` is a ``redis.Redis`` (bytes or str responses). Thread-compatible, not
    thread-safe: use one instance per worker thread. See the module docstring for the state.
    """

    def __init__(self, settings: Settings, redis_client: Any) -> None:
        self.settings = settings
        self.cfg = settings.alerts
        if self.cfg.window_s <= 0:
            raise ValueError(f"alerts.window_s must be > 0, got {self.cfg.window_s}")
        validate_horizons(self.cfg)
        self.spw = slots_per_window(self.cfg)
        self.n_slots = max(fast_slots(self.cfg))
        self.redis = redis_client
        self.base = f"{{{settings.redis.prefix}:dm}}"
        self.window_ms = int(self.cfg.window_s) * 1000
        self.slot_ms = int(self.cfg.slot_s) * 1000
        self.weights = event_weights(settings)
        self.effects = DemandEffectWriter(settings)
        self.stats = MonitorStats()
        self._count = redis_client.register_script(_COUNT_LUA)
        self._close = redis_client.register_script(_CLOSE_LUA)
        self._lock_token = uuid.uuid4().hex
        self._state: DetectorState | None = None
        self._last_peek_ms = -(2**62)
        # item key -> category key of the items seen since this monitor last wrote the state
        # (the state keeps them: a category does not alert again for its own alerting items)
        self._unlinked: dict[str, str] = {}

    # -- public API ---------------------------------------------------------------------------

    def process(self, events: Sequence[Event], item_category: Mapping[str, str]) -> list[AnomalyAlert]:
        """Count a batch of valid events, close the slots and windows it completes, look at the
        open slot; return the transitions.

        ``item_category`` maps item ids to categories; an event's own ``category`` is used when
        its item is not in it (an item with neither counts at item level only).
        Returns the alerts raised and cleared in this call (usually none).
        Raises ``redis`` errors on infrastructure failures; retrying the batch is safe.
        """
        payload = self._payload(events, item_category)
        if payload is None:
            return []
        counted, late, wm_raw, closed = self._count(
            keys=[self.base],
            args=[orjson.dumps(payload), int(self.cfg.window_ttl_s), self.spw],
        )
        syn = payload.pop("syn")
        if syn:
            pipe = self.redis.pipeline(transaction=False)
            pipe.sadd(self.base + ":syn", *syn)
            pipe.expire(self.base + ":syn", max(1, int(self.cfg.effect_ttl_s)))
            pipe.execute()
        n = len(payload["w"])
        self.stats.counted += int(counted)
        self.stats.late += int(late)
        self.stats.repeats += n - int(counted) - int(late)
        metrics.demand_events.inc(int(counted))
        wm = int(float(wm_raw))
        alerts = self.close_due(wm, closed_slot=int(closed))  # the count script read it: no GET
        if int(counted) and self.cfg.peek_s > 0 and wm - self._last_peek_ms >= self.cfg.peek_s * 1000:
            self._last_peek_ms = wm
            alerts += self._peek(wm)
        return alerts

    def close_due(
        self, watermark_ms: int | None = None, closed_slot: int | None = None
    ) -> list[AnomalyAlert]:
        """Close every open slot (and window) that the watermark (default: the stored one) has passed.

        ``closed_slot``: the last closed slot as just read (saves a round trip); the close script
        checks it again atomically, so a stale value only costs that script's round trip."""
        if watermark_ms is None:
            raw = self.redis.get(self.base + ":wm")
            if raw is None:
                return []
            watermark_ms = int(float(raw))
        upto = (watermark_ms - int(self.cfg.allowed_lateness_s) * 1000) // self.slot_ms - 1
        if closed_slot is None:
            last = self.redis.get(self.base + ":sclosed")
            closed_slot = -1 if last is None else int(last)
        if upto <= closed_slot:
            return []
        return self._close_upto(int(upto))

    def flush(self) -> list[AnomalyAlert]:
        """Close every open slot and window now (end of a replay; never in a live worker)."""
        raw = self.redis.zrange(self.base + ":sopen", -1, -1)
        last = self.redis.get(self.base + ":sclosed")
        upto = int(raw[0]) if raw else (int(last) if last is not None else -1)
        return self._close_upto(upto, final=True)

    def state(self) -> DetectorState:
        """The detector state as stored in Redis (a fresh one when none)."""
        raw = self.redis.get(self.base + ":state")
        if not raw:
            return new_state(self.cfg)
        return DetectorState.from_bytes(raw, horizon_max(self.cfg), self.n_slots)

    def open_counts(self) -> dict[int, dict[str, float]]:
        """Weighted demand per key of every open slot (slot index -> {key: count})."""
        wins = [int(w) for w in self.redis.zrange(self.base + ":sopen", 0, -1)]
        pipe = self.redis.pipeline(transaction=False)
        for w in wins:
            pipe.hgetall(f"{self.base}:s:{w}")
        out: dict[int, dict[str, float]] = {}
        for w, h in zip(wins, pipe.execute(), strict=True):
            out[w] = {_s(k): float(v) for k, v in h.items()}
        return out

    def forget_alerts(self) -> DetectorState:
        """Clear every active alert and its boost/damping without a 'cleared' alert, keeping the
        baselines (after a backfill of history: past episodes are not today's news)."""
        if not self._acquire():
            raise RuntimeError("another worker holds the demand lock; run this with the workers stopped")
        try:
            state = self.state()
            gone = [key for key, _ in state.active_keys()]
            state.alert[:] = 0
            assert state.fast_p is not None
            state.fast_p[:] = 1.0
            pipe = self.redis.pipeline(transaction=True)
            pipe.set(self.base + ":state", state.to_bytes())
            self.effects.queue(pipe, [], gone)
            pipe.execute()
        finally:
            self._release()
        self._state = state
        _set_active_gauge(state)
        return state

    def reset(self) -> int:
        """Delete all monitor state and effects under this prefix (tests, evaluations)."""
        n = 0
        for pattern in (f"{self.base}*",):  # the state, the counts and the effects (one hash tag)
            keys = list(self.redis.scan_iter(match=_glob_escape(pattern), count=1000))
            for i in range(0, len(keys), 500):
                n += self.redis.delete(*keys[i : i + 500])
        self._state = None
        return n

    # -- internals ----------------------------------------------------------------------------

    def _payload(self, events: Sequence[Event], item_category: Mapping[str, str]) -> dict[str, Any] | None:
        if not events:
            return None
        wins: list[int] = []
        users: list[str] = []
        items: list[str] = []
        cats: list[str] = []
        xs: list[float] = []
        syn: set[str] = set()
        prefix = self.cfg.synthetic_user_prefix
        max_ts = 0
        weights = self.weights
        sms = self.slot_ms
        for ev in events:
            x = weights.get(ev.type, 0.0)
            if x <= 0 or not ev.item_id:
                self.stats.ignored += 1
                continue
            cat = item_category.get(ev.item_id) or ev.category or ""
            if cat:  # the state learns each item's category (see DetectorState.link)
                self._unlinked[ITEM_PREFIX + ev.item_id] = CATEGORY_PREFIX + cat
            wins.append(ev.ts // sms)
            users.append(ev.user_id)
            items.append(ev.item_id)
            cats.append(cat)
            xs.append(x)
            if prefix and ev.user_id.startswith(prefix):
                syn.add(ITEM_PREFIX + ev.item_id)
                if cat:
                    syn.add(CATEGORY_PREFIX + cat)
            if ev.ts > max_ts:
                max_ts = ev.ts
        if not wins:
            return None
        return {"w": wins, "u": users, "i": items, "c": cats, "x": xs, "ts": max_ts, "syn": sorted(syn)}

    def _acquire(self) -> bool:
        ttl_ms = 60_000
        return bool(self.redis.set(self.base + ":lock", self._lock_token, nx=True, px=ttl_ms))

    def _release(self) -> None:
        # Delete the lock only if it is still ours (compare-and-delete).
        self.redis.eval(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
            1,
            self.base + ":lock",
            self._lock_token,
        )

    def _close_upto(self, upto: int, final: bool = False) -> list[AnomalyAlert]:
        if not self._acquire():
            log.debug("demand slots up to %d are being closed by another worker", upto)
            return []
        try:
            flat = self._close(keys=[self.base], args=[upto])
            state = self.state()
            linked = dict(self._unlinked)
            state.link(linked)
            windows_before = state.active_windows
            acc_before = state.acc_window
            transitions: list[Transition] = []
            closed: list[int] = []
            for j in range(0, len(flat), 2):
                slot = int(flat[j])
                closed.append(slot)
                if slot <= state.last_slot:  # already in the state (crash before the cleanup)
                    continue
                counts, total_w, total_w2 = _parse_counts(flat[j + 1])
                transitions += look(state, slot, counts, total_w, total_w2, self.cfg)
            # The window being filled closes once the watermark has passed its last slot.
            if state.acc_window >= 0 and (final or (state.acc_window + 1) * self.spw - 1 <= upto):
                transitions += close_window(state, self.cfg)
            n_windows = state.active_windows - windows_before
            if not closed and not n_windows and state.acc_window == acc_before:
                return []
            self.stats.windows_closed += n_windows
            done_hours = {w // self.spw for w in closed} | ({acc_before} if acc_before >= 0 else set())
            done_hours = {h for h in done_hours if h <= state.last_window and h != state.acc_window}
            cleared = [t.key for t in transitions if not t.raised]
            pipe = self.redis.pipeline(transaction=True)
            pipe.set(self.base + ":state", state.to_bytes())
            for slot in closed:
                pipe.delete(f"{self.base}:s:{slot}")
            for h in done_hours:
                pipe.delete(f"{self.base}:u:{h}")
            if closed:
                pipe.zrem(self.base + ":sopen", *[str(w) for w in closed])
            self.effects.queue(pipe, state.active_keys(), cleared)
            pipe.execute()
            self._linked(linked)
        finally:
            self._release()
        return self._finish(state, transitions)

    def _linked(self, written: dict[str, str]) -> None:
        """Forget the item -> category links that a written state now holds."""
        for k, v in written.items():
            if self._unlinked.get(k) == v:
                del self._unlinked[k]

    def _peek(self, watermark_ms: int) -> list[AnomalyAlert]:
        """Look at the open slots' partial demand; raise (and write) only what they show."""
        last = self.redis.get(self.base + ":sclosed")
        lo = f"({int(last)}" if last is not None else "-inf"
        slots = [int(w) for w in self.redis.zrangebyscore(self.base + ":sopen", lo, "+inf")]
        if not slots:
            return []

        def run(state: DetectorState) -> list[Transition]:
            state.link(self._unlinked)
            pipe = self.redis.pipeline(transaction=False)
            for w in slots:
                pipe.hgetall(f"{self.base}:s:{w}")
            counts: dict[str, float] = {}
            tw = tw2 = 0.0
            for h in pipe.execute():
                c, w1, w2 = _parse_counts([x for kv in h.items() for x in kv])
                tw, tw2 = tw + w1, tw2 + w2
                for k, v in c.items():
                    counts[k] = counts.get(k, 0.0) + v
            return peek(state, max(slots), counts, tw, tw2, self.cfg, watermark_ms)

        if not run(self.state()):
            return []
        if not self._acquire():
            return []
        try:
            state = self.state()  # again under the lock: another worker may have moved on
            linked = dict(self._unlinked)
            transitions = run(state)
            if transitions:
                pipe = self.redis.pipeline(transaction=True)
                pipe.set(self.base + ":state", state.to_bytes())
                self.effects.queue(pipe, state.active_keys(), [])
                pipe.execute()
                self._linked(linked)
        finally:
            self._release()
        return self._finish(state, transitions)

    def _finish(self, state: DetectorState, transitions: list[Transition]) -> list[AnomalyAlert]:
        self._state = state
        syn: set[str] = set()
        if transitions:
            syn = {_s(k) for k in self.redis.smembers(self.base + ":syn")}
        alerts = [transition_to_alert(t, self.window_ms, synthetic=t.key in syn) for t in transitions]
        for a in alerts:
            if a.state == "raised":
                metrics.anomalies_raised.labels(a.kind, a.level).inc()
        _set_active_gauge(state)
        return alerts


def _parse_counts(fields: Sequence[Any]) -> tuple[dict[str, float], float, float]:
    """(weighted demand per key, sum of weights, sum of squared weights) of a slot hash (flat)."""
    counts: dict[str, float] = {}
    total_w = total_w2 = 0.0
    for k in range(0, len(fields), 2):
        name = _s(fields[k])
        val = float(fields[k + 1])
        if name == _TOTAL_W:
            total_w = val
        elif name == _TOTAL_W2:
            total_w2 = val
        elif name != _TOTAL_N:
            counts[name] = val
    return counts, total_w, total_w2


def _set_active_gauge(state: DetectorState) -> None:
    for (kind, level), n in state.active().items():
        metrics.anomalies_active.labels(
            "surge" if kind == SURGE else "drop", "item" if level == LEVEL_ITEM else "category"
        ).set(n)


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _glob_escape(pattern: str) -> str:
    """Escape glob metacharacters except the trailing ``*``."""
    body = pattern[:-1]
    for ch in "\\[]?*":
        body = body.replace(ch, "\\" + ch)
    return body + "*"
