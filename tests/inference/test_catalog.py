"""The catalog index: lookups, exact and ANN top-k with exclusions, upserts, persistence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from inference.catalog import CatalogError, CatalogIndex, load_catalog
from inference.encoder import OnnxEncoder
from inference.training.index import build_catalog
from streamrec.interfaces import ItemVectors
from streamrec.settings import Settings


def _random(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    m = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def _brute_topk(q: np.ndarray, m: np.ndarray, k: int, exclude: set[int]) -> list[int]:
    s = m @ q
    order = [int(i) for i in np.argsort(-s, kind="stable") if int(i) not in exclude]
    return order[:k]


def test_lookup_index_of_and_protocol() -> None:
    cat = CatalogIndex.from_arrays(["a", "b", "c"], 3 * _random(3), "v1", categories=["x", "y", None])
    assert isinstance(cat, ItemVectors)
    np.testing.assert_allclose(np.linalg.norm(cat.matrix, axis=1), 1.0, atol=1e-6)  # rows normalised
    assert cat.index_of(["c", "zz", "a"]).tolist() == [2, -1, 0]
    vecs, found = cat.lookup(["b", "nope"])
    assert found.tolist() == [True, False]
    np.testing.assert_allclose(vecs[0], cat.matrix[1])
    assert not vecs[1].any()
    assert cat.categories == ["x", "y", ""] and cat.available.all() and cat.dim == 32
    with pytest.raises(CatalogError, match="duplicate"):
        CatalogIndex.from_arrays(["a", "a"], _random(2), "v1")


def test_exact_topk_matches_brute_force_with_exclusions() -> None:
    m = _random(300)
    cat = CatalogIndex.from_arrays([f"i{k}" for k in range(300)], m, "v1")
    q = _random(5, seed=1)
    excl = [np.array([], np.int64), np.array([3, 7]), np.arange(0, 300, 2), np.array([299]), np.array([0])]
    for r in range(5):  # exclude the best item of query 4 to be sure exclusion bites
        if r == 4:
            excl[4] = np.array([_brute_topk(q[4], m, 1, set())[0]])
    idx, sc = cat.topk(q, 10, exclude=excl)
    for r in range(5):
        assert idx[r].tolist() == _brute_topk(q[r], m, 10, set(excl[r].tolist()))
        np.testing.assert_allclose(sc[r], m[idx[r]] @ q[r], rtol=1e-5)
        assert np.all(np.diff(sc[r]) <= 1e-7)


def test_exact_topk_with_tied_scores_returns_the_best_scores() -> None:
    """Items with the same vector tie; a tie at the k-th score must still give k distinct items
    holding the k best scores (the partition's fast path falls back to argpartition there)."""
    base = _random(50, seed=4)
    m = np.repeat(base, 4, axis=0)  # every vector four times: ties at every rank
    cat = CatalogIndex.from_arrays([f"i{k}" for k in range(200)], m, "v1")
    q = _random(3, seed=2)
    for k in (10, 11, 13):  # the k-th best falls inside a group of four equals
        idx, sc = cat.topk(q, k)
        for r in range(3):
            want = np.sort(m @ q[r])[::-1][:k]
            np.testing.assert_allclose(sc[r], want, rtol=1e-6)
            np.testing.assert_allclose(m[idx[r]] @ q[r], sc[r], rtol=1e-6)
            assert len(set(idx[r].tolist())) == k


def test_topk_pads_when_fewer_items_than_k() -> None:
    cat = CatalogIndex.from_arrays(["a", "b", "c"], _random(3), "v1")
    idx, sc = cat.topk(_random(1, seed=3), 5, exclude=[np.array([1])])
    assert sorted(idx[0][:2].tolist()) == [0, 2] and idx[0][2:].tolist() == [-1, -1, -1]
    assert np.isneginf(sc[0][2:]).all()


def test_save_load_roundtrip_and_tamper(tmp_path: Path) -> None:
    cat = CatalogIndex.from_arrays(
        ["a", "b"], _random(2), "v7", categories=["x", "y"], available=[True, False]
    )
    cat.save(tmp_path / "catalog")
    back = CatalogIndex.load(tmp_path / "catalog")
    assert (
        back.ids == ["a", "b"] and back.categories == ["x", "y"] and back.available.tolist() == [True, False]
    )
    assert back.model_version == "v7"
    np.testing.assert_array_equal(back.matrix, cat.matrix)
    np.save(tmp_path / "catalog" / "vectors.npy", _random(2, seed=9))
    with pytest.raises(CatalogError, match="does not match meta.json"):
        CatalogIndex.load(tmp_path / "catalog")
    with pytest.raises(CatalogError, match="streamrec index"):
        CatalogIndex.load(tmp_path / "nothing")


def test_upsert_adds_and_changes_without_rebuild() -> None:
    m = _random(50)
    cat = CatalogIndex.from_arrays([f"i{k}" for k in range(50)], m, "v1")
    new_vec, moved = _random(2, seed=5)
    before = cat.topk(moved[None], 1)[0][0, 0]  # top-k's transposed copy of the vectors is cached now
    added, changed = cat.upsert(
        ["new", "i3"], np.stack([new_vec, moved]), categories=["c", "d"], available=[True, False]
    )
    assert (added, changed) == (1, 1)
    assert len(cat) == 51 and cat.index_of(["new"]).tolist() == [50]
    assert cat.topk(new_vec[None], 1)[0][0, 0] == 50
    assert cat.topk(moved[None], 1)[0][0, 0] == 3 != before  # changed in place: seen, not the cached copy
    assert cat.categories[3] == "d" and not cat.available[3] and cat.available[50]
    cat.replace_vectors(-cat.matrix)
    assert cat.topk(moved[None], 1)[0][0, 0] != 3


def test_ann_above_threshold_recall_exclusion_and_upsert() -> None:
    n = 4000  # clustered like real item embeddings: 80 product families
    centers = _random(80, dim=48, seed=2)
    m = centers[np.arange(n) % 80] + 0.6 * _random(n, dim=48, seed=3)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    ids = [f"i{k}" for k in range(n)]
    cat = CatalogIndex.from_arrays(ids, m, "v1", ann_threshold=1000)
    assert cat.uses_ann
    q = m[:200] + 0.05 * _random(200, dim=48, seed=4)
    recall = cat.ann_recall(q, 10)
    assert recall >= 0.9, f"ANN recall@10 vs exact {recall:.3f}"
    idx, _ = cat.topk(q[:3], 10, exclude=[np.array([0]), np.array([1]), np.array([], np.int64)])
    assert 0 not in idx[0] and 1 not in idx[1] and idx[2][0] == 2
    fresh = _random(1, dim=48, seed=11)
    cat.upsert(["fresh", "i5"], np.stack([fresh[0], -m[5]]))
    assert cat.ids[cat.topk(fresh, 1)[0][0, 0]] == "fresh"  # added to the ANN index
    top_for_old = cat.topk(m[5][None], 5)[0][0]
    assert 5 not in top_for_old  # i5 now points the other way
    assert cat.topk(-m[5][None], 1)[0][0, 0] == 5


def test_build_catalog_with_real_encoder_and_load_catalog(
    pretrained_dir: Path, tmp_path: Path, data_dir: Path
) -> None:
    import shutil

    from streamrec.datasets import load_dataset

    model = tmp_path / "model"
    shutil.copytree(pretrained_dir, model)
    enc = OnnxEncoder(model, variant="int8")
    ds = load_dataset("online-retail", data_dir)
    cat = build_catalog(enc, ds, model / "catalog")
    assert len(cat) == len(ds.items) == 3659 and cat.model_version == enc.model_version
    row = cat.index_of(["85123A"])[0]  # WHITE HANGING HEART T-LIGHT HOLDER
    np.testing.assert_allclose(
        cat.matrix[row], enc.encode(["WHITE HANGING HEART T-LIGHT HOLDER"])[0], atol=0.05
    )
    q = enc.encode(["white heart t-light holder"])
    assert "85123A" in [cat.ids[i] for i in cat.topk(q, 10)[0][0]]
    s = Settings(model_dir=model)
    assert load_catalog(s).ids == cat.ids
    meta = json.loads((model / "catalog" / "meta.json").read_text())
    meta["model_version"] = "some-other-model"
    (model / "catalog" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CatalogError, match="re-embed"):
        load_catalog(s)


def test_ivf_probes_the_fewest_lists_that_reach_the_recall_target() -> None:
    n = 6000  # clustered: 60 product families, queries of 1-5 items as in calibration
    centers = _random(60, dim=32, seed=5)
    m = centers[np.arange(n) % 60] + 0.9 * _random(n, dim=32, seed=6)
    ids = [f"i{k}" for k in range(n)]
    loose = CatalogIndex.from_arrays(ids, m, "v1", ann_threshold=1000, ann_recall_target=0.8)
    strict = CatalogIndex.from_arrays(ids, m, "v1", ann_threshold=1000, ann_recall_target=0.99)
    assert loose.ann_calibration is None and loose._ann is None  # built on first use, not on load
    loose.prepare()
    strict.topk(m[:1], 5)
    lo, hi = loose.ann_calibration, strict.ann_calibration
    assert lo is not None and hi is not None
    assert lo["recall_at_20"] >= 0.8 and hi["recall_at_20"] >= 0.99
    # the looser target stops at the first step; the stricter one probes more lists, not all of them
    assert lo["nprobe"] == 8 < hi["nprobe"] < hi["nlist"]
    assert loose._ann.nprobe == 8 and strict._ann.nprobe == hi["nprobe"]  # what the searches use
    # fresh queries (another seed) keep roughly the calibrated recall
    g = np.random.default_rng(9)
    q = strict.matrix[g.integers(0, n, (100, 3))].sum(1)
    assert strict.ann_recall(q, 20) >= 0.95
    # excluded rows never come back, and a query excluding more than the index returns pads with -1
    idx, sc = strict.topk(q[:2], 5, exclude=[np.arange(n), np.array([], np.int64)])
    assert (idx[0] == -1).all() and np.isneginf(sc[0]).all()
    assert (idx[1] >= 0).all() and (np.diff(sc[1]) <= 1e-6).all()


def test_ivf_index_follows_a_growing_catalog() -> None:
    """A serving (prepared) catalog that grows past the threshold builds its index in that
    upsert, and one that doubles is rebuilt and calibrated anew; partial exclusions hold."""
    base = _random(900, dim=16, seed=21)
    cat = CatalogIndex.from_arrays([f"i{k}" for k in range(900)], base, "v1", ann_threshold=1000)
    cat.prepare()
    assert not cat.uses_ann and cat._ann is None
    more = _random(300, dim=16, seed=22)
    cat.upsert([f"j{k}" for k in range(300)], more)
    assert cat.uses_ann and cat._ann is not None  # built in the upsert, not in a scoring round
    first = dict(cat.ann_calibration or {})
    assert cat.ids[cat.topk(more[5][None], 1)[0][0, 0]] == "j5"
    cat.upsert([f"h{k}" for k in range(1300)], _random(1300, dim=16, seed=23))
    assert len(cat) == 2500 and cat.ann_calibration is not None
    assert cat.ann_calibration["nlist"] > first["nlist"]  # rebuilt for twice the items
    q = cat.matrix[:4]
    full, _ = cat.topk(q, 6)
    idx, sc = cat.topk(q, 6, exclude=[full[0, :2], np.array([], np.int64), full[2, :1], np.array([3])])
    assert not set(full[0, :2]) & set(idx[0]) and list(idx[0][:4]) == list(full[0][2:6])
    assert list(idx[1]) == list(full[1]) and 3 not in idx[3]
    assert (idx >= 0).all() and np.isfinite(sc).all()


def test_unavailable_items_are_masked_inside_the_search_not_by_widening_it() -> None:
    """``available_only`` leaves out unavailable items for every query at once: the exact product
    gives what per-row exclusions of them gave, and the ANN index skips them while searching,
    still returning k items per query."""
    n = 3000
    centers = _random(30, dim=16, seed=31)
    m = centers[np.arange(n) % 30] + 0.7 * _random(n, dim=16, seed=32)
    ids = [f"i{k}" for k in range(n)]
    avail = np.ones(n, bool)
    avail[::3] = False  # a third of the catalog out of stock
    q = m[:40] + 0.05 * _random(40, dim=16, seed=33)
    hist = [np.array([k + 1]) for k in range(40)]
    exact = CatalogIndex.from_arrays(ids, m, "v1", available=avail)
    masked, _ = exact.topk(q, 20, exclude=hist, available_only=True)
    gone = np.flatnonzero(~avail)
    per_row, _ = exact.topk(q, 20, exclude=[np.concatenate([h, gone]) for h in hist])
    np.testing.assert_array_equal(masked, per_row)
    ann = CatalogIndex.from_arrays(ids, m, "v1", available=avail, ann_threshold=1000)
    got, sc = ann.topk(q, 20, exclude=hist, available_only=True)
    assert (got >= 0).all() and np.isfinite(sc).all()
    assert avail[got].all() and not any(h[0] in row for h, row in zip(hist, got, strict=True))
    hits = sum(len(set(a) & set(b)) for a, b in zip(got, masked, strict=True))
    assert hits / masked.size >= 0.9
    everything, _ = ann.topk(q, 20)
    assert not avail[everything].all()  # without the flag the unavailable ones rank as before
