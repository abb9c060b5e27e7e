"""Online (test-then-learn) baseline recommenders for the replay evaluation.

Each baseline sees the stream in event-time order through the same two calls as streamrec:
``recommend(user_ids, k, now_ms)`` before a batch is applied, then ``update(events)``.
All of them allow repeat purchases, as streamrec does in the replay (see evaluation/replay.py).

- ``most_popular``: all-time counts (weighted by event type).
- ``recent_popular``: counts decayed with event time (half-life 7 days), as a trending list.
- ``item_knn``: item-to-item co-occurrence over users' item sets, cosine-normalised
  (:class:`ItemSimilarity`, shared with ``eval loo``); a user's list is the sum of the rows
  of their recent items.
- ``session_knn``: SKNN (Jannach & Ludewig, 2017): the m past baskets most similar (cosine)
  to the user's recent items vote for their items.
- ``repeat``: the user's own past items by decayed frequency (buy-again), then popular.
- ``sasrec``: the ID-based sequential model (SASRec-style): the user model's architecture over
  learned item-ID embeddings, no text (:func:`train_sequential_id`, trained in the same job on the
  periods before the evaluated one), run over each user's latest events as the stream brings them.
  Its weights stay fixed over the evaluated period (it is not retrained online); items it never saw
  in training cannot be recommended by it.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from streamrec.datasets import SPLITS, Dataset
from streamrec.events import Event, EventType

if TYPE_CHECKING:
    from inference.training.user_model import TrainedUserModel

TYPE_WEIGHT = {"view": 1.0, "click": 2.0, "add_to_cart": 4.0, "purchase": 6.0}


class OnlineBaseline:
    name = "baseline"

    def __init__(self, item_ids: Sequence[str]) -> None:
        self.ids = list(item_ids)
        self.index = {i: n for n, i in enumerate(self.ids)}
        self.n = len(self.ids)

    def _idx(self, events: Sequence[Event]) -> tuple[np.ndarray, np.ndarray, list[Event]]:
        hits = [
            (e, self.index[e.item_id]) for e in events if e.item_id is not None and e.item_id in self.index
        ]
        ev = [e for e, _ in hits]
        idx = np.fromiter((n for _, n in hits), np.int64, len(hits))
        w = np.fromiter((TYPE_WEIGHT.get(e.type.value, 0.0) for e in ev), np.float64, len(ev))
        return idx, w, ev

    def _top(self, scores: np.ndarray, k: int) -> list[str]:
        k = min(k, scores.size)
        part = np.argpartition(-scores, k - 1)[:k]
        part = part[np.argsort(-scores[part], kind="stable")]
        return [self.ids[i] for i in part]

    def recommend(self, user_ids: Sequence[str], k: int, now_ms: int) -> list[list[str]]:
        raise NotImplementedError

    def update(self, events: Sequence[Event]) -> None:
        raise NotImplementedError


class MostPopular(OnlineBaseline):
    name = "most_popular"

    def __init__(self, item_ids: Sequence[str]) -> None:
        super().__init__(item_ids)
        self.counts = np.zeros(self.n)

    def recommend(self, user_ids, k, now_ms):
        top = self._top(self.counts, k)
        return [top for _ in user_ids]

    def update(self, events):
        idx, w, _ = self._idx(events)
        np.add.at(self.counts, idx, w)


class RecentPopular(OnlineBaseline):
    """Σ weight · 2^(-(now - t)/half_life), kept by forward decay."""

    name = "recent_popular"

    def __init__(self, item_ids: Sequence[str], half_life_days: float = 7.0) -> None:
        super().__init__(item_ids)
        self.hl_ms = half_life_days * 86_400_000
        self.scores = np.zeros(self.n)
        self.t_ref: int | None = None

    def recommend(self, user_ids, k, now_ms):
        top = self._top(self.scores, k)
        return [top for _ in user_ids]

    def update(self, events):
        idx, w, ev = self._idx(events)
        if not ev:
            return
        ts = np.fromiter((e.ts for e in ev), np.int64, len(ev))
        if self.t_ref is None:
            self.t_ref = int(ts.min())
        # Move the reference forward now and then so the exponents stay small.
        if ts.max() - self.t_ref > 20 * self.hl_ms:
            shift = int(ts.max() - self.t_ref)
            self.scores *= 2.0 ** (-shift / self.hl_ms)
            self.t_ref += shift
        np.add.at(self.scores, idx, w * 2.0 ** ((ts - self.t_ref) / self.hl_ms))


class _UserHistory(OnlineBaseline):
    def __init__(self, item_ids: Sequence[str], history: int = 20) -> None:
        super().__init__(item_ids)
        self.recent: dict[str, deque[int]] = defaultdict(lambda: deque(maxlen=history))
        self.fallback = MostPopular(item_ids)

    def _remember(self, ev: list[Event], idx: np.ndarray) -> None:
        for e, i in zip(ev, idx, strict=True):
            dq = self.recent[e.user_id]
            if i in dq:
                dq.remove(i)
            dq.append(int(i))

    def _with_fallback(self, scores: np.ndarray | None, k: int) -> list[str]:
        if scores is None or not np.any(scores > 0):
            return self._top(self.fallback.counts, k)
        # Ties (zeros) broken by popularity.
        return self._top(scores + 1e-9 * self.fallback.counts / (self.fallback.counts.max() + 1.0), k)


class ItemSimilarity:
    """Item-to-item co-occurrence C = XᵀX over users' item sets (X binary users × items), zero
    diagonal, cosine-normalised at query time: sim(i, j) = C_ij / sqrt(n_i · n_j).

    The one item-kNN of the project: :meth:`fit` builds it from a users × items matrix
    (leave-one-out), :meth:`add` grows it as a user meets new items (the replay's stream); both
    give the same C for the same user-item pairs. :meth:`scores` sums the similarity rows of
    each query's items.
    """

    def __init__(self, n_items: int) -> None:
        self.n = n_items
        self.co = np.zeros((n_items, n_items), np.float32)
        self.cnt = np.zeros(n_items, np.float32)  # users per item

    @classmethod
    def fit(cls, user_items: sp.spmatrix) -> ItemSimilarity:
        x = (sp.csr_matrix(user_items) > 0).astype(np.float32)
        knn = cls(x.shape[1])
        knn.co = np.asarray((x.T @ x).todense(), np.float32)
        np.fill_diagonal(knn.co, 0.0)
        knn.cnt = np.asarray(x.sum(0), np.float32).ravel()
        return knn

    def add(self, new: np.ndarray, known: np.ndarray) -> None:
        """A user met the items ``new`` (distinct, not seen by them before) and already had ``known``."""
        if new.size == 0:
            return
        self.co[np.ix_(new, known)] += 1.0
        self.co[np.ix_(known, new)] += 1.0
        self.co[np.ix_(new, new)] += 1.0  # each new pair once (both orders)
        self.co[new, new] -= 1.0  # no self co-occurrence
        self.cnt[new] += 1.0

    def scores(self, queries: Sequence[np.ndarray]) -> np.ndarray:
        """(len(queries), n_items): per query, the summed similarity rows of its items."""
        inv = (1.0 / np.sqrt(np.maximum(self.cnt, 1.0))).astype(np.float32)
        out = np.zeros((len(queries), self.n), np.float32)
        for r, q in enumerate(queries):
            if len(q):
                q = np.asarray(q, np.int64)
                out[r] = (self.co[q] * inv[q, None]).sum(0) * inv
        return out


class ItemKNN(_UserHistory):
    """Online item-kNN (:class:`ItemSimilarity` grown from the stream); a user's list is the
    sum of the similarity rows of their recent items."""

    name = "item_knn"

    def __init__(self, item_ids: Sequence[str], history: int = 20) -> None:
        super().__init__(item_ids, history)
        self.sim = ItemSimilarity(self.n)
        self.seen: dict[str, set[int]] = defaultdict(set)

    def recommend(self, user_ids, k, now_ms):
        hists = [np.fromiter(self.recent.get(u, ()), np.int64) for u in user_ids]
        scores = self.sim.scores(hists)
        return [self._with_fallback(scores[r] if len(h) else None, k) for r, h in enumerate(hists)]

    def update(self, events):
        self.fallback.update(events)
        idx, _, ev = self._idx(events)
        by_user: dict[str, list[int]] = defaultdict(list)
        for e, i in zip(ev, idx, strict=True):
            by_user[e.user_id].append(int(i))
        for u, items in by_user.items():
            seen = self.seen[u]
            new = np.array([i for i in dict.fromkeys(items) if i not in seen], np.int64)
            self.sim.add(new, np.fromiter(seen, np.int64, len(seen)))
            seen.update(new.tolist())
        self._remember(ev, idx)


class SessionKNN(_UserHistory):
    """SKNN over past baskets (a user's events at one timestamp form a basket)."""

    name = "session_knn"

    def __init__(self, item_ids: Sequence[str], neighbours: int = 100, history: int = 20) -> None:
        super().__init__(item_ids, history)
        self.m = neighbours
        self.postings: list[list[int]] = [[] for _ in range(self.n)]  # item -> session ids
        self.sessions: list[np.ndarray] = []

    def recommend(self, user_ids, k, now_ms):
        out = []
        for u in user_ids:
            hist = list(self.recent.get(u, ()))
            if not hist or not self.sessions:
                out.append(self._with_fallback(None, k))
                continue
            cand = np.concatenate([np.asarray(self.postings[i], np.int64) for i in hist])
            if cand.size == 0:
                out.append(self._with_fallback(None, k))
                continue
            sids, overlap = np.unique(cand, return_counts=True)
            lens = np.fromiter((self.sessions[s].size for s in sids), np.float64, sids.size)
            sim = overlap / np.sqrt(lens * len(hist))
            top = np.argsort(-sim, kind="stable")[: self.m]
            scores = np.zeros(self.n)
            for s, w in zip(sids[top], sim[top], strict=True):
                scores[self.sessions[s]] += w
            out.append(self._with_fallback(scores, k))
        return out

    def update(self, events):
        self.fallback.update(events)
        idx, _, ev = self._idx(events)
        baskets: dict[tuple[str, int], list[int]] = defaultdict(list)
        for e, i in zip(ev, idx, strict=True):
            baskets[(e.user_id, e.ts)].append(int(i))
        for items in baskets.values():
            arr = np.unique(np.asarray(items, np.int64))
            sid = len(self.sessions)
            self.sessions.append(arr)
            for i in arr:
                self.postings[i].append(sid)
        self._remember(ev, idx)


class Repeat(_UserHistory):
    """Buy-again: the user's own items by decayed frequency."""

    name = "repeat"

    def __init__(self, item_ids: Sequence[str], half_life_days: float = 30.0) -> None:
        super().__init__(item_ids)
        self.hl_ms = half_life_days * 86_400_000
        self.freq: dict[str, dict[int, float]] = defaultdict(dict)

    def recommend(self, user_ids, k, now_ms):
        out = []
        for u in user_ids:
            f = self.freq.get(u)
            if not f:
                out.append(self._with_fallback(None, k))
                continue
            scores = np.zeros(self.n)
            items = np.fromiter(f.keys(), np.int64, len(f))
            scores[items] = np.fromiter(f.values(), np.float64, len(f))
            out.append(self._with_fallback(scores, k))
        return out

    def update(self, events):
        self.fallback.update(events)
        idx, w, ev = self._idx(events)
        for e, i, wi in zip(ev, idx, w, strict=True):
            # Forward decay against a fixed landmark (2010-01-01).
            x = wi * 2.0 ** ((e.ts - 1_262_304_000_000) / self.hl_ms)
            d = self.freq[e.user_id]
            d[int(i)] = d.get(int(i), 0.0) + x
        self._remember(ev, idx)


# The ID-only baseline's learning rate of its item embeddings, relative to the tower's: each
# dataset's valid split chooses (Online Retail, NDCG@10 on valid: 0.0075 at 1 (best epoch 1 of 4,
# under most-popular), 0.0293 at 10 (epoch 9): at 1 the embeddings barely move in the epochs
# that early stopping allows).
SEQUENTIAL_ID_OFFSET_LR = (1.0, 10.0)


def train_sequential_id(
    ds: Dataset,
    catalog: Any,
    split: str,
    threads: int = 0,
    progress: bool = True,
    cache_dir: Path | None = None,
    offset_lr: Sequence[float] = SEQUENTIAL_ID_OFFSET_LR,
) -> TrainedUserModel:
    """The ID-only sequential baseline, trained for evaluating ``split``: on the train split, once
    per learning rate of the item embeddings in ``offset_lr``, each stopped early on valid; the best
    on valid is kept, and for the test split refit on train + valid for its epochs, as
    ``streamrec train-user`` does for the served user model. ``catalog`` gives the item rows (its
    text vectors are not used).

    With ``cache_dir``, a model trained before on the same interactions, item rows and
    configurations is loaded from there instead (``eval loo`` and ``eval replay`` of one dataset
    share one training of tens of minutes), and a new one is saved there."""
    from inference.training.user_model import UserModelConfig, refit_user_model, train_user_model

    cfgs = [UserModelConfig(item_repr="id", threads=threads, offset_lr_scale=x) for x in offset_lr]
    path = None
    if cache_dir is not None:
        path = cache_dir / f"sasrec-{ds.name}-{split}-{_training_key(ds, catalog, cfgs)}"
        if path.with_suffix(".json").is_file():
            return _load_sequential_id(path, catalog)
    runs = [train_user_model(ds, catalog, cfg, progress=progress) for cfg in cfgs]
    model = max(runs, key=lambda m: m.metrics["best"]["ndcg@10"])
    model.metrics["grid"] = {
        "offset_lr_scale": [
            {
                "value": m.cfg.offset_lr_scale,
                "ndcg@10": m.metrics["best"]["ndcg@10"],
                "epoch": m.metrics["best"]["epoch"],
            }
            for m in runs
        ]
    }
    if split != "valid":
        model = refit_user_model(ds, catalog, model, progress=progress)
    if path is not None:
        _save_sequential_id(model, path)
    return model


def _training_key(ds: Dataset, catalog: Any, cfgs: Sequence[Any]) -> str:
    """What a trained ID-only model depends on: the interactions, the item rows, the configurations
    tried (not the thread count)."""
    import dataclasses
    import hashlib
    import json

    import pandas as pd

    cols = [c for c in ("user_id", "item_id", "ts", "split", "type") if c in ds.interactions]
    h = hashlib.sha256(pd.util.hash_pandas_object(ds.interactions[cols], index=False).to_numpy().tobytes())
    h.update("\n".join(catalog.ids).encode())
    for cfg in cfgs:
        h.update(
            json.dumps(
                {k: v for k, v in dataclasses.asdict(cfg).items() if k != "threads"}, sort_keys=True
            ).encode()
        )
    return h.hexdigest()[:16]


def _save_sequential_id(model: TrainedUserModel, path: Path) -> None:
    import dataclasses
    import json

    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"tower.{k}": v for k, v in model.tower.state_dict().items()}
    tensors.update({f"table.{k}": v for k, v in model.table.state_dict().items()})
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path.with_suffix(".safetensors")))
    meta = {"alpha": model.alpha, "metrics": model.metrics, "config": dataclasses.asdict(model.cfg)}
    path.with_suffix(".json").write_text(json.dumps(meta, default=float))


def _load_sequential_id(path: Path, catalog: Any) -> TrainedUserModel:
    import json

    from safetensors.torch import load_file

    from inference.training.user_model import ItemTable, TrainedUserModel, UserModelConfig, UserTower

    meta = json.loads(path.with_suffix(".json").read_text())
    cfg = UserModelConfig(**meta["config"])
    tensors = load_file(str(path.with_suffix(".safetensors")))
    tower = UserTower(catalog.dim, cfg)
    tower.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("tower.")})
    table = ItemTable(catalog.matrix, np.zeros(len(catalog.ids), np.float32), cfg.item_repr, cfg.seed)
    table.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("table.")})
    return TrainedUserModel(
        tower.eval(), table, cfg, float(meta["alpha"]), {**meta["metrics"], "cached": str(path)}
    )


class SequentialID(_UserHistory):
    """The trained ID-only sequential model on the stream (see the module doc): each user's last
    ``n_events`` events → the model's context vector → the items by dot product, repeats allowed;
    users without events get the popular items."""

    name = "sasrec"

    def __init__(
        self, item_ids: Sequence[str], model: TrainedUserModel, catalog: Any, ds: Dataset, split: str
    ) -> None:
        super().__init__(item_ids)
        self.model = model
        self.index_of = catalog.index_of
        self.n_events = model.cfg.n_events
        self.events: defaultdict[str, deque[tuple[str, str, int]]] = defaultdict(
            lambda: deque(maxlen=self.n_events)
        )
        rows = catalog.index_of(self.ids)
        matrix = model.item_matrix()
        self.items = np.zeros((self.n, matrix.shape[1]), np.float32)
        self.items[rows >= 0] = matrix[rows[rows >= 0]]
        # Only items with a trained embedding can be ranked: those seen before the evaluated split.
        inter = ds.interactions
        seen = inter.loc[inter["split"].isin(SPLITS[: SPLITS.index(split)]), "item_id"].astype(str).unique()
        known = np.zeros(self.n, bool)
        known[[self.index[i] for i in seen if i in self.index]] = True
        self.unknown = ~known | (rows < 0)

    def recommend(self, user_ids, k, now_ms):
        from inference.user_model import event_arrays

        ctx = [list(self.events.get(u, ()))[::-1] for u in user_ids]  # newest first
        warm = [j for j, c in enumerate(ctx) if c]
        out = [self._top(self.fallback.counts, k) if not c else [] for c in ctx]
        if warm:
            arrays = event_arrays(
                [ctx[j] for j in warm], [ctx[j][0][2] for j in warm], self.index_of, self.n_events
            )
            dim = self.items.shape[1]
            P = self.model.contexts(
                arrays, np.zeros((len(warm), dim), np.float32), np.zeros(len(warm), np.float32)
            )
            S = P @ self.items.T
            S[:, self.unknown] = -np.inf
            ranked = min(k, int((~self.unknown).sum()))
            for j, row in zip(warm, S, strict=True):
                out[j] = self._top(row, ranked)
        return out

    def update(self, events):
        self.fallback.update(events)
        for e in events:
            if e.item_id and e.type is not EventType.SEARCH:
                self.events[e.user_id].append((e.item_id, e.type.value, e.ts))


BASELINES = {cls.name: cls for cls in (MostPopular, RecentPopular, ItemKNN, SessionKNN, Repeat)}
