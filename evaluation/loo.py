"""Offline evaluation by full ranking over the whole catalog.

Protocol (:func:`evaluate_methods`): for each evaluation case (:func:`inference.training.pairs.eval_cases`)
every catalog item is scored, the items of the user's history are **excluded**, and the
target's rank among the remaining items gives Recall@k, NDCG@k and MRR (ties between the target
and other items count half: the expected rank under a random tie-break). Methods:

* ``most_popular``: interaction counts before the evaluated split;
* ``item_knn``: item-item co-occurrence (users in common, cosine-normalised) summed over the
  user's history;
* ``pretrained``: the base encoder, softmax(α·h_iᵀp) order = h_iᵀp order;
* ``streamrec``: the fine-tuned encoder.

``streamrec eval loo`` runs it on Amazon Scientific (leave-one-out; ``--split valid`` for tuning,
``test`` for the report), or on any dataset (Online Retail: time split), and writes Markdown,
a PNG plot and JSON. :func:`ranking_metrics` and :func:`full_ranking_ranks` are reusable.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from evaluation.baselines import ItemSimilarity
from inference.training.pairs import EvalCases, eval_cases
from streamrec.datasets import SPLITS, Dataset, load_dataset
from streamrec.settings import ScoringSettings, Settings, get_settings

if TYPE_CHECKING:
    from inference.scoring import Scorer

log = logging.getLogger(__name__)

KS = (10, 50)
METRIC_KEYS = ("recall@10", "ndcg@10", "recall@50", "ndcg@50", "mrr")

# Published figures on the UniSRec "Scientific" data (leave-one-out, full ranking over all 4,385
# items). Recalled from the papers' tables, not re-derived here; verify against the papers before
# quoting them elsewhere. Whether history items were excluded is not stated in the tables.
PUBLISHED: dict[str, dict[str, Any]] = {
    "SASRec (UniSRec paper)": {
        "recall@10": 0.1080, "ndcg@10": 0.0553, "recall@50": 0.2042, "ndcg@50": 0.0760,
        "source": "Hou et al., KDD 2022 (UniSRec), Table 3, Scientific",
    },
    "UniSRec (fine-tuned, UniSRec paper)": {
        "recall@10": 0.1255, "ndcg@10": 0.0685, "recall@50": 0.2527, "ndcg@50": 0.0958,
        "source": "Hou et al., KDD 2022 (UniSRec), Table 3, Scientific",
    },
    "Recformer (Recformer paper)": {
        "recall@10": 0.1448, "ndcg@10": 0.1027, "mrr": 0.0951,
        "source": "Li et al., KDD 2023 (Recformer), Table 3, Scientific; Recall@10 reported as HR@10",
    },
}  # fmt: skip


# -- metrics ------------------------------------------------------------------------------
def ranking_metrics(ranks: Sequence[float] | np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """Recall@k, NDCG@k (one relevant item: 1/log2(1+rank)) and MRR from 1-based full-ranking
    ranks of the target (0 or negative = not ranked, counts as a miss)."""
    r = np.asarray(ranks, np.float64)
    out: dict[str, float] = {}
    if r.size == 0:
        return {**{f"recall@{k}": 0.0 for k in ks}, **{f"ndcg@{k}": 0.0 for k in ks}, "mrr": 0.0, "n": 0}
    hit = r >= 1
    for k in ks:
        inside = hit & (r <= k)
        out[f"recall@{k}"] = float(inside.mean())
        out[f"ndcg@{k}"] = float(np.where(inside, 1.0 / np.log2(1.0 + np.maximum(r, 1.0)), 0.0).mean())
    out["mrr"] = float(np.where(hit, 1.0 / np.maximum(r, 1.0), 0.0).mean())
    out["n"] = int(r.size)
    return out


def per_case(metric: str, ranks: np.ndarray) -> np.ndarray:
    """Each case's contribution to ``metric`` (its mean over cases is :func:`ranking_metrics`';
    ``hr@k`` is the replay's name of ``recall@k``)."""
    r = np.asarray(ranks, np.float64)
    hit = r >= 1
    name, _, k = metric.partition("@")
    if name == "mrr":
        return np.where(hit, 1.0 / np.maximum(r, 1.0), 0.0)
    inside = hit & (r <= int(k))
    if name in ("recall", "hr"):
        return inside.astype(np.float64)
    return np.where(inside, 1.0 / np.log2(1.0 + np.maximum(r, 1.0)), 0.0)


def paired_interval(
    gain: np.ndarray,
    groups: Sequence[str] | None = None,
    level: float = 0.90,
    n: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Bootstrap interval of the mean per-case gain, paired. With ``groups`` (each case's user)
    whole users are resampled, so that the correlated events of one shopper count as one draw."""
    gain = np.asarray(gain, np.float64)
    codes = group_codes(groups) if groups is not None else np.arange(len(gain))
    sums, counts = resampled_sums(codes, [gain, np.ones_like(gain)], n, seed)
    lo, hi = np.quantile(sums / np.maximum(counts, 1.0), [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def resampled_sums(
    codes: np.ndarray, columns: Sequence[np.ndarray], n: int = 2000, seed: int = 0
) -> list[np.ndarray]:
    """Bootstrap over groups: ``n`` resamples (with replacement) of the groups ``codes`` names
    (0, 1, ...; see :func:`group_codes`), and for each per-case column its sum over every
    resample, (n,), all columns from the same draws (so ratios and differences stay paired)."""
    n_groups = int(codes.max()) + 1 if codes.size else 0
    per_group = [np.bincount(codes, weights=np.asarray(c, np.float64), minlength=n_groups) for c in columns]
    draws = np.random.default_rng(seed).integers(0, n_groups, size=(n, n_groups))
    return [g[draws].sum(1) for g in per_group]


def group_codes(groups: Sequence[str]) -> np.ndarray:
    """Each case's group (its user) as 0, 1, ... in order of first appearance (for ``np.bincount``)."""
    index: dict[str, int] = {}
    return np.fromiter((index.setdefault(g, len(index)) for g in groups), np.int64, len(groups))


def recall_at_k(ranks: Sequence[float] | np.ndarray, k: int) -> float:
    """Share of cases whose target is within the top k."""
    return ranking_metrics(ranks, (k,))[f"recall@{k}"]


def ndcg_at_k(ranks: Sequence[float] | np.ndarray, k: int) -> float:
    """Mean 1/log2(1 + rank) over cases with rank <= k (0 otherwise)."""
    return ranking_metrics(ranks, (k,))[f"ndcg@{k}"]


def mrr(ranks: Sequence[float] | np.ndarray) -> float:
    """Mean reciprocal rank (full ranking, no cut-off)."""
    return ranking_metrics(ranks, (1,))["mrr"]


def full_ranking_ranks(
    scores: np.ndarray, targets: np.ndarray, exclude: Sequence[np.ndarray] | None = None
) -> np.ndarray:
    """1-based rank of ``targets[r]`` in row r of ``scores`` (m, n) over all items but ``exclude[r]``.

    Ties count half (expected rank under a random tie-break), so constant scores are not
    rewarded. Returns float ranks (m,).
    """
    s = np.array(scores, np.float32, copy=True)
    rows = np.arange(s.shape[0])
    t = s[rows, targets].copy()
    if exclude is not None:
        for r, ex in enumerate(exclude):
            if len(ex):
                s[r, ex] = -np.inf
    s[rows, targets] = -np.inf  # the target itself is neither above nor tied with itself
    greater = (s > t[:, None]).sum(1)
    ties = (s == t[:, None]).sum(1)
    return 1.0 + greater + 0.5 * ties


# -- methods ------------------------------------------------------------------------------
class Ranker:
    """Scores of every catalog item for a chunk of cases: ``scores(case_idx) -> (len, n_items)``."""

    name = "base"

    def scores(self, rows: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


class PopularityRanker(Ranker):
    name = "most_popular"

    def __init__(self, counts: np.ndarray) -> None:
        self.counts = counts.astype(np.float32)

    def scores(self, rows: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.counts, (len(rows), self.counts.size))


class ItemKNNRanker(Ranker):
    """Item-kNN (:class:`evaluation.baselines.ItemSimilarity` fitted on the users' item sets):
    a case's score is the summed similarity of its history items."""

    name = "item_knn"

    def __init__(self, user_items: sp.csr_matrix, history_idx: Sequence[np.ndarray]) -> None:
        self.sim = ItemSimilarity.fit(user_items)
        self.hist = [np.asarray(h, np.int64) for h in history_idx]

    def scores(self, rows: np.ndarray) -> np.ndarray:
        return self.sim.scores([self.hist[r] for r in rows])


class VectorRanker(Ranker):
    """h_iᵀp for context vectors P (m, dim) and item vectors H (n, dim)."""

    def __init__(self, name: str, contexts: np.ndarray, items: np.ndarray) -> None:
        self.name = name
        self.P = np.asarray(contexts, np.float32)
        self.H = np.asarray(items, np.float32)

    def scores(self, rows: np.ndarray) -> np.ndarray:
        return self.P[rows] @ self.H.T


def encoder_scorer(
    name: str, encode: Callable[[list[str]], np.ndarray], ds: Dataset, cases: EvalCases, batch_size: int = 256
) -> VectorRanker:
    """Embed every item and every case context with ``encode`` (progress bars)."""
    items = _encode_batched(encode, ds.items["text"].tolist(), batch_size, f"{name}: items")
    ctx = _encode_batched(encode, cases.contexts, batch_size, f"{name}: contexts")
    return VectorRanker(name, ctx, items)


def _encode_batched(encode: Callable[[list[str]], np.ndarray], texts: list[str], bs: int, desc: str):
    out = []
    for s in tqdm(range(0, len(texts), bs), desc=desc, unit="batch", leave=False):
        out.append(np.asarray(encode(texts[s : s + bs]), np.float32))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def baseline_scorers(ds: Dataset, cases: EvalCases, split: str) -> list[Ranker]:
    """Most-popular and item-kNN fitted on the interactions before ``split``."""
    pos = {i: k for k, i in enumerate(ds.item_ids)}
    before = SPLITS[: SPLITS.index(split)]
    df = ds.interactions[ds.interactions["split"].isin(list(before)) & ds.interactions["item_id"].isin(pos)]
    item_idx = df["item_id"].map(pos).to_numpy()
    counts = np.bincount(item_idx, minlength=len(pos)).astype(np.float32)
    users, uidx = np.unique(df["user_id"].to_numpy(), return_inverse=True)
    ui = sp.csr_matrix(
        (np.ones(len(uidx), np.float32), (uidx, item_idx)), shape=(len(users), len(pos))
    )  # duplicates sum; binarised in ItemSimilarity.fit
    hist_idx = [np.fromiter((pos[i] for i in h), np.int64) for h in cases.histories]
    return [PopularityRanker(counts), ItemKNNRanker(ui, hist_idx)]


# --compare NAME=FOLDER[:mode] → (user model, co-visitation)
COMPARE_MODES = {"": (True, True), "text": (False, False), "text+cv": (False, True), "model": (True, False)}
LIST_K = max(KS)  # the served path pushes lists; ranks beyond them count as misses for every method


class ServedRanker:
    """The worker's own path: profiles built by ``profiles/`` from the users' history events (the
    ProfileStore on a real Redis, as the worker writes them), ranked by ``inference.scoring.Scorer``
    with the model folder's catalog and user model, history excluded through ``exclude_ids``.
    ``ranked(rows)`` gives each case's list of catalog rows (``LIST_K`` long)."""

    def __init__(
        self,
        name: str,
        ds: Dataset,
        cases: EvalCases,
        split: str,
        settings: Settings,
        model_dir: Path,
        redis_client: Any,
        use_user_model: bool = True,
        use_covisit: bool = True,
        tuned: bool = True,
    ) -> None:
        import uuid
        from dataclasses import replace

        from devstack.produce import dataset_events
        from inference.catalog import CatalogIndex
        from inference.covisit import CoVisitation, CoVisitRecorder
        from inference.popularity import RedisPopularity
        from inference.scoring import Request
        from inference.tuning import with_model_scoring
        from inference.user_model import load_user_model
        from profiles.store import ProfileStore

        self.name = name
        s = settings.override(redis={"prefix": f"{settings.redis.prefix}:loo:{uuid.uuid4().hex[:8]}"})
        if tuned:  # the scoring weights the worker would serve this folder with
            s = with_model_scoring(s, model_dir)
        self.catalog = CatalogIndex.load(Path(model_dir) / "catalog")
        if use_user_model:
            refuse_seen_split(Path(model_dir), split)
        um = load_user_model(Path(model_dir), self.catalog) if use_user_model else None
        self.user_model_version = um.version if um is not None else None
        before = list(SPLITS[: SPLITS.index(split)])
        inter = ds.interactions
        hist = inter[inter["split"].isin(before) & inter["user_id"].astype(str).isin(set(cases.users))]
        events = list(dataset_events(replace(ds, interactions=hist), "all", settings=s))
        # The collaborative signal learns from the stream: here the stream is the histories, counted
        # by the worker's own recorder (so it sees what item-kNN is fitted on, nothing more).
        covisit = None
        if use_covisit:
            covisit = CoVisitation(len(self.catalog.ids))
            recorder = CoVisitRecorder(
                covisit, self.catalog.index_of, s.scoring.covisit_window, fold_every_s=None
            )
            recorder.record([e.user_id for e in events], [e.item_id or "" for e in events])
            covisit.fold()
        store = ProfileStore(redis_client, s, items=self.catalog)
        popularity = RedisPopularity(s, redis_client)  # the worker's decayed popularity, same events
        try:
            for i in tqdm(range(0, len(events), 5000), desc=f"{name}: profiles", unit="batch", leave=False):
                store.apply_batch(events[i : i + 5000])
                popularity.record(events[i : i + 5000])
            profiles = store.get_profiles(cases.users)
            # What the scorer would read at the end of the histories (one snapshot; Redis is cleaned).
            snapshot = _PopularitySnapshot(popularity.top(max(s.scoring.popularity_items, 4 * LIST_K)))
        finally:
            keys = list(redis_client.scan_iter(match=f"*{s.redis.prefix}*", count=5000))
            for i in range(0, len(keys), 5000):
                redis_client.delete(*keys[i : i + 5000])
        self._parts = (s.profile, snapshot, um, covisit)
        self.scoring = s.scoring
        self.scorer = self._scorer(s.scoring)
        last = hist.groupby(hist["user_id"].astype(str))["ts"].max().to_dict()
        self.requests = [
            Request(u, profiles.get(u), k=LIST_K, exclude_ids=h, ref_ms=int(last.get(u, 0)))
            for u, h in zip(cases.users, cases.histories, strict=True)
        ]
        self.now_ms = int(hist["ts"].max()) if len(hist) else 0

    def _scorer(self, scoring: ScoringSettings) -> Scorer:
        from inference.scoring import Scorer

        profile, popularity, user_model, covisit = self._parts
        return Scorer(
            self.catalog, scoring, profile, popularity=popularity, user_model=user_model, covisit=covisit
        )

    def variant(self, name: str, scoring: ScoringSettings) -> ServedRanker:
        """The same profiles, model and co-visitation ranked with other scoring settings (tuning)."""
        other = copy.copy(self)
        other.name, other.scoring, other.scorer = name, scoring, self._scorer(scoring)
        return other

    def ranked(self, rows: np.ndarray) -> list[np.ndarray]:
        lists = self.scorer.recommend([self.requests[r] for r in rows], now_ms=self.now_ms)
        return [self.catalog.index_of([it.item_id for it in lst]) for lst in lists]


def refuse_seen_split(model_dir: Path, split: str) -> None:
    """Stop (usage error) when the user model in ``model_dir`` was trained on ``split``: a model
    refit on train + valid (``streamrec train-user``'s default) cannot be tuned on valid."""
    from inference.user_model import USER_DIR, read_user_manifest

    if not (Path(model_dir) / USER_DIR / "manifest.json").is_file():
        return
    m = read_user_manifest(Path(model_dir) / USER_DIR, verify=False)
    seen = (m.metrics.get("refit") or {}).get("splits", [])
    if split in seen:
        raise click.UsageError(
            f"the user model in {model_dir} was trained on the {split} split (refit on {'+'.join(seen)}), "
            f"so it cannot be evaluated on it: train one with `streamrec train-user --no-refit` to tune on {split}"
        )


class _PopularitySnapshot:
    """The popularity ranking read from Redis at one moment (a ``PopularitySource``)."""

    def __init__(self, rows: list[tuple[str, float]]) -> None:
        self.rows = rows

    def top(self, k: int, category: str | None = None) -> list[tuple[str, float]]:
        return self.rows[:k]


def _list_ranks(lists: Sequence[np.ndarray], targets: np.ndarray) -> np.ndarray:
    """1-based position of each target in its list, 0 when absent."""
    out = np.zeros(len(targets), np.float64)
    for j, (lst, t) in enumerate(zip(lists, targets, strict=True)):
        hit = np.flatnonzero(np.asarray(lst) == t)
        out[j] = hit[0] + 1 if hit.size else 0
    return out


def evaluate_methods(
    ds: Dataset,
    cases: EvalCases,
    scorers: Sequence[Ranker | ServedRanker],
    chunk: int = 512,
    ranks_out: dict[str, np.ndarray] | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics of every method over ``cases`` (full ranking, history excluded; ranks beyond
    ``LIST_K`` count as misses, so MRR is MRR@LIST_K for every method alike). ``ranks_out``
    receives each method's per-case ranks (0 = a miss), for paired comparisons."""
    pos = {i: k for k, i in enumerate(ds.item_ids)}
    targets = np.fromiter((pos[t] for t in cases.targets), np.int64, len(cases))
    excl = [np.fromiter((pos[i] for i in h if i in pos), np.int64) for h in cases.histories]
    results: dict[str, dict[str, float]] = {}
    for sc in scorers:
        if isinstance(sc, ServedRanker):
            ranks = served_ranks(sc, targets, pos, chunk)
        else:
            ranks = np.zeros(len(cases), np.float64)
            for s in range(0, len(cases), chunk):
                rows = np.arange(s, min(s + chunk, len(cases)))
                ranks[rows] = full_ranking_ranks(sc.scores(rows), targets[rows], [excl[r] for r in rows])
        ranks = np.where(ranks <= LIST_K, ranks, 0)
        results[sc.name] = ranking_metrics(ranks)
        if ranks_out is not None:
            ranks_out[sc.name] = ranks
    return results


def paired_gains(
    ranks: Mapping[str, np.ndarray],
    of: str,
    metrics: Sequence[str] = ("ndcg@10", "recall@10"),
    level: float = 0.90,
) -> dict[str, dict[str, list[float]]]:
    """``of``'s gain over every other method on the same cases: {method: {metric: [mean, low,
    high]}}, a paired bootstrap interval (cases resampled: one per user)."""
    out: dict[str, dict[str, list[float]]] = {}
    for name, r in ranks.items():
        if name == of:
            continue
        out[name] = {}
        for m in metrics:
            gain = per_case(m, ranks[of]) - per_case(m, r)
            lo, hi = paired_interval(gain, level=level)
            out[name][m] = [float(gain.mean()), lo, hi]
    return out


def gains_table(gains: Mapping[str, Mapping[str, Sequence[float]]], of: str) -> str:
    """:func:`paired_gains` as a Markdown table."""
    metrics = list(next(iter(gains.values()), {}))
    head = f"| {of} against | " + " | ".join(f"{m} gain (90 % interval)" for m in metrics) + " |"
    rows = [head, "|---|" + "---|" * len(metrics)]
    for name, g in gains.items():
        cells = [f"{g[m][0]:+.4f} ({g[m][1]:+.4f}, {g[m][2]:+.4f})" for m in metrics]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def served_ranks(
    ranker: ServedRanker, targets: np.ndarray, pos: Mapping[str, int], chunk: int = 512
) -> np.ndarray:
    """Each case's target position (1-based, 0 = absent) in the served list of ``ranker``;
    ``targets`` and ``pos`` in the dataset's item positions."""
    ranks = np.zeros(len(targets), np.float64)
    for s in range(0, len(targets), chunk):
        rows = np.arange(s, min(s + chunk, len(targets)))
        lists = [_reindex(ranker.catalog.ids, lst, pos) for lst in ranker.ranked(rows)]
        ranks[rows] = _list_ranks(lists, targets[rows])
    return ranks


def _reindex(ids: Sequence[str], rows: np.ndarray, pos: Mapping[str, int]) -> np.ndarray:
    """Catalog rows → dataset item positions (the catalog may hold items in another order)."""
    return np.fromiter((pos.get(ids[r], -1) for r in rows.tolist()), np.int64, len(rows))


# -- report -------------------------------------------------------------------------------
def markdown_table(results: Mapping[str, Mapping[str, Any]], keys: Sequence[str] = METRIC_KEYS) -> str:
    """A Markdown table: one row per method, one column per metric (— when absent)."""
    lines = ["| method | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for name, m in results.items():
        cells = [f"{m[k]:.4f}" if isinstance(m.get(k), int | float) else "—" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_results(results: Mapping[str, Mapping[str, Any]], path: Path, title: str) -> Path:
    """Grouped bars of the metrics per method (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(METRIC_KEYS))
    for j, name in enumerate(names):
        vals = [float(results[name].get(k, np.nan)) for k in METRIC_KEYS]
        ax.bar(x + j * width - 0.4 + width / 2, vals, width, label=name)
    ax.set_xticks(x, METRIC_KEYS)
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- the command --------------------------------------------------------------------------
def sasrec_ranker(
    ds: Dataset, cases: EvalCases, split: str, catalog: Any, threads: int = 0, cache_dir: Path | None = None
) -> VectorRanker:
    """The ID-only sequential baseline (SASRec-style): the user model's architecture over learned
    ID embeddings, no text, trained here on the train split (valid for early stopping) and, for
    the test split, refit on train + valid like the served user model (``streamrec train-user``);
    one trained before on the same data is loaded from ``cache_dir`` (shared with ``eval replay``)."""
    from evaluation.baselines import train_sequential_id
    from inference.training.user_model import eval_examples

    model = train_sequential_id(ds, catalog, split, threads, cache_dir=cache_dir)
    ex = eval_examples(ds, split, catalog.index_of, model.cfg.n_events, catalog.dim, cases=cases)
    pos = {i: k for k, i in enumerate(ds.item_ids)}
    items = np.zeros((len(pos), catalog.dim), np.float32)
    rows = catalog.index_of(list(pos))
    items[rows >= 0] = model.item_matrix()[rows[rows >= 0]]
    return VectorRanker("sasrec (ID-only)", model.contexts(ex.arrays, ex.query, ex.qmask), items)


def run_evaluation(
    ds: Dataset,
    split: str,
    served: Mapping[str, tuple[Path, bool, bool]],
    settings: Settings,
    max_users: int = 0,
    sasrec: bool = True,
    seed: int = 0,
    ranks_out: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, dict[str, float]], EvalCases, dict[str, str]]:
    """Baselines, the ID-only sequential model and every served configuration
    (name → (model folder, use its user model, use co-visitation)) on the evaluation cases of ``split``."""
    cases = eval_cases(ds, split).take(max_users, seed)
    if not len(cases):
        raise click.ClickException(f"no evaluation cases in split {split!r} of {ds.name}")
    scorers: list[Ranker | ServedRanker] = list(baseline_scorers(ds, cases, split))
    redis_client = settings.redis.client()
    versions: dict[str, str] = {}
    for name, (folder, with_user, with_cv) in served.items():
        r = ServedRanker(
            name,
            ds,
            cases,
            split,
            settings,
            folder,
            redis_client,
            use_user_model=with_user,
            use_covisit=with_cv,
        )
        versions[name] = f"{r.catalog.model_version}" + (
            f" + {r.user_model_version}" if r.user_model_version else ""
        )
        scorers.append(r)
    if sasrec:
        first = next(iter(served.values()))[0]
        from inference.catalog import CatalogIndex

        catalog = CatalogIndex.load(first / "catalog")
        scorers.insert(2, sasrec_ranker(ds, cases, split, catalog, cache_dir=settings.state_dir / "cache"))
    return evaluate_methods(ds, cases, scorers, ranks_out=ranks_out), cases, versions


def pretrained_model_dir(s: Settings) -> Path:
    """A cached export of the base encoder (no fine-tuning), built on first use."""
    from inference.encoder import OnnxEncoder

    folder = s.state_dir.resolve() / "cache" / f"pretrained-{s.encoder.max_len}"
    try:
        OnnxEncoder(folder, s.encoder, variant="fp32")
        return folder
    except Exception:
        from inference.training.export import export_pretrained

        export_pretrained(
            folder, base_model=s.encoder.base_model or None, max_len=s.encoder.max_len, variants=("fp32",)
        )
        return folder


@click.command("loo")
@click.option(
    "--dataset",
    "dataset",
    default="scientific",
    show_default=True,
    help="scientific, online-retail, or a generic dataset folder.",
)
@click.option(
    "--split",
    type=click.Choice(["valid", "test"]),
    default="test",
    show_default=True,
    help="valid for tuning, test for the report.",
)
@click.option(
    "--model-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="The served model folder (catalog + user model; default: settings): the `streamrec` row.",
)
@click.option(
    "--compare",
    multiple=True,
    help="More served rows, NAME=FOLDER[:MODE]: no mode = user model + co-visitation, text = profile blend "
    "only, text+cv = profile blend + co-visitation, model = user model without co-visitation.",
)
@click.option(
    "--sasrec/--no-sasrec", default=True, show_default=True, help="Train the ID-only baseline here."
)
@click.option("--max-users", type=int, default=0, help="Evaluate a seeded sample of users (0 = all).")
@click.option(
    "--results-dir", type=click.Path(path_type=Path), default=Path("results/loo"), show_default=True
)
@click.option("--output", type=click.Path(path_type=Path), default=None, help="JSON, method names as keys.")
@click.option("--quick", is_flag=True, help="500 users (CI smoke run).")
def loo(
    dataset: str,
    split: str,
    model_dir: Path | None,
    compare: tuple[str, ...],
    sasrec: bool,
    max_users: int,
    results_dir: Path,
    output: Path | None,
    quick: bool,
) -> None:
    """Leave-one-out full ranking (history excluded) through the served path: `streamrec` is the
    worker's profiles + scorer (+ user model) on the model folder; beside it most-popular,
    item-kNN, the ID-only sequential model and the text-only profile blend."""
    s = get_settings()
    t0 = time.time()
    ds = load_dataset(dataset, s.data_dir)
    if quick and not max_users:
        max_users = 500
    model_dir = model_dir or s.resolved_model_dir
    if not (model_dir / "catalog" / "meta.json").exists():
        raise click.ClickException(
            f"no catalog in {model_dir}: build one with `streamrec index --dataset {dataset} --model-dir {model_dir}`"
        )
    served: dict[str, tuple[Path, bool, bool]] = {
        "text only (profile blend)": (model_dir, False, False),
        "text + user model": (model_dir, True, False),
        "text + co-visitation": (model_dir, False, True),
    }
    for spec in compare:
        name, _, folder = spec.partition("=")
        path, _, mode = folder.partition(":")
        if mode not in COMPARE_MODES:
            raise click.BadParameter(f"{spec!r}: the mode after ':' is one of {', '.join(COMPARE_MODES)}")
        served[name] = (Path(path), *COMPARE_MODES[mode])
    served["streamrec"] = (model_dir, True, True)
    ranks: dict[str, np.ndarray] = {}
    results, cases, versions = run_evaluation(ds, split, served, s, max_users, sasrec=sasrec, ranks_out=ranks)
    # How sure "ahead of" is: streamrec's gain over every other row, paired on the same users.
    gains = paired_gains(ranks, "streamrec")
    published = PUBLISHED if ds.name == "scientific" else {}
    notes = [
        f"dataset {ds.name}: {len(ds.items)} items; split {split}; {len(cases)} users evaluated"
        + (f" (sample of {max_users})" if max_users else ""),
        f"skipped: {cases.skipped_cold} users without history, {cases.skipped_repeat} whose split items "
        "were all in their history",
        "full ranking over the whole catalog; the user's history items are excluded from the ranking; "
        "target = first item of the split not in the history; ties count half; ranks beyond "
        f"{LIST_K} count as misses (MRR is MRR@{LIST_K})",
        "served rows (`streamrec`, `text only`, comparisons) are the worker's path: the history replayed as "
        "events into profiles on Redis (profiles/store.py), scored by inference/scoring.py with its settings "
        f"(MMR λ {s.scoring.mmr_lambda:g}), history passed as exclude_ids",
        *[f"{k}: {v}" for k, v in versions.items()],
        f"run time {time.time() - t0:.0f}s",
    ]
    results_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{ds.name}-{split}"
    plot = plot_results(results, results_dir / f"loo-{tag}.png", f"{ds.name} {split}: full ranking")
    md = [f"# Leave-one-out evaluation: {ds.name}, {split}", "", markdown_table(results), ""]
    md += ["## streamrec against each row, paired on the same users", "", gains_table(gains, "streamrec"), ""]
    if published:
        md += [
            "## Published figures (same data, leave-one-out, full ranking)",
            "",
            markdown_table(published),
            "",
            *[f"- {k}: {v['source']}" for k, v in published.items()],
            "- Recalled from the papers' tables, not re-run here; verify before quoting. The papers "
            "do not say whether history items are excluded.",
            "",
        ]
    md += ["## Notes", "", *[f"- {n}" for n in notes], "", f"![plot]({plot.name})", ""]
    report = results_dir / f"loo-{tag}.md"
    report.write_text("\n".join(md))
    click.echo("\n".join(md))
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        # Method names are the top-level keys (streamrec's row also holds its paired gains over the
        # others); the published figures and notes are in the Markdown.
        rows: dict[str, Any] = {
            k: ({**v, "gain_vs": gains} if k == "streamrec" else v) for k, v in results.items()
        }
        output.write_text(json.dumps(rows, indent=2))
        click.echo(f"wrote {output}")
