"""`streamrec tune`'s choice rule and grid parsing (the CLI flow: tests/inference/training/test_tune_cli.py)."""

from __future__ import annotations

import click
import numpy as np
import pytest

from evaluation.loo import ranking_metrics
from evaluation.tune import choose, paired_interval, parse_grid, per_case
from streamrec.settings import ScoringSettings


def test_the_best_point_is_chosen_only_when_its_gain_is_beyond_noise() -> None:
    rng = np.random.default_rng(0)
    ref = (rng.random(2000) < 0.1).astype(float)
    clear = np.maximum(ref, (rng.random(2000) < 0.1).astype(float))  # finds about 90 % more
    assert choose([ref, clear, ref * 0])[:2] == (1, 1)
    # one case more out of 2,000: the best, but not beyond noise, so the settings' values stay
    slight = ref.copy()
    slight[np.flatnonzero(ref == 0)[0]] = 1.0
    best, chosen, (lo, hi) = choose([ref, slight])
    assert (best, chosen) == (1, 0) and lo <= 0 < hi
    # a tie with the settings' values keeps them
    assert choose([ref, ref.copy()])[:2] == (0, 0)


def test_per_case_contributions_average_to_the_reported_metrics() -> None:
    ranks = np.array([1, 0, 3, 12, 60, 2], float)
    m = ranking_metrics(ranks)
    for key in ("recall@10", "ndcg@10", "recall@50", "ndcg@50", "mrr"):
        assert per_case(key, ranks).mean() == pytest.approx(m[key])


def test_the_grid_is_every_combination_checked_against_the_fields_bounds() -> None:
    base = ScoringSettings()
    grid = parse_grid(["covisit_weight=0,0.1", "mmr_lambda=1,0.9,1.0"], base)
    assert grid == [
        {"covisit_weight": 0.0, "mmr_lambda": 1.0},
        {"covisit_weight": 0.0, "mmr_lambda": 0.9},
        {"covisit_weight": 0.1, "mmr_lambda": 1.0},
        {"covisit_weight": 0.1, "mmr_lambda": 0.9},
    ]
    with pytest.raises(click.BadParameter, match="mmr_lambda"):
        parse_grid(["mmr_lambda=1.5"], base)
    with pytest.raises(click.BadParameter, match="cannot be tuned"):
        parse_grid(["top_k=10,20"], base)
    with pytest.raises(click.BadParameter, match="NAME=V1"):
        parse_grid(["covisit_weight"], base)


def test_resampling_whole_users_widens_the_interval_of_correlated_events() -> None:
    rng = np.random.default_rng(1)
    # 200 users with 20 events each; a user's events all gain or all lose together
    per_user = rng.choice([-1.0, 1.0], size=200) * 0.5 + 0.05
    gain = np.repeat(per_user, 20)
    users = [f"u{u}" for u in range(200) for _ in range(20)]
    lo_e, hi_e = paired_interval(gain)
    lo_u, hi_u = paired_interval(gain, users)
    assert lo_e < gain.mean() < hi_e and lo_u < gain.mean() < hi_u
    assert (hi_u - lo_u) > 3 * (hi_e - lo_e)  # about sqrt(20) wider: 200 draws, not 4,000


def test_the_more_points_are_compared_the_wider_the_interval_the_best_must_clear() -> None:
    from evaluation.tune import interval_level

    assert interval_level(2) == pytest.approx(0.90) and interval_level(12) == pytest.approx(1 - 0.10 / 11)
    rng = np.random.default_rng(2)
    ref = (rng.random(3000) < 0.1).astype(float)
    better = ref.copy()
    flip = rng.choice(3000, 120, replace=False)  # about 80 gains and 40 losses: a small, noisy lead
    better[flip] = 1.0 - better[flip]
    assert better.mean() > ref.mean()
    _, _, (lo2, hi2) = choose([ref, better])
    _, _, (lo12, hi12) = choose([ref, better, *[ref * 0] * 10])
    assert lo12 < lo2 and hi12 > hi2
