"""Training pairs, evaluation cases, ranking metrics and the baselines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from evaluation.loo import (
    ItemKNNRanker,
    VectorRanker,
    baseline_scorers,
    evaluate_methods,
    full_ranking_ranks,
    mrr,
    ndcg_at_k,
    ranking_metrics,
    recall_at_k,
)
from inference.training.pairs import context_text, eval_cases, training_pairs
from streamrec.datasets import Dataset, load_dataset


def _ds(rows: list[tuple[str, str, int, str]], n_items: int = 6, query: dict | None = None) -> Dataset:
    items = pd.DataFrame({"item_id": [f"i{k}" for k in range(n_items)], "text": [f"text {k}" for k in range(n_items)],
                          "category": "", "available": True})  # fmt: skip
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "ts", "split"])
    inter["type"] = "click"
    inter["query"] = [query.get(k, "") if query else "" for k in range(len(inter))]
    return Dataset("t", items, inter)


def test_context_most_recent_first_and_clipped() -> None:
    assert context_text(["a b c d", "e f", "g"], n=2, item_words=3) == "g ; e f"
    assert context_text(["one two three four"], n=5, item_words=2) == "one two"


def test_training_pairs_from_sequences_and_queries() -> None:
    rows = [("u", "i0", 1, "train"), ("u", "i1", 2, "train"), ("u", "i0", 3, "train"), ("u", "i2", 4, "train"),
            ("u", "i3", 5, "test"), ("v", "", 1, "train"), ("v", "i4", 2, "train")]  # fmt: skip
    ds = _ds(rows, query={5: "blue lamp"})
    p = training_pairs(ds, ("train",), context_items=2, item_words=5)
    ctx = [(t, g) for t, g, k in zip(p.texts, p.targets, p.kinds, strict=True) if k == "context"]
    # i0 again is a repeat (skipped); test rows are not used; most recent first
    assert ctx == [("text 0", "i1"), ("text 0 ; text 1", "i2")]
    assert [(t, g) for t, g, k in zip(p.texts, p.targets, p.kinds, strict=True) if k == "query"] == [
        ("blue lamp", "i4")
    ]
    with_repeats = training_pairs(ds, ("train",), 2, 5, queries=False, skip_repeats=False)
    assert with_repeats.targets == ["i1", "i0", "i2"]


def test_basket_pairs_take_context_from_earlier_baskets_only() -> None:
    # two orders (ts 1 and 2) of two items each, then a third order repeating i0
    rows = [("u", "i0", 1, "train"), ("u", "i1", 1, "train"), ("u", "i2", 2, "train"), ("u", "i3", 2, "train"),
            ("u", "i0", 3, "train"), ("u", "i4", 3, "train")]  # fmt: skip
    ds = _ds(rows)
    p = training_pairs(ds, ("train",), context_items=3, item_words=5, basket=True)
    assert list(zip(p.texts, p.targets, strict=True)) == [
        ("text 1 ; text 0", "i2"),
        ("text 1 ; text 0", "i3"),  # both items of order 2 see order 1 only
        ("text 3 ; text 2 ; text 1", "i4"),  # i0 is a repeat: no pair
    ]
    # sequence mode: each item is the next of the one before it, within an order too
    seq = training_pairs(ds, ("train",), context_items=1, item_words=5)
    assert list(zip(seq.texts, seq.targets, strict=True)) == [
        ("text 0", "i1"),
        ("text 1", "i2"),
        ("text 2", "i3"),
        ("text 0", "i4"),
    ]


def test_eval_cases_history_and_first_new_item() -> None:
    rows = [("u", "i0", 1, "train"), ("u", "i1", 2, "valid"), ("u", "i0", 3, "test"), ("u", "i5", 4, "test"),
            ("w", "i2", 1, "test"), ("x", "i3", 1, "train"), ("x", "i3", 2, "test")]  # fmt: skip
    c = eval_cases(_ds(rows), "test", context_items=5, item_words=5)
    assert c.users == ["u"] and c.targets == ["i5"] and c.histories == [["i0", "i1"]]
    assert c.contexts == ["text 1 ; text 0"]
    assert (c.skipped_cold, c.skipped_repeat) == (1, 1)


def test_metric_values() -> None:
    ranks = [1, 2, 11, 60]
    assert recall_at_k(ranks, 10) == 0.5
    assert ndcg_at_k(ranks, 10) == pytest.approx((1 + 1 / np.log2(3)) / 4)
    assert mrr(ranks) == pytest.approx((1 + 1 / 2 + 1 / 11 + 1 / 60) / 4)
    m = ranking_metrics(ranks)
    assert m["recall@50"] == 0.75 and m["n"] == 4
    assert ranking_metrics([])["recall@10"] == 0.0


def test_full_ranking_excludes_history_and_splits_ties() -> None:
    scores = np.array([[0.9, 0.8, 0.7, 0.1], [0.5, 0.5, 0.5, 0.5]], np.float32)
    ranks = full_ranking_ranks(scores, np.array([2, 0]), [np.array([0]), np.array([], np.int64)])
    assert ranks.tolist() == [2.0, 2.5]  # item 0 excluded -> only item 1 above; 3 ties count half


def test_item_knn_follows_co_occurrence() -> None:
    import scipy.sparse as sp

    # users bought {0,1}, {0,1}, {2,3}: a user with history [0] should get 1 first
    ui = sp.csr_matrix(np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1]], np.float32))
    knn = ItemKNNRanker(ui, [np.array([0])])
    s = knn.scores(np.array([0]))[0]
    assert np.argmax(s) == 1 and s[2] == 0 and s[0] == 0


def test_methods_on_real_scientific_valid(data_dir: Path) -> None:
    ds = load_dataset("scientific", data_dir)
    cases = eval_cases(ds, "valid").take(400, seed=0)
    pos = {i: k for k, i in enumerate(ds.item_ids)}
    # an oracle "encoder" whose context vector is the target's item vector ranks every target first
    rng = np.random.default_rng(0)
    items = rng.normal(size=(len(pos), 64)).astype(np.float32)
    oracle = VectorRanker("oracle", items[[pos[t] for t in cases.targets]], items)
    res = evaluate_methods(ds, cases, [*baseline_scorers(ds, cases, "valid"), oracle])
    assert res["oracle"]["recall@10"] == 1.0 and res["oracle"]["mrr"] > 0.99
    assert 0.0 < res["most_popular"]["recall@50"] < 0.2
    assert res["item_knn"]["recall@50"] > res["most_popular"]["recall@50"]
