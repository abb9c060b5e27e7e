"""``streamrec eval replay``: prequential (test-then-learn) evaluation on the real stream.

Protocol (Online Retail, clean purchases):

1. Warm-up: the train and valid periods (up to 2011-10-31) are applied to the profiles in a
   real Redis through the same code the workers run (``ProfileStore.apply_batch``), and to
   every baseline's state.
2. Test (from 2011-11-01), in event-time order, one batch per timestamp (a basket): *before*
   applying it, each event's item is looked up in its user's latest recommendations
   (recomputed from the current profile through ``inference.scoring.Scorer``, as the push path
   does); then the batch is applied to profiles and baselines.
3. Metrics per event: HR@10/20 (item in the top 10/20), NDCG@10/20 (1/log2(rank+1)),
   MRR (reciprocal rank within the top-20 list, 0 beyond); per day and overall. Catalog
   coverage: distinct items recommended / catalog size. Novelty: mean -log2 of the
   recommended items' share of the warm-up purchases.

Repeat purchases are allowed (37.5 % of the test purchases re-buy an item the customer bought
before): streamrec runs with ``exclude_purchased = False`` here, and a buy-again baseline
(``repeat``) is reported beside the others.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import click
import numpy as np
import pandas as pd
from tqdm import tqdm

from streamrec.datasets import SPLITS, Dataset, load_dataset
from streamrec.events import Event
from streamrec.settings import REORDER_SHOP_SCORING, ScoringSettings, Settings, get_settings

if TYPE_CHECKING:
    from inference.scoring import Scorer

KS = (10, 20)
LIST_K = max(KS)


@dataclass
class MethodScores:
    """Per-event ranks (0 = not in the list) and the recommended items, for one method."""

    ranks: list[int] = field(default_factory=list)
    days: list[str] = field(default_factory=list)
    recommended: set[str] = field(default_factory=set)
    novelty: list[float] = field(default_factory=list)
    # per event: the user had bought the item before; the item is cold (unseen before the
    # test period) / in the long tail (outside the warm-up's top 20 % by interactions)
    rebuy: list[bool] = field(default_factory=list)
    cold: list[bool] = field(default_factory=list)
    tail: list[bool] = field(default_factory=list)
    users: list[str] = field(default_factory=list)  # whose event (paired bootstraps over users)

    def add(
        self, rank: int, day: str, rebuy: bool = False, cold: bool = False, tail: bool = False, user: str = ""
    ) -> None:
        self.ranks.append(rank)
        self.users.append(user)
        self.days.append(day)
        self.rebuy.append(rebuy)
        self.cold.append(cold)
        self.tail.append(tail)


def rank_metrics(ranks: Sequence[int], ks: Sequence[int] = KS) -> dict[str, float]:
    """HR@k, NDCG@k and MRR from 1-based ranks (0 = absent) of the target in a top list.

    The same maths as the offline evaluation (``evaluation.loo.ranking_metrics``); in a
    prequential replay a hit within the top k of the pushed list is HR@k, and MRR is cut at
    the list's length.
    """
    from evaluation.loo import ranking_metrics

    m = ranking_metrics(ranks, ks)
    return {
        **{f"hr@{k}": m[f"recall@{k}"] for k in ks},
        **{f"ndcg@{k}": m[f"ndcg@{k}"] for k in ks},
        "mrr": m["mrr"],
    }


def frame_events(ds: Dataset, df: pd.DataFrame, settings: Settings) -> list[Event]:
    """The rows ``df`` of ``ds.interactions`` as events (the producer's mapping, so the replay
    sees exactly what a live worker would)."""
    from dataclasses import replace

    from devstack.produce import dataset_events

    return list(dataset_events(replace(ds, interactions=df), "all", settings=settings))


class ReplayMethod(Protocol):
    """What :func:`run_replay` needs of a method: :class:`StreamrecMethod` and the baselines
    (``evaluation.baselines``)."""

    def recommend(self, user_ids: Sequence[str], k: int, now_ms: int) -> list[list[str]]: ...

    def update(self, events: Sequence[Event]) -> None: ...


class StreamrecMethod:
    """streamrec itself: ProfileStore (real Redis) + Scorer over a model folder's catalog."""

    def __init__(
        self, name: str, settings: Settings, model_dir: Path, redis_client, tuned: bool = True
    ) -> None:
        from inference.catalog import CatalogIndex
        from inference.covisit import CoVisitation, CoVisitRecorder
        from inference.popularity import RedisPopularity
        from inference.tuning import with_model_scoring
        from inference.user_model import load_user_model
        from profiles.store import ProfileStore

        self.name = name
        s = settings.override(
            redis={"prefix": f"{settings.redis.prefix}:{name}"}, scoring=REORDER_SHOP_SCORING
        )
        if tuned:  # the folder's tuned weights, as the worker serves it
            s = with_model_scoring(s, model_dir)
        self.settings = s
        self.catalog = CatalogIndex.load(model_dir / "catalog")
        um = load_user_model(model_dir, self.catalog) if s.scoring.user_model else None
        self.user_model_version = um.version if um is not None else None
        self.store = ProfileStore(redis_client, s, items=self.catalog)
        self.popularity = RedisPopularity(s, redis_client)
        # The collaborative signal learns from the replayed stream (warm-up, then test-then-learn)
        # with the worker's recorder; folded once per hour of stream time, so runs repeat exactly.
        self.covisit = CoVisitation(len(self.catalog.ids))
        self.recorder = CoVisitRecorder(
            self.covisit, self.catalog.index_of, s.scoring.covisit_window, fold_every_s=None
        )
        self._fold_hour = -1
        self.user_model = um
        self.scorer = self._scorer(s.scoring)
        self.redis = redis_client

    def _scorer(self, scoring: ScoringSettings) -> Scorer:
        from inference.scoring import Scorer

        return Scorer(
            self.catalog,
            scoring,
            self.settings.profile,
            popularity=self.popularity,
            user_model=self.user_model,
            covisit=self.covisit,
        )

    def variant(self, scoring: ScoringSettings) -> ReplayMethod:
        """Another scorer over this method's state (profiles, popularity, co-visitation), for
        tuning: it ranks and learns nothing itself, so it must come before this method in
        :func:`run_replay`'s methods, and this method then learns each basket once."""
        return _ScorerVariant(self, self._scorer(scoring))

    def recommend(
        self, user_ids: Sequence[str], k: int, now_ms: int, scorer: Scorer | None = None
    ) -> list[list[str]]:
        from inference.scoring import Request

        profiles = self.store.get_profiles(list(user_ids))
        reqs = [Request(u, profiles.get(u), k=k, ref_ms=now_ms) for u in user_ids]
        lists = (scorer or self.scorer).recommend(reqs, now_ms=now_ms)
        return [[it.item_id for it in lst] for lst in lists]

    def update(self, events: Sequence[Event]) -> None:
        res = self.store.apply_batch(events)
        self.popularity.record(events)
        applied = [events[i] for i in res.applied_index if events[i].item_id]
        self.recorder.record([e.user_id for e in applied], [e.item_id or "" for e in applied])
        hour = max((e.ts for e in events), default=0) // 3_600_000
        if hour != self._fold_hour:
            self.covisit.fold()
            self._fold_hour = hour

    def cleanup(self) -> None:
        keys = list(self.redis.scan_iter(match=f"*{self.settings.redis.prefix}*", count=5000))
        for i in range(0, len(keys), 5000):
            self.redis.delete(*keys[i : i + 5000])


class _ScorerVariant:
    """:meth:`StreamrecMethod.variant`: its profiles, ranked by another scorer."""

    def __init__(self, base: StreamrecMethod, scorer: Scorer) -> None:
        self.base, self.scorer = base, scorer

    def recommend(self, user_ids: Sequence[str], k: int, now_ms: int) -> list[list[str]]:
        return self.base.recommend(user_ids, k, now_ms, scorer=self.scorer)

    def update(self, events: Sequence[Event]) -> None:
        pass  # the base method learns


def run_replay(
    ds: Dataset,
    methods: dict[str, ReplayMethod],
    settings: Settings,
    max_test_days: int | None = None,
    warmup_days: int | None = None,
    progress: bool = True,
    split: str = "test",
) -> dict[str, MethodScores]:
    """Warm up every method on the splits before ``split`` (train+valid for test), then
    test-then-learn over ``split`` (``valid``: for tuning settings without touching test)."""
    inter = ds.interactions
    before = list(SPLITS[: SPLITS.index(split)])
    warm = inter[inter["split"].isin(before)]
    test = inter[inter["split"] == split]
    if warmup_days:
        start = warm["ts"].max() - warmup_days * 86_400_000
        warm = warm[warm["ts"] >= start]
    if max_test_days:
        end = test["ts"].min() + max_test_days * 86_400_000
        test = test[test["ts"] < end]
    # Warm-up: large batches, time-ordered.
    warm_events = frame_events(ds, warm, settings)
    item_pop: defaultdict[str | None, float] = defaultdict(float)
    for e in warm_events:
        item_pop[e.item_id] += 1.0
    total = sum(item_pop.values()) or 1.0
    step = 5000
    for start in tqdm(range(0, len(warm_events), step), desc="warm-up", unit="batch", disable=not progress):
        chunk = warm_events[start : start + step]
        for m in methods.values():
            m.update(chunk)
    scores = {name: MethodScores() for name in methods}
    bought: defaultdict[str, set[str]] = defaultdict(set)
    for e in warm_events:
        if e.item_id:
            bought[e.user_id].add(e.item_id)
    ranked_items = sorted(item_pop, key=lambda i: -item_pop[i])
    head = set(ranked_items[: max(1, len(ranked_items) // 5)])
    test_events = frame_events(ds, test, settings)
    by_ts: dict[int, list[Event]] = defaultdict(list)
    for e in test_events:
        by_ts[e.ts].append(e)
    for ts in tqdm(sorted(by_ts), desc="test-then-learn", unit="basket", disable=not progress):
        batch = by_ts[ts]
        users = list(dict.fromkeys(e.user_id for e in batch))
        day = time.strftime("%Y-%m-%d", time.gmtime(ts / 1000))
        for name, m in methods.items():
            lists = m.recommend(users, LIST_K, ts)
            # Keyed by item id; an event without one (None) finds no rank.
            pos: dict[str, dict[str | None, int]] = {
                u: {item: r + 1 for r, item in enumerate(lst)} for u, lst in zip(users, lists, strict=True)
            }
            sc = scores[name]
            for lst in lists:
                sc.recommended.update(lst)
                sc.novelty.extend(-math.log2((item_pop.get(i, 0.0) + 1.0) / (total + 1.0)) for i in lst[:10])
            for e in batch:
                sc.add(
                    pos[e.user_id].get(e.item_id, 0),
                    day,
                    rebuy=e.item_id in bought[e.user_id],
                    cold=e.item_id not in item_pop,
                    tail=e.item_id not in head,
                    user=e.user_id,
                )
            m.update(batch)
        for e in batch:
            if e.item_id:
                bought[e.user_id].add(e.item_id)
    return scores


def summarise(scores: dict[str, MethodScores], n_items: int) -> tuple[dict, pd.DataFrame]:
    overall: dict[str, dict[str, float]] = {}
    rows = []
    for name, sc in scores.items():
        met = rank_metrics(sc.ranks)
        met["coverage"] = len(sc.recommended) / n_items
        met["novelty"] = float(np.mean(sc.novelty)) if sc.novelty else 0.0
        met["events"] = len(sc.ranks)
        ranks = np.asarray(sc.ranks)
        for seg, flags in (("rebuy", sc.rebuy), ("new", [not f for f in sc.rebuy]), ("cold", sc.cold),
                           ("tail", sc.tail)):  # fmt: skip
            sel = ranks[np.asarray(flags, bool)] if flags else ranks[:0]
            met[f"hr@{LIST_K} {seg}"] = rank_metrics(sel.tolist())[f"hr@{LIST_K}"] if sel.size else 0.0
            met[f"events {seg}"] = int(sel.size)
        overall[name] = met
        df = pd.DataFrame({"day": sc.days, "rank": sc.ranks})
        for day, g in df.groupby("day"):
            rows.append({"method": name, "day": day, **rank_metrics(g["rank"].tolist()), "events": len(g)})
    return overall, pd.DataFrame(rows)


def paired_vs(
    scores: dict[str, MethodScores],
    of: str,
    k: int = LIST_K,
    level: float = 0.90,
    n: int = 2000,
    seed: int = 0,
) -> dict[str, dict[str, list[float]]]:
    """``of``'s HR@k against every other method on the same events: the gain (difference) and
    the ratio, each with a bootstrap interval that resamples whole users (a customer's basket
    events are not independent). {method: {"hr@k gain": [value, low, high], "hr@k ratio": [...]}}."""
    from evaluation.loo import group_codes, per_case, resampled_sums

    users = scores[of].users
    codes = group_codes(users)
    mine = per_case(f"hr@{k}", np.asarray(scores[of].ranks))
    q = [(1 - level) / 2, 1 - (1 - level) / 2]
    out: dict[str, dict[str, list[float]]] = {}
    for name, sc in scores.items():
        if name == of or sc.users != users:
            continue
        theirs = per_case(f"hr@{k}", np.asarray(sc.ranks))
        a, b, c = resampled_sums(codes, [mine, theirs, np.ones_like(mine)], n, seed)
        gain = (mine.sum() - theirs.sum()) / max(len(mine), 1)
        ratio = mine.sum() / theirs.sum() if theirs.sum() else float("inf")
        g_lo, g_hi = np.quantile((a - b) / np.maximum(c, 1.0), q)
        r_lo, r_hi = np.quantile(a / np.maximum(b, 1e-12), q)
        out[name] = {
            f"hr@{k} gain": [float(gain), float(g_lo), float(g_hi)],
            f"hr@{k} ratio": [float(ratio), float(r_lo), float(r_hi)],
        }
    return out


def write_report(
    overall: dict, per_day: pd.DataFrame, out_dir: Path, notes: list[str], versus: dict | None = None
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for name, g in per_day.groupby("method"):
        ax.plot(
            pd.to_datetime(g["day"]),
            g["hr@10"],
            marker="o",
            ms=3,
            label=name,
            lw=2 if name == "streamrec" else 1,
        )
    ax.set_ylabel("HR@10 (per day)")
    ax.set_title("Prequential replay, Online Retail test period")
    ax.legend(fontsize=8, ncol=3)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(out_dir / "replay_hr10_per_day.png", dpi=110)
    plt.close(fig)

    names = list(overall)
    fig, ax = plt.subplots(figsize=(9, 4))
    x = np.arange(len(names))
    for j, met in enumerate(("hr@10", "ndcg@10", "mrr")):
        ax.bar(x + (j - 1) * 0.27, [overall[n][met] for n in names], width=0.27, label=met)
    ax.set_xticks(x, names, rotation=20)
    ax.legend()
    ax.set_title("Overall (test period)")
    fig.tight_layout()
    fig.savefig(out_dir / "replay_overall.png", dpi=110)
    plt.close(fig)

    cols = [
        "hr@10",
        "hr@20",
        "ndcg@10",
        "mrr",
        "coverage",
        "hr@20 new",
        "hr@20 rebuy",
        "hr@20 cold",
        "hr@20 tail",
    ]
    lines = ["# Replay evaluation (prequential, Online Retail)", ""]
    lines += [f"- {n}" for n in notes]
    lines += ["", "| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for n in sorted(overall, key=lambda n: -overall[n]["hr@10"]):
        lines.append(f"| {n} | " + " | ".join(f"{overall[n][c]:.4f}" for c in cols) + " |")
    if versus:
        key = f"hr@{LIST_K}"
        lines += [
            "",
            "streamrec against each method on the same events (90 % intervals, whole users resampled):",
            "",
            f"| streamrec against | {key} gain | {key} ratio |",
            "|---|---|---|",
        ]
        for name, v in sorted(versus.items(), key=lambda kv: -kv[1][f"{key} ratio"][0]):
            g, r = v[f"{key} gain"], v[f"{key} ratio"]
            lines.append(
                f"| {name} | {g[0]:+.4f} ({g[1]:+.4f}, {g[2]:+.4f}) | ×{r[0]:.3f} (×{r[1]:.3f}, ×{r[2]:.3f}) |"
            )
    lines += ["", "![HR@10 per day](replay_hr10_per_day.png)", "", "![overall](replay_overall.png)", ""]
    path = out_dir / "replay.md"
    path.write_text("\n".join(lines))
    return path


@click.command("replay")
@click.option(
    "--dataset", default="online-retail", show_default=True, help="Named dataset or generic folder."
)
@click.option(
    "--model-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Fine-tuned model folder (default: the settings' model dir).",
)
@click.option(
    "--pretrained-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Pretrained (not fine-tuned) model folder; built from the base model when missing.",
)
@click.option("--results-dir", type=click.Path(path_type=Path), default=Path("results"), show_default=True)
@click.option(
    "--output", type=click.Path(path_type=Path), default=None, help="JSON with every method's metrics."
)
@click.option("--quick", is_flag=True, help="3 test days and 30 warm-up days (CI smoke run).")
@click.option("--days", type=int, default=None, help="Limit the test period to this many days.")
@click.option(
    "--split",
    type=click.Choice(["valid", "test"]),
    default="test",
    show_default=True,
    help="valid to tune settings (warm-up on train), test for the report.",
)
@click.option(
    "--sasrec/--no-sasrec",
    default=True,
    show_default=True,
    help="Train the ID-based sequential baseline here (minutes on 2 cores).",
)
def replay(dataset, model_dir, pretrained_dir, results_dir, output, quick, days, split, sasrec) -> None:
    """Prequential replay of the real stream: streamrec vs baselines (HR, NDCG, MRR, coverage, novelty)."""
    from evaluation.baselines import BASELINES, SequentialID, train_sequential_id

    s = get_settings().override(redis={"prefix": run_prefix()})
    model_dir = model_dir or s.resolved_model_dir
    if not (model_dir / "manifest.json").exists():
        raise click.ClickException(
            f"no model at {model_dir}: run `streamrec train`, `streamrec export` and `streamrec index` first "
            "(or pass --model-dir)"
        )
    if s.scoring.user_model:
        from evaluation.loo import refuse_seen_split

        refuse_seen_split(model_dir, split)
    pretrained_dir = pretrained_dir or s.state_dir / "model-pretrained"
    ds = load_dataset(dataset, s.data_dir)
    if not (pretrained_dir / "catalog").exists():
        ensure_pretrained(pretrained_dir, ds, s)
    redis = s.redis.client()
    ours = StreamrecMethod("streamrec", s, model_dir, redis)
    pretrained = StreamrecMethod("streamrec_pretrained", s, pretrained_dir, redis)
    methods: dict[str, ReplayMethod] = {"streamrec": ours, "streamrec_pretrained": pretrained}
    methods.update({name: cls(ds.item_ids) for name, cls in BASELINES.items()})
    t0 = time.time()
    if sasrec:  # trained in this job, on the periods before the evaluated one (not timed below)
        seq = train_sequential_id(ds, ours.catalog, split, cache_dir=s.state_dir / "cache")
        methods[SequentialID.name] = SequentialID(ds.item_ids, seq, ours.catalog, ds, split)
        t_train, t0 = time.time() - t0, time.time()
    try:
        scores = run_replay(
            ds, methods, s, max_test_days=3 if quick else days, warmup_days=30 if quick else None, split=split
        )
    finally:
        for m in methods.values():
            if isinstance(m, StreamrecMethod):
                m.cleanup()
    overall, per_day = summarise(scores, len(ds.items))
    notes = [
        f"dataset {ds.name}: {len(ds.items)} items; {split} events evaluated: {overall['streamrec']['events']}",
        "test-then-learn per basket; lists of 20; repeat purchases allowed for every method",
        f"model: {ours.catalog.model_version}; pretrained: {pretrained.catalog.model_version}",
        f"run time {time.time() - t0:.0f}s" + (" (quick)" if quick else ""),
    ]
    if sasrec:
        cfg, ref = seq.cfg, seq.metrics.get("refit")
        grid = ", ".join(
            f"{g['value']:g}: {g['ndcg@10']:.4f}" for g in seq.metrics["grid"]["offset_lr_scale"]
        )
        notes.append(
            f"sasrec: ID-only sequential model ({cfg.layers} layers, d {cfg.d_model}, last {cfg.n_events} events), "
            f"item-embedding learning rate x{cfg.offset_lr_scale:g} and {seq.metrics['best']['epoch']} epochs chosen "
            f"on valid (NDCG@10 by learning rate: {grid}), trained on {'train + valid' if ref else 'train'} "
            + (f"(loaded from {seq.metrics['cached']})" if "cached" in seq.metrics else f"in {t_train:.0f}s")
            + f"; weights fixed over the {split} period"
        )
    versus = paired_vs(scores, "streamrec")
    report = write_report(overall, per_day, Path(results_dir), notes, versus)
    click.echo(report.read_text())
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        overall["streamrec"]["vs"] = versus  # HR@20 gain and ratio over each method, with intervals
        Path(output).write_text(json.dumps(overall, indent=2))
        click.echo(f"wrote {output}")


def run_prefix() -> str:
    """The Redis key prefix of one replay run: its own, also for runs started in the same second
    (two of them sharing profiles would read each other's future)."""
    return f"eval-{int(time.time())}-{uuid.uuid4().hex[:8]}"


def ensure_pretrained(folder: Path, ds: Dataset, s: Settings) -> Path:
    """Export the base encoder (no fine-tuning) and embed the catalog into ``folder``."""
    from inference.encoder import OnnxEncoder
    from inference.training.export import export_pretrained
    from inference.training.index import build_catalog

    export_pretrained(folder, base_model=s.encoder.base_model or None, max_len=s.encoder.max_len)
    enc = OnnxEncoder(folder, s.encoder)
    build_catalog(enc, ds, folder / "catalog")
    return folder
