"""Scoring: a batch of user profiles → top-K recommendations with reasons.

For each user, the context vector p comes from the **user model** when the model folder has one
(``inference.user_model``: a small Transformer over the profile's recent events and the fresh
query, one ONNX Runtime call per batch of users); without one, or for a profile that has no
recent events yet, it is a blend of the profile vectors,

    p = normalise(w_lt · long_term + w_s · session + w_q · query)

(the query term only while the search is fresh, so the query dominates right after a
search). Every candidate item i gets

    u_i = softmax_i(α · s_i + w_pop · log pop_i + log f_i),   s_i = h_iᵀp + w_cv · covisit_i

where f_i is the demand-spike factor of the item or its category (>1 boost, <1 damping,
1 without an anomaly), pop_i the shop's recent demand (optional prior) and covisit_i the
collaborative signal learned from the stream. When bought items may come back
(``exclude_purchased = false``), u is a mixture: ``repeat_share`` of the mass goes to the
user's past purchases by recency and frequency, the current context and the shop's recent
demand for them (``buy_again``), the rest is the softmax over new items (see
``Scorer._mixture``); lists are ranked by u_i, so the scores shown are the ranking's
probabilities. Candidates come from the catalog's exact top-k (one matrix product for the whole
batch of users) or its ANN index, plus the bought, co-visited and popular items;
purchased items (configurable), unavailable items and recently recommended items are
filtered; MMR re-ranks the candidates for diversity; each item carries a reason:

- ``buy_again``: an item the user bought before, when purchases are not filtered: the r-th most
  recent purchase, bought n times, has weight ``repeat_decay^r · n^repeat_count_power``;
- ``matches_query``: the fresh search query contributes most to its score;
- ``trending_in:<category>`` / ``trending``: a demand surge boosted it;
- ``similar_to:<item_id>``: the recent item of the user it is most similar to;
- ``popular``: cold start (no profile vector), from the popularity fallback.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, NamedTuple

import numpy as np

from inference import metrics
from inference.covisit import CoVisitation
from inference.user_model import OnnxUserModel, event_arrays
from streamrec.interfaces import Catalog, DemandAdjustments, PopularitySource
from streamrec.settings import ProfileSettings, ScoringSettings


class ScoredItem(NamedTuple):
    """One item of a list (a named tuple: a round builds thousands of them)."""

    item_id: str
    score: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "score": round(float(self.score), 6), "reason": self.reason}


#: One list as three parallel lists (item ids, scores, reasons): what a round builds in bulk and
#: what the scoring process sends back (it pickles several times faster than the named tuples).
PackedList = tuple[list[str], list[float], list[str]]


def pack(items: Sequence[ScoredItem]) -> PackedList:
    """A list of :class:`ScoredItem` as a :data:`PackedList`."""
    return [it.item_id for it in items], [it.score for it in items], [it.reason for it in items]


def unpack(packed: PackedList) -> list[ScoredItem]:
    """A :data:`PackedList` as :class:`ScoredItem` s."""
    # tuple.__new__ straight from C: the named tuple's own constructor runs Python per item
    return list(map(tuple.__new__, repeat(ScoredItem), zip(*packed, strict=True)))


@dataclass
class Request:
    """One user to score. ``profile`` is a profiles.store.Profile or None (cold user)."""

    user_id: str
    profile: Any | None
    k: int
    query_vector: np.ndarray | None = None  # an ad-hoc query (pull endpoint's q=)
    category_hint: str | None = None  # the category of the triggering event (cold start)
    exclude_ids: Sequence[str] = field(default_factory=tuple)  # e.g. recently recommended
    # "Now" for freshness (query TTL, session timeout); the triggering event's time on the push
    # path, so replays of historic streams behave as live ones. None: the batch's now_ms.
    ref_ms: int | None = None


#: Co-visitation scores are kept dense when their non-zeros fill at least 1 / this of the
#: (users x catalog) array: on Online Retail (3,659 items) a round's neighbourhoods cover most of
#: the catalog and the dense array is fastest; on a 100,000-item catalog they cover a small share.
DENSE_COVISIT_FILL = 8
#: The smallest positive float32: a co-visitation score must exceed 0 to make a candidate.
_TINY = np.float32(np.nextafter(np.float32(0), np.float32(1)))


class Scorer:
    """Scores batches of users against the catalog. Thread-compatible, no I/O of its own
    except through the adjustments and popularity sources it is given."""

    def __init__(
        self,
        catalog: Catalog,
        scoring: ScoringSettings,
        profile: ProfileSettings,
        adjustments: DemandAdjustments | None = None,
        popularity: PopularitySource | None = None,
        user_model: OnnxUserModel | None = None,
        covisit: CoVisitation | None = None,
    ) -> None:
        self.catalog = catalog
        self.cfg = scoring
        self.profile_cfg = profile
        self.adjustments = adjustments
        self.popularity = popularity
        self.user_model = user_model
        self.covisit = covisit  # the collaborative signal (inference/covisit.py), grown from the stream
        # The popularity prior's last read: (clock bucket, catalog size, revision) → (log_pop, top rows).
        self._prior: tuple[tuple[int, int, Any], np.ndarray, np.ndarray] | None = None
        # The demand factors' last per-row arrays: (factors in force, catalog size, revision) → arrays.
        self._demand_memo: tuple[tuple[Any, ...], np.ndarray, np.ndarray] | None = None
        self._codes_memo: tuple[tuple[int, Any], np.ndarray, dict[str, int]] | None = None

    # -- context vectors -----------------------------------------------------------------
    def context_vectors(
        self, reqs: Sequence[Request], now_ms: int, timings: dict[str, float] | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(P (m, dim) unit rows, has_context (m,), query_weight_share (m,)).

        ``query_weight_share`` is the part of p that comes from a query vector (0 without one).
        """
        dim = self.catalog.dim
        m = len(reqs)
        lt = np.zeros((m, dim), np.float32)
        se = np.zeros((m, dim), np.float32)
        qu = np.zeros((m, dim), np.float32)
        w = np.zeros((m, 3), np.float32)
        ttl_ms = self.profile_cfg.query_ttl_s * 1000.0
        session_ms = self.profile_cfg.session_inactivity_s * 1000.0
        for r, req in enumerate(reqs):
            p = req.profile
            ref = now_ms if req.ref_ms is None else req.ref_ms
            if p is not None:
                if getattr(p, "long_term", None) is not None:
                    lt[r] = p.long_term
                    w[r, 0] = self.cfg.weight_long_term
                last = getattr(p, "last_ts", None) or 0
                if getattr(p, "session", None) is not None and ref - last <= session_ms:
                    se[r] = p.session
                    w[r, 1] = self.cfg.weight_session
                q_ts = getattr(p, "query_ts", None) or 0
                if getattr(p, "query", None) is not None and ref - q_ts <= ttl_ms:
                    qu[r] = p.query
                    w[r, 2] = self.cfg.weight_query
            if req.query_vector is not None:  # an explicit query overrides the stored one
                qu[r] = req.query_vector
                w[r, 2] = self.cfg.weight_query
        lt = _unit(lt)
        se = _unit(se)
        qu = _unit(qu)
        raw = w[:, :1] * lt + w[:, 1:2] * se + w[:, 2:3] * qu
        norms = np.linalg.norm(raw, axis=1)
        has = norms > 1e-8
        P = np.zeros_like(raw)
        P[has] = raw[has] / norms[has, None]
        share = np.where(w.sum(1) > 0, w[:, 2] / np.maximum(w.sum(1), 1e-9), 0.0)
        if self.user_model is not None:
            elapsed = self._model_contexts(reqs, now_ms, qu, w[:, 2] > 0, P, has)
            if timings is not None:
                timings["user_model"] = elapsed
        return P, has, share

    def _model_contexts(
        self,
        reqs: Sequence[Request],
        now_ms: int,
        query: np.ndarray,
        has_query: np.ndarray,
        P: np.ndarray,
        has: np.ndarray,
    ) -> float:
        """Replace P's rows by the user model's p for users with recent events or a fresh query.
        Returns the seconds it took."""
        t0 = time.perf_counter()
        um = self.user_model
        assert um is not None
        events = [getattr(r.profile, "recent_events", None) or [] for r in reqs]
        refs = [now_ms if r.ref_ms is None else r.ref_ms for r in reqs]
        arr = event_arrays(events, refs, self.catalog.index_of, um.n_events)
        use = np.flatnonzero((arr.mask.sum(1) > 0) | has_query)
        if use.size:
            sub = arr.rows(use)
            P[use] = um.contexts(
                self.catalog.matrix,
                sub,
                query[use],
                has_query[use],
                revision=getattr(self.catalog, "revision", None),
            )
            has[use] = True
        elapsed = time.perf_counter() - t0
        metrics.user_model_seconds.observe(elapsed)
        return elapsed

    # -- main entry ----------------------------------------------------------------------
    def recommend(
        self, reqs: Sequence[Request], now_ms: int | None = None, timings: dict[str, float] | None = None
    ) -> list[list[ScoredItem]]:
        """Top-K per request, one matrix product for the whole batch. ``timings`` (if given)
        receives the seconds of the whole call (``scoring``) and of the user model (``user_model``)."""
        return [unpack(p) for p in self.recommend_packed(reqs, now_ms, timings)]

    def recommend_packed(
        self, reqs: Sequence[Request], now_ms: int | None = None, timings: dict[str, float] | None = None
    ) -> list[PackedList]:
        """:meth:`recommend`'s lists as :data:`PackedList` s, built for the whole batch at once (the
        scoring process sends these)."""
        t0 = time.perf_counter()
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        out: list[PackedList] = [([], [], []) for _ in reqs]
        if not reqs:
            return out
        P, has, q_share = self.context_vectors(reqs, now_ms, timings)
        warm = np.flatnonzero(has)
        # Popularity read once per batch and category, shared by the prior and the cold-start fallback.
        popular: dict[tuple[str | None, int], list[tuple[str, float]]] = {}
        if warm.size:
            self._score_warm(reqs, warm, P, q_share, out, popular, now_ms)
        for r in np.flatnonzero(~has).tolist():
            out[r] = pack(self._fallback(reqs[r], popular))
        elapsed = time.perf_counter() - t0
        metrics.scoring_seconds.observe(elapsed)
        metrics.scoring_batch_users.observe(len(reqs))
        if timings is not None:
            timings["scoring"] = elapsed
        return out

    # -- warm users: everything vectorised over the batch ---------------------------------
    def _score_warm(
        self,
        reqs: Sequence[Request],
        rows: np.ndarray,
        P: np.ndarray,
        q_share: np.ndarray,
        out: list[PackedList],
        popular: dict[tuple[str | None, int], list[tuple[str, float]]],
        now_ms: int,
    ) -> None:
        """Candidates, buy-again, demand factors, softmax, MMR and reasons for the users ``rows``.

        Array shapes: m users, C candidates per user (top-k by similarity, then the user's
        bought items), k_max slots. No Python loop over candidates; one over users only to
        gather their item id lists and to build the returned objects.
        """
        cat = self.catalog
        sub = [reqs[r] for r in rows]
        Pw = P[rows]
        k_max = max(r.k for r in sub)
        n_cand = int(min(len(cat.ids), max(4 * k_max, k_max + 50)))
        excl_rows, excl_items = self._exclusions(sub)
        unavailable = np.flatnonzero(~np.asarray(cat.available, bool))
        excl = _split_rows(excl_rows, excl_items, len(sub))
        top_idx, top_sim = cat.topk(Pw, n_cand, exclude=excl, available_only=True)
        S, extra = self._covisit(sub, excl_rows, excl_items, unavailable)
        log_pop, extra = self._popularity_prior(len(sub), extra, popular, now_ms)
        c = self._candidates(sub, Pw, top_idx, top_sim, excl_rows, excl_items, extra)
        fac, trend = self._demand(c.idx)
        alpha = self.cfg.alpha
        valid = c.idx >= 0
        log_fac = np.log(np.maximum(fac, 1e-6))
        model = c.sim
        if S is not None:  # u_i's score: cosine + the co-visitation feature (row max 1)
            gathered = S.gather(c.idx)
            model = c.sim + self.cfg.covisit_weight * np.where(valid, gathered, 0.0).astype(np.float32)
        # u_i: the model's softmax over the discoveries, mixed with the buy-again distribution over
        # the user's own purchases in the proportion ``repeat_share`` (see ``_mixture``). Ranking is
        # by log u_i (in cosine units for MMR), so the shown scores are the ranking's probabilities.
        logits = alpha * model + log_fac
        # Which past purchase comes back: the context (β·logits) and the shop's recent demand (ρ·log pop).
        rebuy_ctx = self.cfg.repeat_context * np.where(valid, logits, 0.0)
        if log_pop is not None:  # the shop's recent demand as a prior: u_i ∝ exp(α·s_i) · pop_i^w
            pop_c = log_pop[np.maximum(c.idx, 0)]
            logits = logits + self.cfg.popularity_weight * pop_c
            rebuy_ctx = rebuy_ctx + self.cfg.repeat_popularity * pop_c
        probs = self._mixture(valid, logits, c.bonus, rebuy_ctx)
        rel = np.where(valid & (probs > 0), np.log(np.maximum(probs, 1e-30)) / alpha, -np.inf)
        quota = np.array([int(round(self.cfg.buy_again_share * r.k)) for r in sub], np.int64)
        order = self._mmr_batch(c.idx, rel, k_max, c.bonus > 0, quota)  # (m, k_max), -1 = none
        if self.cfg.trending_slots > 0 and self.adjustments is not None:
            ks = np.array([r.k for r in sub], np.int64)
            order = self._trending_slots(order, c.idx, rel, fac > 1.0, c.bonus > 0, ks)
        sel = np.take_along_axis(c.idx, np.maximum(order, 0), 1)
        sel = np.where(order >= 0, sel, -1)
        take = np.maximum(order, 0)
        sel_trend = np.take_along_axis(trend, take, 1)
        codes, similar = self._reason_codes(
            sub,
            Pw,
            sel,
            np.take_along_axis(fac, take, 1),
            sel_trend,
            np.take_along_axis(c.bonus, take, 1),
            q_share[rows],
        )
        ks = np.array([r.k for r in sub], np.int64)
        lists = self._packed_lists(ks, sel, np.take_along_axis(probs, take, 1), codes, similar, sel_trend)
        for j, r in enumerate(rows.tolist()):
            out[r] = lists[j]

    def _exclusions(self, sub: Sequence[Request]) -> tuple[np.ndarray, np.ndarray]:
        """(request row, catalog row) pairs to filter: excluded ids, and purchases when filtered."""
        lists: list[list[str]] = []
        for req in sub:
            ids = list(req.exclude_ids)
            p = req.profile
            if p is not None and self.cfg.exclude_purchased:
                ids.extend(getattr(p, "purchased_items", None) or [])
            lists.append(ids)
        rows, idx, _, _ = self._flat_index(lists)
        return rows, idx

    def _flat_index(
        self, lists: Sequence[Sequence[str]]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Ragged id lists → (row, catalog row, flat position, position in its list) of the known
        ids, in one lookup. Rows come out in ascending order; ``flat position`` indexes the
        concatenated lists."""
        lens = np.fromiter((len(x) for x in lists), np.int64, len(lists))
        flat = [i for x in lists for i in x]
        idx = self.catalog.index_of(flat) if flat else np.empty(0, np.int64)
        row = np.repeat(np.arange(len(lists)), lens)
        ok = np.flatnonzero(idx >= 0)
        return row[ok], idx[ok], ok, ok - (np.cumsum(lens) - lens)[row[ok]]

    def _covisit(
        self, sub: Sequence[Request], excl_rows: np.ndarray, excl_items: np.ndarray, unavailable: np.ndarray
    ) -> tuple[_DenseScores | _SparseScores | None, tuple[np.ndarray, np.ndarray] | None]:
        """Co-visitation scores of the users' recent items, each row scaled to max 1, and each
        row's best ``covisit_candidates`` items (row, catalog row) as extra candidates:
        co-visited, not excluded, available.

        Vectorised over the batch either way: as a dense (m, n) array when the users'
        neighbourhoods cover much of the catalog (a small one), else sparse, only the co-visited
        items stored, so that a round on a large catalog costs what the neighbourhoods hold and
        not m x catalog size. Both give the same scores and candidates."""
        cv, cfg = self.covisit, self.cfg
        if cv is None or cfg.covisit_weight <= 0:
            return None, None
        events = [getattr(r.profile, "recent_events", None) or [] for r in sub]
        rows, items, flat, _ = self._flat_index([[e[0] for e in evs] for evs in events])
        m, n = len(sub), len(self.catalog.ids)
        weights = None
        if cfg.covisit_recency < 1.0 and rows.size:
            ts = np.fromiter((int(e[2]) for evs in events for e in evs), np.int64)[flat]
            first = np.unique(rows * n + items, return_index=True)[1]  # an item at its newest event
            moments = _moment_rank(rows, ts)
            rows, items = rows[first], items[first]
            weights = np.power(np.float32(cfg.covisit_recency), moments[first]).astype(np.float32)
        dense = cv.scores_dense(rows, items, m, weights=weights)  # a small, full catalog: dense
        if dense is not None:
            return self._covisit_dense(_widened(dense, n), excl_rows, excl_items, unavailable)
        S = cv.scores_csr(rows, items, m, canonical=False, weights=weights)
        if S.shape[1] > n:  # rows counted beyond the catalog score nothing
            S = S[:, :n]
        if S.nnz * DENSE_COVISIT_FILL >= m * n:
            return self._covisit_dense(_widened(S.toarray(), n), excl_rows, excl_items, unavailable)
        S.sum_duplicates()  # sorted columns: the keys below come out ascending
        counts = np.diff(S.indptr)
        nonempty = np.flatnonzero(counts)
        row_max = np.zeros(m, np.float32)
        if nonempty.size:
            row_max[nonempty] = np.maximum.reduceat(S.data, S.indptr[nonempty])
        r_of = np.repeat(np.arange(m, dtype=np.int64), counts)
        vals = (S.data / np.maximum(row_max, 1e-12)[r_of]).astype(np.float32)
        cols = S.indices.astype(np.int64)
        scores = _SparseScores(r_of * n + cols, vals, n)  # keys ascending: CSR rows, sorted columns
        k = cfg.covisit_candidates
        if k <= 0:
            return scores, None
        ok = vals > 0
        if excl_rows.size:
            ok &= ~np.isin(scores.keys, excl_rows * n + excl_items)
        if unavailable.size:
            ok &= ~np.isin(cols, unavailable)
        sel = np.flatnonzero(ok)
        order = sel[np.lexsort((-vals[sel], r_of[sel]))]  # by row, best first
        r_sorted = r_of[order]
        starts = np.searchsorted(r_sorted, np.arange(m))
        best = order[np.arange(order.size) - starts[r_sorted] < k]
        best.sort()  # by row, then item
        return scores, (r_of[best], cols[best])

    def _covisit_dense(
        self, S: np.ndarray, excl_rows: np.ndarray, excl_items: np.ndarray, unavailable: np.ndarray
    ) -> tuple[_DenseScores, tuple[np.ndarray, np.ndarray] | None]:
        """:meth:`_covisit` on the dense (m, n) scores ``S`` (scaled here, in place)."""
        n = S.shape[1]
        S /= np.maximum(S.max(1, keepdims=True), 1e-12)
        k = min(self.cfg.covisit_candidates, n)
        if k <= 0:
            return _DenseScores(S), None
        masked = S.copy()
        masked[excl_rows, excl_items] = 0.0
        if unavailable.size:
            masked[:, unavailable] = 0.0
        # The k best positive values of each row, ties at the k-th value broken by the lowest
        # catalog row (as the sparse form's stable sort does). Most rows have no tie there: the
        # values at or above the k-th are exactly k; the others keep every value above the k-th,
        # then its equals in order.
        # (selected from the low end of the negated values: numpy's introselect from the high end
        # degrades on rows of mostly zeros, 2.3 s instead of 0.12 s on 256 x 100,000 at 15 % fill)
        kth = -np.partition(-masked, k - 1, axis=1)[:, k - 1 : k]
        kth = np.maximum(kth, _TINY)  # a row with fewer than k positive values takes them all
        take = masked >= kth
        tied_rows = np.flatnonzero(take.sum(1) > k)
        if tied_rows.size:
            sub, at = masked[tied_rows], kth[tied_rows]
            above, tied = sub > at, sub == at
            need = k - above.sum(1, keepdims=True)
            take[tied_rows] = above | (tied & (np.cumsum(tied, axis=1) <= need))
        rows, cols = np.nonzero(take)  # by row, then item
        return _DenseScores(S), (rows.astype(np.int64), cols.astype(np.int64))

    def _popularity_prior(
        self,
        m: int,
        extra: tuple[np.ndarray, np.ndarray] | None,
        memo: dict[tuple[str | None, int], list[tuple[str, float]]],
        now_ms: int,
    ) -> tuple[np.ndarray | None, tuple[np.ndarray, np.ndarray] | None]:
        """log of each item's recent popularity relative to the top item (items beyond the top
        ``popularity_items`` get the last one's), and the ``popularity_candidates`` most popular
        items as extra candidates of every row (merged with ``extra``). (None, extra) when off.

        The top items are read at most once per ``popularity_refresh_ms`` of the batch's clock
        (event time in replays, so a replay reads them per basket as before)."""
        cfg = self.cfg
        if self.popularity is None or not uses_popularity(cfg):
            return None, extra
        n = len(self.catalog.ids)
        refresh = cfg.popularity_refresh_ms
        key = (now_ms // refresh if refresh > 0 else -1, n, getattr(self.catalog, "revision", None))
        cached = self._prior
        if refresh > 0 and cached is not None and cached[0] == key:
            log_pop, idx = cached[1], cached[2]
        else:
            top = self._top_popular(cfg.popularity_items, None, memo)[: cfg.popularity_items]
            if not top:
                return None, extra
            idx = self.catalog.index_of([i for i, _ in top])
            rel = np.array([x for _, x in top], np.float64)
            ok = (idx >= 0) & (rel > 0)
            idx, rel = idx[ok], rel[ok]
            if not idx.size:
                return None, extra
            log_pop = np.full(n, np.log(rel.min()), np.float32)
            log_pop[idx] = np.log(rel)
            self._prior = (key, log_pop, idx)
        k = min(cfg.popularity_candidates, idx.size) if cfg.popularity_weight > 0 else 0
        if k <= 0:
            return log_pop, extra
        rows = np.repeat(np.arange(m), k)
        items = np.tile(idx[:k], m)
        if extra is not None and extra[0].size:
            keys = np.unique(np.concatenate([extra[0] * n + extra[1], rows * n + items]))
            rows, items = keys // n, keys % n
        return log_pop, (rows, items)

    def _candidates(
        self,
        sub: Sequence[Request],
        Pw: np.ndarray,
        top_idx: np.ndarray,
        top_sim: np.ndarray,
        excl_rows: np.ndarray,
        excl_items: np.ndarray,
        extra: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> _Candidates:
        """Top-k columns, then one column per bought item and per ``extra`` (co-visitation)
        item not among them.

        Bought items join the candidates even when their similarity is low; those among the
        top-k keep their column (and demand factor) and get the bonus there.
        """
        m, n = len(sub), len(self.catalog.ids)
        b_rows, b_items, b_bonus = self._repeat_bonus(sub)
        if extra is not None and extra[0].size:  # co-visitation candidates, no bonus
            er, ei = extra
            new = ~np.isin(er * n + ei, b_rows * n + b_items)
            order = np.argsort(np.concatenate([b_rows, er[new]]), kind="stable")
            b_rows = np.concatenate([b_rows, er[new]])[order]
            b_items = np.concatenate([b_items, ei[new]])[order]
            b_bonus = np.concatenate([b_bonus, np.zeros(int(new.sum()), np.float32)])[order]
        if b_rows.size:  # not excluded, available
            keep = ~np.isin(b_rows * n + b_items, excl_rows * n + excl_items)
            keep &= np.asarray(self.catalog.available, bool)[b_items]
            b_rows, b_items, b_bonus = b_rows[keep], b_items[keep], b_bonus[keep]
        top_valid = top_idx >= 0
        top_keys = np.where(top_valid, np.arange(m)[:, None] * n + top_idx, -1)
        b_keys = b_rows * n + b_items
        top_bonus = np.zeros(top_idx.shape, np.float32)
        if b_keys.size:
            order = np.argsort(b_keys)
            sk = b_keys[order]
            pos = np.minimum(np.searchsorted(sk, top_keys), sk.size - 1)
            hit = top_valid & (sk[pos] == top_keys)
            top_bonus = np.where(hit, b_bonus[order][pos], 0.0).astype(np.float32)
            outside = ~np.isin(b_keys, top_keys[top_valid])
            b_rows, b_items, b_bonus = b_rows[outside], b_items[outside], b_bonus[outside]
        top_sim = np.where(top_valid, top_sim, -np.inf).astype(np.float32)
        counts = np.bincount(b_rows, minlength=m)
        width = int(counts.max()) if counts.size else 0
        col = np.arange(b_rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
        b_idx = np.full((m, width), -1, np.int64)
        b_sim = np.full((m, width), -np.inf, np.float32)
        b_bon = np.zeros((m, width), np.float32)
        if b_rows.size:
            b_idx[b_rows, col] = b_items
            b_sim[b_rows, col] = np.einsum("nd,nd->n", self.catalog.matrix[b_items], Pw[b_rows])
            b_bon[b_rows, col] = b_bonus
        return _Candidates(
            idx=np.concatenate([top_idx, b_idx], 1),
            sim=np.concatenate([top_sim, b_sim], 1),
            bonus=np.concatenate([top_bonus, b_bon], 1),
        )

    def _repeat_bonus(self, sub: Sequence[Request]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, catalog row, weight) of the users' purchases, most recent first per user, deduplicated.

        The buy-again weight of the r-th most recent purchase, bought n times, is
        ``repeat_decay^r · n^repeat_count_power`` (> 0; see ``_mixture``). Empty when purchases are
        filtered (``exclude_purchased``) or ``repeat_share`` is 0.
        """
        cfg = self.cfg
        none = np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
        if cfg.exclude_purchased or cfg.repeat_share <= 0:
            return none
        lists = [list(getattr(r.profile, "purchased_items", None) or [])[: cfg.repeat_items] for r in sub]
        counts = [getattr(r.profile, "purchase_counts", None) or {} for r in sub]
        n_flat = np.fromiter(
            (max(1, counts[j].get(i, 1)) for j, x in enumerate(lists) for i in x), np.float32
        )
        rows, items, flat, rank = self._flat_index(lists)  # rank: recency rank within the purchases
        if not rows.size:
            return none
        n_all = self.catalog.matrix.shape[0]
        weight = cfg.repeat_decay ** rank.astype(np.float32) * n_flat[flat] ** cfg.repeat_count_power
        _, first = np.unique(rows * n_all + items, return_index=True)  # a repeat keeps its best rank
        first.sort()
        return rows[first], items[first], np.maximum(weight[first], 1e-30).astype(np.float32)

    def _mixture(
        self, valid: np.ndarray, logits: np.ndarray, weight: np.ndarray, rebuy_ctx: np.ndarray
    ) -> np.ndarray:
        """u_i for every candidate: a two-part mixture, re-buy or discovery.

            u_i = π · q_i                       for the user's past purchases (``weight`` > 0)
            u_i = (1 - π) · softmax(logits)_i    over the other candidates

        where π = ``repeat_share`` and q_i ∝ w_i · exp(rebuy_ctx_i): w_i the recency/frequency
        weight, rebuy_ctx_i = β·(α·s_i + log f_i) + ρ·log pop_i (β = ``repeat_context``: how much the
        current context decides *which* staple comes back; ρ = ``repeat_popularity``: how much the
        shop's recent demand does). A row with only one part gives it all the mass; without
        purchases (or with them filtered) u is the model's softmax alone. Rows sum to 1 over their
        candidates.
        """
        rebuy = valid & (weight > 0)
        disc = valid & ~rebuy
        p_new = _softmax_rows(np.where(disc, logits, -np.inf))
        if not rebuy.any():
            return p_new
        ctx = np.where(rebuy, rebuy_ctx, 0.0)
        q = _softmax_rows(np.where(rebuy, np.log(np.maximum(weight, 1e-30)) + ctx, -np.inf))
        share = self.cfg.repeat_share
        pi = np.where(rebuy.any(1), np.where(disc.any(1), share, 1.0), 0.0).astype(np.float32)
        return (pi[:, None] * q + (1.0 - pi)[:, None] * p_new).astype(np.float32)

    def _demand(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Demand factors (1 without an anomaly) and trend reasons (object array, None) of every
        candidate, whichever source brought it (similarity top-k, co-visitation, the shop's popular
        items, the user's own past purchases), gathered from per-catalog-row arrays: a surging item
        reaches every shopper whose candidates hold it, those who bought it before included."""
        fac = np.ones(idx.shape, np.float32)
        trend = np.full(idx.shape, None, object)
        if self.adjustments is None:
            return fac, trend
        items, categories = self.adjustments.active()  # one small read per round
        if not items and not categories:
            return fac, trend  # no alert: nothing per candidate (the common case)
        row_fac, row_trend = self._demand_rows(items, categories)
        take = idx >= 0
        rows = idx[take]
        fac[take] = row_fac[rows]
        trend[take] = row_trend[rows]
        return fac, trend

    def _demand_rows(
        self, items: Mapping[str, float], categories: Mapping[str, float]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Every catalog row's demand factor (its item's factor times its category's) and trend
        reason (``trending`` for a surging item, else ``trending_in:<category>``, else None), for
        the factors in force; kept while they and the catalog stay the same."""
        cat = self.catalog
        revision = getattr(cat, "revision", None)
        key = (tuple(items.items()), tuple(categories.items()), len(cat.ids), revision)
        cached = self._demand_memo
        if cached is not None and revision is not None and cached[0] == key:
            return cached[1], cached[2]
        n = len(cat.ids)
        f_item = np.ones(n, np.float64)
        if items:
            rows = cat.index_of(list(items))
            vals = np.fromiter(items.values(), np.float64, len(items))
            f_item[rows[rows >= 0]] = vals[rows >= 0]
        # Per category, then one gather by each row's category code: O(catalog + alerts), however
        # many categories surge at once (a load step can raise hundreds).
        codes, code_of = self._category_codes()
        code_f = np.ones(len(code_of), np.float64)
        code_trend = np.full(len(code_of), None, object)
        for c, f in categories.items():
            j = code_of.get(c) if c else None  # an item without a category never takes one's factor
            if j is not None:
                code_f[j] = f
                if f > 1.0:
                    code_trend[j] = f"trending_in:{c}"
        f_cat = code_f[codes]
        trend = code_trend[codes]
        trend[f_item > 1.0] = "trending"
        fac = (f_item * f_cat).astype(np.float32)
        self._demand_memo = (key, fac, trend)
        return fac, trend

    def _category_codes(self) -> tuple[np.ndarray, dict[str, int]]:
        """Each catalog row's category as a small integer, and the code of each category; kept
        while the catalog's size and revision stay the same."""
        cat = self.catalog
        revision = getattr(cat, "revision", None)
        key = (len(cat.ids), revision)
        memo = self._codes_memo
        if memo is not None and revision is not None and memo[0] == key:
            return memo[1], memo[2]
        code_of: dict[str, int] = {}
        names = cat.categories
        codes = np.fromiter((code_of.setdefault(c, len(code_of)) for c in names), np.int64, len(names))
        self._codes_memo = (key, codes, code_of)
        return codes, code_of

    def _mmr_batch(
        self, idx: np.ndarray, rel: np.ndarray, k: int, rebuy: np.ndarray, quota: np.ndarray
    ) -> np.ndarray:
        """Maximal marginal relevance for every row at once; (m, k) column positions, -1 = none.

        At most ``quota[r]`` buy-again candidates (``rebuy``) are picked in row r; then only
        discoveries. The pool is each row's best ``max(4k, k + 50)`` candidates by relevance (as
        many as the similarity candidates; bought items beyond them rank too low to be picked in
        practice: ``tests/inference/test_scoring_batched.py`` checks against the unpruned reference).
        """
        lam = self.cfg.mmr_lambda
        m, C = idx.shape
        rel = np.where(idx >= 0, rel, -np.inf)
        pool = min(C, max(4 * k, k + 50))
        cols = np.argsort(-rel, axis=1, kind="stable")[:, :pool]
        prel = np.take_along_axis(rel, cols, 1)
        prebuy = np.take_along_axis(rebuy, cols, 1)
        kk = min(k, pool)
        quota_binds = bool((np.minimum(prebuy[:, :kk].sum(1), kk) > quota).any())
        if (lam >= 1.0 and not quota_binds) or pool <= 1:
            return np.where(np.isfinite(prel[:, :kk]), cols[:, :kk], -1)
        G = None
        if lam < 1.0:  # relevance only (a binding buy-again quota): no similarities needed
            H = self.catalog.matrix[np.maximum(np.take_along_axis(idx, cols, 1), 0)]  # (m, pool, dim)
            # Pool-to-pool similarities, one batched BLAS product (m, pool, pool): about half the time
            # of a mat-vec per step, and each step then only gathers its pick's row.
            G = np.matmul(H, H.transpose(0, 2, 1))
        ar = np.arange(m)
        base = lam * prel  # the relevance part of every step's score
        # alive: not picked, finite relevance, and not a re-buy once the row's quota is used up.
        alive = np.isfinite(prel) & ~(prebuy & (quota <= 0)[:, None])
        score = np.where(alive, base, -np.inf)  # step 0: no diversity term yet
        max_sim = np.zeros((m, pool), np.float32)
        picked = np.full((m, kk), -1, np.int64)
        n_rebuy = np.zeros(m, np.int64)
        for step in range(kk):
            best = np.argmax(score, 1)
            ok = np.isfinite(score[ar, best])  # False once a row has nothing left to pick
            picked[:, step] = np.where(ok, cols[ar, best], -1)
            alive[ar, best] = False
            took_rebuy = ok & prebuy[ar, best]
            if took_rebuy.any():
                n_rebuy += took_rebuy
                full = took_rebuy & (n_rebuy >= quota)
                if full.any():
                    alive[full] &= ~prebuy[full]
            if step + 1 == kk:
                break
            if G is not None:
                step_sim = G[ar, best]  # similarity of each row's new pick to its pool
                max_sim = step_sim if step == 0 else np.maximum(max_sim, step_sim)
                score = np.where(alive, base - (1.0 - lam) * max_sim, -np.inf)
            else:
                score = np.where(alive, base, -np.inf)
        return _compact(picked)

    def _trending_slots(
        self,
        order: np.ndarray,
        idx: np.ndarray,
        rel: np.ndarray,
        boosted: np.ndarray,
        rebuy: np.ndarray,
        ks: np.ndarray,
    ) -> np.ndarray:
        """Give up to ``trending_slots`` of each list to its most relevant surging (boosted)
        candidates that MMR left out, in place of its last discoveries (or in empty slots).

        Only candidates among the user's best ``max(4k, k + 50)`` by relevance qualify (the pool
        MMR picks from), so a surge reaches the shoppers it suits, not everyone; a list that
        already shows a surging item keeps it."""
        boosted = boosted & (idx >= 0)
        if not boosted.any():
            return order
        m, C = idx.shape
        ar = np.arange(m)
        rel = np.where(idx >= 0, rel, -np.inf)
        k = int(ks.max())
        pool = min(C, max(4 * k, k + 50))
        in_list = np.arange(order.shape[1])[None, :] < ks[:, None]  # the slots each list shows
        rank = np.empty((m, C), np.int64)
        rank[ar[:, None], np.argsort(-rel, axis=1, kind="stable")] = np.arange(C)
        eligible = boosted & (rank < pool) & np.isfinite(rel)
        order = order.copy()
        for _ in range(self.cfg.trending_slots):
            shown = np.zeros((m, C), bool)
            r, j = np.nonzero((order >= 0) & in_list)
            shown[r, order[r, j]] = True
            n_shown = (shown & boosted).sum(1)
            cand = eligible & ~shown
            todo = (n_shown < self.cfg.trending_slots) & cand.any(1)
            if not todo.any():
                break
            best = np.argmax(np.where(cand, rel, -np.inf), 1)
            at = np.maximum(order, 0)
            free = (order < 0) & in_list
            disc = (order >= 0) & in_list & ~rebuy[ar[:, None], at] & ~boosted[ar[:, None], at]
            slot = np.where(
                free.any(1),
                np.argmax(free, 1),
                order.shape[1] - 1 - np.argmax(disc[:, ::-1], 1),
            )
            ok = todo & (free.any(1) | disc.any(1))
            order[ar[ok], slot[ok]] = best[ok]
        return order

    def _reason_codes(
        self,
        sub: Sequence[Request],
        Pw: np.ndarray,
        sel: np.ndarray,
        fac: np.ndarray,
        trend: np.ndarray,
        bonus: np.ndarray,
        q_share: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Reason per selected item, as codes (see ``_REASONS``), and for ``similar_to`` the catalog
        row of the user's recent item it is most similar to (-1 for none): trending (boosted) >
        buy_again > matches_query > similar_to > popular."""
        cat = self.catalog
        m, k = sel.shape
        H = cat.matrix[np.maximum(sel, 0)]  # (m, k, dim)
        Q, has_q = self._query_vectors(sub, q_share)
        q_sim = np.einsum("mkd,md->mk", H, Q)
        recent = [list(getattr(r.profile, "recent_items", None) or [])[:20] for r in sub]
        r_rows, r_items, _, _ = self._flat_index(recent)
        counts = np.bincount(r_rows, minlength=m)
        width = max(1, int(counts.max()) if counts.size else 0)
        col = np.arange(r_rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
        R_idx = np.full((m, width), -1, np.int64)
        R_idx[r_rows, col] = r_items
        R = cat.matrix[np.maximum(R_idx, 0)]  # (m, width, dim)
        r_sim = np.where((R_idx >= 0)[:, None, :], H @ R.transpose(0, 2, 1), -np.inf)  # (m, k, width)
        has_r = (counts > 0)[:, None]
        r_best = np.argmax(r_sim, 2)
        r_max = np.max(r_sim, 2)
        query_wins = has_q[:, None] & (~has_r | (q_share[:, None] >= 0.5) | (q_sim >= r_max))
        codes = np.full((m, k), 4, np.int8)  # popular
        codes[has_r.repeat(k, 1)] = 3  # similar_to
        codes[query_wins] = 2
        codes[bonus > 0] = 1
        codes[(fac > 1.0) & (trend != None)] = 0  # noqa: E711 (object array comparison)
        similar = np.where(has_r, np.take_along_axis(R_idx, r_best, 1), -1)
        return codes, similar

    def _query_vectors(self, sub: Sequence[Request], q_share: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(m, dim) unit query vectors and which rows have one (explicit, or the fresh stored one)."""
        Q = np.zeros((len(sub), self.catalog.dim), np.float32)
        has = np.zeros(len(sub), bool)
        for j, req in enumerate(sub):
            p = req.profile
            if req.query_vector is not None:
                Q[j], has[j] = req.query_vector, True
            elif p is not None and getattr(p, "query", None) is not None and q_share[j] > 0:
                Q[j], has[j] = p.query, True
        return _unit(Q), has

    def _packed_lists(
        self,
        ks: np.ndarray,
        sel: np.ndarray,
        probs: np.ndarray,
        codes: np.ndarray,
        similar: np.ndarray,
        trend: np.ndarray,
    ) -> list[PackedList]:
        """Each row's first ``ks[r]`` picks (up to its first empty slot) as a :data:`PackedList`,
        built for all rows at once: one gather per column, no Python per item but the ids and
        reason strings themselves."""
        width = sel.shape[1]
        filled = np.cumprod(sel >= 0, axis=1, dtype=bool) & (np.arange(width)[None, :] < ks[:, None])
        r, c = np.nonzero(filled)  # row by row, in slot order
        ids = self.catalog.ids
        item_ids = [ids[i] for i in sel[r, c].tolist()]
        scores = probs[r, c].tolist()
        code = codes[r, c]
        reasons = np.array(_REASONS, object)[code]
        at = np.flatnonzero(code == 3)  # similar_to: only where the user has a recent item (row >= 0)
        if at.size:
            reasons[at] = [f"similar_to:{ids[i]}" for i in similar[r[at], c[at]].tolist()]
        at = np.flatnonzero(code == 0)
        if at.size:
            reasons[at] = trend[r[at], c[at]]
        texts: list[str] = reasons.tolist()
        ends = np.cumsum(filled.sum(1)).tolist()
        starts = [0, *ends[:-1]]
        return [(item_ids[a:b], scores[a:b], texts[a:b]) for a, b in zip(starts, ends, strict=True)]

    def _top_popular(
        self, k: int, category: str | None, memo: dict[tuple[str | None, int], list[tuple[str, float]]]
    ) -> list[tuple[str, float]]:
        """Popular items (memoised per batch: one Redis lookup per category, not per user)."""
        assert self.popularity is not None
        k = max(k, self.cfg.top_k * 2)
        for (cat, n), picks in memo.items():
            if cat == category and n >= k:
                return picks[:k]
        memo[(category, k)] = picks = self.popularity.top(k, category=category)
        return picks

    def _fallback(
        self, req: Request, memo: dict[tuple[str | None, int], list[tuple[str, float]]] | None = None
    ) -> list[ScoredItem]:
        """Cold start: trending/popular items (in the event's category when it has one)."""
        memo = {} if memo is None else memo
        excl = set(req.exclude_ids)
        p = req.profile
        if p is not None and self.cfg.exclude_purchased:
            excl.update(getattr(p, "purchased_items", None) or [])
        picks: list[tuple[str, float]] = []
        if self.popularity is not None:
            if req.category_hint:
                picks = list(self._top_popular(req.k + len(excl), req.category_hint, memo))
            if len(picks) < req.k:
                seen = {i for i, _ in picks}
                more = self._top_popular(req.k + len(excl) + len(picks), None, memo)
                picks += [x for x in more if x[0] not in seen]
        if not picks:  # no popularity yet: the first available items, score 0
            avail = np.flatnonzero(np.asarray(self.catalog.available, bool))[: req.k + len(excl)]
            picks = [(self.catalog.ids[i], 0.0) for i in avail]
        avail_idx = self.catalog.index_of([i for i, _ in picks])
        ok_avail = np.asarray(self.catalog.available, bool)
        chosen = [
            (i, s)
            for (i, s), j in zip(picks, avail_idx, strict=True)
            if i not in excl and (j < 0 or ok_avail[j])
        ][: req.k]
        total = sum(s for _, s in chosen) or 1.0
        return [ScoredItem(i, s / total, "popular") for i, s in chosen]


_REASONS = ("trending", "buy_again", "matches_query", "similar_to", "popular")


@dataclass
class _Candidates:
    """Per user (rows) and candidate (columns): catalog row (-1 = empty), h·p, buy-again weight (0 = not bought)."""

    idx: np.ndarray
    sim: np.ndarray
    bonus: np.ndarray


def _compact(picked: np.ndarray) -> np.ndarray:
    """Move each row's picks (>= 0) to the front, order kept (a step with no allowed pick leaves -1)."""
    key = np.where(picked >= 0, 0, 1)
    order = np.argsort(key, axis=1, kind="stable")
    return np.take_along_axis(picked, order, 1)


def _split_rows(rows: np.ndarray, items: np.ndarray, m: int) -> list[np.ndarray]:
    """(row, item) pairs sorted by row → one item array per row."""
    order = np.argsort(rows, kind="stable")
    counts = np.bincount(rows, minlength=m)
    return np.split(items[order], np.cumsum(counts)[:-1])


def uses_popularity(cfg: ScoringSettings) -> bool:
    """The shop's recent demand enters the score: as the discoveries' prior, or in buy-again."""
    rebuy = not cfg.exclude_purchased and cfg.repeat_share > 0 and cfg.repeat_popularity > 0
    return cfg.popularity_weight > 0 or rebuy


def _softmax_rows(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax; -inf entries get 0."""
    top = np.max(z, axis=1, keepdims=True)
    e = np.exp(z - np.where(np.isfinite(top), top, 0.0))
    return e / np.maximum(e.sum(1, keepdims=True), 1e-30)


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.where(n > 1e-12, x / np.maximum(n, 1e-12), 0.0).astype(np.float32)


def _moment_rank(rows: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """For each (row, event time): how many distinct times of its row are newer (0 = the row's
    newest moment). Events at one time (a basket's items) share a rank."""
    order = np.lexsort((-ts, rows))
    r, t = rows[order], ts[order]
    new = np.ones(r.size, bool)
    new[1:] = (r[1:] != r[:-1]) | (t[1:] != t[:-1])
    dense = np.cumsum(new) - 1  # distinct (row, time) id, in row order, newest first
    row_start = np.ones(r.size, bool)
    row_start[1:] = r[1:] != r[:-1]
    first_of_row = np.maximum.accumulate(np.where(row_start, np.arange(r.size), 0))
    out = np.empty(r.size, np.int64)
    out[order] = dense - dense[first_of_row]
    return out


@dataclass(frozen=True)
class _DenseScores:
    """Per-user scores as a dense (m, n) array."""

    values: np.ndarray

    def gather(self, idx: np.ndarray) -> np.ndarray:
        """(m, c) scores at the catalog rows ``idx`` (m, c); rows < 0 read column 0 (callers mask them)."""
        return np.take_along_axis(self.values, np.maximum(idx, 0), 1)


@dataclass(frozen=True)
class _SparseScores:
    """Per-user scores stored only where they are non-zero: ``keys`` = row · n + catalog row,
    ascending, with their ``values``."""

    keys: np.ndarray
    values: np.ndarray
    n: int

    def gather(self, idx: np.ndarray) -> np.ndarray:
        """(m, c) float32 scores at the catalog rows ``idx`` (m, c) of each row; 0 where none is
        stored or idx < 0."""
        out = np.zeros(idx.shape, np.float32)
        if not self.keys.size:
            return out
        q = np.arange(idx.shape[0], dtype=np.int64)[:, None] * self.n + np.maximum(idx, 0)
        pos = np.minimum(np.searchsorted(self.keys, q), self.keys.size - 1)
        hit = (idx >= 0) & (self.keys[pos] == q)
        out[hit] = self.values[pos[hit]]
        return out


def _widened(S: np.ndarray, n: int) -> np.ndarray:
    """Dense scores with exactly ``n`` columns: the catalog's rows beyond the counted ones score 0,
    counted rows beyond the catalog are dropped."""
    if S.shape[1] == n:
        return S
    out = np.zeros((S.shape[0], n), np.float32)
    w = min(n, S.shape[1])
    out[:, :w] = S[:, :w]
    return out
