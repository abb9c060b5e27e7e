"""The per-user scorer that the batched one in ``inference/scoring.py`` replaced, kept as its
oracle: the same maths written plainly, one user and one candidate at a time.

Not used by the product; ``tests/inference/test_scoring_batched.py`` checks that the batched
scorer returns the same lists, scores and reasons.
"""

from __future__ import annotations

import time  # noqa: F401
from collections.abc import Sequence

import numpy as np

from inference.scoring import Request, ScoredItem, uses_popularity
from streamrec.interfaces import Catalog, DemandAdjustments, PopularitySource
from streamrec.settings import ProfileSettings, ScoringSettings


class ReferenceScorer:
    """Scores batches of users against the catalog. Thread-compatible, no I/O of its own
    except through the adjustments and popularity sources it is given."""

    def __init__(
        self,
        catalog: Catalog,
        scoring: ScoringSettings,
        profile: ProfileSettings,
        adjustments: DemandAdjustments | None = None,
        popularity: PopularitySource | None = None,
    ) -> None:
        self.catalog = catalog
        self.cfg = scoring
        self.profile_cfg = profile
        self.adjustments = adjustments
        self.popularity = popularity

    # -- context vectors -----------------------------------------------------------------
    def context_vectors(
        self, reqs: Sequence[Request], now_ms: int
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
        return P, has, share

    # -- main entry ----------------------------------------------------------------------
    def recommend(self, reqs: Sequence[Request], now_ms: int | None = None) -> list[list[ScoredItem]]:
        """Top-K per request, one matrix product for the whole batch."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        out: list[list[ScoredItem]] = [[] for _ in reqs]
        if not reqs:
            return out
        P, has, q_share = self.context_vectors(reqs, now_ms)
        warm = np.flatnonzero(has)
        if warm.size:
            self._score_warm(reqs, warm, P, q_share, out)
        for r in np.flatnonzero(~has).tolist():
            out[r] = self._fallback(reqs[r])
        return out

    def _exclusions(self, req: Request) -> np.ndarray:
        ids: list[str] = list(req.exclude_ids)
        p = req.profile
        if p is not None and self.cfg.exclude_purchased:
            ids.extend(getattr(p, "purchased_items", None) or [])
        if not ids:
            return np.empty(0, np.int64)
        idx = self.catalog.index_of(ids)
        return idx[idx >= 0]

    def _score_warm(
        self, reqs: Sequence[Request], rows: np.ndarray, P: np.ndarray, q_share: np.ndarray, out: list
    ) -> None:
        cat = self.catalog
        unavailable = np.flatnonzero(~np.asarray(cat.available, bool))
        excl = [np.union1d(self._exclusions(reqs[r]), unavailable) for r in rows]
        k_max = max(reqs[r].k for r in rows)
        n_cand = int(min(len(cat.ids), max(4 * k_max, k_max + 50)))
        cand_idx, cand_sim = cat.topk(P[rows], n_cand, exclude=excl)
        alpha = self.cfg.alpha
        # Demand factors for every candidate of the batch in one call.
        flat = cand_idx.reshape(-1)
        valid = flat >= 0
        factors: np.ndarray = np.ones(flat.shape, np.float32)
        reasons: list[str | None] = [None] * flat.size
        if self.adjustments is not None and valid.any():
            for t in np.flatnonzero(valid).tolist():  # candidate by candidate
                factors[t], reasons[t] = self._factor(int(flat[t]))
        factors = factors.reshape(cand_idx.shape)
        log_pop = self._log_popularity()
        for j, r in enumerate(rows):
            req = reqs[r]
            ok = cand_idx[j] >= 0
            idx = cand_idx[j][ok]
            sim = cand_sim[j][ok].astype(np.float32)
            fac = factors[j][ok]
            rsn = [reasons[j * cand_idx.shape[1] + t] for t in np.flatnonzero(ok)]
            bought, b_bonus = self._repeat_bonus(req, excl[j])
            # Bought items and the shop's popular items join the candidates even when their
            # similarity is low; every candidate takes its demand factor.
            extra = bought[~np.isin(bought, idx)]
            popular = self._popular(excl[j])
            extra = np.concatenate([extra, popular[~np.isin(popular, np.concatenate([idx, extra]))]])
            idx = np.concatenate([idx, extra])
            sim = np.concatenate([sim, cat.matrix[extra] @ P[r]]).astype(np.float32)
            more = [self._factor(int(i)) for i in extra]
            fac = np.concatenate([fac, np.asarray([f for f, _ in more], np.float32)])
            rsn += [t for _, t in more]
            bonus = np.zeros(idx.size, np.float32)
            if bought.size:
                where = {int(i): t for t, i in enumerate(idx)}
                bonus[[where[int(i)] for i in bought]] = b_bonus
            logits = alpha * sim + np.log(np.maximum(fac, 1e-6))
            rebuy_ctx = self.cfg.repeat_context * logits
            if log_pop is not None:
                logits = logits + self.cfg.popularity_weight * log_pop[idx]
                rebuy_ctx = rebuy_ctx + self.cfg.repeat_popularity * log_pop[idx]
            probs = self._mixture(req, logits, bonus, rebuy_ctx)
            rel = np.where(probs > 0, np.log(np.maximum(probs, 1e-30)) / alpha, -np.inf)
            quota = int(round(self.cfg.buy_again_share * req.k))
            order = self._mmr(idx, rel, req.k, bonus > 0, quota)
            if self.adjustments is not None:
                order = self._trending(order, rel, fac > 1.0, bonus > 0, req.k, k_max)
            out[r] = self._explain(
                req, idx[order], probs[order], [rsn[o] for o in order], fac[order], q_share[r], bonus[order]
            )

    def _factor(self, row: int) -> tuple[np.float32, str | None]:
        """One catalog row's demand factor (item x category) and trend reason."""
        if self.adjustments is None:
            return np.float32(1.0), None
        item_f, cat_f = self.adjustments.active()
        item, category = self.catalog.ids[row], self.catalog.categories[row]
        fi = item_f.get(item, 1.0)
        fc = cat_f.get(category, 1.0) if category else 1.0
        reason = "trending" if fi > 1.0 else f"trending_in:{category}" if fc > 1.0 else None
        return np.float32(fi * fc), reason

    def _trending(
        self, order: np.ndarray, rel: np.ndarray, boosted: np.ndarray, rebuy: np.ndarray, k: int, k_max: int
    ) -> np.ndarray:
        """Up to ``trending_slots`` picks go to the most relevant boosted candidates among the
        best ``max(4 k_max, k_max + 50)`` by relevance: into an empty slot, else in place of the
        last pick that is neither a re-buy nor boosted."""
        pool = set(np.argsort(-rel, kind="stable")[: max(4 * k_max, k_max + 50)].tolist())
        picks = [int(o) for o in order]
        for _ in range(self.cfg.trending_slots):
            if sum(bool(boosted[o]) for o in picks) >= self.cfg.trending_slots:
                break
            cand = [c for c in range(rel.size) if boosted[c] and c in pool and c not in picks]
            if not cand:
                break
            best = max(cand, key=lambda c: (rel[c], -c))
            if len(picks) < k:
                picks.append(best)
                continue
            disc = [t for t, o in enumerate(picks) if not rebuy[o] and not boosted[o]]
            if not disc:
                break
            picks[disc[-1]] = best
        return np.asarray(picks, np.int64)

    def _repeat_bonus(self, req: Request, excluded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Catalog rows of the user's purchases and their buy-again weights:
        ``repeat_decay^r · n^repeat_count_power`` for the r-th most recent purchase, bought n times.
        Empty when purchases are filtered (``exclude_purchased``) or ``repeat_share`` is 0."""
        cfg = self.cfg
        p = req.profile
        none = np.empty(0, np.int64), np.empty(0, np.float32)
        if cfg.exclude_purchased or cfg.repeat_share <= 0 or p is None:
            return none
        bought = list(getattr(p, "purchased_items", None) or [])[: cfg.repeat_items]
        if not bought:
            return none
        idx = self.catalog.index_of(bought)
        counts = getattr(p, "purchase_counts", None) or {}
        n = np.array([max(1, counts.get(i, 1)) for i in bought], np.float32)
        weight = cfg.repeat_decay ** np.arange(len(bought), dtype=np.float32) * n**cfg.repeat_count_power
        keep = (idx >= 0) & ~np.isin(idx, excluded)
        idx, weight = idx[keep], np.maximum(weight[keep], 1e-30).astype(np.float32)
        _, first = np.unique(idx, return_index=True)  # a repeated id keeps its most recent rank
        first.sort()
        return idx[first], weight[first]

    def _top_popular_rows(self) -> tuple[np.ndarray, np.ndarray]:
        top = self.popularity.top(self.cfg.popularity_items) if self.popularity is not None else []
        idx = self.catalog.index_of([i for i, _ in top]) if top else np.empty(0, np.int64)
        rel = np.array([x for _, x in top], np.float64)
        ok = (idx >= 0) & (rel > 0) if top else np.zeros(0, bool)
        return idx[ok], rel[ok]

    def _log_popularity(self) -> np.ndarray | None:
        """log relative popularity per catalog row (the last read one's beyond the top items)."""
        if not uses_popularity(self.cfg):
            return None
        idx, rel = self._top_popular_rows()
        if not idx.size:
            return None
        out = np.full(len(self.catalog.ids), np.log(rel.min()), np.float32)
        out[idx] = np.log(rel)
        return out

    def _popular(self, excluded: np.ndarray) -> np.ndarray:
        """The most popular items as extra candidates, less excluded and unavailable ones."""
        if self.cfg.popularity_weight <= 0:
            return np.empty(0, np.int64)
        idx, _ = self._top_popular_rows()
        idx = idx[: self.cfg.popularity_candidates]
        return idx[~np.isin(idx, excluded)]

    def _mixture(
        self, req: Request, logits: np.ndarray, weight: np.ndarray, rebuy_ctx: np.ndarray
    ) -> np.ndarray:
        """u = π·q over past purchases + (1 - π)·softmax over the rest (one user)."""
        cfg = self.cfg
        rebuy = weight > 0
        p_new = np.zeros(logits.size, np.float64)
        if (~rebuy).any():
            p_new[~rebuy] = _softmax(logits[~rebuy])
        if not rebuy.any():
            return p_new.astype(np.float32)
        q = np.zeros(logits.size, np.float64)
        q[rebuy] = _softmax(np.log(weight[rebuy]) + rebuy_ctx[rebuy])
        pi = cfg.repeat_share if (~rebuy).any() else 1.0
        return (pi * q + (1.0 - pi) * p_new).astype(np.float32)

    def _mmr(self, idx: np.ndarray, rel: np.ndarray, k: int, rebuy: np.ndarray, quota: int) -> np.ndarray:
        """Maximal marginal relevance over the candidates, at most ``quota`` buy-again picks;
        returns positions into ``idx``."""
        lam = self.cfg.mmr_lambda
        n = idx.size
        k = min(k, n)
        H = self.catalog.matrix[idx]
        sims = H @ H.T
        selected: list[int] = []
        max_sim = np.full(n, -np.inf, np.float32)
        remaining = np.ones(n, bool)
        for _ in range(k):
            div = np.where(np.isfinite(max_sim), max_sim, 0.0) if lam < 1.0 else 0.0
            mmr = lam * rel - (1.0 - lam) * div
            mmr[~remaining] = -np.inf
            if sum(bool(rebuy[i]) for i in selected) >= quota:
                mmr[rebuy] = -np.inf
            best = int(np.argmax(mmr))
            if not np.isfinite(mmr[best]):
                break
            selected.append(best)
            remaining[best] = False
            max_sim = np.maximum(max_sim, sims[best])
        return np.asarray(selected, np.int64)

    def _explain(
        self,
        req: Request,
        idx: np.ndarray,
        probs: np.ndarray,
        trend_reasons: list[str | None],
        factors: np.ndarray,
        q_share: float,
        repeat_bonus: np.ndarray | None = None,
    ) -> list[ScoredItem]:
        cat = self.catalog
        H = cat.matrix[idx]
        p = req.profile
        recent = list(getattr(p, "recent_items", None) or [])[:20] if p is not None else []
        ridx = cat.index_of(recent) if recent else np.empty(0, np.int64)
        known = ridx >= 0
        recent_ids = [recent[i] for i in np.flatnonzero(known)]
        R = cat.matrix[ridx[known]] if known.any() else None
        qv = None
        if req.query_vector is not None:
            qv = req.query_vector
        elif p is not None and getattr(p, "query", None) is not None and q_share > 0:
            qv = p.query
        q_sim = H @ _unit(np.asarray(qv, np.float32)[None])[0] if qv is not None else None
        r_sim = H @ R.T if R is not None else None
        items = []
        for t, i in enumerate(idx):
            trend = trend_reasons[t]
            if trend and factors[t] > 1.0:
                reason = trend
            elif repeat_bonus is not None and repeat_bonus[t] > 0:
                reason = "buy_again"
            elif q_sim is not None and (r_sim is None or q_share >= 0.5 or q_sim[t] >= r_sim[t].max()):
                reason = "matches_query"
            elif r_sim is not None:
                reason = f"similar_to:{recent_ids[int(np.argmax(r_sim[t]))]}"
            else:
                reason = "popular"
            items.append(ScoredItem(cat.ids[i], float(probs[t]), reason))
        return items

    def _fallback(self, req: Request) -> list[ScoredItem]:
        """Cold start: trending/popular items (in the event's category when it has one)."""
        excl = set(req.exclude_ids)
        p = req.profile
        if p is not None and self.cfg.exclude_purchased:
            excl.update(getattr(p, "purchased_items", None) or [])
        picks: list[tuple[str, float]] = []
        n = max(req.k + len(excl), self.cfg.top_k * 2)  # as many as the batched scorer reads
        if self.popularity is not None:
            if req.category_hint:
                picks = self.popularity.top(n, category=req.category_hint)
            if len(picks) < req.k:
                seen = {i for i, _ in picks}
                more = self.popularity.top(max(n + len(picks), self.cfg.top_k * 2))
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


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.where(n > 1e-12, x / np.maximum(n, 1e-12), 0.0).astype(np.float32)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max()
    e = np.exp(z)
    return e / e.sum()
