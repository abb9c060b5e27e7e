"""The profile model: pure numpy, vectorised over a batch of users.

A user's profile holds

* a **long-term vector**: the time-decayed weighted mean of the item vectors the user
  touched, ``sum_i w_i 2^(-(T - t_i)/H) h_i / sum_i w_i 2^(-(T - t_i)/H)``, with the weight
  ``w_i`` of the event type (view 1, click 2, add_to_cart 4, purchase 6 by default) and the
  half-life ``H = profile.long_term_half_life_s`` in event time;
* a **session vector**: the same with the short ``profile.session_half_life_s``, over the
  events of the current session only. A session ends after ``profile.session_inactivity_s`` of
  inactivity or when the event's ``session_id`` differs from the previous event's (both set);
* a **query-intent vector**: the encoded query of the user's latest search (by event time);
* counts by event type, the last event time and id, and bounded lists of recent items
  (most recent first, unique) and purchased items with their purchase counts (for filtering
  or buy-again).

Ordering rules (what keeps a profile a function of the events, whatever the batching):

* A batch's events of one user are applied in event-time order (stable: ties keep arrival order).
* The long-term sum is order-independent: every event is decayed against its own time, so an
  event *older* than the user's last applied event (a late event) is applied exactly as if it
  had arrived in order.
* A late event (``ts`` < the user's ``last_ts`` before the batch) also counts, and a late
  purchase joins the purchased items; it does not change the session vector, the session id,
  the recent items or the last event id, which describe the present. A late search replaces
  the query only if it is newer than the stored query.

The stored vectors are means (unit-free weights cancel), so the reference time of a vector
only matters when more events are added; it is kept as ``long_term_ts`` and ``last_ts``.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import sparse

from streamrec.events import EventType
from streamrec.settings import ProfileSettings

EVENT_TYPES: tuple[EventType, ...] = tuple(EventType)
TYPE_INDEX = {t: i for i, t in enumerate(EVENT_TYPES)}
_TYPE_NAMES: tuple[str, ...] = tuple(t.value for t in EVENT_TYPES)
_TS = operator.itemgetter(2)  # the time of a recent event [item_id, type, ts]
SEARCH = TYPE_INDEX[EventType.SEARCH]
PURCHASE = TYPE_INDEX[EventType.PURCHASE]
_NO_TS = np.iinfo(np.int64).min


@dataclass
class Profile:
    """One user's profile as stored in Redis (vectors are float32, ``None`` when absent).

    Its Redis representation is ``profiles.store._Blob`` (one msgpack record per user).
    """

    user_id: str
    long_term: np.ndarray | None = None
    session: np.ndarray | None = None
    query: np.ndarray | None = None
    query_text: str | None = None
    query_ts: int | None = None
    last_ts: int | None = None  # epoch ms of the newest applied event
    n_events: dict[str, int] = field(default_factory=dict)
    recent_items: list[str] = field(default_factory=list)  # most recent first
    # [item_id, type, ts] of the newest item events by event time (ties: later arrival first)
    recent_events: list[list] = field(default_factory=list)
    purchased_items: list[str] = field(default_factory=list)  # most recent first
    purchase_counts: dict[str, int] = field(default_factory=dict)  # purchase events per purchased item
    last_event_id: str | None = None
    session_id: str | None = None
    # State behind the vectors (needed to add events to them).
    long_term_weight: float = 0.0
    long_term_ts: int | None = None  # reference time of long_term_weight
    session_weight: float = 0.0  # referenced at last_ts
    model_version: str | None = None  # item-vector model the vectors live in
    version: int = 0  # optimistic-concurrency version of the stored hash
    offsets: dict[str, int] = field(default_factory=dict)  # "topic:partition" -> newest applied offset
    dedupe_horizon_ts: int = 0  # events older than this are stale (see profiles.store)

    @property
    def total_events(self) -> int:
        return sum(self.n_events.values())


def type_weights(cfg: ProfileSettings) -> np.ndarray:
    """Weight of each event type in ``EVENT_TYPES`` order (search moves no item vector)."""
    weights = {
        EventType.VIEW: cfg.weight_view,
        EventType.CLICK: cfg.weight_click,
        EventType.ADD_TO_CART: cfg.weight_add_to_cart,
        EventType.PURCHASE: cfg.weight_purchase,
        EventType.SEARCH: 0.0,
    }
    return np.array([weights[t] for t in EVENT_TYPES], np.float64)


@dataclass
class EventColumns:
    """A batch of events to apply, columnar. ``user`` indexes the ``profiles`` list of :func:`apply`."""

    user: np.ndarray  # (E,) int64
    ts: np.ndarray  # (E,) int64 epoch ms
    type: np.ndarray  # (E,) int64 index into EVENT_TYPES
    vectors: np.ndarray  # (E, dim) float32 item vectors; zero rows for searches
    event_ids: Sequence[str]
    item_ids: Sequence[str | None]
    session_ids: Sequence[str | None]
    queries: Sequence[str | None]
    query_vectors: np.ndarray | None = None  # (E, dim) float32, rows used for searches only
    has_query_vector: np.ndarray | None = None  # (E,) bool

    def __len__(self) -> int:
        return int(self.user.shape[0])


@dataclass
class _Sorted:
    """The batch in (user, event time) order; user k's events are ``starts[k]:ends[k]``."""

    ev: EventColumns
    order: np.ndarray  # (E,) sorted position -> row of ``ev``
    u: np.ndarray  # (E,) user of each sorted event
    ts: np.ndarray  # (E,) event time
    typ: np.ndarray  # (E,) index into EVENT_TYPES
    H: np.ndarray  # (E, dim) float64 item vectors
    w: np.ndarray  # (E,) weight of the event's type
    weighted: np.ndarray  # (E,) w > 0: the event moves the vectors
    starts: np.ndarray  # (m,) first sorted position of each user
    ends: np.ndarray  # (m,) one past the last sorted position of each user
    idx: np.ndarray  # (E,) arange
    sids: list[str | None]  # session ids, sorted


@dataclass
class _Stored:
    """The users' stored state, as arrays (vectors as float64 means)."""

    last: np.ndarray  # (m,) int64, _NO_TS for a new user
    has_last: np.ndarray  # (m,) bool
    lt_w: np.ndarray  # (m,) long-term weight
    lt_ref: np.ndarray  # (m,) reference time of lt_w
    lt_mean: np.ndarray  # (m, dim)
    se_w: np.ndarray  # (m,) session weight, referenced at last
    se_mean: np.ndarray  # (m, dim)
    sid: list[str | None]  # (m,) session id


@dataclass
class _Session:
    """Per event: not late; per user: the new session state (valid where ``has_nonlate``)."""

    nonlate: np.ndarray  # (E,) bool
    has_nonlate: np.ndarray  # (m,) bool: some event of the user is not late
    last_nonlate: np.ndarray  # (m,) sorted position of the user's newest non-late event
    weight: np.ndarray  # (m,)
    sum: np.ndarray  # (m, dim) weighted sum


@dataclass
class _Update:
    """Everything :func:`apply` computed for the batch, per user."""

    lt_w: np.ndarray  # (m,) new long-term weight
    lt_sum: np.ndarray  # (m, dim) new long-term weighted sum
    lt_ref: np.ndarray  # (m,) new long-term reference time
    session: _Session
    counts: np.ndarray  # (m, len(EVENT_TYPES)) events of the batch by type
    last: np.ndarray  # (m,) new last event time
    last_search: np.ndarray  # (m,) sorted position of the user's latest search, -1 if none


def _segment_starts(u: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.r_[True, u[1:] != u[:-1]])


def _front_unique(new_first: list[str], old: Sequence[str], limit: int) -> list[str]:
    """``new_first`` then ``old``, first occurrence kept, truncated to ``limit``."""
    return list(dict.fromkeys([*new_first, *old]))[:limit]


def apply(
    profiles: Sequence[Profile],
    ev: EventColumns,
    cfg: ProfileSettings,
    dim: int,
    model_version: str | None = None,
) -> list[Profile]:
    """Apply a batch of (already de-duplicated) events; return the new profiles.

    ``profiles[k]`` is user k's current profile (an empty :class:`Profile` for a new user);
    every user must have at least one event in ``ev``. The result is in the same order.
    The maths is vectorised over all events and users of the batch; only the bounded item
    lists are maintained per user in Python.
    """
    m = len(profiles)
    if m == 0:
        return []
    b = _sort_events(ev, m, cfg)
    s = _stored_state(profiles, dim)
    lt_w, lt_sum, lt_ref = _long_term(b, s, cfg)
    is_search = b.typ == SEARCH
    upd = _Update(
        lt_w=lt_w,
        lt_sum=lt_sum,
        lt_ref=lt_ref,
        session=_session(b, s, cfg),
        counts=np.bincount(b.u * len(EVENT_TYPES) + b.typ, minlength=m * len(EVENT_TYPES)).reshape(
            m, len(EVENT_TYPES)
        ),
        last=np.maximum(s.last, np.maximum.reduceat(b.ts, b.starts)),
        last_search=np.maximum.reduceat(np.where(is_search, b.idx, -1), b.starts),
    )
    rows = _Rows(b, upd)
    return [_new_profile(k, p, b, rows, cfg, model_version) for k, p in enumerate(profiles)]


def _sort_events(ev: EventColumns, m: int, cfg: ProfileSettings) -> _Sorted:
    """Sort the batch by user, then event time (stable: ties keep arrival order)."""
    order = np.argsort(ev.ts, kind="stable")
    order = order[np.argsort(ev.user[order], kind="stable")]
    u = ev.user[order]
    typ = ev.type[order]
    H = ev.vectors[order].astype(np.float64)
    starts = _segment_starts(u)
    if len(starts) != m or not np.array_equal(u[starts], np.arange(m)):
        raise ValueError("apply() needs at least one event for every profile, users indexed 0..m-1")
    E = len(u)
    w = type_weights(cfg)[typ]
    return _Sorted(
        ev=ev,
        order=order,
        u=u,
        ts=ev.ts[order],
        typ=typ,
        H=H,
        w=w,
        weighted=w > 0,
        starts=starts,
        ends=np.r_[starts[1:], E],
        idx=np.arange(E),
        sids=[ev.session_ids[i] for i in order],
    )


def _stored_state(profiles: Sequence[Profile], dim: int) -> _Stored:
    m = len(profiles)
    last = np.array([p.last_ts if p.last_ts is not None else _NO_TS for p in profiles], np.int64)
    lt_w = np.array([p.long_term_weight if p.long_term is not None else 0.0 for p in profiles], np.float64)
    lt_ref = np.array([p.long_term_ts if p.long_term_ts is not None else _NO_TS for p in profiles], np.int64)
    lt_mean = np.zeros((m, dim), np.float64)
    se_w = np.array([p.session_weight if p.session is not None else 0.0 for p in profiles], np.float64)
    se_mean = np.zeros((m, dim), np.float64)
    for k, p in enumerate(profiles):
        if p.long_term is not None and lt_w[k] > 0:
            lt_mean[k] = p.long_term
        if p.session is not None and se_w[k] > 0:
            se_mean[k] = p.session
    return _Stored(
        last=last,
        has_last=last != _NO_TS,
        lt_w=lt_w,
        lt_ref=lt_ref,
        lt_mean=lt_mean,
        se_w=se_w,
        se_mean=se_mean,
        sid=[p.session_id for p in profiles],
    )


def _segment_sums(c: np.ndarray, b: _Sorted) -> np.ndarray:
    """Per user, the sum of its events' vectors weighted by ``c``: one sparse (users x events)
    product, ~15x faster than weighting every vector and summing the segments."""
    E = len(c)
    W = sparse.csr_matrix((c, np.arange(E), np.r_[b.starts, E]), shape=(len(b.starts), E))
    return np.asarray(W @ b.H)


def _long_term(b: _Sorted, s: _Stored, cfg: ProfileSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """New long-term (weight, weighted sum, reference time) per user: closed form, order-independent."""
    H_lt = cfg.long_term_half_life_s * 1000.0
    ts, u, starts = b.ts, b.u, b.starts
    ev_max = np.maximum.reduceat(np.where(b.weighted, ts, _NO_TS), starts)
    ref = np.maximum(np.where(s.lt_w > 0, s.lt_ref, _NO_TS), ev_max)  # new reference time per user
    touched = ref != _NO_TS
    ref_f = np.where(touched, ref, 0).astype(np.float64)
    c = np.where(b.weighted, b.w * np.exp2(np.minimum(ts - ref_f[u], 0.0) / H_lt), 0.0)
    S = _segment_sums(c, b)
    C = np.add.reduceat(c, starts)
    old = np.where(
        s.lt_w > 0, s.lt_w * np.exp2(np.minimum(s.lt_ref.astype(np.float64) - ref_f, 0.0) / H_lt), 0.0
    )
    return old + C, s.lt_mean * old[:, None] + S, ref


def _session_resets(b: _Sorted, s: _Stored, nonlate: np.ndarray, cfg: ProfileSettings) -> np.ndarray:
    """Non-late events that start a new session (inactivity, changed session id or first event)."""
    u, ts = b.u, b.ts
    timeout_ms = cfg.session_inactivity_s * 1000.0
    first_of_user = np.zeros(len(u), bool)
    first_of_user[b.starts] = True
    # Late events sort before the non-late ones of their user, so the previous non-late event
    # of a non-late event i is i-1 unless i-1 is late or another user's (then: stored state).
    prev_is_batch = ~first_of_user & np.r_[False, nonlate[:-1]]
    prev_ts = np.where(prev_is_batch, np.r_[_NO_TS, ts[:-1]], s.last[u])
    has_prev = prev_is_batch | s.has_last[u]
    sids = b.sids
    sid_change = np.zeros(len(u), bool)
    for i in np.flatnonzero(nonlate):
        prev_sid = sids[i - 1] if prev_is_batch[i] else s.sid[u[i]]
        if sids[i] is not None and prev_sid is not None and sids[i] != prev_sid:
            sid_change[i] = True
    gap = np.where(has_prev, ts.astype(np.float64) - prev_ts.astype(np.float64), np.inf)
    return nonlate & (~has_prev | (gap > timeout_ms) | sid_change)


def _session(b: _Sorted, s: _Stored, cfg: ProfileSettings) -> _Session:
    """The session vectors: in event-time order over the non-late events."""
    u, ts, idx, starts, last, se_w = b.u, b.ts, b.idx, b.starts, s.last, s.se_w
    H_se = cfg.session_half_life_s * 1000.0
    nonlate = ~(s.has_last[u] & (ts < last[u]))
    reset = _session_resets(b, s, nonlate, cfg)
    last_reset = np.maximum.reduceat(np.where(reset, idx, -1), starts)
    has_nonlate = np.maximum.reduceat(nonlate.astype(np.int64), starts) > 0
    last_nonlate = np.maximum.reduceat(np.where(nonlate, idx, -1), starts)
    se_ref = np.where(has_nonlate, ts[np.maximum(last_nonlate, 0)], last).astype(np.float64)
    in_session = nonlate & (idx >= last_reset[u])
    cs = np.where(in_session & b.weighted, b.w * np.exp2(np.minimum(ts - se_ref[u], 0.0) / H_se), 0.0)
    S_se = _segment_sums(cs, b)
    C_se = np.add.reduceat(cs, starts)
    keep_old = has_nonlate & (last_reset < 0) & (se_w > 0)
    old_se = np.where(keep_old, se_w * np.exp2(np.minimum(last.astype(np.float64) - se_ref, 0.0) / H_se), 0.0)
    return _Session(
        nonlate=nonlate,
        has_nonlate=has_nonlate,
        last_nonlate=last_nonlate,
        weight=np.where(has_nonlate, old_se + C_se, se_w),
        sum=np.where(has_nonlate[:, None], s.se_mean * old_se[:, None] + S_se, s.se_mean * se_w[:, None]),
    )


class _Rows:
    """What :func:`_new_profile` reads, as Python lists built once per batch: indexing a numpy
    array per user and per event (a scalar object each time) cost more than the maths."""

    def __init__(self, b: _Sorted, upd: _Update) -> None:
        se = upd.session
        self.counts = upd.counts.tolist()
        self.last = upd.last.tolist()
        self.lt_w = upd.lt_w.tolist()
        self.lt_ref = upd.lt_ref.tolist()
        # the means, divided as one array (the same numbers as row by row), float32 like stored
        self.long_term = _means(upd.lt_sum, upd.lt_w)
        self.has_nonlate = se.has_nonlate.tolist()
        self.last_nonlate = se.last_nonlate.tolist()
        self.se_w = se.weight.tolist()
        self.session = _means(se.sum, se.weight)
        self.last_search = upd.last_search.tolist()
        self.starts, self.ends = b.starts.tolist(), b.ends.tolist()
        self.typ = b.typ.tolist()
        self.ts = b.ts.tolist()
        self.nonlate = se.nonlate.tolist()
        self.order = b.order.tolist()
        item_ids = b.ev.item_ids
        self.item = [item_ids[i] for i in self.order]  # item id of each sorted event


def _means(sums: np.ndarray, weights: np.ndarray) -> list[np.ndarray | None]:
    """Row k: ``sums[k] / weights[k]`` as float32 (its own array: a profile kept in the store's
    cache must not hold the batch's matrix), None where the weight is not positive."""
    pos = weights > 0
    out: list[np.ndarray | None] = [None] * len(weights)
    if pos.any():
        rows = np.flatnonzero(pos)
        means = (sums[rows] / weights[rows, None]).astype(np.float32)
        for r, k in enumerate(rows.tolist()):
            out[k] = means[r].copy()
    return out


def _new_profile(
    k: int, p: Profile, b: _Sorted, r: _Rows, cfg: ProfileSettings, model_version: str | None
) -> Profile:
    """User k's profile after the batch."""
    n_events = dict(p.n_events)
    for name, cnt in zip(_TYPE_NAMES, r.counts[k], strict=True):
        if cnt:
            n_events[name] = n_events.get(name, 0) + cnt
    q = Profile.__new__(Profile)  # a shallow copy (dataclasses.replace re-runs __init__: 3x slower)
    q.__dict__.update(p.__dict__)
    q.last_ts = r.last[k]
    q.n_events = n_events
    q.model_version = model_version if model_version is not None else p.model_version
    q.offsets = dict(p.offsets)
    if r.lt_w[k] > 0:
        q.long_term = r.long_term[k]
        q.long_term_weight = r.lt_w[k]
        q.long_term_ts = r.lt_ref[k]
    lo, hi = r.starts[k], r.ends[k]
    if r.has_nonlate[k]:
        _set_present(q, p, k, lo, hi, b, r, cfg)
    _add_purchases(q, p, lo, hi, r, cfg)
    _add_recent_events(q, p, lo, hi, r, cfg)
    _set_query(q, p, k, b, r)
    return q


def _set_present(
    q: Profile, p: Profile, k: int, lo: int, hi: int, b: _Sorted, r: _Rows, cfg: ProfileSettings
) -> None:
    """Session vector, session id, last event id and recent items (from the non-late events)."""
    if r.se_w[k] > 0:
        q.session = r.session[k]
        q.session_weight = r.se_w[k]
    else:
        q.session, q.session_weight = None, 0.0
    j = r.last_nonlate[k]
    q.session_id = b.sids[j]
    q.last_event_id = b.ev.event_ids[r.order[j]]
    nonlate, typ, item = r.nonlate, r.typ, r.item
    recent_new = [
        it for i in range(hi - 1, lo - 1, -1) if nonlate[i] and typ[i] != SEARCH and (it := item[i])
    ]
    if recent_new:
        q.recent_items = _front_unique(recent_new, p.recent_items, cfg.recent_items)


def _add_purchases(q: Profile, p: Profile, lo: int, hi: int, r: _Rows, cfg: ProfileSettings) -> None:
    """Purchased items (late purchases included) and their purchase counts.

    Applied one purchase at a time in event order, so the bounded state is a function of the
    events whatever the batching: an item pushed out of the capped list loses its count, and
    one that comes back starts again at 1.
    """
    typ, item = r.typ, r.item
    bought = [it for i in range(lo, hi) if typ[i] == PURCHASE and (it := item[i])]
    if not bought:
        return
    items = list(p.purchased_items)
    counts = dict(p.purchase_counts)
    cap = cfg.purchased_items
    for it in bought:  # oldest first
        if it in items:
            items.remove(it)
        items.insert(0, it)
        counts[it] = counts.get(it, 0) + 1
        for gone in items[cap:]:
            counts.pop(gone, None)
        del items[cap:]
    q.purchased_items = items
    q.purchase_counts = {i: counts[i] for i in items if i in counts}


def _add_recent_events(q: Profile, p: Profile, lo: int, hi: int, r: _Rows, cfg: ProfileSettings) -> None:
    """The newest ``cfg.recent_events`` item events, late ones included, by event time.

    A total order (event time, then arrival) whose top N does not depend on where batches were
    cut: the batch's events (sorted by time, stable) come after every stored one in arrival.
    """
    if cfg.recent_events <= 0:
        return
    typ, item, ts = r.typ, r.item, r.ts
    new = [
        [it, _TYPE_NAMES[typ[i]], ts[i]]
        for i in range(hi - 1, lo - 1, -1)
        if typ[i] != SEARCH and (it := item[i])
    ]
    if new:
        # newest first; a stable sort (reverse keeps ties in order): new before stored on ties
        merged = sorted([*new, *p.recent_events], key=_TS, reverse=True)
        q.recent_events = merged[: cfg.recent_events]


def _set_query(q: Profile, p: Profile, k: int, b: _Sorted, r: _Rows) -> None:
    """The latest search by event time, unless the stored query is newer."""
    j = r.last_search[k]
    if j >= 0 and (p.query_ts is None or r.ts[j] >= p.query_ts):
        ev = b.ev
        src = r.order[j]
        q.query_text = ev.queries[src]
        q.query_ts = r.ts[j]
        if ev.query_vectors is not None and ev.has_query_vector is not None and ev.has_query_vector[src]:
            q.query = np.asarray(ev.query_vectors[src], np.float32)
        else:
            q.query = None
