"""The batched scorer (all users of a batch at once) against the plain per-user reference."""

from __future__ import annotations

import numpy as np
import pytest
from support.scoring_reference import ReferenceScorer

from alerts.effects import StaticDemandAdjustments
from inference.catalog import CatalogIndex
from inference.scoring import Request, Scorer
from profiles.model import Profile
from streamrec.settings import Settings

NOW = 1_700_000_000_000


@pytest.fixture(scope="module")
def catalog() -> CatalogIndex:
    rng = np.random.default_rng(3)
    n, dim = 400, 24
    centers = rng.normal(size=(8, dim))
    cats = rng.integers(0, 8, n)
    v = centers[cats] + 0.8 * rng.normal(size=(n, dim))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    avail = rng.random(n) > 0.05
    return CatalogIndex.from_arrays(
        [f"i{k}" for k in range(n)],
        v.astype(np.float32),
        "t",
        categories=[f"c{c}" for c in cats],
        available=avail,
    )


def _requests(catalog: CatalogIndex, seed: int) -> list[Request]:
    rng = np.random.default_rng(seed)
    reqs = []
    for u in range(60):
        items = rng.choice(len(catalog.ids), 40, replace=False)
        ids = [catalog.ids[i] for i in items]
        unit = lambda x: (x / np.linalg.norm(x)).astype(np.float32)  # noqa: E731
        query = unit(rng.normal(size=catalog.dim)) if u % 4 == 0 else None
        prof = Profile(
            user_id=f"u{u}",
            long_term=unit(catalog.matrix[items[:20]].mean(0)),
            session=unit(catalog.matrix[items[:3]].mean(0)) if u % 3 else None,
            query=query,
            query_ts=NOW - 1000 if query is not None else None,
            last_ts=NOW,
            recent_items=ids[: 5 + u % 15] + ["not-in-catalog"],
            purchased_items=ids[10 : 10 + u % 25] + ["gone"],
            purchase_counts={i: 1 + (n % 3) for n, i in enumerate(ids[10:35])},
        )
        k = 20 if u % 5 else 7
        explicit = catalog.matrix[items[0]] if u % 11 == 0 else None
        reqs.append(Request(f"u{u}", None if u % 17 == 0 else prof, k=k, ref_ms=NOW, query_vector=explicit))
    return reqs


class _Popular:
    """A fixed popularity ranking (every 5th item, falling scores), as RedisPopularity.top returns it."""

    def __init__(self, ids: list[str]) -> None:
        self.rows = [(i, 1.0 / (1 + n)) for n, i in enumerate(ids[::5])]

    def top(self, k, category=None):
        return self.rows[:k]


@pytest.mark.parametrize("exclude_purchased", [True, False])
@pytest.mark.parametrize("mmr_lambda", [1.0, 0.8])
@pytest.mark.parametrize("boosts", [False, True])
# (prior of the discoveries, demand's say in which purchase comes back): the last one reads
# popularity for buy-again alone.
@pytest.mark.parametrize("popularity_weight,repeat_popularity", [(0.0, 0.0), (0.7, 0.4), (0.0, 1.5)])
def test_batched_scorer_equals_the_per_user_reference(
    catalog, exclude_purchased, mmr_lambda, boosts, popularity_weight, repeat_popularity
):
    s = Settings().override(
        scoring={
            "exclude_purchased": exclude_purchased,
            "mmr_lambda": mmr_lambda,
            "popularity_weight": popularity_weight,
            "repeat_popularity": repeat_popularity,
            "popularity_items": 60,
            "popularity_candidates": 15,
        }
    )
    adj = (  # surges and drops on single items and a surge on one category
        StaticDemandAdjustments(
            {i: (1.5 if n % 2 else 0.5) for n, i in enumerate(catalog.ids[::7])}, {"c3": 1.4}
        )
        if boosts
        else None
    )
    pop = _Popular(catalog.ids)
    reqs = _requests(catalog, seed=int(exclude_purchased) + 2 * int(boosts))
    got = Scorer(catalog, s.scoring, s.profile, adjustments=adj, popularity=pop).recommend(reqs, now_ms=NOW)
    want = ReferenceScorer(catalog, s.scoring, s.profile, adjustments=adj, popularity=pop).recommend(
        reqs, now_ms=NOW
    )
    assert any(got), "some users are warm"
    for g, w in zip(got, want, strict=True):
        assert [x.item_id for x in g] == [x.item_id for x in w]
        assert [x.reason for x in g] == [x.reason for x in w]
        assert np.allclose([x.score for x in g], [x.score for x in w], rtol=1e-4, atol=1e-7)
    reasons = {x.reason.split(":")[0] for g in got for x in g}
    assert {"similar_to", "matches_query"} <= reasons
    if not exclude_purchased:
        assert "buy_again" in reasons
    if boosts:
        assert "trending_in" in reasons
