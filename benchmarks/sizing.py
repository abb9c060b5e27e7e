"""``streamrec bench sizing``: Redis bytes per profile and profile-store events/s, measured.

A real replay (Online Retail by default, or any dataset folder in the generic format) is
applied to the profile store in time order, in batches of ``stream.batch_max`` (the worker's
own code: one read and one write pipeline per batch, no Kafka). At checkpoints of the stream
(a quarter, half, all) every user's keys are measured with ``MEMORY USAGE`` (one pipeline),
which gives bytes per user at the median, p90 and mean, by activity (events per user) and in
total, and how they grow with the stream. The replay runs under several history settings
(``profile.recent_events``, ``profile.dedupe_event_ids``) to show what each costs.

Item vectors are seeded random unit vectors of the served dimension: their values do not change
their size. Keys are unique to the run and removed at the end. Output: JSON (and a plot).
"""

from __future__ import annotations

import json
import os
import platform
import time
import uuid
from pathlib import Path
from typing import Any

import click
import numpy as np

from streamrec.settings import Settings, get_settings

# (label, profile overrides): the defaults, a longer model history, a smaller dedupe window.
CONFIGS: tuple[tuple[str, dict[str, int]], ...] = (
    ("defaults", {}),
    ("recent_events=100", {"recent_events": 100}),
    ("dedupe_event_ids=200", {"dedupe_event_ids": 200}),
)
BUCKETS = ((1, 10), (10, 100), (100, 1000), (1000, 10**9))


def _measure(redis: Any, store: Any, users: list[str], events_per_user: dict[str, int]) -> dict[str, Any]:
    from streamrec.redis_routing import RoutedPipeline

    pipe = RoutedPipeline(redis)
    for u in users:
        for key in (store.profile_key(u), store.ids_key(u)):
            pipe.on(key).memory_usage(key, samples=0)
    raw = pipe.execute()
    prof = np.array([int(x or 0) for x in raw[0::2]], np.int64)
    ids = np.array([int(x or 0) for x in raw[1::2]], np.int64)
    tot = prof + ids
    n_ev = np.array([events_per_user[u] for u in users], np.int64)
    by_activity = {}
    for lo, hi in BUCKETS:
        m = (n_ev >= lo) & (n_ev < hi)
        if m.any():
            label = f"{lo}-{hi - 1}" if hi < 10**9 else f">={lo}"
            by_activity[label] = {
                "users": int(m.sum()),
                "median_bytes": int(np.median(tot[m])),
                "mean_bytes": int(tot[m].mean()),
            }
    return {
        "users": len(users),
        "profile_bytes": {
            "median": int(np.median(prof)),
            "p90": int(np.percentile(prof, 90)),
            "mean": int(prof.mean()),
        },
        "event_ids_bytes": {
            "median": int(np.median(ids)),
            "p90": int(np.percentile(ids, 90)),
            "mean": int(ids.mean()),
        },
        "user_bytes": {
            "median": int(np.median(tot)),
            "p90": int(np.percentile(tot, 90)),
            "mean": int(tot.mean()),
        },
        "total_mb": round(float(tot.sum()) / 2**20, 2),
        "gb_per_million_users": round(float(tot.mean()) * 1e6 / 2**30, 2),
        "by_activity": by_activity,
    }


def _run(
    base: Settings, events: list, items: Any, label: str, overrides: dict[str, int], checkpoints: list[int]
) -> dict:
    from tqdm import tqdm

    from profiles.store import Position, ProfileStore

    s = base.override(redis={"prefix": f"size{uuid.uuid4().hex[:8]}"}, profile=overrides)
    redis = s.redis.client()
    store = ProfileStore(redis, s, items=items)
    batch = s.stream.batch_max
    counts: dict[str, int] = {}
    points, apply_s = [], 0.0
    try:
        done = 0
        with tqdm(total=len(events), desc=label, unit="ev", leave=False) as bar:
            for cp in checkpoints:
                while done < cp:
                    chunk = events[done : min(cp, done + batch)]
                    t0 = time.perf_counter()
                    store.apply_batch(
                        chunk, positions=[Position("size", 0, done + k) for k in range(len(chunk))]
                    )
                    apply_s += time.perf_counter() - t0
                    for e in chunk:
                        counts[e.user_id] = counts.get(e.user_id, 0) + 1
                    done += len(chunk)
                    bar.update(len(chunk))
                users = sorted(counts)
                point = _measure(redis, store, users, counts)
                point["events"] = done
                point["events_per_user_median"] = float(np.median([counts[u] for u in users]))
                points.append(point)
        return {
            "config": label,
            "profile": {
                k: getattr(s.profile, k)
                for k in ("recent_items", "recent_events", "purchased_items", "dedupe_event_ids")
            },
            "store_events_per_s": round(len(events) / apply_s, 1),
            "checkpoints": points,
        }
    finally:
        keys = list(redis.scan_iter(match=f"*{s.redis.prefix}*", count=5000))
        for k in range(0, len(keys), 5000):
            redis.delete(*keys[k : k + 5000])
        redis.close()


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for run in result["runs"]:
        cps = run["checkpoints"]
        a.plot([c["events"] for c in cps], [c["total_mb"] for c in cps], marker="o", label=run["config"])
        last = cps[-1]["by_activity"]
        b.plot(list(last), [v["median_bytes"] / 1024 for v in last.values()], marker="o", label=run["config"])
    a.set_xlabel("events replayed")
    a.set_ylabel("Redis MB (profiles + event ids)")
    a.set_title("Memory as the stream grows")
    b.set_xlabel("events per user")
    b.set_ylabel("median kB per user")
    b.set_title("Per user, by activity (whole stream)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"streamrec profile sizing: {result['dataset']}, {result['events']:,} events")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@click.command()
@click.option(
    "--dataset", default="online-retail", show_default=True, help="Dataset name or folder (generic format)."
)
@click.option(
    "--events", "limit", type=int, default=None, help="Replay only the first N events (default all)."
)
@click.option("--quick", is_flag=True, help="20,000 events, the default settings only (CI smoke run).")
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the JSON here (and a .png beside it).",
)
def sizing(dataset: str, limit: int | None, quick: bool, output: Path | None) -> None:
    """Redis bytes per profile (MEMORY USAGE over a real replay) and profile-store events/s."""
    from benchmarks.stream import BENCH_DIM, random_items
    from devstack.produce import dataset_events
    from streamrec.datasets import load_dataset

    s = get_settings()
    ds = load_dataset(dataset, s.data_dir)
    limit = 20_000 if quick and limit is None else limit
    events = list(dataset_events(ds, "all", settings=s, limit=limit))
    if not events:
        raise click.ClickException(f"dataset {dataset!r} has no interactions to replay")
    items = random_items(ds.item_ids)
    n = len(events)
    checkpoints = sorted({n // 4, n // 2, n} - {0})
    configs = CONFIGS[:1] if quick else CONFIGS
    result: dict[str, Any] = {
        "bench": "sizing",
        "dataset": ds.name,
        "events": n,
        "item_vector_dim": BENCH_DIM,
        "batch_max": s.stream.batch_max,
        "redis_cluster": s.redis.cluster,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "runs": [],
    }
    for label, overrides in configs:
        run = _run(s, events, items, label, overrides, checkpoints)
        result["runs"].append(run)
        last = run["checkpoints"][-1]
        click.echo(
            f"{label:<22} {last['users']:>7,} users  median {last['user_bytes']['median'] / 1024:.1f} kB  "
            f"p90 {last['user_bytes']['p90'] / 1024:.1f} kB  mean {last['user_bytes']['mean'] / 1024:.1f} kB  "
            f"= {last['gb_per_million_users']} GB per million users  store {run['store_events_per_s']:,.0f} events/s"
        )
    text = json.dumps(result, indent=2)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
        _plot(result, output.with_suffix(".png"))
    click.echo(text if not output else f"wrote {output} and {output.with_suffix('.png')}")
