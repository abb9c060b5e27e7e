"""The profile model: pure numpy, vectorised over a batch of users.

A user's profile holds

* a **long-term vector**: the time-decayed weighted mean of the item vectors the user
  touched, ``sum_i w_i 2^(-(T - t_i)/H) h_i / sum_i w_i 2^(-(T - t_i)/H)``, with the weight
  ``w_i`` of the event type (view 1, click 2, add_to_cart 4, purchase 6 by default) and the
  half-life ``H = profile.long_term_half_life_s`` in event time;
* a **session vector**: the same with the short ``profile.session_half_life_s``, over the
  events of the current session only. A session ends after ``profile.session_timeout_s`` of
  inactivity or when the event's ``session_id`` differs from the previous event's (both set);
* a **query-intent vector**: the encoded query of the user's latest search (by event time);
* counts by event type, the last event time and id, and bounded lists of recent items
  (most recent first, unique) and purchased items with their purchase counts (for filtering
  or the buy-again bonus).

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

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from streamrec.settings import ProfileSettings

EVENT_TYPES = ("view", "click", "add_to_cart", "purchase", "search")
TYPE_INDEX = {t: i for i, t in enumerate(EVENT_TYPES)}
SEARCH = TYPE_INDEX["search"]
PURCHASE = TYPE_INDEX["purchase"]
_NO_TS = np.iinfo(np.int64).min


@dataclass
class Profile:
    """One user's profile as stored in Redis (vectors are float32, ``None`` when absent)."""

    user_id: str
    long_term: np.ndarray | None = None
    session: np.ndarray | None = None
    query: np.ndarray | None = None
    query_text: str | None = None
    query_ts: int | None = None
    last_ts: int | None = None  # epoch ms of the newest applied event
    n_events: dict[str, int] = field(default_factory=dict)
    recent_items: list[str] = field(default_factory=list)  # most recent first
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
    return np.array(
        [cfg.weight_view, cfg.weight_click, cfg.weight_add_to_cart, cfg.weight_purchase, 0.0], np.float64
    )


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


def _segment_starts(u: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.r_[True, u[1:] != u[:-1]])


def _front_unique(new_first: list[str], old: Sequence[str], limit: int) -> list[str]:
    """``new_first`` then ``old``, first occurrence kept, truncated to ``limit``."""
    out: list[str] = []
    seen: set[str] = set()
    for x in (*new_first, *old):
        if x not in seen:
            seen.add(x)
            out.append(x)
            if len(out) >= limit:
                break
    return out


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
    order = np.argsort(ev.ts, kind="stable")
    order = order[np.argsort(ev.user[order], kind="stable")]
    u = ev.user[order]
    ts = ev.ts[order]
    typ = ev.type[order]
    H = ev.vectors[order].astype(np.float64)
    starts = _segment_starts(u)
    if len(starts) != m or not np.array_equal(u[starts], np.arange(m)):
        raise ValueError("apply() needs at least one event for every profile, users indexed 0..m-1")
    E = len(u)
    idx = np.arange(E)

    w_type = type_weights(cfg)
    w = w_type[typ]
    # Stored state as arrays.
    last = np.array([p.last_ts if p.last_ts is not None else _NO_TS for p in profiles], np.int64)
    has_last = last != _NO_TS
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

    # ---- long-term: closed form, order-independent --------------------------------------
    H_lt = cfg.long_term_half_life_s * 1000.0
    weighted = w > 0
    ev_max = np.maximum.reduceat(np.where(weighted, ts, _NO_TS), starts)
    ref = np.maximum(np.where(lt_w > 0, lt_ref, _NO_TS), ev_max)  # new reference time per user
    touched = ref != _NO_TS
    ref_f = np.where(touched, ref, 0).astype(np.float64)
    c = np.where(weighted, w * np.exp2(np.minimum(ts - ref_f[u], 0.0) / H_lt), 0.0)
    S = np.add.reduceat(c[:, None] * H, starts, axis=0)
    C = np.add.reduceat(c, starts)
    old = np.where(lt_w > 0, lt_w * np.exp2(np.minimum(lt_ref.astype(np.float64) - ref_f, 0.0) / H_lt), 0.0)
    new_lt_w = old + C
    new_lt_sum = lt_mean * old[:, None] + S

    # ---- session: in event-time order over the non-late events --------------------------
    late = has_last[u] & (ts < last[u])
    nonlate = ~late
    H_se = cfg.session_half_life_s * 1000.0
    timeout_ms = cfg.session_timeout_s * 1000.0
    sids = [ev.session_ids[i] for i in order]
    first_of_user = np.zeros(E, bool)
    first_of_user[starts] = True
    # Late events sort before the non-late ones of their user, so the previous non-late event
    # of a non-late event i is i-1 unless i-1 is late or another user's (then: stored state).
    prev_is_batch = ~first_of_user & np.r_[False, nonlate[:-1]]
    prev_ts = np.where(prev_is_batch, np.r_[_NO_TS, ts[:-1]], last[u])
    has_prev = prev_is_batch | has_last[u]
    stored_sid = [p.session_id for p in profiles]
    sid_change = np.zeros(E, bool)
    for i in np.flatnonzero(nonlate):
        prev_sid = sids[i - 1] if prev_is_batch[i] else stored_sid[u[i]]
        if sids[i] is not None and prev_sid is not None and sids[i] != prev_sid:
            sid_change[i] = True
    gap = np.where(has_prev, ts.astype(np.float64) - prev_ts.astype(np.float64), np.inf)
    reset = nonlate & (~has_prev | (gap > timeout_ms) | sid_change)
    last_reset = np.maximum.reduceat(np.where(reset, idx, -1), starts)
    has_nonlate = np.maximum.reduceat(nonlate.astype(np.int64), starts) > 0
    last_nonlate = np.maximum.reduceat(np.where(nonlate, idx, -1), starts)
    se_ref = np.where(has_nonlate, ts[np.maximum(last_nonlate, 0)], last).astype(np.float64)
    in_session = nonlate & (idx >= last_reset[u])
    cs = np.where(in_session & weighted, w * np.exp2(np.minimum(ts - se_ref[u], 0.0) / H_se), 0.0)
    S_se = np.add.reduceat(cs[:, None] * H, starts, axis=0)
    C_se = np.add.reduceat(cs, starts)
    keep_old = has_nonlate & (last_reset < 0) & (se_w > 0)
    old_se = np.where(keep_old, se_w * np.exp2(np.minimum(last.astype(np.float64) - se_ref, 0.0) / H_se), 0.0)
    new_se_w = np.where(has_nonlate, old_se + C_se, se_w)
    new_se_sum = np.where(has_nonlate[:, None], se_mean * old_se[:, None] + S_se, se_mean * se_w[:, None])

    # ---- counts, last event ---------------------------------------------------------------
    counts = np.bincount(u * len(EVENT_TYPES) + typ, minlength=m * len(EVENT_TYPES)).reshape(
        m, len(EVENT_TYPES)
    )
    new_last = np.maximum(last, np.maximum.reduceat(ts, starts))

    # ---- query: the latest search by event time ------------------------------------------
    is_search = typ == SEARCH
    last_search = np.maximum.reduceat(np.where(is_search, idx, -1), starts)

    out: list[Profile] = []
    for k, p in enumerate(profiles):
        lo = starts[k]
        hi = starts[k + 1] if k + 1 < m else E
        n_events = dict(p.n_events)
        for t, cnt in zip(EVENT_TYPES, counts[k], strict=True):
            if cnt:
                n_events[t] = n_events.get(t, 0) + int(cnt)
        q = Profile(
            user_id=p.user_id,
            long_term=p.long_term,
            session=p.session,
            query=p.query,
            query_text=p.query_text,
            query_ts=p.query_ts,
            last_ts=int(new_last[k]),
            n_events=n_events,
            recent_items=p.recent_items,
            purchased_items=p.purchased_items,
            purchase_counts=p.purchase_counts,
            last_event_id=p.last_event_id,
            session_id=p.session_id,
            long_term_weight=p.long_term_weight,
            long_term_ts=p.long_term_ts,
            session_weight=p.session_weight,
            model_version=model_version if model_version is not None else p.model_version,
            version=p.version,
            offsets=dict(p.offsets),
            dedupe_horizon_ts=p.dedupe_horizon_ts,
        )
        if new_lt_w[k] > 0:
            q.long_term = (new_lt_sum[k] / new_lt_w[k]).astype(np.float32)
            q.long_term_weight = float(new_lt_w[k])
            q.long_term_ts = int(ref[k])
        if has_nonlate[k]:
            if new_se_w[k] > 0:
                q.session = (new_se_sum[k] / new_se_w[k]).astype(np.float32)
                q.session_weight = float(new_se_w[k])
            else:
                q.session, q.session_weight = None, 0.0
            j = int(last_nonlate[k])
            q.session_id = sids[j]
            q.last_event_id = ev.event_ids[order[j]]
            recent_new = [
                ev.item_ids[order[i]]
                for i in range(hi - 1, lo - 1, -1)
                if nonlate[i] and not is_search[i] and ev.item_ids[order[i]]
            ]
            if recent_new:
                q.recent_items = _front_unique(recent_new, p.recent_items, cfg.recent_items)
        bought = [
            ev.item_ids[order[i]]
            for i in range(hi - 1, lo - 1, -1)
            if typ[i] == PURCHASE and ev.item_ids[order[i]]
        ]
        if bought:
            q.purchased_items = _front_unique(bought, p.purchased_items, cfg.purchased_items)
            bought_n = dict(p.purchase_counts)
            for item in bought:
                bought_n[item] = bought_n.get(item, 0) + 1
            # Counts are kept for the items still in the (capped) purchased list only.
            q.purchase_counts = {i: bought_n[i] for i in q.purchased_items if i in bought_n}
        j = int(last_search[k])
        if j >= 0 and (p.query_ts is None or ts[j] >= p.query_ts):
            src = int(order[j])
            q.query_text = ev.queries[src]
            q.query_ts = int(ts[j])
            if ev.query_vectors is not None and ev.has_query_vector is not None and ev.has_query_vector[src]:
                q.query = np.asarray(ev.query_vectors[src], np.float32)
            else:
                q.query = None
        out.append(q)
    return out
