"""Scoring: blend, softmax, filters, boosts, MMR and reasons on a catalog with known structure."""

from __future__ import annotations

import numpy as np
import pytest

from alerts.effects import StaticDemandAdjustments
from inference.catalog import CatalogIndex
from inference.popularity import RedisPopularity
from inference.scoring import Request, Scorer
from profiles.model import Profile
from streamrec.events import make_event
from streamrec.settings import Settings

CATS = ("lantern", "mug", "bag")
PER_CAT = 30
DIM = 32


@pytest.fixture
def catalog() -> CatalogIndex:
    """3 categories of 30 items; items of a category cluster around one direction."""
    rng = np.random.default_rng(7)
    centers = np.linalg.qr(rng.normal(size=(DIM, DIM)))[0][: len(CATS)]
    vecs, ids, cats = [], [], []
    for c, name in enumerate(CATS):
        for j in range(PER_CAT):
            v = centers[c] + 0.35 * rng.normal(size=DIM) / np.sqrt(DIM)
            vecs.append(v / np.linalg.norm(v))
            ids.append(f"{name}-{j}")
            cats.append(name)
    return CatalogIndex.from_arrays(ids, np.asarray(vecs, np.float32), "test-v1", categories=cats)


def _profile(catalog: CatalogIndex, items: list[str], purchased: list[str] = ()) -> Profile:
    vecs, found = catalog.lookup(items)
    assert found.all()
    lt = vecs.mean(0)
    return Profile(
        user_id="u1",
        long_term=lt / np.linalg.norm(lt),
        session=vecs[-1],
        last_ts=1_700_000_000_000,
        recent_items=list(reversed(items)),
        purchased_items=list(purchased),
    )


def _scorer(catalog, **overrides) -> Scorer:
    s = Settings().override(scoring=overrides)
    return Scorer(catalog, s.scoring, s.profile)


def test_clicks_in_one_category_dominate_its_recommendations(catalog):
    prof = _profile(catalog, ["mug-1", "mug-2", "mug-3"])
    [recs] = _scorer(catalog).recommend([Request("u1", prof, k=10)], now_ms=prof.last_ts)
    assert len(recs) == 10
    assert sum(r.item_id.startswith("mug-") for r in recs) >= 9
    assert all(r.reason.startswith("similar_to:mug-") for r in recs if r.item_id.startswith("mug-"))
    # Softmax probabilities over the candidates: positive, at most 1 in total.
    assert all(r.score > 0 for r in recs) and sum(r.score for r in recs) <= 1.0 + 1e-6


def test_purchased_and_unavailable_items_are_excluded(catalog):
    prof = _profile(catalog, ["mug-1", "mug-2"], purchased=["mug-1", "mug-2", "mug-4"])
    catalog.available[catalog.index_of(["mug-5"])[0]] = False
    [recs] = _scorer(catalog).recommend([Request("u1", prof, k=25)], now_ms=prof.last_ts)
    got = {r.item_id for r in recs}
    assert not got & {"mug-1", "mug-2", "mug-4", "mug-5"}
    # With the filter off, purchased items come back (repeat purchases are allowed).
    [again] = _scorer(catalog, exclude_purchased=False).recommend(
        [Request("u1", prof, k=25)], now_ms=prof.last_ts
    )
    assert {"mug-1", "mug-2"} <= {r.item_id for r in again}


def test_buy_again_brings_back_purchases_from_another_category(catalog):
    # The user browses mugs but bought lanterns and a bag: far from p, still re-ordered staples.
    prof = _profile(catalog, ["mug-1", "mug-2", "mug-3"], purchased=["lantern-7", "bag-3", "lantern-2"])
    req = [Request("u1", prof, k=10)]
    [plain] = _scorer(catalog, exclude_purchased=False, repeat_share=0.0).recommend(req, now_ms=prof.last_ts)
    assert not {"lantern-7", "bag-3", "lantern-2"} & {r.item_id for r in plain}
    [recs] = _scorer(catalog, exclude_purchased=False, repeat_share=0.9, repeat_decay=0.5).recommend(
        req, now_ms=prof.last_ts
    )
    ids = [r.item_id for r in recs]
    assert {"lantern-7", "bag-3"} <= set(ids)
    assert ids.index("lantern-7") < ids.index("bag-3")  # the most recent purchase first (same similarity)
    assert {r.reason for r in recs if r.item_id in {"lantern-7", "bag-3"}} == {"buy_again"}
    # The filter wins over the bonus: no purchase comes back when purchases are excluded.
    [excl] = _scorer(catalog, exclude_purchased=True, repeat_share=0.9).recommend(req, now_ms=prof.last_ts)
    assert not {"lantern-7", "bag-3", "lantern-2"} & {r.item_id for r in excl}


def test_buy_again_and_discoveries_share_one_probability_mass(catalog):
    # u_i = π·q_i for past purchases (q ∝ decay^rank · times bought) and (1 - π)·softmax for the
    # rest: the list's scores are those probabilities, a staple bought 6 times comes before one
    # bought once, and how much of the list re-buys follows π.
    bought = [f"lantern-{j}" for j in range(8)]
    prof = _profile(catalog, ["mug-1", "mug-2", "mug-3"], purchased=bought)
    prof.purchase_counts = {i: (6 if i == "lantern-5" else 1) for i in bought}
    req = [Request("a", prof, k=12)]
    over = {"exclude_purchased": False, "buy_again_share": 1.0, "repeat_decay": 1.0, "repeat_context": 0.0}
    over["mmr_lambda"] = 1.0
    [high] = _scorer(catalog, **over, repeat_share=0.9).recommend(req, now_ms=prof.last_ts)
    [low] = _scorer(catalog, **over, repeat_share=0.02).recommend(req, now_ms=prof.last_ts)
    again = [r for r in high if r.reason == "buy_again"]
    assert len(again) == 8 and again[0].item_id == "lantern-5"
    # q: 6/13 for the staple, 1/13 for each other purchase; π = 0.9.
    assert again[0].score == pytest.approx(0.9 * 6 / 13, rel=1e-4)
    assert [r.score for r in again[1:]] == pytest.approx([0.9 / 13] * 7, rel=1e-4)
    assert sum(r.reason == "buy_again" for r in low) < 4
    for lst in (high, low):
        scores = [r.score for r in lst]
        assert all(s > 1e-4 for s in scores) and sum(scores) <= 1.0 + 1e-6
        assert scores == sorted(scores, reverse=True)  # ranked by u_i (MMR off)
    # The share cap bounds the re-buys whatever π says.
    [capped] = _scorer(catalog, **{**over, "buy_again_share": 0.25}, repeat_share=0.9).recommend(
        req, now_ms=prof.last_ts
    )
    assert sum(r.reason == "buy_again" for r in capped) == 3


def test_the_popularity_prior_lifts_what_the_shop_sells_now(catalog):
    # A shopper between mugs and bags; with the prior on, the shop's best-selling bag climbs
    # into the list (and joins the candidates even if the similarity search missed it).
    prof = _profile(catalog, ["mug-1", "bag-1", "mug-2", "bag-2"])

    class _Pop:
        def top(self, k, category=None):
            return [("bag-9", 1.0), ("mug-20", 0.5), ("lantern-3", 0.001)][:k]

    s = Settings().override(scoring={"popularity_weight": 1.5, "mmr_lambda": 1.0})
    off = Scorer(
        catalog, s.override(scoring={"popularity_weight": 0.0}).scoring, s.profile, popularity=_Pop()
    )
    on = Scorer(catalog, s.scoring, s.profile, popularity=_Pop())
    [a] = off.recommend([Request("u1", prof, k=40)], now_ms=prof.last_ts)
    [b] = on.recommend([Request("u1", prof, k=40)], now_ms=prof.last_ts)
    rank_a = [r.item_id for r in a].index("bag-9")
    rank_b = [r.item_id for r in b].index("bag-9")
    assert rank_b == 0 < rank_a
    assert "lantern-3" not in {r.item_id for r in b[:10]}  # popular but unrelated: not pushed in


class _CountingPop:
    """A popularity source whose ranking a test sets, counting its reads."""

    def __init__(self, top: list[tuple[str, float]]) -> None:
        self.rows, self.reads = top, 0

    def top(self, k, category=None):
        self.reads += 1
        return self.rows[:k]


def test_buy_again_follows_what_the_shop_sells_now(catalog):
    # Eight lanterns bought once each, most recent first; the shop now sells lantern-6 most.
    bought = [f"lantern-{j}" for j in range(8)]
    prof = _profile(catalog, ["mug-1", "mug-2"], purchased=bought)
    pop = _CountingPop([("lantern-6", 1.0), ("mug-20", 0.5), ("lantern-2", 0.01)])
    over = {"exclude_purchased": False, "buy_again_share": 1.0, "repeat_decay": 0.9, "repeat_context": 0.0}
    over["mmr_lambda"] = 1.0

    def again(rho: float) -> list[str]:
        s = Settings().override(scoring={**over, "repeat_popularity": rho})
        [recs] = Scorer(catalog, s.scoring, s.profile, popularity=pop).recommend(
            [Request("u1", prof, k=12)], now_ms=prof.last_ts
        )
        return [r.item_id for r in recs if r.reason == "buy_again"]

    assert again(0.0)[:3] == ["lantern-0", "lantern-1", "lantern-2"]  # recency alone
    with_demand = again(1.0)
    assert with_demand[0] == "lantern-6"
    assert pop.reads == 1  # popularity_weight 0: read for buy-again only, once


def test_the_popularity_prior_is_read_once_per_refresh_window(catalog):
    prof = _profile(catalog, ["mug-1", "bag-1"])
    pop = _CountingPop([("bag-9", 1.0), ("mug-20", 0.5)])
    s = Settings().override(
        scoring={"popularity_weight": 1.5, "mmr_lambda": 1.0, "popularity_refresh_ms": 1000}
    )
    scorer = Scorer(catalog, s.scoring, s.profile, popularity=pop)
    t = 1_700_000_000_000  # a multiple of the window
    req = [Request("u1", prof, k=10)]
    [first] = scorer.recommend(req, now_ms=t)
    pop.rows = [("mug-20", 1.0), ("bag-9", 0.001)]  # demand moves from the bag to a mug
    [same] = scorer.recommend(req, now_ms=t + 999)
    assert pop.reads == 1 and [r.item_id for r in same] == [r.item_id for r in first]
    [later] = scorer.recommend(req, now_ms=t + 1000)
    assert pop.reads == 2
    assert first[0].item_id == "bag-9" and later[0].item_id == "mug-20"
    every = Scorer(
        catalog, s.override(scoring={"popularity_refresh_ms": 0}).scoring, s.profile, popularity=pop
    )
    for dt in (0, 1, 2):
        every.recommend(req, now_ms=t + dt)
    assert pop.reads == 5


def test_a_fresh_search_query_moves_results_toward_matching_items(catalog):
    prof = _profile(catalog, ["mug-1", "mug-2", "mug-3"])
    qv, _ = catalog.lookup(["lantern-0", "lantern-1"])
    q = qv.mean(0)
    prof.query = q / np.linalg.norm(q)
    prof.query_ts = prof.last_ts
    scorer = _scorer(catalog)
    [recs] = scorer.recommend([Request("u1", prof, k=10)], now_ms=prof.last_ts)
    lanterns = [r for r in recs if r.item_id.startswith("lantern-")]
    assert len(lanterns) >= 6
    assert all(r.reason == "matches_query" for r in lanterns)
    # An hour later the query has expired (query_ttl_s = 30 min): back to mugs.
    [later] = scorer.recommend([Request("u1", prof, k=10)], now_ms=prof.last_ts + 3_600_000)
    assert sum(r.item_id.startswith("mug-") for r in later) >= 9


def test_demand_boost_lifts_a_category_with_a_trending_reason(catalog):
    # A shopper who browses mugs and bags alike: both are candidates.
    prof = _profile(catalog, ["bag-1", "mug-1", "bag-2", "mug-2"])
    prof.session = None  # long-term only: an even mix of the two categories
    s = Settings()
    plain = Scorer(catalog, s.scoring, s.profile)
    boosted = Scorer(
        catalog, s.scoring, s.profile, adjustments=StaticDemandAdjustments(categories={"bag": 3.0})
    )
    [a] = plain.recommend([Request("u1", prof, k=10)], now_ms=prof.last_ts)
    [b] = boosted.recommend([Request("u1", prof, k=10)], now_ms=prof.last_ts)

    def bags(recs):
        return [r for r in recs if r.item_id.startswith("bag-")]

    assert len(bags(b)) > len(bags(a))
    assert all(r.reason == "trending_in:bag" for r in bags(b))
    assert not any(r.reason.startswith("trending") for r in a)


def test_a_trending_slot_goes_to_a_relevant_surging_item_only(catalog):
    prof = _profile(catalog, ["mug-1", "mug-2", "mug-3"])
    prof.session = None
    ranked = [catalog.ids[i] for i in np.argsort(-(catalog.matrix @ prof.long_term))]
    near = next(i for i in ranked[30:45] if not i.startswith("mug-"))  # among the shopper's candidates
    far = ranked[-1]  # the least similar product: outside the pool MMR picks from
    s = Settings()
    adj = StaticDemandAdjustments({near: 1.5, far: 1.5})
    req = [Request("u1", prof, k=10)]
    [plain] = Scorer(catalog, s.scoring, s.profile).recommend(req, now_ms=prof.last_ts)
    [factor_only] = Scorer(
        catalog, s.override(scoring={"trending_slots": 0}).scoring, s.profile, adjustments=adj
    ).recommend(req, now_ms=prof.last_ts)
    [slot] = Scorer(catalog, s.scoring, s.profile, adjustments=adj).recommend(req, now_ms=prof.last_ts)
    ids = lambda recs: [r.item_id for r in recs]  # noqa: E731
    assert near not in ids(plain) and ids(factor_only) == ids(plain)  # x1.5 alone does not reach the top 10
    assert ids(slot)[:-1] == ids(plain)[:-1]  # the slot replaces the last discovery...
    assert slot[-1].item_id == near and slot[-1].reason == "trending"  # ...with the surging product
    assert far not in ids(slot)  # a surge the shopper has no affinity for is not pushed on them


def test_mmr_diversifies(catalog):
    prof = _profile(catalog, ["mug-1", "lantern-1", "mug-2"])
    [relevance_only] = _scorer(catalog, mmr_lambda=1.0).recommend(
        [Request("u1", prof, k=10)], now_ms=prof.last_ts
    )
    [diverse] = _scorer(catalog, mmr_lambda=0.3).recommend([Request("u1", prof, k=10)], now_ms=prof.last_ts)

    def n_cats(recs):
        return len({r.item_id.split("-")[0] for r in recs})

    def mean_pair_sim(recs):
        v, _ = catalog.lookup([r.item_id for r in recs])
        s = v @ v.T
        return (s.sum() - np.trace(s)) / (len(recs) * (len(recs) - 1))

    assert mean_pair_sim(diverse) < mean_pair_sim(relevance_only)
    assert n_cats(diverse) >= n_cats(relevance_only)


def test_cold_user_gets_popular_items_in_the_event_category(catalog, settings, redis_client):
    pop = RedisPopularity(settings, redis_client)
    ts = 1_700_000_000_000
    events = [make_event("purchase", f"x{i}", item_id="bag-3", ts=ts, category="bag") for i in range(5)]
    events += [make_event("click", f"y{i}", item_id="mug-7", ts=ts, category="mug") for i in range(9)]
    events += [make_event("view", "z", item_id="mug-8", ts=ts, category="mug")]
    assert pop.record(events) == len(events)
    scorer = Scorer(catalog, settings.scoring, settings.profile, popularity=pop)
    [anyone, bag_shopper] = scorer.recommend(
        [Request("new-1", None, k=3), Request("new-2", None, k=3, category_hint="bag")], now_ms=ts
    )
    # Weighted: 5 purchases x 6 = 30 for bag-3 > 9 clicks x 2 = 18 for mug-7 > 1 view of mug-8.
    assert [r.item_id for r in anyone] == ["bag-3", "mug-7", "mug-8"]
    assert all(r.reason == "popular" for r in anyone + bag_shopper)
    assert bag_shopper[0].item_id == "bag-3"


def _hourly(settings):
    """The settings with a 1-hour popularity half-life."""
    return settings.override(scoring={"popularity_half_life_s": 3600.0})


def test_popularity_decays_with_event_time(settings, redis_client):
    pop = RedisPopularity(_hourly(settings), redis_client)
    t0 = 1_700_000_000_000
    pop.record([make_event("purchase", "a", item_id="old", ts=t0) for _ in range(3)])
    # Two half-lives later, 1 purchase weighs more than 3 / 4.
    pop.record([make_event("purchase", "b", item_id="new", ts=t0 + 2 * 3_600_000)])
    assert [i for i, _ in pop.top(2)] == ["new", "old"]


def test_popularity_half_life_comes_from_the_settings(settings, redis_client):
    """The worker builds RedisPopularity without a half-life: scoring.popularity_half_life_s rules."""
    t0 = 1_700_000_000_000
    old = [make_event("purchase", "a", item_id="old", ts=t0) for _ in range(3)]
    new = [make_event("purchase", "b", item_id="new", ts=t0 + 2 * 3_600_000)]
    short = settings.override(
        scoring={"popularity_half_life_s": 3600.0}, redis={"prefix": f"{settings.redis.prefix}-s"}
    )
    long = settings.override(
        scoring={"popularity_half_life_s": 30 * 86_400.0}, redis={"prefix": f"{settings.redis.prefix}-l"}
    )
    tops = []
    for s in (short, long):
        pop = RedisPopularity(s, redis_client)
        pop.record(old)
        pop.record(new)
        tops.append([i for i, _ in pop.top(2)])
    # Two half-lives: 1 new purchase outweighs 3 old ones; over two hours of a 30-day half-life, not.
    assert tops == [["new", "old"], ["old", "new"]]


def test_batch_of_users_scored_together_matches_one_by_one(catalog):
    scorer = _scorer(catalog)
    profs = [_profile(catalog, [f"{c}-{j}", f"{c}-{j + 1}"]) for c in CATS for j in (0, 5)]
    reqs = [Request(f"u{i}", p, k=5) for i, p in enumerate(profs)]
    together = scorer.recommend(reqs, now_ms=profs[0].last_ts)
    alone = [scorer.recommend([r], now_ms=profs[0].last_ts)[0] for r in reqs]
    assert [[x.item_id for x in t] for t in together] == [[x.item_id for x in a] for a in alone]


def test_popularity_landmark_moves_without_overflow(settings, redis_client):
    """Years of event time over a 1-hour half-life: the landmark moves, ranks stay right."""
    pop = RedisPopularity(_hourly(settings), redis_client)
    t0 = 1_300_000_000_000
    pop.record([make_event("purchase", "a", item_id="old", ts=t0, category="c") for _ in range(5)])
    later = t0 + 3 * 365 * 86_400_000  # ~26,000 half-lives later
    pop.record([make_event("view", "b", item_id="new", ts=later, category="c")])
    assert [i for i, _ in pop.top(2)] == ["new", "old"]
    assert [i for i, _ in pop.top(2, category="c")] == ["new", "old"]
    assert float(redis_client.get(pop._landmark_key)) == later


def test_popularity_writers_with_a_stale_landmark_copy_count_right(settings, redis_client):
    """Writer A keeps its copy of the landmark while writer B moves it: A's next increments are
    rescaled to the stored landmark, so the scores equal one writer's doing it all."""
    t0, h = 1_300_000_000_000, 3_600_000
    seq = [
        ("A", make_event("purchase", "u1", item_id="x", ts=t0)),
        ("B", make_event("view", "u2", item_id="z", ts=t0 + 401 * h)),  # past MAX_HALF_LIVES: B moves it
        ("A", make_event("click", "u3", item_id="y", ts=t0 + 399 * h)),  # A's copy (t0) is stale here
        ("A", make_event("view", "u4", item_id="z", ts=t0 + 402 * h)),
    ]
    two = _hourly(settings).override(redis={"prefix": settings.redis.prefix + ":two"})
    one = _hourly(settings).override(redis={"prefix": settings.redis.prefix + ":one"})
    a, b = (RedisPopularity(two, redis_client) for _ in range(2))
    single = RedisPopularity(one, redis_client)
    for k, (who, ev) in enumerate(seq):
        if k == 2:
            assert a._landmark_copy == t0 and float(redis_client.get(a._landmark_key)) == t0 + 401 * h
        (a if who == "A" else b).record([ev])
        single.record([ev])
    assert a._landmark_copy == t0 + 401 * h  # refreshed by its write
    got, want = dict(a.top(3)), dict(single.top(3))
    assert list(got) == list(want) == ["z", "y", "x"]
    for item, score in want.items():
        assert got[item] == pytest.approx(score, rel=1e-9, abs=1e-300)
    # z: views at L and L + 1 h (1 + 2), y: a click 2 h before L (2 / 4)
    assert got["y"] == pytest.approx(0.5 / 3.0, rel=1e-9)
