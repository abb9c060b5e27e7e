"""``streamrec bench user-model``: users/s of the exported user model (ONNX Runtime fp32 / int8).

What is timed is the scorer's call (:meth:`inference.user_model.OnnxUserModel.contexts`): the
gather of the events' projected rows and the mean of their vectors, and one ONNX Runtime run, for
batches of real-shaped users (every user with the model's N events, the worst case). The
catalog's projection, computed once per catalog (and again when it changes), is timed apart
(``projection_ms``). Median of repeats, one engine at a time in this process (no torch is
loaded here).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from streamrec.settings import get_settings


def _rate(fn, users: int, repeats: int, min_users: int) -> tuple[float, list[float]]:  # noqa: ANN001
    for _ in range(3):
        fn()
    iters = max(2, min_users // users)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        rates.append(iters * users / (time.perf_counter() - t0))
    return statistics.median(rates), [round(r, 1) for r in rates]


@click.command("user-model")
@click.option(
    "--model-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Model folder with user/ (default: settings).",
)
@click.option("--batches", default="1,32,256", show_default=True, help="Users per call.")
@click.option("--repeats", type=int, default=7, show_default=True)
@click.option("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = all cores).")
@click.option("--output", type=click.Path(path_type=Path), default=None, help="Write the results as JSON.")
def user_model(model_dir: Path | None, batches: str, repeats: int, threads: int, output: Path | None) -> None:
    """User-model throughput (users/s) at several batch sizes, fp32 and int8."""
    from inference.catalog import CatalogIndex
    from inference.user_model import OnnxUserModel, event_arrays, read_user_manifest

    s = get_settings()
    folder = model_dir or s.resolved_model_dir
    cat = CatalogIndex.load(folder / "catalog")
    manifest = read_user_manifest(folder / "user")
    n = int(manifest.n_events)
    sizes = [int(b) for b in batches.split(",")]
    rng = np.random.default_rng(0)
    now = 1_700_000_000_000
    events = [
        [[cat.ids[int(rng.integers(len(cat.ids)))], "view", now - 60_000 * j] for j in range(n)]
        for _ in range(max(sizes))
    ]
    arr = event_arrays(events, [now] * len(events), cat.index_of, n)
    q = np.zeros((len(events), cat.dim), np.float32)
    hq = np.zeros(len(events), np.float32)
    res: dict[str, Any] = {
        "bench": "user-model",
        "model": manifest.version,
        "n_events": n,
        "catalog_items": len(cat.ids),
        "threads": threads or os.cpu_count(),
        "what": "users/s of OnnxUserModel.contexts (gather of projected rows and mean + one ONNX Runtime call), "
        "median of repeats; projection_ms: the catalog's projection, once per catalog",
        "engines": {},
    }
    for variant in manifest.variants:
        um = OnnxUserModel(folder / "user", variant=variant, threads=threads)
        out: dict[str, Any] = {}
        if um.projection is not None:
            times = []
            for rev in range(5):  # a new revision each time: computed anew
                t0 = time.perf_counter()
                um.table(cat.matrix, revision=-1 - rev)
                times.append(time.perf_counter() - t0)
            out["projection_ms"] = round(1000 * statistics.median(times), 2)
        for bs in sizes:
            sub = type(arr)(arr.idx[:bs], arr.types[:bs], arr.age[:bs], arr.mask[:bs])
            med, reps = _rate(lambda: um.contexts(cat.matrix, sub, q[:bs], hq[:bs]), bs, repeats, 2048)  # noqa: B023
            out[f"bs{bs}"] = {"users_per_s": round(med, 1), "repeats": reps}
        res["engines"][f"onnx_{variant}"] = out
    lines = [
        "| engine | " + " | ".join(f"bs{b} users/s" for b in sizes) + " |",
        "|---|" + "---:|" * len(sizes),
    ]
    for eng, r in res["engines"].items():
        lines.append(f"| {eng} | " + " | ".join(f"{r[f'bs{b}']['users_per_s']:,.0f}" for b in sizes) + " |")
    for eng, r in res["engines"].items():
        if "projection_ms" in r:
            click.echo(
                f"{eng}: the catalog's projection ({len(cat.ids):,} items) {r['projection_ms']:.1f} ms, once"
            )
    click.echo("\n".join(lines))
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(res, indent=2))
        click.echo(f"wrote {output}")
