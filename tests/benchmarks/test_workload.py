"""The e2e bench's events are shaped after a real shop's shoppers and items, not made up."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from benchmarks.stream import shaped_workload


def _shop() -> SimpleNamespace:
    # shopper a: 6 events, b: 3, c: 1; item x sold 5 times, y 3, z 2; a's orders of 4 and 2 lines
    rows = (
        [("a", "x", 1)] * 4
        + [("a", "y", 2)] * 2
        + [("b", "x", 1), ("b", "y", 1), ("b", "z", 1), ("c", "z", 5)]
    )
    return SimpleNamespace(name="tiny", interactions=pd.DataFrame(rows, columns=["user_id", "item_id", "ts"]))


def test_the_shops_own_catalog_draws_its_items_by_their_sales_and_shoppers_by_activity() -> None:
    load = shaped_workload(_shop(), ["x", "y", "z", "never-sold"])
    # sales 5, 3, 2 and half a sale for the item nobody bought
    assert load.item_p == pytest.approx(np.array([5, 3, 2, 0.5]) / 10.5)
    assert load.user_p == pytest.approx([0.6, 0.3, 0.1])  # by activity rank
    d = load.describe()
    assert d["top_item_shares"][0] == pytest.approx(5 / 10.5, abs=1e-4) and d["shoppers"] == 3
    assert load.burst_sizes.tolist() == [1]  # a clickstream: each event drawn on its own
    orders = shaped_workload(_shop(), ["x", "y", "z"], bursts=True)
    assert sorted(orders.burst_sizes.tolist()) == [1, 2, 3, 4]  # (user, time) groups: c, a's 2nd, b, a's 1st


def test_events_come_in_bursts_of_one_shopper() -> None:
    load = shaped_workload(_shop(), ["x", "y", "z"], bursts=True)
    who = load.shoppers(10_000, np.random.default_rng(0))
    assert who.size == 10_000 and set(who.tolist()) <= {0, 1, 2}
    # runs of one shopper: bursts of 1-4 events (two bursts of one shopper may follow each other)
    runs = np.diff(np.flatnonzero(np.diff(np.r_[-1, who, -1]) != 0))
    assert 2.0 < runs.mean() < 6.0, runs.mean()
    # shoppers by activity: the busiest (rank 0) sends the most events
    assert np.bincount(who).argmax() == 0


def test_another_catalog_gets_the_shops_popularity_curve_in_a_random_order() -> None:
    items = [f"s{i}" for i in range(1000)]
    load = shaped_workload(_shop(), items)
    assert load.item_p.sum() == pytest.approx(1.0) and (load.item_p > 0).all()
    # sales 5, 3, 2 by rank: a power law of slope ~1.2, p(rank) = rank^-slope / sum
    slope = -np.polyfit(np.log([1, 2, 3]), np.log([5, 3, 2]), 1)[0]
    ranked = np.sort(load.item_p)[::-1]
    assert ranked[0] / ranked[9] == pytest.approx(10**slope, rel=1e-6)
    # popularity does not follow the catalog's order (ranks are permuted)
    assert not (np.diff(load.item_p) <= 0).all()


def test_a_clickstream_draws_every_event_on_its_own() -> None:
    who = shaped_workload(_shop(), ["x", "y", "z"]).shoppers(10_000, np.random.default_rng(0))
    # P(next event is the same shopper) = 0.6^2 + 0.3^2 + 0.1^2 = 0.46, not the bursts' ~0.8
    same = (who[1:] == who[:-1]).mean()
    assert 0.43 < same < 0.49, same
