"""``streamrec tune``: choose a model folder's scoring weights on its shop's valid split.

Two protocols, both through the served path:

* ``loo``: ``evaluation.loo.ServedRanker`` (profiles built by ``profiles/`` on a real Redis, ranked
  by ``inference/scoring.py`` with the folder's user model and the co-visitation learned from the
  histories) ranks the valid split's leave-one-out cases once per grid point, history excluded, as
  ``eval loo`` does;
* ``replay``: the valid period replayed basket by basket with the re-ordering shop's scoring, as
  ``eval replay`` does; every grid point ranks each basket from the same profiles before they
  learn it once.

The point with the best metric is chosen only when it beats the settings' own values by more
than the noise of the split: the lower end of a paired bootstrap interval of its gain (whole
users resampled; 90 %, Bonferroni-corrected for the points compared) must be above zero.
Otherwise the settings' values stay and the file sets nothing.

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

from evaluation.loo import (
    LIST_K,
    METRIC_KEYS,
    ServedRanker,
    paired_interval,
    per_case,
    ranking_metrics,
    served_ranks,
)
from inference.training.pairs import eval_cases
from inference.tuning import TUNABLE, TUNED_FILE
from streamrec.datasets import Dataset, load_dataset
from streamrec.settings import ScoringSettings, Settings, get_settings

DEFAULT_GRID = ("covisit_weight=0,0.1,0.2,0.3,0.5",)
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


def interval_level(points: int) -> float:
    """The confidence of the interval that must clear zero: :data:`LEVEL`, Bonferroni-corrected
    for the points compared with the settings' values (the best of many noisy points looks
    better than it is: with 12 points, a 99.1 % interval)."""
    return 1.0 - (1.0 - LEVEL) / max(1, points - 1)


def choose(
    contrib: Sequence[np.ndarray], groups: Sequence[str] | None = None
) -> tuple[int, int, tuple[float, float]]:
    """(best point, chosen point, interval of the best's per-case gain over point 0) from each
    point's per-case metric contributions; point 0 holds the settings' values. The best (ties:
    the earliest) is chosen only when the lower end of that interval (:func:`interval_level`)
    is above zero."""
    means = [float(c.mean()) for c in contrib]
    best = max(range(len(means)), key=lambda i: (means[i], -i))
    level = interval_level(len(contrib))
    lo, hi = paired_interval(contrib[best] - contrib[0], groups, level) if best else (0.0, 0.0)
    return best, best if lo > 0 else 0, (lo, hi)


def _points(
    grid: Sequence[Mapping[str, Any]], scoring: ScoringSettings
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the settings' values of the grid's fields, every point to measure: those values first)."""
    fields = list(grid[0]) if grid else []  # the order the grid was given in
    reference = {k: getattr(scoring, k) for k in fields}
    return reference, [reference, *[dict(g) for g in grid if dict(g) != reference]]


def tune_loo(
    ds: Dataset,
    model_dir: Path,
    settings: Settings,
    grid: Sequence[Mapping[str, Any]],
    metric: str = "ndcg@10",
    max_users: int = 0,
) -> dict[str, Any]:
    """Leave-one-out: rank the valid cases (one per user) at every point and choose."""
    from tqdm.auto import tqdm

    cases = eval_cases(ds, "valid").take(max_users, 0)
    if not len(cases):
        raise click.ClickException(f"no evaluation cases in the valid split of {ds.name}")
    base = ServedRanker(
        "settings", ds, cases, "valid", settings, model_dir, settings.redis.client(), tuned=False
    )
    pos = {i: k for k, i in enumerate(ds.item_ids)}
    targets = np.fromiter((pos[t] for t in cases.targets), np.int64, len(cases))
    reference, values = _points(grid, base.scoring)
    points: list[dict[str, Any]] = []
    contrib: list[np.ndarray] = []
    for v in tqdm(values, desc="tune", unit="point"):
        ranks = served_ranks(base.variant(json.dumps(v), base.scoring.model_copy(update=v)), targets, pos)
        ranks = np.where(ranks <= LIST_K, ranks, 0)
        points.append({"values": v, **ranking_metrics(ranks)})
        contrib.append(per_case(metric, ranks))
    return _result(
        ds, "loo", model_dir, metric, reference, points, contrib, None, len(cases), list(METRIC_KEYS)
    )


REPLAY_COLUMNS = ["hr@10", "hr@20", "ndcg@10", "mrr", "hr@20 new", "hr@20 rebuy"]


def tune_replay(
    ds: Dataset,
    model_dir: Path,
    settings: Settings,
    grid: Sequence[Mapping[str, Any]],
    metric: str = "hr@20",
    days: int | None = None,
) -> dict[str, Any]:
    """Prequential replay of the valid period with the re-ordering shop's scoring (as ``eval
    replay``): every point ranks each basket from the same profiles, then they learn it once."""
    from evaluation.loo import refuse_seen_split
    from evaluation.replay import ReplayMethod, StreamrecMethod, run_prefix, run_replay, summarise

    refuse_seen_split(model_dir, "valid")
    s = settings.override(redis={"prefix": run_prefix()})
    base = StreamrecMethod("settings", s, model_dir, s.redis.client(), tuned=False)
    reference, values = _points(grid, base.settings.scoring)
    names = [json.dumps(v) for v in values]
    methods: dict[str, ReplayMethod] = {
        n: base.variant(base.settings.scoring.model_copy(update=v))
        for n, v in zip(names[1:], values[1:], strict=True)
    }
    methods[names[0]] = base  # last: it learns each basket after every point has ranked it
    try:
        scores = run_replay(ds, methods, s, max_test_days=days, split="valid")
    finally:
        base.cleanup()
    overall, _ = summarise(scores, len(ds.items))
    points = [{"values": v, **overall[n]} for n, v in zip(names, values, strict=True)]
    contrib = [per_case(metric, np.asarray(scores[n].ranks)) for n in names]
    users = scores[names[0]].users
    return _result(
        ds, "replay", model_dir, metric, reference, points, contrib, users, len(set(users)), REPLAY_COLUMNS
    )


def _result(
    ds: Dataset,
    protocol: str,
    model_dir: Path,
    metric: str,
    reference: dict[str, Any],
    points: list[dict[str, Any]],
    contrib: list[np.ndarray],
    groups: Sequence[str] | None,
    users: int,
    columns: list[str],
) -> dict[str, Any]:
    best, chosen_at, (lo, hi) = choose(contrib, groups)
    return {
        "dataset": ds.name,
        "protocol": protocol,
        "split": "valid",
        "cases": len(contrib[0]),
        "users": users,
        "metric": metric,
        "columns": columns,
        "model_dir": str(model_dir),
        "reference": reference,
        "points": points,
        "best": points[best]["values"],
        "gain_vs_reference": {
            "mean": float(points[best][metric] - points[0][metric]),
            "interval": [lo, hi],
            "interval_level": interval_level(len(points)),
        },
        # what the folder's scoring.json sets: nothing when the settings' values stay (so a folder
        # tuned under a preset, e.g. the replay's, never carries the preset's own values elsewhere)
        "chosen": points[chosen_at]["values"] if chosen_at else {},
        "chosen_point": points[chosen_at]["values"],
        "rule": (
            f"the best {metric} point is chosen when the lower end of a paired bootstrap interval (users "
            f"resampled; {int(LEVEL * 100)} % Bonferroni-corrected for the {len(points) - 1} points compared) of its "
            "gain over the settings' values is above 0; otherwise those values stay"
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
    chosen = next(p for p in result["points"] if p["values"] == result["chosen_point"])
    ax.scatter([float(chosen["values"][x_name])], [chosen[metric]], s=220, facecolors="none", edgecolors="red",
               linewidths=2, zorder=5, label="chosen")  # fmt: skip
    ax.set_xlabel(x_name)
    ax.set_ylabel(f"{metric} (valid split)")
    ax.set_title(
        f"{result['dataset']}, {result['protocol']}: scoring weights on the valid split ({result['users']} users)"
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


PROTOCOLS = {
    "loo": "leave-one-out cases of the valid split (one per user), full ranking, history excluded",
    "replay": "events of the valid period replayed test-then-learn per basket with the re-ordering shop's "
    "scoring (as `eval replay`)",
}


def markdown(result: Mapping[str, Any], plot: Path) -> str:
    keys = list(result["columns"])
    fields = list(result["reference"])
    head = "| " + " | ".join([*fields, *keys]) + " |"
    rows = [head, "|" + "---|" * (len(fields) + len(keys))]
    for p in result["points"]:
        mark = " **(chosen)**" if p["values"] == result["chosen_point"] else ""
        vals = [str(p["values"][f]) for f in fields]
        vals[-1] += mark
        rows.append("| " + " | ".join([*vals, *[f"{p[k]:.4f}" for k in keys]]) + " |")
    g = result["gain_vs_reference"]
    lo, hi = g["interval"]
    return "\n".join(
        [
            f"# Scoring weights tuned on {result['dataset']}'s valid split ({result['protocol']})",
            "",
            f"- {result['cases']} {PROTOCOLS[result['protocol']]}, {result['users']} users, through the served "
            f"path; model folder {result['model_dir']} (not trained on valid)",
            f"- first row: the settings' values; best {result['metric']}: {result['best']} "
            f"({g['mean']:+.4f}, {100 * g['interval_level']:.1f} % interval of the gain [{lo:+.4f}, {hi:+.4f}])",
            f"- chosen: {result['chosen'] or 'the settings’ values stay (scoring.json sets nothing)'} "
            f"({result['rule']})",
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
    "--protocol",
    type=click.Choice(list(PROTOCOLS)),
    default="loo",
    show_default=True,
    help="loo: discovery (history excluded), NDCG@10 by default; replay: a re-ordering shop's live stream "
    "(re-buys allowed, REORDER_SHOP_SCORING), HR@20 by default.",
)
@click.option(
    "--grid",
    multiple=True,
    default=DEFAULT_GRID,
    show_default=True,
    help="NAME=V1,V2,... over a scoring field (repeat for a product grid).",
)
@click.option(
    "--metric",
    type=click.Choice([*METRIC_KEYS, *REPLAY_COLUMNS[:4]]),
    default=None,
    help="What is maximised (default: ndcg@10 for loo, hr@20 for replay).",
)
@click.option("--max-users", type=int, default=0, help="loo: a seeded sample of the valid cases (0 = all).")
@click.option("--days", type=int, default=None, help="replay: the first this many days of the valid period.")
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
    protocol: str,
    grid: tuple[str, ...],
    metric: str | None,
    max_users: int,
    days: int | None,
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
    missing = [f for f in write_to if not f.is_dir()]
    if missing:
        raise click.ClickException(f"--write-to {missing[0]}: no such model folder")
    points = parse_grid(grid, s.scoring)
    if protocol == "loo":
        metric = metric or "ndcg@10"
        if metric not in METRIC_KEYS:
            raise click.BadParameter(
                f"{metric} is a replay metric; loo maximises one of {', '.join(METRIC_KEYS)}"
            )
        result = tune_loo(ds, model_dir, s, points, metric, max_users)
    else:
        metric = metric or "hr@20"
        if metric not in REPLAY_COLUMNS:
            raise click.BadParameter(
                f"{metric} is a loo metric; replay maximises one of {', '.join(REPLAY_COLUMNS[:4])}"
            )
        result = tune_replay(ds, model_dir, s, points, metric, days)
    result["seconds"] = round(time.time() - t0, 1)
    results_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{ds.name}-{protocol}"
    plot = _plot(result, results_dir / f"tune-{tag}.png")
    report = markdown(result, plot)
    (results_dir / f"tune-{tag}.md").write_text(report)
    (results_dir / f"tune-{tag}.json").write_text(json.dumps(result, indent=2))
    click.echo(report)
    for folder in write_to:
        (folder / TUNED_FILE).write_text(json.dumps(result, indent=2))
        click.echo(f"wrote {folder / TUNED_FILE}: {result['chosen'] or 'nothing to change'}")
