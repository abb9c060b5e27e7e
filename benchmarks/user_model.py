"""``streamrec bench user-model``: users/s of the exported user model (ONNX Runtime fp32 / int8).

What is timed is the scorer's call (:meth:`inference.user_model.OnnxUserModel.contexts`): the
gather of the events' projected rows and the mean of their vectors, and one ONNX Runtime run, for
batches of real-shaped users (every user with the model's N events, the worst case). The
catalog's projection, computed once per catalog (and again when it changes), is timed apart
(``projection_ms``). Median of repeats, one engine at a time in this process.

The torch tower (eager fp32, the weights the graphs were exported from: ``user/tower.safetensors``)
is timed the same way in a separate process (the same inputs; its projection of the catalog, once,
then ``UserTower.encode`` per call), so that neither runtime's threads or allocator touch the other's
figures; ``ratio_onnx_int8_vs_torch_bs<N>`` compares them.
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
@click.option(
    "--torch/--no-torch",
    "with_torch",
    default=True,
    show_default=True,
    help="Also time the torch tower (eager fp32) in a separate process.",
)
@click.option("--quick", is_flag=True, help="Batches 1 and 8, one repeat (CI smoke run, not a measurement).")
@click.option("--engine", type=click.Choice(["torch"]), default=None, hidden=True)  # the torch child
@click.option("--output", type=click.Path(path_type=Path), default=None, help="Write the results as JSON.")
def user_model(
    model_dir: Path | None,
    batches: str,
    repeats: int,
    threads: int,
    with_torch: bool,
    quick: bool,
    engine: str | None,
    output: Path | None,
) -> None:
    """User-model throughput (users/s) at several batch sizes: ONNX Runtime fp32 and int8, and torch."""
    from inference.user_model import MANIFEST, USER_DIR, OnnxUserModel, read_user_manifest

    s = get_settings()
    folder = model_dir or s.resolved_model_dir
    if quick:
        batches, repeats = "1,8", 1
    sizes = [int(b) for b in batches.split(",")]
    if engine == "torch":
        click.echo(json.dumps(_torch_engine(folder, sizes, repeats, threads)))
        return
    if not (folder / USER_DIR / MANIFEST).is_file():  # `bench all` on a folder without one: say so
        why = f"{folder} has no user model (`streamrec train-user --model-dir {folder}` trains one)"
        click.echo(f"skipped: {why}")
        if output:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps({"bench": "user-model", "skipped": why}, indent=2))
        return
    manifest = read_user_manifest(folder / USER_DIR)
    n = int(manifest.n_events)
    cat, arr, q, hq = _inputs(folder, n, max(sizes))
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
            sub = arr.rows(slice(bs))
            med, reps = _rate(lambda: um.contexts(cat.matrix, sub, q[:bs], hq[:bs]), bs, repeats, 2048)  # noqa: B023
            out[f"bs{bs}"] = {"users_per_s": round(med, 1), "repeats": reps}
        res["engines"][f"onnx_{variant}"] = out
    if with_torch:
        res["engines"]["torch"] = _torch_child(folder, batches, repeats, threads)
        torch_rates = res["engines"]["torch"]
        for variant in manifest.variants:
            for bs in sizes:
                if f"bs{bs}" in torch_rates:
                    ours = res["engines"][f"onnx_{variant}"][f"bs{bs}"]["users_per_s"]
                    res[f"ratio_onnx_{variant}_vs_torch_bs{bs}"] = round(
                        ours / torch_rates[f"bs{bs}"]["users_per_s"], 2
                    )
    lines = [
        "| engine | " + " | ".join(f"bs{b} users/s" for b in sizes) + " |",
        "|---|" + "---:|" * len(sizes),
    ]
    for eng, r in res["engines"].items():
        if "skipped" in r:
            lines.append(f"| {eng} | skipped: {r['skipped']} |")
            continue
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


def _inputs(folder: Path, n: int, users: int) -> tuple[Any, Any, np.ndarray, np.ndarray]:
    """The catalog and ``users`` real-shaped users (n events each, no query): the same for every engine."""
    from inference.catalog import CatalogIndex
    from inference.user_model import event_arrays

    cat = CatalogIndex.load(folder / "catalog")
    rng = np.random.default_rng(0)
    now = 1_700_000_000_000
    events = [
        [[cat.ids[int(rng.integers(len(cat.ids)))], "view", now - 60_000 * j] for j in range(n)]
        for _ in range(users)
    ]
    arr = event_arrays(events, [now] * users, cat.index_of, n)
    return cat, arr, np.zeros((users, cat.dim), np.float32), np.zeros(users, np.float32)


def _torch_child(folder: Path, batches: str, repeats: int, threads: int) -> dict[str, Any]:
    """The torch engine's figures from a separate process (or why there are none)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "streamrec.cli", "bench", "user-model", "--model-dir", str(folder),
           "--batches", batches, "--repeats", str(repeats), "--threads", str(threads), "--engine", "torch"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"skipped": (proc.stderr.strip().splitlines() or ["the torch process failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _torch_engine(folder: Path, sizes: list[int], repeats: int, threads: int) -> dict[str, Any]:
    """Users/s of the torch tower on the inputs of the ONNX engines (run in the torch child)."""
    import torch

    from inference.training.user_model import load_tower
    from inference.user_model import ENCODE_INPUTS, encode_feeds

    tower = load_tower(folder / "user")
    torch.set_num_threads(threads or os.cpu_count() or 1)
    cat, arr, q, hq = _inputs(folder, tower.pos.shape[0], max(sizes))
    with torch.inference_mode():  # the catalog's projection (+ the bias row for padding), once
        rows = np.vstack([cat.matrix, np.zeros((1, cat.dim), np.float32)])
        table = tower.inp(torch.from_numpy(rows)).numpy()
    out: dict[str, Any] = {}
    for bs in sizes:
        sub = arr.rows(slice(bs))

        def call(sub=sub, bs=bs) -> None:  # noqa: ANN001
            feeds = encode_feeds(table, cat.matrix, sub, q[:bs], hq[:bs])
            x, mean, types, age, mask, query, qmask = (torch.from_numpy(feeds[k]) for k in ENCODE_INPUTS)
            with torch.inference_mode():
                tower.encode(x, mean, types, age, mask, query, qmask)

        med, reps = _rate(call, bs, repeats, 2048)
        out[f"bs{bs}"] = {"users_per_s": round(med, 1), "repeats": reps}
    return out
