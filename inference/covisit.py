"""Item-to-item co-visitation learned from the stream: the scorer's collaborative signal.

One rule defines the counts, offline and online alike (:func:`window_meetings`): when a user
meets an item that is not among their last ``window`` distinct items, the item's user count
goes up by one and each (item, window item) pair by one, in both orders. For users with at
most ``window`` distinct items this is item-kNN's "users in common" co-occurrence; for heavy
users it keeps to what they bought or viewed around the same time.

    sim(i, j) = C_ij / sqrt(n_i · n_j)        (cosine over users, as ``evaluation.baselines``)
    s_u(j)    = Σ_{i ∈ window(u)} sim(i, j)    one sparse product for a batch of users

The scorer adds ``scoring.covisit_weight · s_u(j) / max_j s_u(j)`` to the cosine of a
candidate and takes the best ``scoring.covisit_candidates`` items of s_u as extra candidates,
so an item that sells with what the user just met can be pushed although its text is far
from them. A new item starts with no counts (text only) and gains evidence as it sells.

State: a seed fitted on the training events (``<model dir>/user/covisit.npz``, written by
``streamrec train-user``), plus what this worker's :class:`CoVisitRecorder` counts from the
applied events after it. On a large or thin catalog, counts are folded into a fresh CSR matrix
and published by swapping one reference; on a small, full one (Online Retail) they live in one
dense array that a fold adds to in place, under a lock that a scoring product also takes. Either
way a scoring round in another thread reads one consistent state.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

FILE = "covisit.npz"


def window_meetings(
    items: Iterable[int], window: list[int], size: int, pairs_a: list[int], pairs_b: list[int], met: list[int]
) -> list[int]:
    """Apply one user's item sequence (oldest first) to their window (newest first, distinct).

    Appends the new meetings' pairs to ``pairs_a``/``pairs_b`` (one order; the caller adds both)
    and the met items to ``met``; returns the new window.
    """
    for j in items:
        if j in window:
            window.remove(j)  # a repeat moves to the front, no new evidence
        else:
            met.append(j)
            pairs_a.extend([j] * len(window))
            pairs_b.extend(window)
        window.insert(0, j)
        del window[size:]
    return window


# Counts this full (nnz x DENSE_BASE_FILL >= n^2) over at most this many items are kept dense: a
# round's product is then one sparse x dense product (each of a user's items adds its row), about
# 4x faster than the sparse x sparse one on Online Retail (3,659 items, 24 % full: 54 MB), and a
# fold adds its pairs in place (no merge: a merge and a fresh dense copy took 50-150 ms alone and
# 330-450 ms in a loaded scoring process, more often the higher the event rate).
DENSE_BASE_FILL = 8
DENSE_BASE_MAX_ITEMS = 6_000


class _Published(NamedTuple):
    """What a scoring call reads, swapped as one reference, in one of two forms.

    Sparse: counts = ``base`` + ``delta`` (the recent folds, small), ``dense`` None.
    Dense: every count in ``dense`` (folds add to it in place, under the dense lock), ``base``
    None and ``delta`` empty. ``inv``: each item's 1/sqrt(users)."""

    base: sp.csr_matrix | None
    delta: sp.csr_matrix
    inv: np.ndarray
    dense: np.ndarray | None = None

    @property
    def n(self) -> int:
        return int(self.dense.shape[0] if self.dense is not None else self.base.shape[0])  # type: ignore[union-attr]


class CoVisitation:
    """Co-visitation counts over a catalog's rows; see the module docstring. The catalog may grow
    (upserted items get new rows): counts grow with the rows they are given.

    A fold costs O(pairs since the last one), not O(all counts). Dense form: the pairs are added
    in place. Sparse form: they go into a small ``delta`` matrix beside the seed-sized ``base``,
    merged into it only once it holds ``merge_fraction`` of the base's entries (amortised O(1)
    per pair); a merged base that has become small and full enough turns dense. The cosine's
    normalisation is applied at scoring time, so a fold never rebuilds a normalised copy.
    """

    def __init__(
        self,
        n_items: int,
        counts: sp.csr_matrix | None = None,
        users: np.ndarray | None = None,
        merge_fraction: float = 0.1,
    ) -> None:
        base = _empty(n_items) if counts is None else counts.tocsr().astype(np.float32)
        self._users = np.zeros(n_items, np.float32) if users is None else np.asarray(users, np.float32)
        self.merge_fraction = merge_fraction
        self._pa: list[np.ndarray] = []
        self._pb: list[np.ndarray] = []
        self._dirty = False  # pairs or user counts added since the last fold
        self._lock = threading.Lock()
        self._fold_lock = threading.Lock()  # one fold at a time (a background one, or a save)
        # Dense form: held by an in-place fold and by every read of the dense counts.
        self._dense_lock = threading.Lock()
        self._state = self._build(base, _empty(base.shape[0]), self._users)

    @property
    def n(self) -> int:
        return self._state.n

    # -- building ------------------------------------------------------------------------
    @classmethod
    def fit(cls, n_items: int, sequences: Iterable[Sequence[int]], window: int) -> CoVisitation:
        """Counts from users' item sequences (catalog rows, oldest first), by the one rule."""
        pa: list[int] = []
        pb: list[int] = []
        met: list[int] = []
        for seq in sequences:
            window_meetings(seq, [], window, pa, pb, met)
        cv = cls(n_items)
        cv.add(np.asarray(pa, np.int64), np.asarray(pb, np.int64), np.asarray(met, np.int64))
        cv.fold()
        return cv

    def add(self, a: np.ndarray, b: np.ndarray, met: np.ndarray) -> None:
        """Queue pairs (a[k], b[k]) (both orders are counted) and met items; :meth:`fold` publishes."""
        with self._lock:
            if a.size:
                self._pa.append(np.concatenate([a, b]))
                self._pb.append(np.concatenate([b, a]))
                self._dirty = True
            if met.size:
                need = int(met.max()) + 1
                if need > self._users.size:  # a row the catalog added since
                    self._users = np.pad(self._users, (0, need - self._users.size))
                np.add.at(self._users, met, 1.0)
                self._dirty = True

    def fold(self) -> None:
        """Fold the queued pairs into the counts and publish them (nothing to do: no work).

        O(queued pairs), plus now and then an O(nnz) merge of the recent counts into the base.
        SciPy's sparse sums release the GIL, so a fold in another thread does not hold up
        scoring rounds meanwhile; they read the previous state until the new one is published
        (one reference swap)."""
        with self._fold_lock:
            self._fold()

    def _fold(self) -> None:
        with self._lock:
            if not self._dirty:
                return
            pa, pb, self._pa, self._pb = self._pa, self._pb, [], []
            users = self._users.copy()
            self._dirty = False
        st = self._state
        a = np.concatenate(pa) if pa else np.empty(0, np.int64)
        b = np.concatenate(pb) if pb else np.empty(0, np.int64)
        n = max(users.size, st.n)
        if st.dense is not None and n <= DENSE_BASE_MAX_ITEMS:
            dense = st.dense
            if n > dense.shape[0]:  # rows the catalog added since: a new array, rounds reading
                dense = np.pad(dense, (0, n - dense.shape[0]))  # the old one are undisturbed
            with self._dense_lock:  # no product reads it meanwhile; the state changes with it
                # by flat index: 6x faster than a 2-d index (400,000 pairs: 6 vs 40 ms); the
                # array is C-contiguous (toarray, pad), so the flat view is the array itself
                assert dense.flags.c_contiguous
                np.add.at(dense.reshape(-1), a * n + b, np.float32(1.0))
                self._state = _Published(None, _empty(n), _inv(users, n), dense)
            return
        if st.dense is not None:  # grown beyond the dense form's size: sparse from now on
            base, delta = _resized(self.counts(), n), _empty(n)
        else:
            assert st.base is not None
            base, delta = st.base, st.delta
            if n > base.shape[0]:  # rows the catalog added since
                base, delta = _resized(base, n), _resized(delta, n)
        if a.size:
            delta = (delta + sp.csr_matrix((np.ones(a.size, np.float32), (a, b)), shape=(n, n))).tocsr()
        self._state = self._build(base, delta, users)

    def _build(self, base: sp.csr_matrix, delta: sp.csr_matrix, users: np.ndarray) -> _Published:
        """The state to publish; the delta is merged into the base once it has grown large, and
        counts small and full enough turn dense."""
        if delta.nnz and delta.nnz >= self.merge_fraction * max(base.nnz, 1):
            base, delta = (base + delta).tocsr(), _empty(base.shape[0])
        n = base.shape[0]
        inv = _inv(users, n)
        if not delta.nnz and n <= DENSE_BASE_MAX_ITEMS and base.nnz * DENSE_BASE_FILL >= n * n:
            return _Published(None, delta, inv, base.toarray())
        return _Published(base, delta, inv)

    def counts(self) -> sp.csr_matrix:
        """Every count folded so far (the seed's and the stream's), as one CSR matrix."""
        with self._dense_lock:
            st = self._state
            if st.dense is not None:
                return sp.csr_matrix(st.dense)
        assert st.base is not None
        return (st.base + st.delta).tocsr() if st.delta.nnz else st.base

    # -- scoring -------------------------------------------------------------------------
    def scores(self, rows: np.ndarray, items: np.ndarray, m: int, n: int | None = None) -> np.ndarray:
        """(m, n) float32: for each of ``m`` users, the summed similarity rows of their distinct
        recent items, given as (user row, catalog row) pairs; ``n`` columns (default: the rows
        counted so far; rows beyond them have no counts yet). The dense form of :meth:`scores_csr`."""
        out = self.scores_csr(rows, items, m, canonical=False).toarray()
        k = out.shape[1]
        n = k if n is None else n
        return out[:, :n] if n <= k else np.pad(out, ((0, 0), (0, n - k)))

    def scores_csr(
        self,
        rows: np.ndarray,
        items: np.ndarray,
        m: int,
        canonical: bool = True,
        weights: np.ndarray | None = None,
    ) -> sp.csr_matrix:
        """The users' scores as a sparse (m, rows counted so far) float32 matrix: only the items
        met with theirs are stored, so a round costs what the users' neighbourhoods hold, not
        m x catalog size. ``canonical``: sorted column indices, no duplicates (else as the
        product gives them, for a caller that densifies it). ``weights``: one per (row, item)
        pair (the pairs then distinct), e.g. the item's recency; default 1.

        s_u(j) = Σ_i w_ui C_ij / sqrt(n_i n_j): the users' items weighted by w_ui / sqrt(n_i), one
        sparse product with the counts, the columns scaled by 1/sqrt(n_j)."""
        st = self._state  # one published state for the whole call
        if st.dense is not None:
            dense = self.scores_dense(rows, items, m, weights)
            if dense is not None:  # else it has turned sparse since: read that state
                return sp.csr_matrix(dense)
            st = self._state
        assert st.base is not None
        w = self._user_weights(st, rows, items, m, weights)
        prod = w @ st.base
        if st.delta.nnz:
            prod = prod + w @ st.delta
        prod = sp.csr_matrix(prod, dtype=np.float32)
        if canonical:
            prod.sum_duplicates()  # also sorts the indices
        prod.data *= st.inv[prod.indices]
        return prod

    @property
    def has_dense(self) -> bool:
        """The counts are small and full enough to be kept and scored densely (:meth:`scores_dense`)."""
        return self._state.dense is not None

    def scores_dense(
        self, rows: np.ndarray, items: np.ndarray, m: int, weights: np.ndarray | None = None
    ) -> np.ndarray | None:
        """:meth:`scores_csr` as a dense (m, rows counted so far) float32 array, from the dense
        counts (one sparse x dense product); None when the counts are sparse."""
        with self._dense_lock:  # a fold in place waits for the product, and the other way round
            st = self._state
            if st.dense is None:
                return None
            w = self._user_weights(st, rows, items, m, weights)
            out = np.asarray(w @ st.dense, np.float32)
        out *= st.inv[None, :]
        return out

    @staticmethod
    def _user_weights(
        st: _Published, rows: np.ndarray, items: np.ndarray, m: int, weights: np.ndarray | None
    ) -> sp.csr_matrix:
        """(m, rows counted) CSR: each user's items weighted by w_ui / sqrt(n_i)."""
        k = st.n
        ok = items < k
        if weights is None:
            w = sp.csr_matrix((np.ones(int(ok.sum()), np.float32), (rows[ok], items[ok])), shape=(m, k))
            w.data[:] = st.inv[w.indices]  # an item counts once per user (duplicates were summed)
            return w
        r, i = rows[ok], items[ok]
        return sp.csr_matrix((np.asarray(weights, np.float32)[ok] * st.inv[i], (r, i)), shape=(m, k))

    @property
    def nnz(self) -> int:
        """Stored count entries (the base's and the recent folds'; the non-zero ones when dense)."""
        with self._dense_lock:
            st = self._state
            if st.dense is not None:
                return int(np.count_nonzero(st.dense))
        assert st.base is not None
        return int(st.base.nnz + st.delta.nnz)

    # -- files ---------------------------------------------------------------------------
    def save(self, path: Path, item_ids: Sequence[str], window: int) -> Path:
        self.fold()
        c = self.counts().tocoo()
        np.savez_compressed(
            path,
            item_ids=np.asarray(item_ids, dtype=object).astype(str),
            row=c.row.astype(np.int32),
            col=c.col.astype(np.int32),
            data=c.data.astype(np.float32),
            users=self._users,
            window=np.int64(window),
        )
        return path

    @classmethod
    def load(cls, path: Path, catalog_ids: Sequence[str], index_of) -> tuple[CoVisitation, int]:
        """Counts saved by :meth:`save`, re-indexed onto a catalog (items it lacks are dropped;
        catalog items without counts start at zero). Returns (co-visitation, window)."""
        z = np.load(path, allow_pickle=False)
        rows = index_of([str(x) for x in z["item_ids"]])
        n = len(catalog_ids)
        r, c, d = rows[z["row"]], rows[z["col"]], z["data"]
        ok = (r >= 0) & (c >= 0)
        counts = sp.csr_matrix((d[ok], (r[ok], c[ok])), shape=(n, n), dtype=np.float32)
        users = np.zeros(n, np.float32)
        known = rows >= 0
        users[rows[known]] = z["users"][known]
        return cls(n, counts, users), int(z["window"])


def load_covisit(model_dir: Path, catalog_ids: Sequence[str], index_of) -> tuple[CoVisitation, int] | None:
    """The model folder's seed (``<model dir>/user/covisit.npz``), None when it has none."""
    path = Path(model_dir) / "user" / FILE
    return CoVisitation.load(path, catalog_ids, index_of) if path.is_file() else None


class CoVisitRecorder:
    """Counts the applied events' meetings into a :class:`CoVisitation` (pipeline hook).

    It keeps each recent user's window of distinct items in memory (least recently seen users
    are forgotten beyond ``max_users``; a forgotten user starts a new window). Folds at most
    every ``fold_every_s`` seconds (None: the caller folds), so one batch costs a few list
    operations per event and a fold costs O(nnz). With ``fold_in_background`` the fold runs in a
    thread of its own and ``record`` returns at once (the worker's scoring process: a fold must
    not stall the scoring rounds queued behind a record); :meth:`settle` waits for it.
    """

    def __init__(
        self,
        covisit: CoVisitation,
        index_of,
        window: int,
        max_users: int = 1_000_000,
        fold_every_s: float | None = 1.0,
        fold_in_background: bool = False,
    ) -> None:
        self.covisit = covisit
        self.fold_in_background = fold_in_background
        self._folding: threading.Thread | None = None
        self.index_of = index_of
        self.window = window
        self.max_users = max_users
        self.fold_every_s = fold_every_s
        self._windows: OrderedDict[str, list[int]] = OrderedDict()
        self._lock = threading.Lock()  # agents of several partitions may record at once
        self._last_fold = time.monotonic()

    def record(self, user_ids: Sequence[str], item_ids: Sequence[str]) -> int:
        """Events in order (user, item); unknown items are ignored. Returns the new meetings."""
        rows = self.index_of(list(item_ids)) if len(item_ids) else np.empty(0, np.int64)
        by_user: dict[str, list[int]] = {}
        for u, i in zip(user_ids, rows.tolist(), strict=True):
            if i >= 0:
                by_user.setdefault(u, []).append(i)
        pa: list[int] = []
        pb: list[int] = []
        met: list[int] = []
        wins = self._windows
        with self._lock:
            for u, seq in by_user.items():
                win = wins.pop(u, None) or []
                wins[u] = window_meetings(seq, win, self.window, pa, pb, met)
            while len(wins) > self.max_users:
                wins.popitem(last=False)
        self.covisit.add(np.asarray(pa, np.int64), np.asarray(pb, np.int64), np.asarray(met, np.int64))
        now = time.monotonic()
        if self.fold_every_s is not None and now - self._last_fold >= self.fold_every_s:
            self._last_fold = now
            if not self.fold_in_background:
                self.covisit.fold()
            elif self._folding is None or not self._folding.is_alive():  # else: the next one folds these
                self._folding = threading.Thread(target=self.covisit.fold, name="covisit-fold", daemon=True)
                self._folding.start()
        return len(met)

    def settle(self, timeout_s: float | None = None) -> bool:
        """Wait for a background fold in progress; True when none is left running."""
        t = self._folding
        if t is not None:
            t.join(timeout_s)
            return not t.is_alive()
        return True

    async def __call__(self, events: Sequence, changed_users: set[str]) -> None:
        """Pipeline hook: the applied events (replays and duplicates are never passed here)."""
        items = [(e.user_id, e.item_id) for e in events if e.item_id]
        if items:
            users, ids = zip(*items, strict=True)
            await asyncio.get_running_loop().run_in_executor(None, self.record, users, ids)


def _inv(users: np.ndarray, n: int) -> np.ndarray:
    """Each of ``n`` items' 1/sqrt(users) (an item without users: 1)."""
    inv = np.ones(n, np.float32)
    k = min(n, users.size)
    inv[:k] = 1.0 / np.sqrt(np.maximum(users[:k], 1.0))
    return inv


def _empty(n: int) -> sp.csr_matrix:
    return sp.csr_matrix((n, n), dtype=np.float32)


def _resized(m: sp.csr_matrix, n: int) -> sp.csr_matrix:
    out = m.copy()
    out.resize((n, n))
    return out
