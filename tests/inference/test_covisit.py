"""The co-visitation signal: one counting rule offline and online (whatever the batching), the
same cosine as item-kNN for short histories, a seed re-indexed onto the catalog, and the scorer
taking co-visited items as candidates and as a feature of the score."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import scipy.sparse as sp

from evaluation.baselines import ItemSimilarity
from inference.catalog import CatalogIndex
from inference.covisit import CoVisitation, CoVisitRecorder, load_covisit
from inference.scoring import Request, Scorer
from profiles.model import Profile
from streamrec.events import Event, EventType
from streamrec.settings import Settings

T0 = 1_700_000_000_000


def _catalog(n: int = 30, dim: int = 8, seed: int = 0) -> CatalogIndex:
    m = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return CatalogIndex.from_arrays([f"i{k}" for k in range(n)], m, "test-vectors")


def _stream(n_users: int = 40, n_items: int = 30, length: int = 12, seed: int = 1) -> list[tuple[str, int]]:
    g = np.random.default_rng(seed)
    out = [(f"u{g.integers(n_users)}", int(g.integers(n_items))) for _ in range(n_users * length)]
    return out


def _dense(cv: CoVisitation) -> np.ndarray:
    cv.fold()
    return cv.counts().toarray()


def test_recorder_counts_what_fit_counts_whatever_the_batching() -> None:
    stream = _stream()
    seqs: dict[str, list[int]] = {}
    for u, i in stream:
        seqs.setdefault(u, []).append(i)
    fitted = CoVisitation.fit(30, seqs.values(), window=5)
    ids = [f"i{k}" for k in range(30)]
    index_of = _catalog().index_of
    for cuts in ([len(stream)], [1] * len(stream), [7, 100, 3, 250]):
        online = CoVisitation(30)
        rec = CoVisitRecorder(online, index_of, window=5, fold_every_s=None)
        pos = 0
        for c in [*cuts, len(stream)]:
            part = stream[pos : pos + c]
            rec.record([u for u, _ in part], [ids[i] for _, i in part])
            pos += c
        np.testing.assert_array_equal(_dense(online), _dense(fitted))
        np.testing.assert_array_equal(online._users, fitted._users)
    assert fitted.nnz > 0 and np.allclose(_dense(fitted), _dense(fitted).T)


def test_short_histories_give_item_knn_cosine() -> None:
    g = np.random.default_rng(3)
    seqs = [g.choice(20, size=int(g.integers(1, 6)), replace=False).tolist() for _ in range(60)]
    cv = CoVisitation.fit(20, seqs, window=10)  # every history fits in the window
    rows = np.repeat(np.arange(len(seqs)), [len(s) for s in seqs])
    x = sp.csr_matrix((np.ones(rows.size), (rows, np.concatenate(seqs))), shape=(len(seqs), 20))
    knn = ItemSimilarity.fit(x)
    q = [np.array(seqs[0]), np.array(seqs[1])]
    qr = np.repeat([0, 1], [len(q[0]), len(q[1])])
    np.testing.assert_allclose(cv.scores(qr, np.concatenate(q), 2), knn.scores(q), rtol=1e-5, atol=1e-6)


def test_window_limits_pairs_to_nearby_items() -> None:
    cv = CoVisitation.fit(10, [[0, 1, 2, 3]], window=2)
    c = _dense(cv)
    assert c[3, 2] == 1 and c[3, 1] == 1 and c[3, 0] == 0  # 0 had left the window when 3 came
    assert c[1, 0] == 1 and c[0, 1] == 1


def test_seed_is_reindexed_onto_the_catalog(tmp_path) -> None:
    cv = CoVisitation.fit(4, [[0, 1], [1, 2], [0, 1, 3]], window=5)
    cv.save(tmp_path / "covisit.npz", ["a", "b", "c", "d"], 5)
    (tmp_path / "user").mkdir()
    (tmp_path / "covisit.npz").rename(tmp_path / "user" / "covisit.npz")
    cat = CatalogIndex.from_arrays(["d", "x", "b", "a"], np.eye(4, dtype=np.float32), "v")  # c gone, x new
    loaded, window = load_covisit(tmp_path, cat.ids, cat.index_of)  # type: ignore[misc]
    c = _dense(loaded)
    assert window == 5
    assert c[3, 2] == 2  # (a, b): two users
    assert c[0, 3] == 1 and c[0, 2] == 1  # d with a and b
    assert c[1].sum() == 0 and loaded._users[1] == 0  # the new item starts empty
    assert load_covisit(tmp_path / "nothing", cat.ids, cat.index_of) is None


def test_scorer_takes_co_visited_items_as_candidates_and_weight_zero_turns_them_off() -> None:
    cat = _catalog(60, 8)
    # i59 is the far side of the text space from i0 but everyone who met i0 met i59 too.
    cat.replace_vectors(np.vstack([cat.matrix[:59], -cat.matrix[:1]]))
    cv = CoVisitation.fit(60, [[0, 59]] * 20 + [[0, k] for k in range(1, 10)], window=5)
    prof = Profile(
        "a", long_term=cat.matrix[0], long_term_weight=1.0, last_ts=T0, recent_events=[["i0", "view", T0]]
    )
    req = [Request("a", prof, k=5, ref_ms=T0, exclude_ids=("i0",))]
    s = Settings()
    on = Scorer(cat, s.scoring.model_copy(update={"covisit_weight": 3.0}), s.profile, covisit=cv)
    off = Scorer(cat, s.scoring.model_copy(update={"covisit_weight": 0.0}), s.profile, covisit=cv)
    plain = Scorer(cat, s.scoring, s.profile)
    got_on = [it.item_id for it in on.recommend(req, now_ms=T0)[0]]
    got_off = [it.item_id for it in off.recommend(req, now_ms=T0)[0]]
    assert got_on[0] == "i59"
    assert "i59" not in got_off
    assert got_off == [it.item_id for it in plain.recommend(req, now_ms=T0)[0]]
    probs = [it.score for it in on.recommend(req, now_ms=T0)[0]]
    assert 0 < sum(probs) <= 1.0 + 1e-6 and probs[0] == max(probs)  # u_i includes the feature


def test_recorder_hook_counts_the_applied_events() -> None:
    cat = _catalog()
    cv = CoVisitation(len(cat.ids))
    rec = CoVisitRecorder(cv, cat.index_of, window=5, fold_every_s=0.0)
    evs = [
        Event(event_id=f"e{k}", user_id="u", type=EventType.VIEW, item_id=f"i{k}", ts=T0 + k)
        for k in range(3)
    ] + [Event(event_id="s", user_id="u", type=EventType.SEARCH, query="lamp", ts=T0 + 9)]
    asyncio.run(rec(evs, {"u"}))
    c = cv.counts().toarray()
    assert c[2, 0] == c[2, 1] == c[1, 0] == 1 and c.sum() == 6


def test_counts_grow_with_the_catalog() -> None:
    cat = _catalog(5)
    cv = CoVisitation.fit(5, [[0, 1]], window=5)
    cat.upsert(["new"], np.ones((1, cat.dim), np.float32))  # row 5, unknown to the counts so far
    assert cv.scores(np.array([0]), np.array([5]), 1, len(cat.ids)).shape == (1, 6)
    rec = CoVisitRecorder(cv, cat.index_of, window=5, fold_every_s=0.0)
    rec.record(["u", "u"], ["i0", "new"])
    assert cv.n == 6 and _dense(cv)[5, 0] == 1
    assert cv.scores(np.array([0]), np.array([5]), 1, len(cat.ids))[0, 0] > 0


def test_a_background_fold_never_blocks_recording_and_scores_read_whole_matrices(monkeypatch) -> None:
    """The worker folds in a thread: record returns at once; until the fold is published,
    scores come from the previous matrix, never from a half-built one (sparse form)."""
    import threading

    import inference.covisit as covisit

    monkeypatch.setattr(covisit, "DENSE_BASE_MAX_ITEMS", 0)  # the sparse form: merges publish new matrices
    n = 300
    g = np.random.default_rng(3)
    seqs = [list(g.integers(0, n, 20)) for _ in range(2000)]
    cv = CoVisitation.fit(n, seqs, window=5)
    before = cv.scores(np.array([0, 0]), np.array([1, 2]), 1, n).copy()
    started, release = threading.Event(), threading.Event()
    real = cv._build

    def slow(*args):  # hold the fold until the test has scored meanwhile
        started.set()
        release.wait(10)
        return real(*args)

    cv._build = slow  # type: ignore[method-assign]
    index_of = lambda ids: np.array([int(x[1:]) for x in ids], np.int64)  # noqa: E731
    rec = CoVisitRecorder(cv, index_of, window=5, fold_every_s=0.0, fold_in_background=True)
    rec.record(["u"] * 4, ["i1", "i2", "i1", "i2"])  # i1, i2 meet: new evidence for them
    assert started.wait(10)  # the fold is running and record has returned
    during = cv.scores(np.array([0, 0]), np.array([1, 2]), 1, n)
    assert np.array_equal(during, before)  # the previous matrix, whole
    release.set()
    assert rec.settle(10)
    after = cv.scores(np.array([0, 0]), np.array([1, 2]), 1, n)
    assert after[0, 1] > before[0, 1] or after[0, 2] > before[0, 2]  # now published


def test_an_in_place_fold_of_dense_counts_is_never_read_half_done(monkeypatch) -> None:
    """Dense form: a background fold adds its pairs to the counts in place. record returns at
    once; a score read while the fold is adding waits for it and then sees all of its pairs with
    the user counts of the same fold, never a part of them."""
    import threading

    import inference.covisit as covisit

    n = 300
    g = np.random.default_rng(3)
    seqs = [list(g.integers(0, n, 20)) for _ in range(2000)]
    cv = CoVisitation.fit(n, seqs, window=5)
    assert cv.has_dense
    before = cv.scores(np.array([0, 0]), np.array([1, 2]), 1, n).copy()
    started, release = threading.Event(), threading.Event()
    real = covisit._inv

    def slow(*args):  # called inside the fold's lock, after the pairs were added
        started.set()
        release.wait(10)
        return real(*args)

    monkeypatch.setattr(covisit, "_inv", slow)
    index_of = lambda ids: np.array([int(x[1:]) for x in ids], np.int64)  # noqa: E731
    rec = CoVisitRecorder(cv, index_of, window=5, fold_every_s=0.0, fold_in_background=True)
    rec.record(["u"] * 4, ["i1", "i2", "i1", "i2"])  # i1, i2 meet: new evidence for them
    assert started.wait(10)  # the fold is running and record has returned
    read: list[np.ndarray] = []
    reader = threading.Thread(target=lambda: read.append(cv.scores(np.array([0, 0]), np.array([1, 2]), 1, n)))
    reader.start()
    reader.join(0.3)
    assert reader.is_alive() and not read  # waits for the fold instead of reading half of it
    release.set()
    assert rec.settle(10)
    reader.join(10)
    after = cv.scores(np.array([0, 0]), np.array([1, 2]), 1, n)
    assert after[0, 1] > before[0, 1] or after[0, 2] > before[0, 2]  # published
    np.testing.assert_array_equal(read[0], after)  # the whole fold: its pairs and its user counts
    # the same counts as the sparse form given the same events
    monkeypatch.setattr(covisit, "DENSE_BASE_MAX_ITEMS", 0)
    ref = CoVisitation.fit(n, [*seqs, [1, 2]], window=5)
    np.testing.assert_array_equal(cv.counts().toarray(), ref.counts().toarray())


@pytest.mark.parametrize("form", ["sparse", "dense"])
def test_folds_cost_what_is_new_and_give_the_counts_of_one_fold(form: str, monkeypatch) -> None:
    """Sparse form: folds go into a small recent matrix beside the base (merged once it grows).
    Dense form: folds add to the counts in place, never merging or copying them. Either way a
    fold with nothing new does no work, and scores equal those of the same counts folded at once."""
    import inference.covisit as covisit

    if form == "sparse":
        monkeypatch.setattr(covisit, "DENSE_BASE_MAX_ITEMS", 0)
    n = 50
    g = np.random.default_rng(5)
    stream = [(f"u{g.integers(30)}", f"i{g.integers(n)}") for _ in range(3000)]
    index_of = lambda ids: np.array([int(x[1:]) for x in ids], np.int64)  # noqa: E731
    seed = CoVisitation.fit(n, [list(g.integers(0, n, 15)) for _ in range(200)], window=5)
    whole = CoVisitation(n, seed.counts(), seed._users.copy())
    folded = CoVisitation(n, seed.counts(), seed._users.copy(), merge_fraction=0.05)
    a = CoVisitRecorder(whole, index_of, window=5, fold_every_s=None)
    b = CoVisitRecorder(folded, index_of, window=5, fold_every_s=None)
    a.record([u for u, _ in stream], [i for _, i in stream])
    whole.fold()
    saw_delta = merged = False
    dense = folded._state.dense
    assert (dense is not None) == (form == "dense")
    for k in range(0, len(stream), 25):
        base = folded._state.base
        b.record([u for u, _ in stream[k : k + 25]], [i for _, i in stream[k : k + 25]])
        folded.fold()
        saw_delta |= folded._state.delta.nnz > 0
        merged |= folded._state.base is not base
    if form == "sparse":
        assert saw_delta and merged  # both paths ran
    else:  # every fold went into the same array
        assert not saw_delta and folded._state.dense is dense and folded._state.base is None
    state = folded._state
    folded.fold()  # nothing new: the published state is kept as it is
    assert folded._state is state
    np.testing.assert_array_equal(folded.counts().toarray(), whole.counts().toarray())
    rows, items = np.repeat(np.arange(4), 3), g.integers(0, n, 12)
    np.testing.assert_allclose(folded.scores(rows, items, 4), whole.scores(rows, items, 4), rtol=1e-5)
    # the cosine of the module doc: C_ij / sqrt(n_i n_j), summed over the user's distinct items
    c, users = whole.counts().toarray(), whole._users
    sim = c / np.sqrt(np.outer(np.maximum(users, 1), np.maximum(users, 1)))
    want = sim[np.unique(items[:3])].sum(0)
    np.testing.assert_allclose(whole.scores(rows[:3], items[:3], 1)[0], want, rtol=1e-5)


def test_sparse_and_dense_co_visitation_give_the_same_lists(monkeypatch) -> None:
    """A round's co-visitation scores are dense on a small catalog and sparse on a large one
    (inference.scoring.DENSE_COVISIT_FILL): both forms must rank every user the same, with
    exclusions, unavailable items and users without co-visited items in the batch."""
    import inference.covisit as covisit
    import inference.scoring as scoring

    n = 400
    cat = _catalog(n, 16, seed=3)
    g = np.random.default_rng(5)
    seqs = [list(g.choice(n, 12, replace=False)) for _ in range(300)]
    monkeypatch.setattr(covisit, "DENSE_BASE_MAX_ITEMS", 0)  # this one scores sparse x sparse
    cv = CoVisitation.fit(n, seqs, window=4)
    assert not cv.has_dense
    cat.upsert(["i7", "i8"], cat.matrix[[7, 8]], available=[False, False])
    reqs = []
    for u in range(24):
        recent = [] if u % 6 == 5 else [f"i{k}" for k in g.choice(n, 1 + u % 5, replace=False)]
        vec = cat.matrix[g.integers(n)]
        prof = Profile(
            f"u{u}",
            long_term=vec,
            long_term_weight=1.0,
            last_ts=T0,
            recent_events=[[i, "view", T0] for i in recent],
        )
        reqs.append(Request(f"u{u}", prof, k=10, ref_ms=T0, exclude_ids=tuple(recent[:1])))
    s = Settings()
    scorer = Scorer(
        cat,
        s.scoring.model_copy(update={"covisit_weight": 1.0, "covisit_candidates": 15}),
        s.profile,
        covisit=cv,
    )

    def lists(fill: int) -> list[list[tuple[str, float, str]]]:
        monkeypatch.setattr(scoring, "DENSE_COVISIT_FILL", fill)
        out = scorer.recommend(reqs, now_ms=T0)
        return [[(it.item_id, round(float(it.score), 6), it.reason) for it in lst] for lst in out]

    dense, sparse = lists(10**9), lists(0)
    assert dense == sparse
    # a small, full catalog keeps its counts dense too: the same lists from one sparse x dense product
    monkeypatch.setattr(covisit, "DENSE_BASE_MAX_ITEMS", 6_000)
    cv_dense = CoVisitation.fit(n, seqs, window=4)
    assert cv_dense.has_dense  # 400 items, ~18 % of the pairs counted
    scorer.covisit = cv_dense
    assert lists(0) == sparse
    scorer.covisit = cv
    shown = {i for lst in dense for i, _, _ in lst}
    assert not shown & {"i7", "i8"}  # unavailable
    # the two forms themselves: the same score at every catalog row, the same extra candidates
    ex_rows = np.array([0, 1, 2], np.int64)
    ex_items = np.array([int(r.exclude_ids[0][1:]) if r.exclude_ids else 0 for r in reqs[:3]], np.int64)
    unavailable = np.array([7, 8], np.int64)
    everywhere = np.tile(np.arange(n), (len(reqs), 1))
    monkeypatch.setattr(scoring, "DENSE_COVISIT_FILL", 10**9)
    d_scores, d_cand = scorer._covisit(reqs, ex_rows, ex_items, unavailable)
    monkeypatch.setattr(scoring, "DENSE_COVISIT_FILL", 0)
    s_scores, s_cand = scorer._covisit(reqs, ex_rows, ex_items, unavailable)
    assert type(d_scores).__name__ == "_DenseScores" and type(s_scores).__name__ == "_SparseScores"
    np.testing.assert_array_equal(d_scores.gather(everywhere), s_scores.gather(everywhere))
    assert d_cand is not None and s_cand is not None
    np.testing.assert_array_equal(d_cand[0], s_cand[0])
    np.testing.assert_array_equal(d_cand[1], s_cand[1])
    assert not np.isin(s_cand[1], unavailable).any()
    assert np.bincount(s_cand[0], minlength=len(reqs)).max() <= 15
    # the co-visited candidates matter: without the feature the lists differ
    plain = Scorer(cat, s.scoring.model_copy(update={"covisit_weight": 0.0}), s.profile, covisit=cv)
    assert [[it.item_id for it in lst] for lst in plain.recommend(reqs, now_ms=T0)] != [
        [i for i, _, _ in lst] for lst in dense
    ]


def test_recency_weights_the_newest_moments_and_one_keeps_the_plain_sum(monkeypatch) -> None:
    """s_u(j) = Σ_i recency^r(i) · sim(i, j), r(i) the rank of the moment of the item's newest event
    (a basket's items share one); dense and sparse forms agree, and recency 1 is the plain sum."""
    from inference import scoring

    n = 30
    g = np.random.default_rng(5)
    cv = CoVisitation.fit(n, [list(g.choice(n, 8, replace=False)) for _ in range(200)], window=8)
    cat = _catalog(n, 8)
    # newest first: i3 (moment 0, met again at 2), the basket i7 + i20 (moment 1), i11 (moment 3)
    recent = [("i3", 0), ("i7", 1), ("i20", 1), ("i3", 2), ("i11", 3)]
    prof = Profile(
        "a", long_term=cat.matrix[0], long_term_weight=1.0, last_ts=T0,
        recent_events=[[i, "view", T0 - 1000 * r] for i, r in recent],
    )  # fmt: skip
    req = [Request("a", prof, k=5, ref_ms=T0)]
    counts = _dense(cv)
    users = np.maximum(np.asarray(cv._users), 1.0)  # users who met each item
    sim = counts / np.sqrt(users[:, None] * users[None, :])
    none = np.empty(0, np.int64)
    s = Settings()
    for recency, weights in [
        (0.5, {3: 1.0, 7: 0.5, 20: 0.5, 11: 0.125}),
        (1.0, {3: 1.0, 7: 1.0, 20: 1.0, 11: 1.0}),
    ]:
        want = sum(w * sim[i] for i, w in weights.items())
        want = want / want.max()
        scorer = Scorer(cat, s.scoring.model_copy(update={"covisit_recency": recency}), s.profile, covisit=cv)
        for fill in (10**9, 0):
            monkeypatch.setattr(scoring, "DENSE_COVISIT_FILL", fill)
            got, _ = scorer._covisit(req, none, none, none)
            assert got is not None
            np.testing.assert_allclose(got.gather(np.arange(n)[None, :])[0], want, rtol=1e-5, atol=1e-6)


def test_moment_rank_counts_distinct_newer_times_per_row() -> None:
    from inference.scoring import _moment_rank

    rows = np.array([0, 0, 0, 0, 1, 1, 2])
    ts = np.array([50, 50, 40, 10, 7, 9, 3])
    np.testing.assert_array_equal(_moment_rank(rows, ts), [0, 0, 1, 2, 1, 0, 0])


def test_dense_counts_score_as_the_sparse_product_with_recent_folds_and_weights(monkeypatch) -> None:
    """``scores_dense`` (the dense counts) equals the sparse form's ``scores_csr`` over the same
    events: the seed and later folds, recency weights, rows counted beyond the users' items, a row
    the catalog added since; sparse counts keep no dense copy."""
    import inference.covisit as covisit

    n = 60
    g = np.random.default_rng(2)
    seqs = [list(g.choice(n, 10, replace=False)) for _ in range(80)]
    cv = CoVisitation.fit(n, seqs, window=5)
    monkeypatch.setattr(covisit, "DENSE_BASE_FILL", 0)  # no counts are full enough to keep dense
    sparse = CoVisitation.fit(n, seqs, window=5)
    monkeypatch.setattr(covisit, "DENSE_BASE_FILL", 8)
    assert cv.has_dense and not sparse.has_dense
    for c in (cv, sparse):  # a fold (in place, into the delta), then one with a new catalog row
        c.add(np.array([1, 2, 3]), np.array([4, 5, 6]), np.array([1, 4]))
        c.fold()
        c.add(np.array([60, 60]), np.array([1, 2]), np.array([60]))
        c.fold()
    assert cv.has_dense and cv.n == n + 1 and sparse._state.delta.nnz > 0
    rows = np.array([0, 0, 1, 2, 2, 2, 3], np.int64)
    items = np.array([1, 7, 4, 3, 9, 30, 60], np.int64)
    for w in (None, np.array([1.0, 0.6, 1.0, 1.0, 0.6, 0.36, 1.0], np.float32)):
        dense = cv.scores_dense(rows, items, 5, weights=w)
        assert dense is not None and dense.dtype == np.float32 and dense.shape == (5, n + 1)
        ref = sparse.scores_csr(rows, items, 5, weights=w).toarray()
        np.testing.assert_allclose(dense, ref, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(
            cv.scores_csr(rows, items, 5, weights=w).toarray(), ref, rtol=1e-6, atol=1e-7
        )
        assert not dense[4].any()  # a user without items
        assert dense[3, 1] > 0  # the new row's meetings
    assert sparse.scores_dense(rows, items, 5) is None
    np.testing.assert_array_equal(cv.counts().toarray(), sparse.counts().toarray())
    assert cv.nnz == sparse.counts().nnz
    # beyond the dense form's size the counts turn sparse, keeping every count
    monkeypatch.setattr(covisit, "DENSE_BASE_MAX_ITEMS", n + 1)
    cv.add(np.array([61]), np.array([0]), np.array([61]))
    cv.fold()
    sparse.add(np.array([61]), np.array([0]), np.array([61]))
    sparse.fold()
    assert not cv.has_dense and cv.n == n + 2
    np.testing.assert_array_equal(cv.counts().toarray(), sparse.counts().toarray())
