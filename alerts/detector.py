"""The demand detector: pure maths, no Redis (unit-testable on its own).

Model
-----
Every key (an item ``i:<item_id>`` or a category ``c:<category>``) has a *baseline share*
``s_k`` of all demand: an exponentially weighted sum of its demand over the sum of all demand,
with a half-life of ``baseline_half_life_windows`` *active* windows (windows in which the shop
sold anything). The expected demand of key ``k`` in a window is

    e_k = s_k / (1 - s_k) * (T - o_k)

where ``T`` is the window's total demand and ``o_k`` the key's own (leave-one-out, so a surge
does not raise its own expectation). Conditioning on the shop's actual traffic handles the
hour-of-day, the weekday (no sales on Saturdays in the Online Retail data), nights and seasons
without a seasonal model per key: a key alerts only when it moves *relative to the shop*.
Windows with no demand at all are skipped (no evidence, no decay).

Counts are weighted by event type (view 1 ... purchase 6). They are turned back into event
units by the stream's dispersion factor ``phi = sum(w^2) / sum(w)`` (a compound-Poisson
argument: for a purchases-only stream ``phi`` is the purchase weight and the units are
purchases), so the tail probabilities below are computed on event counts.

Test
----
For each horizon ``h`` (``surge_horizons``, e.g. 1, 3, 8 active windows, for surges;
``drop_horizons``, e.g. 24, for drops), ``O_h`` and ``E_h`` are the sums of observed and expected
events over the last ``h`` active windows. Under a
negative-binomial count model with mean ``E_h`` and size ``nb_size * h`` (over-dispersion of
one window; sums over independent windows add their sizes), the upper tail
``P(X >= O_h)`` tests a surge and the lower tail ``P(X <= O_h)`` a drop. The tails are
continuous in ``O_h`` (regularised incomplete beta), and the smallest over the horizons of the
kind, times their number (Bonferroni), is the key's p-value for that kind. Drops need longer
horizons than surges: a key's expected demand per hour is small (an item sells ~1 per active
hour), so an hour or a day of nothing is not improbable, three days of nothing is.

* raise a **surge** when p <= ``p_raise``, ``O_h >= min_surge_count`` and
  ``O_h >= min_surge_ratio * E_h`` at that horizon;
* raise a **drop** when p <= ``p_raise``, ``E_h >= min_drop_expected`` and
  ``O_h <= max_drop_ratio * E_h``;
* **clear** an active alert when every horizon's tail probability of its kind (without the
  guards) is above ``p_clear``. ``p_clear >> p_raise`` is the hysteresis: one episode raises one
  alert and clears once.

A category does not alert a second time for its own products: when items linked to it
(:meth:`DetectorState.link`) alert or raise with the same kind, their observed and expected
events are taken out of the category's sums and the category raises only if what is left still
passes (a category of one product never doubles that product's alert; ten long-tail products
each a little up still raise their category).

A key needs ``warmup_windows`` active windows of history before it can alert. The baseline
keeps learning during an alert, so a lasting change becomes the new normal and clears.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import msgspec
import numpy as np
from scipy.special import betainc

from streamrec.settings import AlertSettings

__all__ = [
    "DROP",
    "LEVEL_CATEGORY",
    "LEVEL_ITEM",
    "NONE",
    "SURGE",
    "DetectorState",
    "Transition",
    "close_window",
    "detect",
    "fast_slots",
    "horizon_max",
    "key_level",
    "nb_lower_tail",
    "nb_upper_tail",
    "new_state",
    "peek",
    "look",
    "slots_per_window",
    "validate_horizons",
    "wait_tail",
]

NONE, SURGE, DROP = 0, 1, -1
LEVEL_ITEM, LEVEL_CATEGORY = 0, 1
ITEM_PREFIX, CATEGORY_PREFIX = "i:", "c:"
_MAX_SHARE = 0.95
_TINY = 1e-12


def key_level(key: str) -> int:
    """LEVEL_ITEM for ``i:<item_id>``, LEVEL_CATEGORY for ``c:<category>``."""
    if key.startswith(ITEM_PREFIX):
        return LEVEL_ITEM
    if key.startswith(CATEGORY_PREFIX):
        return LEVEL_CATEGORY
    raise ValueError(f"demand key {key!r} must start with 'i:' (item) or 'c:' (category)")


def nb_upper_tail(observed: np.ndarray, mean: np.ndarray, size: float | np.ndarray) -> np.ndarray:
    """P(X >= observed) for X ~ NegBin(mean, size), continuous in ``observed``.

    ``P(X >= k) = I_{1-p}(k, r)`` with ``p = r / (r + mean)``; 1 where ``observed <= 0``.
    """
    k = np.asarray(observed, np.float64)
    m = np.maximum(np.asarray(mean, np.float64), 0.0)
    r = np.asarray(size, np.float64)
    q = m / (r + m)  # 1 - p
    out = np.ones(np.broadcast(k, m, r).shape, np.float64)
    pos = np.broadcast_to(k > 0, out.shape)
    if pos.any():
        kb, qb, rb = (np.broadcast_to(a, out.shape)[pos] for a in (k, q, r))
        out[pos] = betainc(kb, rb, qb)
    return out


def nb_lower_tail(observed: np.ndarray, mean: np.ndarray, size: float | np.ndarray) -> np.ndarray:
    """P(X <= observed) for X ~ NegBin(mean, size), continuous in ``observed``.

    ``P(X <= k) = I_p(r, k + 1)`` with ``p = r / (r + mean)``; 1 where ``mean <= 0``.
    """
    k = np.maximum(np.asarray(observed, np.float64), 0.0)
    m = np.maximum(np.asarray(mean, np.float64), 0.0)
    r = np.asarray(size, np.float64)
    p = r / (r + m)
    return np.where(m > 0, betainc(r, k + 1.0, p), 1.0)


@dataclass
class Transition:
    """A key that raised or cleared an alert at the end of a window."""

    key: str
    level: int  # LEVEL_ITEM or LEVEL_CATEGORY
    kind: int  # SURGE or DROP
    raised: bool  # True: raised, False: cleared
    observed: float  # events over the deciding horizon
    expected: float
    score: float  # -log10 of the tail probability (Bonferroni-corrected)
    first_window: int  # window index where the deciding horizon starts
    window: int  # window index that was closed (or that holds the look)
    start_ms: int | None = None  # sequential looks: event-time span of the deciding evidence
    end_ms: int | None = None
    source: Literal["window", "fast", "wait"] = (
        "window"  # window (hour close) | fast (short horizon look) | wait (waiting time)
    )


class _StateWire(msgspec.Struct, array_like=True):
    keys: list[str]
    share_num: bytes
    share_den: float
    seen: bytes
    alert: bytes
    ring_o: bytes
    ring_e: bytes
    ring_w: bytes
    pos: int
    filled: int
    disp_num: float
    disp_den: float
    active_windows: int
    last_window: int
    horizon_max: int
    slot_o: bytes = b""
    slot_t: bytes = b""
    slot_idx: bytes = b""
    acc_o: bytes = b""
    acc_w: float = 0.0
    acc_w2: float = 0.0
    acc_window: int = -1
    last_slot: int = -1
    since_e: bytes = b""
    since_n: bytes = b""
    fast_p: bytes = b""
    slot_num: float = 0.0
    slot_den: float = 0.0
    n_slots: int = 0
    parent: bytes = b""
    sold_o: bytes = b""


@dataclass
class DetectorState:
    """Per-key baseline, sliding sums and alert state; grows as keys appear."""

    horizon_max: int
    keys: list[str] = field(default_factory=list)
    share_num: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    share_den: float = 0.0
    seen: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    alert: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))
    ring_o: np.ndarray | None = None  # (horizon_max, K) observed events per active window
    ring_e: np.ndarray | None = None  # (horizon_max, K) expected events
    ring_w: np.ndarray | None = None  # (horizon_max,) window index of each ring row
    pos: int = 0
    filled: int = 0
    disp_num: float = 0.0
    disp_den: float = 0.0
    active_windows: int = 0
    last_window: int = -1
    # -- sequential looks (slots of one window) ----------------------------------------------
    n_slots: int = 0  # rows of the slot ring (longest short horizon, in slots)
    slot_o: np.ndarray | None = None  # (n_slots, K) events per closed slot
    slot_t: np.ndarray | None = None  # (n_slots,) the shop's events per slot
    slot_idx: np.ndarray | None = None  # (n_slots,) slot index of each row (-1: empty)
    acc_o: np.ndarray | None = None  # (K,) weighted demand of the window being filled by slots
    acc_w: float = 0.0
    acc_w2: float = 0.0
    acc_window: int = -1  # window index of acc_* (-1: none)
    last_slot: int = -1
    since_e: np.ndarray | None = None  # (K,) expected events since the key's last event
    since_n: np.ndarray | None = None  # (K,) active windows since the key's last event
    fast_p: np.ndarray | None = None  # (K,) corrected surge p of the last look (1: none)
    slot_num: float = 0.0  # decayed shop events per active slot: num / den
    slot_den: float = 0.0
    parent: np.ndarray | None = None  # (K,) index of an item key's category key (-1: none)
    # (K,) events over the longest horizon up to the key's last active window with demand: what
    # it was selling before a silence began (the ring itself empties as the silence goes on)
    sold_o: np.ndarray | None = None
    index: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        k = len(self.keys)
        if self.ring_o is None:
            self.ring_o = np.zeros((self.horizon_max, k), np.float32)
            self.ring_e = np.zeros((self.horizon_max, k), np.float32)
            self.ring_w = np.full(self.horizon_max, -1, np.int64)
        if self.slot_o is None or self.slot_o.shape != (self.n_slots, k):
            self.slot_o = np.zeros((self.n_slots, k), np.float32)
            self.slot_t = np.zeros(self.n_slots, np.float64)
            self.slot_idx = np.full(self.n_slots, -1, np.int64)
        for name, dtype, fill in (
            ("acc_o", np.float64, 0.0),
            ("since_e", np.float64, 0.0),
            ("since_n", np.float32, 0.0),
            ("fast_p", np.float32, 1.0),
            ("parent", np.int32, -1),
            ("sold_o", np.float64, 0.0),
        ):
            v = getattr(self, name)
            if v is None or v.shape != (k,):
                setattr(self, name, np.full(k, fill, dtype))
        self.index = {key: i for i, key in enumerate(self.keys)}
        self.levels = np.array([key_level(key) for key in self.keys], np.int8)

    @property
    def size(self) -> int:
        return len(self.keys)

    def add_keys(self, keys: Sequence[str]) -> None:
        """Append keys not yet known (zero history)."""
        new = [k for k in dict.fromkeys(keys) if k not in self.index]
        if not new:
            return
        for k in new:
            self.index[k] = len(self.keys)
            self.keys.append(k)
        n = len(new)
        self.share_num = np.concatenate([self.share_num, np.zeros(n)])
        self.seen = np.concatenate([self.seen, np.zeros(n, np.int32)])
        self.alert = np.concatenate([self.alert, np.zeros(n, np.int8)])
        pad = np.zeros((self.horizon_max, n), np.float32)
        self.ring_o = np.concatenate([self.ring_o, pad], axis=1)
        self.ring_e = np.concatenate([self.ring_e, pad], axis=1)
        assert self.slot_o is not None and self.acc_o is not None and self.since_e is not None
        assert self.since_n is not None and self.fast_p is not None
        self.slot_o = np.concatenate([self.slot_o, np.zeros((self.n_slots, n), np.float32)], axis=1)
        self.acc_o = np.concatenate([self.acc_o, np.zeros(n)])
        self.since_e = np.concatenate([self.since_e, np.zeros(n)])
        self.since_n = np.concatenate([self.since_n, np.zeros(n, np.float32)])
        self.fast_p = np.concatenate([self.fast_p, np.ones(n, np.float32)])
        assert self.parent is not None
        self.parent = np.concatenate([self.parent, np.full(n, -1, np.int32)])
        assert self.sold_o is not None
        self.sold_o = np.concatenate([self.sold_o, np.zeros(n)])
        self.levels = np.concatenate([self.levels, np.array([key_level(k) for k in new], np.int8)])

    def link(self, parents: Mapping[str, str]) -> None:
        """Record each item key's category key (``{"i:<item>": "c:<category>"}``), adding keys
        not yet known. A category whose demand is explained by its own alerting items does not
        alert a second time (see :func:`_explained`)."""
        assert self.parent is not None
        new = [(i, c) for i, c in parents.items() if c and (i not in self.index or c not in self.index)]
        if new:
            self.add_keys([k for pair in new for k in pair])
        for item, cat in parents.items():
            if cat:
                j = self.index[item]
                c = self.index[cat]
                if self.parent[j] != c:
                    self.parent[j] = c

    def active(self) -> dict[tuple[int, int], int]:
        """Number of active alerts by (kind, level)."""
        out: dict[tuple[int, int], int] = {}
        for kind in (SURGE, DROP):
            for level in (LEVEL_ITEM, LEVEL_CATEGORY):
                out[(kind, level)] = int(np.count_nonzero((self.alert == kind) & (self.levels == level)))
        return out

    def active_keys(self) -> list[tuple[str, int]]:
        """(key, kind) of every active alert."""
        return [(self.keys[i], int(self.alert[i])) for i in np.flatnonzero(self.alert)]

    def to_bytes(self) -> bytes:
        assert self.ring_o is not None and self.ring_e is not None and self.ring_w is not None
        wire = _StateWire(
            keys=self.keys,
            share_num=self.share_num.astype(np.float64).tobytes(),
            share_den=self.share_den,
            seen=self.seen.astype(np.int32).tobytes(),
            alert=self.alert.astype(np.int8).tobytes(),
            ring_o=self.ring_o.astype(np.float32).tobytes(),
            ring_e=self.ring_e.astype(np.float32).tobytes(),
            ring_w=self.ring_w.astype(np.int64).tobytes(),
            pos=self.pos,
            filled=self.filled,
            disp_num=self.disp_num,
            disp_den=self.disp_den,
            active_windows=self.active_windows,
            last_window=self.last_window,
            horizon_max=self.horizon_max,
            slot_o=_b(self.slot_o, np.float32),
            slot_t=_b(self.slot_t, np.float64),
            slot_idx=_b(self.slot_idx, np.int64),
            acc_o=_b(self.acc_o, np.float64),
            acc_w=self.acc_w,
            acc_w2=self.acc_w2,
            acc_window=self.acc_window,
            last_slot=self.last_slot,
            since_e=_b(self.since_e, np.float64),
            since_n=_b(self.since_n, np.float32),
            fast_p=_b(self.fast_p, np.float32),
            parent=_b(self.parent, np.int32),
            sold_o=_b(self.sold_o, np.float64),
            slot_num=self.slot_num,
            slot_den=self.slot_den,
            n_slots=self.n_slots,
        )
        return msgspec.msgpack.encode(wire)

    @classmethod
    def from_bytes(cls, raw: bytes, horizon_max: int, n_slots: int = 0) -> DetectorState:
        """Decode a stored state; a state stored with another ``horizon_max`` (or ``n_slots``)
        restarts those sums (the baselines are kept)."""
        w = msgspec.msgpack.decode(raw, type=_StateWire)
        k = len(w.keys)
        ring_o = np.frombuffer(w.ring_o, np.float32).reshape(w.horizon_max, k).copy()
        ring_e = np.frombuffer(w.ring_e, np.float32).reshape(w.horizon_max, k).copy()
        ring_w = np.frombuffer(w.ring_w, np.int64).copy()
        pos, filled = w.pos, w.filled
        if w.horizon_max != horizon_max:  # horizons changed in settings: start the sums afresh
            ring_o = np.zeros((horizon_max, k), np.float32)
            ring_e = np.zeros((horizon_max, k), np.float32)
            ring_w = np.full(horizon_max, -1, np.int64)
            pos = filled = 0
        return cls(
            horizon_max=horizon_max,
            keys=list(w.keys),
            share_num=np.frombuffer(w.share_num, np.float64).copy(),
            share_den=w.share_den,
            seen=np.frombuffer(w.seen, np.int32).copy(),
            alert=np.frombuffer(w.alert, np.int8).copy(),
            ring_o=ring_o,
            ring_e=ring_e,
            ring_w=ring_w,
            pos=pos,
            filled=filled,
            disp_num=w.disp_num,
            disp_den=w.disp_den,
            active_windows=w.active_windows,
            last_window=w.last_window,
            n_slots=n_slots,
            slot_o=(
                np.frombuffer(w.slot_o, np.float32).reshape(n_slots, k).copy()
                if w.n_slots == n_slots and w.slot_o
                else None
            ),
            slot_t=np.frombuffer(w.slot_t, np.float64).copy() if w.n_slots == n_slots and w.slot_t else None,
            slot_idx=np.frombuffer(w.slot_idx, np.int64).copy()
            if w.n_slots == n_slots and w.slot_idx
            else None,
            acc_o=np.frombuffer(w.acc_o, np.float64).copy() if w.acc_o else None,
            acc_w=w.acc_w,
            acc_w2=w.acc_w2,
            acc_window=w.acc_window,
            last_slot=w.last_slot,
            since_e=np.frombuffer(w.since_e, np.float64).copy() if w.since_e else None,
            since_n=np.frombuffer(w.since_n, np.float32).copy() if w.since_n else None,
            fast_p=np.frombuffer(w.fast_p, np.float32).copy() if w.fast_p else None,
            parent=np.frombuffer(w.parent, np.int32).copy() if w.parent else None,
            # a state stored before sold_o existed: the ring's sums are the best record there is
            sold_o=(
                np.frombuffer(w.sold_o, np.float64).copy()
                if w.sold_o
                else ring_o.sum(axis=0, dtype=np.float64)
            ),
            slot_num=w.slot_num,
            slot_den=w.slot_den,
        )


def _b(a: np.ndarray | None, dtype: type) -> bytes:
    return b"" if a is None else np.ascontiguousarray(a, dtype).tobytes()


def validate_horizons(cfg: AlertSettings) -> None:
    """Raise ValueError unless both horizon lists are non-empty lists of positive window counts."""
    for name in ("surge_horizons", "drop_horizons"):
        hs = getattr(cfg, name)
        if not hs or min(hs) < 1:
            raise ValueError(
                f"alerts.{name} must be a non-empty list of positive window counts, got {hs!r} "
                f"(e.g. STREAMREC_ALERTS_{name.upper()}='[1,3,8]')"
            )


def slots_per_window(cfg: AlertSettings) -> int:
    """Slots (sequential looks) per window; raises ValueError unless slot_s divides window_s."""
    if cfg.slot_s > cfg.window_s or cfg.window_s % cfg.slot_s:
        raise ValueError(
            f"alerts.slot_s ({cfg.slot_s}) must divide alerts.window_s ({cfg.window_s}), e.g. 300 for 3600"
        )
    bad = [h for h in cfg.fast_horizons_s if h % cfg.slot_s]
    if bad:
        raise ValueError(
            f"alerts.fast_horizons_s must be multiples of alerts.slot_s ({cfg.slot_s}), got {bad}"
        )
    return cfg.window_s // cfg.slot_s


def fast_slots(cfg: AlertSettings) -> list[int]:
    """The short surge horizons in slots, ascending."""
    return sorted({max(1, h // cfg.slot_s) for h in cfg.fast_horizons_s})


def horizon_max(cfg: AlertSettings) -> int:
    """Rows of the ring of active windows: the longest horizon of either kind."""
    return max(*cfg.surge_horizons, *cfg.drop_horizons)


def new_state(cfg: AlertSettings) -> DetectorState:
    """An empty detector state for these settings."""
    return DetectorState(horizon_max=horizon_max(cfg), n_slots=max(fast_slots(cfg)))


def detect(
    state: DetectorState,
    window: int,
    counts: dict[str, float],
    total_w: float,
    total_w2: float,
    cfg: AlertSettings,
) -> list[Transition]:
    """Close one window: test every key, update the state in place, return raises and clears.

    ``counts``: weighted demand per key (``i:<item>``, ``c:<category>``) in the window;
    ``total_w`` / ``total_w2``: sum of the weights / squared weights of the window's events
    (item level, each event once). Windows must come in increasing order; an empty window
    (``total_w <= 0``) changes nothing.
    """
    if window <= state.last_window:
        raise ValueError(f"window {window} is not after the last closed window {state.last_window}")
    state.add_keys(list(counts))
    return _detect_vec(state, window, _vector(state, counts), total_w, total_w2, cfg)


def _vector(state: DetectorState, counts: dict[str, float]) -> np.ndarray:
    o = np.zeros(state.size, np.float64)
    if counts:
        idx = np.fromiter((state.index[k] for k in counts), np.int64, len(counts))
        o[idx] = np.fromiter(counts.values(), np.float64, len(counts))
    return o


def _detect_vec(
    state: DetectorState, window: int, o_w: np.ndarray, total_w: float, total_w2: float, cfg: AlertSettings
) -> list[Transition]:
    state.last_window = window
    if total_w <= 0:
        return []
    decay = 0.5 ** (1.0 / cfg.baseline_half_life_windows)
    o, total = _event_units(state, o_w, total_w, total_w2, decay)
    e = _expected_events(state, o, total)
    _push_window(state, window, o, e)
    assert state.ring_o is not None and state.sold_o is not None
    sold = np.flatnonzero(o > 0)
    state.sold_o[sold] = state.ring_o[:, sold].sum(axis=0, dtype=np.float64)
    # Baseline update after computing e: the window is tested against the past only.
    _update_baseline(state, o, total, decay)
    assert state.since_n is not None
    state.since_n = np.where(o > 0, 0.0, state.since_n + 1.0).astype(np.float32)
    tests = _test_horizons(state, cfg)
    return _transitions(state, window, tests, cfg)


def close_window(state: DetectorState, cfg: AlertSettings) -> list[Transition]:
    """Close the window the slots were filling (its last slot has passed): the hour tests."""
    if state.acc_window < 0:
        return []
    assert state.acc_o is not None
    window, o_w, w, w2 = state.acc_window, state.acc_o, state.acc_w, state.acc_w2
    state.acc_o = np.zeros(state.size, np.float64)
    state.acc_w = state.acc_w2 = 0.0
    state.acc_window = -1
    if window <= state.last_window:  # already closed (a replayed slot after a crash)
        return []
    return _detect_vec(state, window, o_w, w, w2, cfg)


def look(
    state: DetectorState,
    slot: int,
    counts: dict[str, float],
    total_w: float,
    total_w2: float,
    cfg: AlertSettings,
) -> list[Transition]:
    """Close one slot (``slot_s`` of event time): a sequential look at every key.

    The slot's demand is added to the window it belongs to (closed by :func:`close_window`
    when a slot of a later window arrives, or by the caller once the watermark passed it) and
    to the ring of recent slots; then the short surge horizons and the waiting-time drop test
    run on every key. Slots must come in increasing order; empty slots may be skipped.
    """
    if slot <= state.last_slot:
        raise ValueError(f"slot {slot} is not after the last closed slot {state.last_slot}")
    spw = slots_per_window(cfg)
    window = slot // spw
    out: list[Transition] = []
    if state.acc_window >= 0 and window > state.acc_window:
        out += close_window(state, cfg)
    state.last_slot = slot
    if total_w <= 0 or window <= state.last_window:
        return out
    state.add_keys(list(counts))
    assert state.acc_o is not None and state.since_e is not None and state.since_n is not None
    assert state.slot_o is not None and state.slot_t is not None and state.slot_idx is not None
    o_w = _vector(state, counts)
    state.acc_o += o_w
    state.acc_w += total_w
    state.acc_w2 += total_w2
    state.acc_window = window
    phi = _phi(state, total_w, total_w2)
    o, t = o_w / phi, total_w / phi
    state.since_e = np.where(o > 0, 0.0, state.since_e + _share_odds(state) * np.maximum(t - o, 0.0))
    state.since_n[o > 0] = 0.0
    if state.n_slots:
        row = slot % state.n_slots
        state.slot_o[row] = o
        state.slot_t[row] = t
        state.slot_idx[row] = slot
    decay = 0.5 ** (1.0 / (cfg.baseline_half_life_windows * spw))
    state.slot_num = decay * state.slot_num + t
    state.slot_den = decay * state.slot_den + 1.0
    out += _look_tests(state, cfg, slot, (slot + 1) * cfg.slot_s * 1000, None, wait=True)
    return out


def peek(
    state: DetectorState,
    slot: int,
    counts: dict[str, float],
    total_w: float,
    total_w2: float,
    cfg: AlertSettings,
    end_ms: int,
) -> list[Transition]:
    """Look at the open slot's partial demand (evidence so far, up to ``end_ms``) without
    consuming it: surges only; changes nothing but the alert flags of keys it raises."""
    if total_w <= 0 or slot <= state.last_slot:
        return []
    state.add_keys(list(counts))
    phi = _phi(state, total_w, total_w2)
    extra = (_vector(state, counts) / phi, total_w / phi)
    return _look_tests(state, cfg, slot, end_ms, extra, wait=False)


def _phi(state: DetectorState, total_w: float, total_w2: float) -> float:
    if state.disp_den > 0:
        return max(state.disp_num / state.disp_den, _TINY)
    return max(total_w2 / max(total_w, _TINY), _TINY)


def _share_odds(state: DetectorState) -> np.ndarray:
    share = np.minimum(state.share_num / max(state.share_den, _TINY), _MAX_SHARE)
    return share / (1.0 - share)


def wait_tail(state: DetectorState, cfg: AlertSettings) -> np.ndarray:
    """P(no event since each key's last one): NB zero term with the expected events since then
    and size ``nb_size`` per active window spanned (1 where nothing was expected)."""
    assert state.since_e is not None and state.since_n is not None
    n = cfg.nb_size * np.maximum(state.since_n.astype(np.float64), 1.0)
    return np.exp(-n * np.log1p(state.since_e / n))


def _look_tests(
    state: DetectorState,
    cfg: AlertSettings,
    slot: int,
    end_ms: int,
    extra: tuple[np.ndarray, float] | None,
    wait: bool,
) -> list[Transition]:
    """Short-horizon surge tests (and the waiting-time drop test) of one look; raises only."""
    assert state.slot_o is not None and state.slot_t is not None and state.slot_idx is not None
    assert state.since_e is not None and state.since_n is not None
    K = state.size
    spw = slots_per_window(cfg)
    rate = state.slot_num / max(state.slot_den, _TINY)  # the shop's events per active slot
    enabled = [h for h in fast_slots(cfg) if h <= state.n_slots and rate * h >= cfg.fast_min_shop_events]
    eligible = state.seen > cfg.warmup_windows
    idle = state.alert == NONE
    odds = _share_odds(state)
    best_p = np.ones(K)
    best_g = np.ones(K)
    best_o = np.zeros(K)
    best_e = np.zeros(K)
    best_h = np.ones(K, np.int64)
    sums: list[tuple[np.ndarray, np.ndarray]] = []
    for h in enabled:
        rows = np.flatnonzero((state.slot_idx >= 0) & (state.slot_idx > slot - h))
        O = state.slot_o[rows].sum(axis=0, dtype=np.float64)  # noqa: E741
        T = float(state.slot_t[rows].sum())
        if extra is not None:
            O = O + extra[0]  # noqa: E741
            T += extra[1]
        E = odds * np.maximum(T - O, 0.0)
        sums.append((O, E))
        guard = (O >= cfg.fast_min_surge_count) & (O >= cfg.min_surge_ratio * E)
        idx = np.flatnonzero((O > E) & ((guard & eligible) | (state.alert == SURGE)))
        if not idx.size:
            continue
        p = nb_upper_tail(O[idx], E[idx], cfg.nb_size)
        better = p < best_p[idx]
        best_p[idx] = np.where(better, p, best_p[idx])
        g = np.where(guard[idx], p, 1.0)
        gbetter = g < best_g[idx]
        sel = idx[gbetter]
        best_g[sel] = g[gbetter]
        best_o[sel], best_e[sel], best_h[sel] = O[sel], E[sel], h
    n_fast = max(1, len(enabled))
    p_corr = np.minimum(best_p * n_fast, 1.0)
    g_corr = np.minimum(best_g * n_fast, 1.0)
    state.fast_p = p_corr.astype(np.float32)
    raise_up = np.flatnonzero(idle & eligible & (g_corr <= cfg.fast_p_raise))
    if raise_up.size:

        def fast_test(j: int, cats: np.ndarray, o: np.ndarray, e: np.ndarray) -> np.ndarray:
            p = _guarded_upper_tail(o, e, cfg.nb_size, cfg.fast_min_surge_count, cfg.min_surge_ratio)
            return np.minimum(p * n_fast, 1.0)

        busy = _busy(state, raise_up, SURGE)
        raise_up = raise_up[~_explained(state, raise_up, busy, sums, fast_test, cfg.fast_p_raise)]
    window = slot // spw
    out = [
        _fast_transition(state, cfg, i, int(best_h[i]), slot, end_ms, best_o, best_e, g_corr)
        for i in raise_up.tolist()
    ]
    state.alert[raise_up] = SURGE
    if wait:
        out += _wait_tests(state, cfg, window, end_ms, eligible)
    return out


def _fast_transition(
    state: DetectorState,
    cfg: AlertSettings,
    i: int,
    h: int,
    slot: int,
    end_ms: int,
    best_o: np.ndarray,
    best_e: np.ndarray,
    g_corr: np.ndarray,
) -> Transition:
    """The surge raised for key ``i`` by its best short horizon of ``h`` slots."""
    spw = slots_per_window(cfg)
    return Transition(
        key=state.keys[i],
        level=int(state.levels[i]),
        kind=SURGE,
        raised=True,
        observed=float(best_o[i]),
        expected=float(best_e[i]),
        score=float(-np.log10(max(float(g_corr[i]), 1e-300))),
        first_window=(slot - h + 1) // spw,
        window=slot // spw,
        start_ms=(slot - h + 1) * cfg.slot_s * 1000,
        end_ms=end_ms,
        source="fast",
    )


def _wait_tests(
    state: DetectorState, cfg: AlertSettings, window: int, end_ms: int, eligible: np.ndarray
) -> list[Transition]:
    """Waiting-time drop test: an item with no event for longer than its recent demand makes likely.

    Items only: a stock-out is a product's. A category's quiet spell is no stock-out (its
    buyers come in clumps the per-window dispersion does not describe: on the untouched Online
    Retail year 5 of its 6 waiting-time alerts were followed by the same demand as before); a
    category's real collapse is left to the window tests of ``drop_horizons``."""
    assert state.since_e is not None and state.since_n is not None
    out: list[Transition] = []
    cand = np.flatnonzero(
        (state.alert == NONE)
        & eligible
        & (state.levels == LEVEL_ITEM)
        & (state.since_e >= cfg.min_drop_expected)
        & (state.since_n <= cfg.wait_max_windows)
    )
    if cand.size:  # ...that were actually selling before the silence (not a stale share after a
        # past drop): the longest horizon up to its last sale, not the ring now, which empties
        # as the silence goes on and hid most stock-outs of steady sellers
        assert state.sold_o is not None
        cand = cand[state.sold_o[cand] >= cfg.min_drop_expected]
    if cand.size:
        tail = wait_tail(state, cfg)
        hit = cand[tail[cand] <= cfg.wait_p_raise]
        for i in hit.tolist():
            p = float(tail[i])
            n_w = int(state.since_n[i])
            out.append(
                Transition(
                    key=state.keys[i],
                    level=int(state.levels[i]),
                    kind=DROP,
                    raised=True,
                    observed=0.0,
                    expected=float(state.since_e[i]),
                    score=float(-np.log10(max(p, 1e-300))),
                    first_window=window - n_w,
                    window=window,
                    start_ms=(window - n_w) * cfg.window_s * 1000,
                    end_ms=end_ms,
                    source="wait",
                )
            )
        state.alert[hit] = DROP
    return out


def _guarded_upper_tail(
    o: np.ndarray, e: np.ndarray, size: float, min_count: float, ratio: float
) -> np.ndarray:
    """NB upper tail of each (o, e) where the surge guards hold (o > e, o >= min_count,
    o >= ratio * e), else 1."""
    ok = (o > e) & (o >= min_count) & (o >= ratio * e)
    p = np.ones(o.size)
    if ok.any():
        p[ok] = nb_upper_tail(o[ok], e[ok], size)
    return p


def _busy(state: DetectorState, raising: np.ndarray, kind: int) -> np.ndarray:
    """Item keys alerting with ``kind`` or raising it now (``raising``), that have a category."""
    assert state.parent is not None
    mask = state.alert == kind
    mask[raising] = True
    return np.flatnonzero(mask & (state.levels == LEVEL_ITEM) & (state.parent >= 0))


def _explained(
    state: DetectorState,
    cand: np.ndarray,
    busy: np.ndarray,
    sums: Sequence[tuple[np.ndarray, np.ndarray]],
    test: Callable[[int, np.ndarray, np.ndarray, np.ndarray], np.ndarray],
    threshold: float,
) -> np.ndarray:
    """Which of the keys ``cand`` are categories whose evidence is that of their busy items.

    A product that surges (or stops selling) moves its category too, and a category made of one
    or two products would then raise a second alert for the same episode. For each candidate
    category with items in ``busy`` (alerting or raising with the same kind), the busy items'
    observed and expected events are taken out of the category's sums (``sums``: (O, E) over
    all keys per horizon) and ``test(j, cats, O, E)`` (the corrected, guarded tail of horizon
    ``j``) runs on what is left; the category is explained when no horizon passes
    ``threshold``. Returns a boolean mask over ``cand``.
    """
    assert state.parent is not None
    out = np.zeros(cand.size, bool)
    if not cand.size or not busy.size or not sums:
        return out
    par = state.parent[busy]
    cats = cand[(state.levels[cand] == LEVEL_CATEGORY) & np.isin(cand, par)]
    if not cats.size:
        return out
    best = np.ones(cats.size)
    for j, (O, E) in enumerate(sums):  # noqa: E741
        o_kids = np.bincount(par, weights=O[busy], minlength=state.size)[cats]
        e_kids = np.bincount(par, weights=E[busy], minlength=state.size)[cats]
        o = np.maximum(O[cats] - o_kids, 0.0)
        e = np.maximum(E[cats] - e_kids, 0.0)
        best = np.minimum(best, test(j, cats, o, e))
    return np.isin(cand, cats[best > threshold])


def _event_units(
    state: DetectorState, o_w: np.ndarray, total_w: float, total_w2: float, decay: float
) -> tuple[np.ndarray, float]:
    """Update the dispersion factor; the window's observed events per key and in total.

    Weighted demand is divided by ``phi = sum(w^2) / sum(w)`` (decayed like the baseline) to
    turn weighted units into event units.
    """
    state.disp_num = decay * state.disp_num + total_w2
    state.disp_den = decay * state.disp_den + total_w
    phi = max(state.disp_num / max(state.disp_den, _TINY), _TINY)

    return o_w / phi, total_w / phi


def _expected_events(state: DetectorState, o: np.ndarray, total: float) -> np.ndarray:
    """Expected events per key: ``s_k / (1 - s_k)`` times the window's other (leave-one-out) demand."""
    share = np.minimum(state.share_num / max(state.share_den, _TINY), _MAX_SHARE)
    others = np.maximum(total - o, 0.0)
    return share / (1.0 - share) * others


def _push_window(state: DetectorState, window: int, o: np.ndarray, e: np.ndarray) -> None:
    """Push the window into the ring of active windows."""
    H = state.horizon_max
    assert state.ring_o is not None and state.ring_e is not None and state.ring_w is not None
    state.ring_o[state.pos] = o
    state.ring_e[state.pos] = e
    state.ring_w[state.pos] = window
    state.pos = (state.pos + 1) % H
    state.filled = min(state.filled + 1, H)


def _update_baseline(state: DetectorState, o: np.ndarray, total: float, decay: float) -> None:
    """Decay the baseline shares and add the window; count the windows each key was seen in."""
    was_seen = (state.share_num > 0) | (o > 0)
    state.share_num = decay * state.share_num + o
    state.share_den = decay * state.share_den + total
    state.seen = state.seen + was_seen.astype(np.int32)
    state.active_windows += 1


@dataclass
class _HorizonTests:
    """Tail probabilities and sums per (horizon, key), rows in the order of ``horizons``."""

    horizons: list[int]  # union of both kinds' horizons, ascending
    n_up: int  # number of distinct surge horizons (Bonferroni factor)
    n_dn: int  # number of distinct drop horizons
    p_up: np.ndarray  # upper tails (1 where not tested or not a surge horizon)
    p_dn: np.ndarray  # lower tails
    g_up: np.ndarray  # upper tails where the surge guards hold, else 1 (for raising)
    g_dn: np.ndarray  # lower tails where the drop guards hold, else 1
    observed: np.ndarray  # O_h
    expected: np.ndarray  # E_h


def _test_horizons(state: DetectorState, cfg: AlertSettings) -> _HorizonTests:
    """Sum the ring over each horizon and compute the surge / drop tails of every key."""
    n_keys = state.size
    H = state.horizon_max
    assert state.ring_o is not None and state.ring_e is not None
    up_h = sorted(set(cfg.surge_horizons))
    dn_h = sorted(set(cfg.drop_horizons))
    horizons = sorted(set(up_h) | set(dn_h))
    n_h = len(horizons)
    p_up = np.ones((n_h, n_keys))
    p_dn = np.ones((n_h, n_keys))
    g_up = np.ones((n_h, n_keys))
    g_dn = np.ones((n_h, n_keys))
    O_all = np.zeros((n_h, n_keys))
    E_all = np.zeros((n_h, n_keys))
    for j, h in enumerate(horizons):
        hh = min(h, state.filled)
        rows = (state.pos - 1 - np.arange(hh)) % H
        O = state.ring_o[rows].sum(axis=0, dtype=np.float64)  # noqa: E741
        E = state.ring_e[rows].sum(axis=0, dtype=np.float64)
        O_all[j], E_all[j] = O, E
        size = cfg.nb_size * hh
        # Only evaluate tails where they can matter (most keys sit at O = 0, E ~ 0).
        if h in up_h:
            up_idx = np.flatnonzero(O > E)
            if up_idx.size:
                p_up[j, up_idx] = nb_upper_tail(O[up_idx], E[up_idx], size)
            ok_up = (O >= cfg.min_surge_count) & (O >= cfg.min_surge_ratio * E)
            g_up[j] = np.where(ok_up, p_up[j], 1.0)
        if h in dn_h:
            dn_idx = np.flatnonzero((O < E) & (E > 0))
            if dn_idx.size:
                p_dn[j, dn_idx] = nb_lower_tail(O[dn_idx], E[dn_idx], size)
            ok_dn = (E >= cfg.min_drop_expected) & (O <= cfg.max_drop_ratio * E)
            g_dn[j] = np.where(ok_dn, p_dn[j], 1.0)
    return _HorizonTests(horizons, len(up_h), len(dn_h), p_up, p_dn, g_up, g_dn, O_all, E_all)


def _transitions(
    state: DetectorState, window: int, tests: _HorizonTests, cfg: AlertSettings
) -> list[Transition]:
    """Raise and clear alerts from the horizon tests; update ``state.alert``; return the transitions."""
    eligible = state.seen > cfg.warmup_windows
    # Bonferroni over the horizons of each kind: compare p * n_horizons with p_raise.
    best_up = np.minimum(tests.g_up.min(axis=0) * tests.n_up, 1.0)
    best_dn = np.minimum(tests.g_dn.min(axis=0) * tests.n_dn, 1.0)
    idle = state.alert == NONE
    raise_up = np.flatnonzero(idle & eligible & (best_up <= cfg.p_raise) & (best_up <= best_dn))
    raise_dn = np.flatnonzero(idle & eligible & (best_dn <= cfg.p_raise) & (best_dn < best_up))
    raise_up = raise_up[~_explained_windows(state, tests, cfg, raise_up, SURGE)]
    raise_dn = raise_dn[~_explained_windows(state, tests, cfg, raise_dn, DROP)]
    # A key raised by a look clears only once its short horizons and its waiting time are quiet too.
    assert state.fast_p is not None
    fast_quiet = state.fast_p > cfg.p_clear
    wait_quiet = wait_tail(state, cfg) > cfg.p_clear
    clear_up = np.flatnonzero((state.alert == SURGE) & (tests.p_up.min(axis=0) > cfg.p_clear) & fast_quiet)
    clear_dn = np.flatnonzero((state.alert == DROP) & (tests.p_dn.min(axis=0) > cfg.p_clear) & wait_quiet)
    out: list[Transition] = []
    for keys, kind, raised, p_mat in (
        (raise_up, SURGE, True, tests.g_up),
        (raise_dn, DROP, True, tests.g_dn),
        (clear_up, SURGE, False, tests.p_up),
        (clear_dn, DROP, False, tests.p_dn),
    ):
        out.extend(_transition(state, window, tests, int(i), kind, raised, p_mat) for i in keys)
    state.alert[raise_up] = SURGE
    state.alert[raise_dn] = DROP
    state.alert[clear_up] = NONE
    state.alert[clear_dn] = NONE
    return out


def _explained_windows(
    state: DetectorState, tests: _HorizonTests, cfg: AlertSettings, raising: np.ndarray, kind: int
) -> np.ndarray:
    """:func:`_explained` for the window tests of one kind (mask over ``raising``)."""
    if not raising.size:
        return np.zeros(0, bool)
    hs = sorted(set(cfg.surge_horizons if kind == SURGE else cfg.drop_horizons))
    rows = [tests.horizons.index(h) for h in hs]
    n_h = tests.n_up if kind == SURGE else tests.n_dn

    def test(j: int, cats: np.ndarray, o: np.ndarray, e: np.ndarray) -> np.ndarray:
        size = cfg.nb_size * min(hs[j], state.filled)
        if kind == SURGE:
            p = _guarded_upper_tail(o, e, size, cfg.min_surge_count, cfg.min_surge_ratio)
        else:
            ok = (o < e) & (e >= cfg.min_drop_expected) & (o <= cfg.max_drop_ratio * e)
            p = np.ones(o.size)
            if ok.any():
                p[ok] = nb_lower_tail(o[ok], e[ok], size)
        return np.minimum(p * n_h, 1.0)

    sums = [(tests.observed[r], tests.expected[r]) for r in rows]
    return _explained(state, raising, _busy(state, raising, kind), sums, test, cfg.p_raise)


def _transition(
    state: DetectorState,
    window: int,
    tests: _HorizonTests,
    i: int,
    kind: int,
    raised: bool,
    p_mat: np.ndarray,
) -> Transition:
    """The transition of key ``i``, reported at its deciding (smallest-p) horizon."""
    j = int(np.argmin(p_mat[:, i]))
    p = min(1.0, float(p_mat[j, i]) * (tests.n_up if kind == SURGE else tests.n_dn))
    hh = min(tests.horizons[j], state.filled)
    assert state.ring_w is not None
    return Transition(
        key=state.keys[i],
        level=int(state.levels[i]),
        kind=kind,
        raised=raised,
        observed=float(tests.observed[j, i]),
        expected=float(tests.expected[j, i]),
        score=float(-np.log10(max(p, 1e-300))),
        first_window=int(state.ring_w[(state.pos - hh) % state.horizon_max]),
        window=window,
    )
