"""The one item-kNN: the same co-occurrence whether fitted at once or grown from a stream."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from evaluation.baselines import ItemSimilarity


def test_fit_and_incremental_growth_agree() -> None:
    rng = np.random.default_rng(0)
    n_users, n_items = 40, 15
    x = (rng.random((n_users, n_items)) < 0.25).astype(np.float32)
    fitted = ItemSimilarity.fit(sp.csr_matrix(x))
    grown = ItemSimilarity(n_items)
    seen: list[set[int]] = [set() for _ in range(n_users)]
    pairs = [(u, i) for u in range(n_users) for i in np.flatnonzero(x[u])]
    rng.shuffle(pairs)  # users meet their items in any order, a few at a time
    for k in range(0, len(pairs), 7):
        for u in {u for u, _ in pairs[k : k + 7]}:
            new = np.array([i for v, i in pairs[k : k + 7] if v == u and i not in seen[u]], np.int64)
            grown.add(new, np.fromiter(seen[u], np.int64, len(seen[u])))
            seen[u].update(new.tolist())
    assert np.array_equal(fitted.co, grown.co) and np.array_equal(fitted.cnt, grown.cnt)
    assert np.all(np.diag(fitted.co) == 0)
    q = [np.array([0, 3]), np.array([], np.int64)]
    s = fitted.scores(q)
    assert np.allclose(s, grown.scores(q)) and not s[1].any()
    # cosine normalisation: sim(i, j) = C_ij / sqrt(n_i n_j)
    expect = (fitted.co[0] / np.sqrt(np.maximum(fitted.cnt[0], 1))) / np.sqrt(np.maximum(fitted.cnt, 1))
    assert np.allclose(fitted.scores([np.array([0])])[0], expect)
