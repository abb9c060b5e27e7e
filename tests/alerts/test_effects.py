"""Demand adjustments through the real scorer: boosts never surface unavailable items."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from alerts.effects import StaticDemandAdjustments
from inference.catalog import CatalogIndex
from inference.scoring import Request, Scorer
from streamrec.settings import Settings


def test_boosts_never_surface_unavailable_items() -> None:
    s = Settings()
    rng = np.random.default_rng(0)
    ids = [f"it{i}" for i in range(40)]
    vecs = rng.normal(size=(40, 8)).astype(np.float32)
    cats = ["lamps" if i < 10 else "bags" for i in range(40)]
    available = np.ones(40, bool)
    available[0] = False  # it0 is sold out (its stock-out raised a drop)
    catalog = CatalogIndex.from_arrays(ids, vecs, "t", cats, available)
    # it0 and it1 are both boosted hard (a surge alert on each and on their category).
    adj = StaticDemandAdjustments({"it0": 50.0, "it1": 50.0}, {"lamps": 1.5})
    users = [
        Request(f"u{j}", SimpleNamespace(long_term=vecs[j % 10] + 0.1 * rng.normal(size=8)), k=10)
        for j in range(20)
    ]
    assert adj.active() == ({"it0": 50.0, "it1": 50.0}, {"lamps": 1.5})
    assert StaticDemandAdjustments().active() == ({}, {})
    for adjustments in (adj, None):
        lists = Scorer(catalog, s.scoring, s.profile, adjustments=adjustments).recommend(users, now_ms=0)
        assert all("it0" not in [x.item_id for x in lst] for lst in lists)
    boosted = Scorer(catalog, s.scoring, s.profile, adjustments=adj).recommend(users, now_ms=0)
    plain = Scorer(catalog, s.scoring, s.profile).recommend(users, now_ms=0)
    n_boosted = sum("it1" in [x.item_id for x in lst] for lst in boosted)
    assert n_boosted > sum("it1" in [x.item_id for x in lst] for lst in plain)
    reasons = {x.reason for lst in boosted for x in lst if x.item_id == "it1"}
    assert reasons and all("trending" in r for r in reasons)


def test_factors_in_redis_lapse_clear_and_cost_one_read_whatever_the_candidates(
    settings: Settings, redis_client
) -> None:
    from alerts.detector import DROP, SURGE
    from alerts.effects import DemandEffectWriter, RedisDemandAdjustments, effects_key

    writer, reader = DemandEffectWriter(settings), RedisDemandAdjustments(settings, redis_client)
    assert reader.active() == ({}, {})  # the scorer skips the per-candidate work
    now = 1_800_000_000_000
    ttl_ms = 1000 * settings.alerts.effect_ttl_s
    pipe = redis_client.pipeline(transaction=True)
    writer.queue(pipe, [("i:A", SURGE), ("c:lamps", SURGE), ("i:B", DROP)], [], now_ms=now)
    pipe.execute()
    items, cats = reader.active(now_ms=now + 1)
    assert items == {"A": settings.alerts.boost, "B": settings.alerts.damping}
    assert cats == {"lamps": settings.alerts.boost}
    # the item factor times its category's, and the reason; an unknown item is left alone
    f, reasons = reader.factors(["A", "C", "B"], ["lamps", "lamps", "bags"])
    assert list(f) == [settings.alerts.boost**2, settings.alerts.boost, settings.alerts.damping]
    assert reasons == ["trending", "trending_in:lamps", None]
    # a stopped monitor's factors lapse on their own ...
    assert reader.active(now_ms=now + ttl_ms) == ({}, {})
    # ... a refresh extends them, a cleared alert is gone at once
    pipe = redis_client.pipeline(transaction=True)
    writer.queue(pipe, [("i:A", SURGE)], ["i:B", "c:lamps"], now_ms=now + ttl_ms - 1)
    pipe.execute()
    assert reader.active(now_ms=now + ttl_ms + 1) == ({"A": settings.alerts.boost}, {})
    assert set(redis_client.hkeys(effects_key(settings.redis.prefix))) == {b"i:A"}
    redis_client.delete(effects_key(settings.redis.prefix))
    assert reader.active() == ({}, {})


def test_the_scorer_applies_the_factors_as_the_per_item_combine_does() -> None:
    """The scorer turns the factors in force into per-catalog-row arrays once; every candidate
    must get what ``factors`` gives item by item (item x category, reason precedence), also
    after the factors or the catalog change."""
    s = Settings()
    rng = np.random.default_rng(1)
    ids = [f"it{i}" for i in range(60)]
    cats = ["lamps" if i < 20 else "bags" if i < 40 else "" for i in range(60)]
    catalog = CatalogIndex.from_arrays(ids, rng.normal(size=(60, 8)).astype(np.float32), "t", cats)
    adj = StaticDemandAdjustments(
        {"it1": 2.0, "it25": 0.5, "it45": 1.5, "gone": 3.0}, {"lamps": 1.5, "bags": 0.5}
    )
    scorer = Scorer(catalog, s.scoring, s.profile, adjustments=adj)
    idx = rng.integers(-1, 60, size=(7, 30))
    for step in range(3):
        fac, trend = scorer._demand(idx)
        take = idx >= 0
        rows = idx[take]
        want_f, want_r = adj.factors([catalog.ids[i] for i in rows], [catalog.categories[i] for i in rows])
        np.testing.assert_array_equal(fac[take], np.asarray(want_f, np.float32))
        assert trend[take].tolist() == want_r
        assert (fac[~take] == 1).all() and all(t is None for t in trend[~take])
        if step == 0:  # the alerts change: the rows follow
            adj.items = {"it2": 1.5}
            adj.categories = {"": 9.0, "bags": 2.0}
        else:  # the catalog changes: it3 moves into bags
            catalog.upsert(["it3"], catalog.matrix[[3]], categories=["bags"])


class _Popular:
    """The shop's popular items, best first (a PopularitySource)."""

    def __init__(self, top: list[tuple[str, float]]) -> None:
        self._top = top

    def top(self, k: int, category: str | None = None) -> list[tuple[str, float]]:
        return self._top[:k]


def test_a_surge_reaches_the_lists_through_every_candidate_source() -> None:
    """A surging item that is one of a shopper's candidates only as one of the shop's popular
    items (outside the similarity top-k) takes its boost and the trending slot; so does one the
    shopper bought before, outside the top-k too (before, only the top-k columns took factors)."""
    s = Settings().override(scoring={"exclude_purchased": False, "popularity_weight": 1.0})
    rng = np.random.default_rng(2)
    n = 200
    vecs = rng.normal(size=(n, 8)).astype(np.float32)
    ids = [f"it{i}" for i in range(n)]
    catalog = CatalogIndex.from_arrays(ids, vecs, "t", ["bags"] * n)
    taste = vecs[0] + 0.1 * rng.normal(size=8)
    # just outside the similarity top-k candidates (60 for lists of 10): close enough to the
    # shopper's taste to qualify once boosted, never a candidate without the popular items
    order = np.argsort(-(catalog.matrix @ (taste / np.linalg.norm(taste))))
    far, mine = f"it{order[64]}", f"it{order[70]}"
    popular = _Popular([(far, 1.0), ("it7", 0.9), ("it8", 0.8)])
    profile = SimpleNamespace(long_term=taste, purchased_items=["it7", mine], purchase_counts={"it7": 3})
    reqs = [Request("u", profile, k=10)]
    plain = Scorer(catalog, s.scoring, s.profile, popularity=popular).recommend(reqs, now_ms=0)[0]
    for surging in (far, mine):
        adj = StaticDemandAdjustments({surging: s.alerts.boost}, {})
        got = Scorer(catalog, s.scoring, s.profile, popularity=popular, adjustments=adj).recommend(
            reqs, now_ms=0
        )[0]
        shown = {x.item_id: x.reason for x in got}
        assert shown.get(surging) == "trending", (surging, shown)
        assert plain[0].item_id == got[0].item_id == "it7" and shown["it7"] == "buy_again"
    assert {x.item_id: x.reason for x in plain}.get(far) is None
