"""``streamrec backfill-demand``: warm the demand detector from a shop's order history.

The detector (``alerts/``) learns each item's and category's share of demand from the stream
itself and only alerts on keys with ``alerts.warmup_windows`` active windows of history. A
fresh deployment would therefore stay silent for its first trading weeks. This replays the
history (a dataset's interactions before a cut-off, in event-time order, with their original
timestamps) through the worker's own :class:`alerts.monitor.DemandMonitor`, so the baselines,
sliding sums and waiting times in Redis are what they would be had the worker run all along.

Alerts of the past are not news: they are not published, and once the history is in, the
alert flags and the boost/damping factors they left are cleared (``forget_alerts``), so that
today's recommendations are not boosted by a surge of last year.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import click
import numpy as np
from tqdm import tqdm

from streamrec.datasets import Dataset
from streamrec.settings import Settings, get_settings

__all__ = ["backfill_demand"]

WEEK_MS = 7 * 24 * 3600 * 1000


def backfill_demand(
    settings: Settings,
    ds: Dataset,
    *,
    before: str = "test",
    weeks: float | None = 8.0,
    batch: int = 5000,
    force: bool = False,
    redis_client: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Replay ``ds``'s interactions before its ``before`` split (the last ``weeks`` of them;
    None: all) through the demand monitor. Skipped (``{"skipped": ...}``) when the detector
    already has history, unless ``force``. Returns what was done."""
    from alerts.monitor import DemandMonitor
    from devstack.produce import dataset_events

    client = redis_client if redis_client is not None else settings.redis.client()
    monitor = DemandMonitor(settings, client)
    have = monitor.state().active_windows
    if have and not force:
        return {"skipped": f"the detector already has {have} active windows of history"}
    if force:
        monitor.reset()
    if before not in ("valid", "test"):
        raise ValueError(f"before must be 'valid' or 'test', got {before!r}")
    cut = int(ds.split(before)["ts"].min())
    df = ds.interactions[ds.interactions["ts"] < cut]
    if weeks is not None and len(df):
        df = df[df["ts"] >= int(df["ts"].max()) - int(weeks * WEEK_MS)]
    sub = dataclasses.replace(ds, interactions=df.sort_values("ts", kind="stable"))
    cats = ds.item_category()
    n = len(df)
    raised = 0
    chunk: list[Any] = []
    bar = tqdm(total=n, desc="demand history", unit="ev", disable=not progress, leave=False)
    for ev in dataset_events(sub, "all", settings=settings):
        chunk.append(ev)
        if len(chunk) >= batch:
            raised += sum(a.state == "raised" for a in monitor.process(chunk, cats))
            bar.update(len(chunk))
            chunk = []
    if chunk:
        raised += sum(a.state == "raised" for a in monitor.process(chunk, cats))
        bar.update(len(chunk))
    raised += sum(a.state == "raised" for a in monitor.flush())
    bar.close()
    state = monitor.forget_alerts()
    span = (int(df["ts"].min()), int(df["ts"].max())) if n else (0, 0)
    return {
        "events": n,
        "from_ms": span[0],
        "to_ms": span[1],
        "active_windows": state.active_windows,
        "keys": state.size,
        "eligible_keys": int(np.count_nonzero(state.seen > settings.alerts.warmup_windows)),
        "past_alerts_forgotten": raised,
    }


@click.command("backfill-demand")
@click.option("--dataset", default="online-retail", show_default=True, help="A dataset name or folder.")
@click.option(
    "--before",
    type=click.Choice(["valid", "test"]),
    default="test",
    show_default=True,
    help="Replay the history up to the start of this split.",
)
@click.option("--weeks", type=float, default=8.0, show_default=True, help="Only the last N weeks (0: all).")
@click.option("--force", is_flag=True, help="Start the detector afresh even when it has history.")
def backfill(dataset: str, before: str, weeks: float, force: bool) -> None:
    """Warm the demand spike detector from the order history (baselines only; past alerts forgotten)."""
    from streamrec.datasets import load_dataset

    s = get_settings()
    ds = load_dataset(dataset, s.data_dir)
    out = backfill_demand(s, ds, before=before, weeks=weeks or None, force=force)
    click.echo(out)
