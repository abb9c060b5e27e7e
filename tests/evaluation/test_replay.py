"""Replay evaluation: metrics and baselines on tiny hand-made streams with known answers."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from click.testing import CliRunner

from evaluation.baselines import (
    ItemKNN,
    MostPopular,
    RecentPopular,
    Repeat,
    SequentialID,
    SessionKNN,
    train_sequential_id,
)
from evaluation.replay import rank_metrics, run_prefix, run_replay, summarise
from streamrec.datasets import load_generic
from streamrec.events import make_event
from streamrec.settings import Settings

ITEMS = ["a", "b", "c", "d", "e"]
T0 = 1_300_000_000_000
DAY = 86_400_000


def test_rank_metrics_known_values():
    m = rank_metrics([1, 0, 2, 11])
    assert m["hr@10"] == pytest.approx(0.5)
    assert m["hr@20"] == pytest.approx(0.75)
    assert m["ndcg@10"] == pytest.approx((1.0 + 1 / 1.5849625007) / 4)
    assert m["mrr"] == pytest.approx((1 + 0.5 + 1 / 11) / 4)


def _ev(user, item, t, typ="purchase"):
    return make_event(typ, user, item_id=item, ts=T0 + t)


def test_most_and_recent_popular():
    mp, rp = MostPopular(ITEMS), RecentPopular(ITEMS, half_life_days=1)
    old = [_ev("u", "a", 0)] * 3
    new = [_ev("v", "b", 10 * DAY)]
    for m in (mp, rp):
        m.update(old)
        m.update(new)
    assert mp.recommend(["x"], 2, T0)[0] == ["a", "b"]
    # 3 purchases 10 half-lives ago weigh less than 1 purchase now.
    assert rp.recommend(["x"], 2, T0)[0] == ["b", "a"]


def test_item_knn_recommends_co_purchased_items():
    knn = ItemKNN(ITEMS)
    knn.update([_ev("u1", "a", 0), _ev("u1", "b", 1)])
    knn.update([_ev("u2", "c", 2), _ev("u2", "d", 3)])
    knn.update([_ev("u3", "a", 4)])
    assert knn.recommend(["u3"], 1, T0)[0] == ["b"]


def test_session_knn_votes_from_similar_baskets():
    sknn = SessionKNN(ITEMS)
    sknn.update([_ev("u1", "a", 0), _ev("u1", "b", 0), _ev("u1", "c", 0)])  # one basket
    sknn.update([_ev("u2", "d", 1), _ev("u2", "e", 1)])
    sknn.update([_ev("u3", "a", 2)])
    top = sknn.recommend(["u3"], 3, T0)[0]
    assert set(top[:3]) == {"a", "b", "c"}


def test_repeat_prefers_the_users_own_items():
    rep = Repeat(ITEMS)
    rep.update([_ev("u1", "e", 0), _ev("u1", "e", 1), _ev("u1", "d", 2), _ev("u2", "a", 3)])
    assert rep.recommend(["u1"], 2, T0)[0] == ["e", "d"]
    assert rep.recommend(["cold"], 1, T0)[0] == ["e"]  # popular fallback


def test_sequential_id_baseline_learns_what_follows_what(tmp_path):
    """The ID-only sequential model, trained in the job on the periods before the evaluated one:
    after 'a' a shopper buys 'b', after 'c' 'd' (the train and valid periods teach it); on the
    stream it follows each user's latest events (repeats allowed), and 'z', first sold in the test period, has no
    trained embedding and is never recommended by it."""
    import numpy as np

    from inference.catalog import CatalogIndex
    from inference.user_model import event_arrays

    items = ["a", "b", "c", "d", "e", "f", "z"]
    pd.DataFrame({"item_id": items, "text": [f"item {i}" for i in items]}).to_csv(
        tmp_path / "items.csv", index=False
    )
    rows = []
    for n in range(600):  # the last 150 users buy their second item in the valid period
        first, then = ("a", "b") if n % 2 else ("c", "d")
        later = "valid" if n >= 450 else "train"
        t2 = T0 + DAY + n * 1000 if n >= 450 else T0 + n * 1000 + 500
        rows += [(f"u{n}", first, T0 + n * 1000, "train"), (f"u{n}", then, t2, later)]
    rows += [("t1", "z", T0 + 3 * DAY, "test"), ("t1", "z", T0 + 3 * DAY + 1, "test")]
    pd.DataFrame(rows, columns=["user_id", "item_id", "ts", "split"]).assign(type="purchase").to_csv(
        tmp_path / "interactions.csv", index=False
    )
    ds = load_generic(tmp_path)
    rng = np.random.default_rng(0)
    catalog = CatalogIndex(
        ds.item_ids, rng.standard_normal((len(ds.item_ids), 16)).astype(np.float32), "random"
    )
    model = train_sequential_id(ds, catalog, "test", progress=False, cache_dir=tmp_path / "cache")
    assert model.metrics["refit"]["splits"] == ["train", "valid"]
    # the embeddings' learning rate is chosen on valid: the model refit is the best one's
    grid = model.metrics["grid"]["offset_lr_scale"]
    assert [g["value"] for g in grid] == [1.0, 10.0]
    best = max(grid, key=lambda g: g["ndcg@10"])
    assert model.cfg.offset_lr_scale == best["value"] and model.metrics["refit"]["epochs"] == best["epoch"]
    # a second job on the same data loads the same model; other data trains anew
    again = train_sequential_id(ds, catalog, "test", progress=False, cache_dir=tmp_path / "cache")
    assert "cached" in again.metrics and again.alpha == model.alpha
    assert np.array_equal(again.item_matrix(), model.item_matrix())
    arrays = event_arrays([[("a", "purchase", T0)]], [T0], catalog.index_of, model.cfg.n_events)
    q = np.zeros((1, 16), np.float32), np.zeros(1, np.float32)
    assert np.allclose(again.contexts(arrays, *q), model.contexts(arrays, *q), atol=1e-6)
    assert (
        "cached"
        not in train_sequential_id(ds, catalog, "valid", progress=False, cache_dir=tmp_path / "cache").metrics
    )
    seq = SequentialID(ds.item_ids, model, catalog, ds, "test")
    seq.update([_ev("x", "a", 3 * DAY), _ev("y", "c", 3 * DAY), _ev("w", "z", 3 * DAY)])
    after_a, after_c, cold = seq.recommend(["x", "y", "never"], 3, T0 + 3 * DAY)
    # trained on new items only (history masked, as in eval loo), it ranks the user's own item
    # freely; the first item new to the user is the one that follows
    assert [i for i in after_a if i != "a"][0] == "b" and [i for i in after_c if i != "c"][0] == "d"
    assert len(after_a) == 3 and "z" not in seq.recommend(["x"], 20, T0 + 3 * DAY)[0]
    assert cold == seq._top(seq.fallback.counts, 3) and "z" in cold  # no events yet: popular (z, just sold)
    scores = run_replay(
        ds, {"sasrec": SequentialID(ds.item_ids, model, catalog, ds, "test")}, Settings(), progress=False
    )
    # t1's first z: no events yet, the popular fallback lists all 7 items; the second: z never
    assert scores["sasrec"].ranks[0] > 0 and scores["sasrec"].ranks[1] == 0


def test_prequential_replay_on_a_generic_dataset(tmp_path):
    """Test-then-learn: the test purchase of 'a' is most-popular's rank 1; 'e', never bought
    before, is last of the 5 items (rank 5); u3's own 'a' leads the buy-again list after it."""
    pd.DataFrame({"item_id": ITEMS, "text": [f"item {i}" for i in ITEMS]}).to_csv(
        tmp_path / "items.csv", index=False
    )
    rows = [
        ("u1", "a", T0, "train"), ("u2", "a", T0 + 1000, "train"), ("u2", "b", T0 + 2000, "train"),
        ("u3", "a", T0 + 2 * DAY, "test"), ("u3", "e", T0 + 3 * DAY, "test"),
    ]  # fmt: skip
    pd.DataFrame(rows, columns=["user_id", "item_id", "ts", "split"]).assign(type="purchase").to_csv(
        tmp_path / "interactions.csv", index=False
    )
    ds = load_generic(tmp_path)
    methods = {"most_popular": MostPopular(ds.item_ids), "repeat": Repeat(ds.item_ids)}
    scores = run_replay(ds, methods, Settings(), progress=False)
    assert scores["most_popular"].ranks == [1, 5]
    assert scores["repeat"].ranks[0] == 1  # cold u3: popular fallback puts 'a' first
    overall, per_day = summarise(scores, len(ds.items))
    assert overall["most_popular"]["hr@10"] == pytest.approx(1.0)
    assert overall["most_popular"]["mrr"] == pytest.approx((1 + 1 / 5) / 2)
    assert overall["most_popular"]["coverage"] == pytest.approx(1.0)
    assert set(per_day["day"]) == {"2011-03-15", "2011-03-16"}


def test_replay_on_the_valid_split_warms_up_on_train_only(tmp_path):
    pd.DataFrame({"item_id": ITEMS, "text": [f"item {i}" for i in ITEMS]}).to_csv(
        tmp_path / "items.csv", index=False
    )
    rows = [
        ("u1", "b", T0, "train"), ("u2", "b", T0 + 1000, "train"),
        ("u3", "c", T0 + DAY, "valid"),  # evaluated; b is the most popular item before it
        ("u1", "c", T0 + 2 * DAY, "test"), ("u2", "c", T0 + 2 * DAY + 1, "test"),  # not in the warm-up
        ("u4", "c", T0 + 2 * DAY + 2, "test"),
    ]  # fmt: skip
    pd.DataFrame(rows, columns=["user_id", "item_id", "ts", "split"]).assign(type="purchase").to_csv(
        tmp_path / "interactions.csv", index=False
    )
    ds = load_generic(tmp_path)
    scores = run_replay(
        ds, {"most_popular": MostPopular(ds.item_ids)}, Settings(), progress=False, split="valid"
    )
    # one valid event, c, never bought in train: below b (bought twice); had the 3 test purchases
    # of c leaked into the warm-up, c would rank first
    assert len(scores["most_popular"].ranks) == 1 and scores["most_popular"].ranks[0] > 1


@pytest.mark.timeout(300)
def test_eval_replay_quick_cli(retail_model_dir, tmp_path, stack):
    out = tmp_path / "replay.json"
    res = CliRunner().invoke(
        __import__("streamrec.cli", fromlist=["main"]).main,
        ["eval", "replay", "--quick", "--model-dir", str(retail_model_dir), "--pretrained-dir",
         str(retail_model_dir), "--results-dir", str(tmp_path), "--output", str(out), "--no-sasrec"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    expected = {
        "streamrec",
        "streamrec_pretrained",
        "most_popular",
        "recent_popular",
        "item_knn",
        "session_knn",
    }
    assert expected <= set(data) and "sasrec" not in data  # --no-sasrec: not trained
    for m in data.values():
        assert 0.0 <= m["hr@10"] <= m["hr@20"] <= 1.0 and m["events"] > 1000
    assert (tmp_path / "replay.md").exists() and (tmp_path / "replay_hr10_per_day.png").exists()
    # streamrec's HR@20 against each method on the same events, with intervals over whole users
    vs = data["streamrec"]["vs"]
    assert set(vs) == set(data) - {"streamrec"}
    for name, v in vs.items():
        gain, g_lo, g_hi = v["hr@20 gain"]
        ratio, r_lo, r_hi = v["hr@20 ratio"]
        assert gain == pytest.approx(data["streamrec"]["hr@20"] - data[name]["hr@20"])
        assert g_lo <= gain <= g_hi and r_lo <= ratio <= r_hi
        if data[name]["hr@20"] > 0:
            assert ratio == pytest.approx(data["streamrec"]["hr@20"] / data[name]["hr@20"])
    assert "| streamrec against | hr@20 gain | hr@20 ratio |" in (tmp_path / "replay.md").read_text()


def test_replay_splits_hits_into_rebuys_new_cold_and_tail_items(tmp_path):
    items = [f"i{k}" for k in range(10)] + ["fresh"]
    pd.DataFrame({"item_id": items, "text": [f"item {i}" for i in items]}).to_csv(
        tmp_path / "items.csv", index=False
    )
    rows = [(f"w{k}", f"i{k % 6}", T0 + k, "train") for k in range(30)]  # i0..i5 popular, i6..i9 never
    rows += [("u1", "i7", T0 + 40, "train")]  # i7 in the warm-up once: long tail
    rows += [
        ("u1", "i7", T0 + 2 * DAY, "test"),  # re-buy of a tail item
        ("u2", "i0", T0 + 2 * DAY + 1, "test"),  # new to u2, head item
        ("u3", "fresh", T0 + 2 * DAY + 2, "test"),  # cold: never seen before the test period
        ("u2", "i0", T0 + 2 * DAY + 3, "test"),  # u2 bought i0 a moment ago: a re-buy now
    ]
    pd.DataFrame(rows, columns=["user_id", "item_id", "ts", "split"]).assign(type="purchase").to_csv(
        tmp_path / "interactions.csv", index=False
    )
    ds = load_generic(tmp_path)
    sc = run_replay(ds, {"repeat": Repeat(ds.item_ids)}, Settings(), progress=False)["repeat"]
    assert sc.rebuy == [True, False, False, True]
    assert sc.cold == [False, False, True, False]
    assert sc.tail == [True, False, True, False]
    overall, _ = summarise({"repeat": sc}, len(items))
    m = overall["repeat"]
    # both re-buys are in the buy-again lists; each segment's rate is over its own events only
    assert m["hr@20 rebuy"] == 1.0 and m["events rebuy"] == 2 and m["events new"] == 2
    assert m["hr@20 new"] == rank_metrics([sc.ranks[1], sc.ranks[2]])["hr@20"]
    assert m["events cold"] == 1 and m["hr@20 cold"] == rank_metrics([sc.ranks[2]])["hr@20"]
    assert m["events tail"] == 2


def test_replay_runs_started_in_the_same_second_keep_their_profiles_apart():
    # Two tuning runs started together once shared one prefix (the second of the start): each
    # read the other's profiles, written further into the stream, and scored far too well.
    prefixes = {run_prefix() for _ in range(20)}
    assert len(prefixes) == 20
    assert all(p.startswith("eval-") for p in prefixes)


def test_paired_intervals_resample_whole_users():
    """Two methods on the same events: the gain and ratio of HR@20 and their intervals; a user
    whose many events all differ moves the interval as one draw, not as many."""
    from evaluation.replay import MethodScores, paired_vs

    a, b = MethodScores(), MethodScores()
    for u in range(40):
        for _ in range(10):  # user u: 10 events; a finds all of users 0-19's, b finds users 10-29's
            a.add(1 if u < 20 else 0, "2011-01-01", user=f"u{u}")
            b.add(1 if 10 <= u < 30 else 0, "2011-01-01", user=f"u{u}")
    vs = paired_vs({"a": a, "b": b}, "a")["b"]
    assert vs["hr@20 gain"][0] == pytest.approx(0.0) and vs["hr@20 ratio"][0] == pytest.approx(1.0)
    lo, hi = vs["hr@20 gain"][1:]
    assert lo < 0 < hi and hi - lo > 0.2  # 20 differing users of 40: wide, though 200 events differ
