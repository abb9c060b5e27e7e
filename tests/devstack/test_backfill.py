"""Warming the demand detector from real order history (real Redis): baselines in, past alerts out."""

from __future__ import annotations

import numpy as np

from alerts.effects import effects_key
from alerts.monitor import DemandMonitor
from devstack.backfill import backfill_demand
from streamrec.datasets import load_dataset
from streamrec.events import Event, EventType
from streamrec.settings import Settings


def test_backfill_gives_baselines_forgets_past_alerts_and_then_a_live_surge_alerts(
    settings: Settings, redis_client, data_dir
) -> None:
    s = settings.override(data_dir=data_dir)
    ds = load_dataset("online-retail", data_dir)
    out = backfill_demand(s, ds, weeks=3, progress=False)
    assert out["events"] > 10_000 and out["active_windows"] > s.alerts.warmup_windows
    assert out["eligible_keys"] > 1000
    monitor = DemandMonitor(s, redis_client)
    state = monitor.state()
    assert state.active_windows == out["active_windows"]
    assert not state.active_keys()  # the past episodes are not carried into the present
    assert not redis_client.hgetall(effects_key(s.redis.prefix))  # no boost or damping left behind
    parent = state.parent
    assert parent is not None and np.count_nonzero(parent >= 0) > 1000  # items know their categories
    # a second call leaves the history alone
    assert "skipped" in backfill_demand(s, ds, weeks=3, progress=False)

    # Live: a mid-popular item of the history gets 12 synthetic buyers within a minute, now.
    cut = int(ds.split("test")["ts"].min())
    hist = ds.interactions[ds.interactions["ts"] < cut]
    buyers = hist[hist["ts"] >= cut - 3 * 7 * 24 * 3600 * 1000].drop_duplicates(["user_id", "item_id"])
    counts = buyers["item_id"].value_counts()
    item = sorted(counts[(counts >= 8) & (counts <= 20)].index)[0]
    cats = ds.item_category()
    now = 1_900_000_000_000
    live = [e for e in _live(ds, now, 600)]
    surge = [
        Event(event_id=f"s{n}", type=EventType.PURCHASE, user_id=f"synthetic-{n}", ts=now + 30_000 + n * 2000,
              item_id=item)
        for n in range(12)
    ]  # fmt: skip
    stream = sorted(live + surge, key=lambda e: e.ts)
    alerts = []
    for i in range(0, len(stream), 50):
        alerts += monitor.process(stream[i : i + 50], cats)
    mine = [a for a in alerts if a.state == "raised" and a.key in {item, cats.get(item)}]
    assert mine and mine[0].kind == "surge" and mine[0].synthetic, alerts
    assert mine[0].window_end - now <= 90_000  # within seconds of the evidence, not at an hour's close
    # one alert for the episode: its category does not alert a second time for it
    assert len(mine) == 1, mine


def _live(ds, now: int, n: int) -> list[Event]:
    """The first ``n`` test purchases re-timed to one a tenth of a second from ``now``."""
    df = ds.split("test").iloc[:n]
    return [
        Event(event_id=f"l{k}", type=EventType.PURCHASE, user_id=str(u), ts=now + 100 * k, item_id=str(i))
        for k, (u, i) in enumerate(zip(df["user_id"], df["item_id"], strict=True))
    ]
