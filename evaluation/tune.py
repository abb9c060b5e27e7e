"""``streamrec tune``: choose a model folder's scoring weights on its shop's valid split.

The served path (``evaluation.loo.ServedRanker``: profiles built by ``profiles/`` on a real Redis,
ranked by ``inference/scoring.py`` with the folder's user model and the co-visitation learned
from the histories) ranks the valid split's leave-one-out cases once per grid point, history
excluded, as ``eval loo`` does. The point with the best metric is chosen only when it beats the
settings' own values by more than the noise of this split: the lower end of a paired bootstrap
90 % interval of its per-user gain must be above zero. Otherwise the settings' values stay.

The choice is written as ``scoring.json`` (:mod:`inference.tuning`) into the folders named by
``--write-to`` (typically the refit folder that is served, trained the same way on train + valid),
which the worker and ``eval`` read from then on; a Markdown report, a plot and the JSON of every
point go to ``--results-dir``. A model refit on the valid split cannot be tuned on it (train one
with ``streamrec train-user --no-refit``).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np

from evaluation.loo import LIST_K, METRIC_KEYS, ServedRanker, _list_ranks, _reindex, ranking_metrics
from inference.training.pairs import eval_cases
from inference.tuning import TUNABLE, TUNED_FILE
from streamrec.datasets import Dataset, load_dataset
from streamrec.settings import ScoringSettings, Settings, get_settings

DEFAULT_GRID = ("covisit_weight=0,0.1,0.2,0.3,0.5",)
BOOTSTRAP = 2000
LEVEL = 0.90


def parse_grid(specs: Sequence[str], base: ScoringSettings) -> list[dict[str, Any]]:
    """``name=v1,v2,...`` specs → every combination as {field: value}, each value checked
    against the field's type and bounds; names must be :data:`~inference.tuning.TUNABLE`."""
    axes: list[tuple[str, list[Any]]] = []
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip()
        if not sep or not values.strip():
            raise click.BadParameter(f"{spec!r}: expected NAME=V1,V2,... (e.g. covisit_weight=0,0.1,0.2)")
        if name not in TUNABLE:
            raise click.BadParameter(f"{name!r} cannot be tuned; one of {', '.join(sorted(TUNABLE))}")
        if any(n == name for n, _ in axes):
            raise click.BadParameter(f"{name!r} is given twice")
        try:  # each value through the field's type and bounds, as a setting would be
            checked = [
                getattr(type(base).model_validate({**base.model_dump(), name: v.strip()}), name)
                for v in values.split(",")
            ]
        except ValueError as exc:
            raise click.BadParameter(f"{spec!r}: {exc}") from exc
        axes.append((name, list(dict.fromkeys(checked))))
    return [
        dict(zip([n for n, _ in axes], combo, strict=True))
        for combo in itertools.product(*[v for _, v in axes])
    ]


def per_case(metric: str, ranks: np.ndarray) -> np.ndarray:
    """Each case's contribution to ``metric`` (its mean over cases is :func:`ranking_metrics`')."""
    r = np.asarray(ranks, np.float64)
    hit = r >= 1
    name, _, k = metric.partition("@")
    if name == "mrr":
        return np.where(hit, 1.0 / np.maximum(r, 1.0), 0.0)
    inside = hit & (r <= int(k))
    if name == "recall":
        return inside.astype(np.float64)
    return np.where(inside, 1.0 / np.log2(1.0 + np.maximum(r, 1.0)), 0.0)


def paired_interval(
    gain: np.ndarray, level: float = LEVEL, n: int = BOOTSTRAP, seed: int = 0
) -> tuple[float, float]:
    """Bootstrap interval (over cases, paired) of the mean per-case gain."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(gain), size=(n, len(gain)))
    means = gain[idx].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def choose(contrib: Sequence[np.ndarray]) -> tuple[int, int, tuple[float, float]]:
    """(best point, chosen point, interval of the best's per-case gain over point 0) from each
    point's per-case metric contributions; point 0 holds the settings' values. The best (ties:
    the earliest) is chosen only when the lower end of that interval is above zero."""
    means = [float(c.mean()) for c in contrib]
    best = max(range(len(means)), key=lambda i: (means[i], -i))
    lo, hi = paired_interval(contrib[best] - contrib[0]) if best else (0.0, 0.0)
    return best, best if lo > 0 else 0, (lo, hi)


def _ranks(ds: Dataset, ranker: ServedRanker, targets: np.ndarray, chunk: int = 512) -> np.ndarray:
    pos = {i: k for k, i in enumerate(ds.item_ids)}
    out = np.zeros(len(targets), np.float64)
    for s in range(0, len(targets), chunk):
        rows = np.arange(s, min(s + chunk, len(targets)))
        lists = [_reindex(ranker.catalog.ids, lst, pos) for lst in ranker.ranked(rows)]
        out[rows] = _list_ranks(lists, targets[rows])
    return np.where(out <= LIST_K, out, 0)


def tune_scoring(
    ds: Dataset,
    model_dir: Path,
    settings: Settings,
    grid: Sequence[Mapping[str, Any]],
    metric: str = "ndcg@10",
    max_users: int = 0,
) -> dict[str, Any]:
    """Rank the valid cases at every grid point (and at the settings' own values) and choose."""
    from tqdm.auto import tqdm

    cases = eval_cases(ds, "valid").take(max_users, 0)
    if not len(cases):
        raise click.ClickException(f"no evaluation cases in the valid split of {ds.name}")
    base = ServedRanker(
        "settings", ds, cases, "valid", settings, model_dir, settings.redis.client(), tuned=False
    )
    pos = {i: k for k, i in enumerate(ds.item_ids)}
    targets = np.fromiter((pos[t] for t in cases.targets), np.int64, len(cases))
    fields = list(grid[0]) if grid else []  # the order the grid was given in
    reference = {k: getattr(base.scoring, k) for k in fields}
    points: list[dict[str, Any]] = []
    contrib: list[np.ndarray] = []
    for values in tqdm(
        [reference, *[dict(g) for g in grid if dict(g) != reference]], desc="tune", unit="point"
    ):
        ranker = base.variant(json.dumps(values), base.scoring.model_copy(update=values))
        ranks = _ranks(ds, ranker, targets)
        points.append({"values": values, **ranking_metrics(ranks)})
        contrib.append(per_case(metric, ranks))
    best, chosen_at, (lo, hi) = choose(contrib)
    chosen = points[chosen_at]["values"]
    return {
        "dataset": ds.name,
        "split": "valid",
        "cases": len(cases),
        "metric": metric,
        "model_dir": str(model_dir),
        "reference": reference,
        "points": points,
        "best": points[best]["values"],
        "gain_vs_reference": {
            "mean": float(points[best][metric] - points[0][metric]),
            f"interval_{int(LEVEL * 100)}": [lo, hi],
        },
        "chosen": chosen,
        "rule": (
            f"the best {metric} point is chosen when the lower end of the paired bootstrap {int(LEVEL * 100)} % "
            "interval of its per-user gain over the settings' values is above 0; otherwise those values stay"
        ),
    }


def _plot(result: Mapping[str, Any], path: Path) -> Path:
    """The metric against the grid's first field, one line per value of the others; the
    settings' own values as a dashed line, the chosen point circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = result["metric"]
    fields = list(result["reference"])
    x_name, rest = fields[0], fields[1:]
    lines: dict[tuple[Any, ...], list[tuple[float, float]]] = {}
    for p in result["points"]:
        lines.setdefault(tuple(p["values"][f] for f in rest), []).append(
            (float(p["values"][x_name]), p[metric])
        )
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, pts in sorted(lines.items()):
        xs, ys = zip(*sorted(pts), strict=True)
        label = ", ".join(f"{f}={v}" for f, v in zip(rest, key, strict=True)) or metric
        ax.plot(xs, ys, marker="o", label=label)
    ref = result["points"][0]
    ax.axhline(
        ref[metric],
        color="gray",
        linestyle="--",
        linewidth=1,
        label=f"the settings' values {result['reference']}",
    )
    chosen = next(p for p in result["points"] if p["values"] == result["chosen"])
    ax.scatter([float(chosen["values"][x_name])], [chosen[metric]], s=220, facecolors="none", edgecolors="red",
               linewidths=2, zorder=5, label="chosen")  # fmt: skip
    ax.set_xlabel(x_name)
    ax.set_ylabel(f"{metric} (valid split)")
    ax.set_title(f"{result['dataset']}: scoring weights on the valid split ({result['cases']} users)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(result: Mapping[str, Any], plot: Path) -> str:
    keys = [k for k in METRIC_KEYS]
    fields = list(result["reference"])
    head = "| " + " | ".join([*fields, *keys]) + " |"
    rows = [head, "|" + "---|" * (len(fields) + len(keys))]
    for p in result["points"]:
        mark = " **(chosen)**" if p["values"] == result["chosen"] else ""
        vals = [str(p["values"][f]) for f in fields]
        vals[-1] += mark
        rows.append("| " + " | ".join([*vals, *[f"{p[k]:.4f}" for k in keys]]) + " |")
    g = result["gain_vs_reference"]
    lo, hi = g[f"interval_{int(LEVEL * 100)}"]
    return "\n".join(
        [
            f"# Scoring weights tuned on {result['dataset']}'s valid split",
            "",
            f"- {result['cases']} leave-one-out cases of the valid split, full ranking, history excluded, through the "
            f"served path; model folder {result['model_dir']} (not trained on valid)",
            f"- first row: the settings' values; best {result['metric']}: {result['best']} "
            f"({g['mean']:+.4f}, {int(LEVEL * 100)} % interval of the per-user gain [{lo:+.4f}, {hi:+.4f}])",
            f"- chosen: {result['chosen']} ({result['rule']})",
            "",
            *rows,
            "",
            f"![plot]({plot.name})",
            "",
        ]
    )


@click.command("tune")
@click.option(
    "--dataset",
    default="online-retail",
    show_default=True,
    help="scientific, online-retail, or a generic dataset folder.",
)
@click.option(
    "--model-dir",
    type=click.Path(path_type=Path),
    required=True,
    help="A model folder whose user model was not trained on valid (`streamrec train-user --no-refit`).",
)
@click.option(
    "--grid",
    multiple=True,
    default=DEFAULT_GRID,
    show_default=True,
    help="NAME=V1,V2,... over a scoring field (repeat for a product grid).",
)
@click.option("--metric", type=click.Choice(list(METRIC_KEYS)), default="ndcg@10", show_default=True)
@click.option("--max-users", type=int, default=0, help="A seeded sample of the valid cases (0 = all).")
@click.option(
    "--write-to",
    type=click.Path(path_type=Path, file_okay=False),
    multiple=True,
    help=f"Model folders to write the choice into ({TUNED_FILE}); typically the refit folder that is served.",
)
@click.option(
    "--results-dir", type=click.Path(path_type=Path), default=Path("results/tune"), show_default=True
)
def tune(
    dataset: str,
    model_dir: Path,
    grid: tuple[str, ...],
    metric: str,
    max_users: int,
    write_to: tuple[Path, ...],
    results_dir: Path,
) -> None:
    """Choose scoring weights for a model folder on the valid split, through the served path."""
    s = get_settings()
    t0 = time.time()
    ds = load_dataset(dataset, s.data_dir)
    if not (model_dir / "catalog" / "meta.json").exists():
        raise click.ClickException(
            f"no catalog in {model_dir}: build one with `streamrec index --model-dir {model_dir}`"
        )
    points = parse_grid(grid, s.scoring)
    result = tune_scoring(ds, model_dir, s, points, metric, max_users)
    result["seconds"] = round(time.time() - t0, 1)
    results_dir.mkdir(parents=True, exist_ok=True)
    plot = _plot(result, results_dir / f"tune-{ds.name}.png")
    report = markdown(result, plot)
    (results_dir / f"tune-{ds.name}.md").write_text(report)
    (results_dir / f"tune-{ds.name}.json").write_text(json.dumps(result, indent=2))
    click.echo(report)
    for folder in write_to:
        if not folder.is_dir():
            raise click.ClickException(f"--write-to {folder}: no such model folder")
        (folder / TUNED_FILE).write_text(json.dumps(result, indent=2))
        click.echo(f"wrote {folder / TUNED_FILE}: {result['chosen']}")
