"""Test helpers: a plain-numpy reference of the profile rules, and small real implementations
of the ItemVectors / TextEncoder protocols (random unit item vectors, hashed-word queries).

The reference is written independently of ``profiles.model``: it walks each user's events one
by one in float64, exactly as the rules in ``profiles/model.py`` describe them. The stream
worker started by the tests imports ``make_items`` / ``make_encoder`` from here
(``streamrec worker --items support.profile_reference:make_items``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamrec.events import Event
from streamrec.settings import ProfileSettings, Settings

DIM = 16
N_ITEMS = 200


class RandomItems:
    """ItemVectors over seeded random unit vectors for ids ``i0 .. i{n-1}``."""

    def __init__(self, n: int = N_ITEMS, dim: int = DIM, seed: int = 7) -> None:
        rng = np.random.default_rng(seed)
        m = rng.normal(size=(n, dim)).astype(np.float32)
        self.matrix = m / np.linalg.norm(m, axis=1, keepdims=True)
        self.ids = [f"i{k}" for k in range(n)]
        self._pos = {x: k for k, x in enumerate(self.ids)}
        self.dim = dim
        self.model_version = f"random-{n}x{dim}-{seed}"

    def lookup(self, item_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        idx = np.fromiter((self._pos.get(i, -1) for i in item_ids), np.int64, len(item_ids))
        found = idx >= 0
        out = np.zeros((len(item_ids), self.dim), np.float32)
        out[found] = self.matrix[idx[found]]
        return out, found


class HashingEncoder:
    """TextEncoder: each lower-cased word adds a signed one-hot at a hashed position; unit rows."""

    def __init__(self, dim: int = DIM) -> None:
        self.dim = dim
        self.model_version = f"hashing-{dim}"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for r, t in enumerate(texts):
            for w in t.lower().split():
                h = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
                out[r, h % self.dim] += 1.0 if (h >> 32) & 1 else -1.0
            n = np.linalg.norm(out[r])
            out[r] = out[r] / n if n > 0 else out[r]
            if n == 0:
                out[r, 0] = 1.0
        return out


def make_items(settings: Settings) -> RandomItems:
    """Worker plug-in (``--items support.profile_reference:make_items``)."""
    return RandomItems(int(os.environ.get("TEST_N_ITEMS", N_ITEMS)))


def make_catalog(settings: Settings) -> Any:
    """Worker plug-in (``--items support.profile_reference:make_catalog``): the same random item
    vectors as :func:`make_items`, as a catalog index, so the worker also pushes recommendations."""
    from inference.catalog import CatalogIndex

    items = make_items(settings)
    return CatalogIndex.from_arrays(
        items.ids, items.matrix, items.model_version, categories=["c"] * len(items.ids)
    )


def make_encoder(settings: Settings) -> HashingEncoder:
    """Worker plug-in (``--encoder support.profile_reference:make_encoder``)."""
    return HashingEncoder()


@dataclass
class RefProfile:
    lt_sum: np.ndarray | None = None
    lt_w: float = 0.0
    lt_ref: int | None = None
    se_sum: np.ndarray | None = None
    se_w: float = 0.0
    last: int | None = None
    sid: str | None = None
    leid: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    recent: list[str] = field(default_factory=list)
    purchased: list[str] = field(default_factory=list)
    bought: dict[str, int] = field(default_factory=dict)
    events: list[list] = field(default_factory=list)  # [item, type, ts], newest (ts, arrival) first
    query: np.ndarray | None = None
    query_text: str | None = None
    query_ts: int | None = None

    @property
    def long_term(self) -> np.ndarray | None:
        return None if self.lt_w <= 0 else self.lt_sum / self.lt_w

    @property
    def session(self) -> np.ndarray | None:
        return None if self.se_w <= 0 else self.se_sum / self.se_w


def _front(lst: list[str], x: str, limit: int) -> list[str]:
    return ([x] + [y for y in lst if y != x])[:limit]


def reference_profiles(
    events: Iterable[Event], items: RandomItems, encoder: HashingEncoder | None, cfg: ProfileSettings
) -> dict[str, RefProfile]:
    """Profiles from a stream of distinct events, one event at a time (float64).

    Events are taken per user in event-time order (ties: stream order).
    """
    weights = {"view": cfg.weight_view, "click": cfg.weight_click, "add_to_cart": cfg.weight_add_to_cart,
               "purchase": cfg.weight_purchase, "search": 0.0}  # fmt: skip
    H = cfg.long_term_half_life_s * 1000.0
    Hs = cfg.session_half_life_s * 1000.0
    timeout = cfg.session_inactivity_s * 1000.0
    evs = sorted(enumerate(events), key=lambda p: (p[1].ts, p[0]))
    out: dict[str, RefProfile] = {}
    for _, e in evs:
        p = out.setdefault(e.user_id, RefProfile())
        t = e.type.value
        w = weights[t]
        h = None
        if t != "search":
            v, found = items.lookup([e.item_id])
            if not found[0]:
                continue
            h = v[0].astype(np.float64)
        late = p.last is not None and e.ts < p.last
        if w > 0:
            if p.lt_ref is None:
                p.lt_sum, p.lt_w, p.lt_ref = w * h, w, e.ts
            elif e.ts >= p.lt_ref:
                d = 2.0 ** (-(e.ts - p.lt_ref) / H)
                p.lt_sum = p.lt_sum * d + w * h
                p.lt_w = p.lt_w * d + w
                p.lt_ref = e.ts
            else:
                d = 2.0 ** (-(p.lt_ref - e.ts) / H)
                p.lt_sum = p.lt_sum + w * d * h
                p.lt_w += w * d
        if not late:
            reset = (
                p.last is None
                or e.ts - p.last > timeout
                or (e.session_id is not None and p.sid is not None and e.session_id != p.sid)
            )
            if reset or p.se_sum is None:
                p.se_sum, p.se_w = np.zeros(items.dim), 0.0
            if not reset and p.last is not None:
                d = 2.0 ** (-(e.ts - p.last) / Hs)
                p.se_sum, p.se_w = p.se_sum * d, p.se_w * d
            if w > 0:
                p.se_sum = p.se_sum + w * h
                p.se_w += w
            p.last, p.sid, p.leid = e.ts, e.session_id, e.event_id
            if e.item_id:
                p.recent = _front(p.recent, e.item_id, cfg.recent_items)
        p.counts[t] = p.counts.get(t, 0) + 1
        if t != "search" and cfg.recent_events:  # taken in (ts, arrival) order: each is the newest
            p.events = ([[e.item_id, t, e.ts]] + p.events)[: cfg.recent_events]
        if t == "purchase":
            p.purchased = _front(p.purchased, e.item_id, cfg.purchased_items)
            p.bought[e.item_id] = p.bought.get(e.item_id, 0) + 1
            p.bought = {i: p.bought[i] for i in p.purchased}
        if t == "search" and (p.query_ts is None or e.ts >= p.query_ts):
            p.query_text, p.query_ts = e.query, e.ts
            p.query = encoder.encode([e.query])[0] if encoder is not None else None
    return out


def assert_profile_matches(got, ref: RefProfile, rtol: float = 2e-4, atol: float = 2e-5) -> None:
    """Compare a stored profiles.model.Profile with the reference."""
    uid = got.user_id
    for name in ("long_term", "session"):
        a, b = getattr(got, name), getattr(ref, name)
        assert (a is None) == (b is None), f"user {uid}: {name} presence differs ({a is None} vs {b is None})"
        if a is not None:
            np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=f"user {uid}: {name}")
    assert (got.query is None) == (ref.query is None), f"user {uid}: query presence"
    if ref.query is not None:
        np.testing.assert_allclose(got.query, ref.query, rtol=rtol, atol=atol)
    assert got.query_text == ref.query_text
    assert got.query_ts == ref.query_ts
    assert got.n_events == ref.counts, f"user {uid}: counts"
    assert got.last_ts == ref.last
    assert got.last_event_id == ref.leid
    assert got.session_id == ref.sid
    assert got.recent_items == ref.recent, f"user {uid}: recent items"
    assert got.purchased_items == ref.purchased, f"user {uid}: purchased items"
    assert got.recent_events == ref.events, f"user {uid}: recent events"
    assert got.purchase_counts == ref.bought, f"user {uid}: purchase counts"
    assert got.long_term_weight == pytest_approx(ref.lt_w)


def pytest_approx(x: float):
    import pytest

    return pytest.approx(x, rel=1e-6, abs=1e-12)


QUERIES = ["red heart lantern", "glass jar", "wooden star", "tea set", "paper lantern blue", "jam jar"]


def generate_events(
    n_users: int, n_events: int, seed: int = 0, n_items: int = N_ITEMS, t0: int = 1_700_000_000_000
) -> list[Event]:
    """A synthetic in-order stream: bursty sessions, every event type, searches, session ids."""
    from streamrec.events import make_event

    rng = np.random.default_rng(seed)
    users = [f"u{k}" for k in range(n_users)]
    clock = {u: t0 + int(rng.integers(0, 3_600_000)) for u in users}
    session = dict.fromkeys(users, 0)
    types = ["view", "click", "add_to_cart", "purchase", "search"]
    probs = [0.45, 0.25, 0.12, 0.08, 0.10]
    out = []
    for n in range(n_events):
        u = users[int(rng.zipf(1.6)) % n_users]
        gap = int(
            rng.choice(
                [0, rng.integers(1, 120_000), rng.integers(2_000_000, 90_000_000)], p=[0.15, 0.7, 0.15]
            )
        )
        clock[u] += gap
        if gap > 1_800_000:
            session[u] += 1
        t = types[int(rng.choice(5, p=probs))]
        kw = (
            {"query": QUERIES[int(rng.integers(len(QUERIES)))]}
            if t == "search"
            else {"item_id": f"i{int(rng.integers(n_items))}"}
        )
        out.append(
            make_event(t, u, ts=clock[u], session_id=f"{u}-{session[u]}", event_id=f"e{seed}-{n}", **kw)
        )
    # The stream is in arrival order: sort by time, as a shop would emit it.
    out.sort(key=lambda e: e.ts)
    return out
