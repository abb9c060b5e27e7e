"""DemandMonitor and RedisDemandAdjustments on the real Redis, fed with the real Online Retail stream."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from support.demand import INJECT_AT, active_windows_after, batches, to_events, with_surge

from alerts.effects import RedisDemandAdjustments
from alerts.models import AnomalyAlert
from alerts.monitor import DemandMonitor
from streamrec.events import Event, EventType
from streamrec.settings import Settings

SURGE_ITEM = "84378"  # ~0.45 buyers per active hour in January 2011


def replay(monitor: DemandMonitor, df: pd.DataFrame, cats: dict[str, str]) -> list[AnomalyAlert]:
    alerts: list[AnomalyAlert] = []
    for evs in batches(df):
        alerts += monitor.process(evs, cats)
    return alerts


def test_untouched_real_stream_raises_no_alert(settings: Settings, redis_client, retail_slice) -> None:
    df, cats = retail_slice
    monitor = DemandMonitor(settings, redis_client)
    alerts = replay(monitor, df, cats) + monitor.flush()
    # At most the false-alarm budget of `eval spikes` (0.2 alerts a day) on these 46 days, each a
    # natural spike far above its expectation (here: a product expected 0.002 times in a quarter
    # of an hour that two shoppers bought), and each raised once and cleared once.
    days = (int(df["ts"].iloc[-1]) - int(df["ts"].iloc[0])) / 86_400_000
    raised = [a for a in alerts if a.state == "raised"]
    assert len(raised) <= 0.2 * days, raised
    for a in raised:
        assert a.observed >= 10 * a.expected and a.observed >= settings.alerts.fast_min_surge_count
        assert [(b.kind, b.state) for b in alerts if b.key == a.key] == [
            (a.kind, "raised"),
            (a.kind, "cleared"),
        ]
    # It did work: every event was counted or was a repeat (same shopper, item and hour: the
    # lines of one invoice count once), and every hour of the slice was closed.
    distinct = len(df.assign(w=df["ts"] // 3_600_000).drop_duplicates(["w", "user_id", "item_id"]))
    assert monitor.stats.late == 0 and monitor.stats.counted + monitor.stats.repeats == len(df)
    assert monitor.stats.counted >= distinct
    assert monitor.stats.windows_closed == df["ts"].floordiv(3_600_000).nunique()
    assert monitor.state().active_windows == monitor.stats.windows_closed
    assert monitor.open_counts() == {}


def test_injected_surge_raises_once_boosts_and_clears_once(
    settings: Settings, redis_client, retail_slice
) -> None:
    df, cats = retail_slice
    category = cats[SURGE_ITEM]
    other = next(i for i, c in cats.items() if c == category and i != SURGE_ITEM)
    unrelated = next(i for i, c in cats.items() if c and c != category)
    wins = active_windows_after(df, INJECT_AT, 3)
    stream = with_surge(df, SURGE_ITEM, category, wins, buyers=8)
    monitor = DemandMonitor(settings, redis_client)
    adjustments = RedisDemandAdjustments(settings, redis_client)
    probe_items = [SURGE_ITEM, other, unrelated]
    probe_cats = [category, category, cats[unrelated]]

    alerts: list[AnomalyAlert] = []
    boosted: tuple[np.ndarray, list[str | None]] | None = None
    # Small batches (a few windows each), so that the raise and the clear land in different calls.
    for evs in batches(stream, 300):
        new = monitor.process(evs, cats)
        alerts += new
        if boosted is None and any(a.key == SURGE_ITEM and a.state == "raised" for a in new):
            boosted = adjustments.factors(probe_items, probe_cats)
    alerts += monitor.flush()

    mine = [a for a in alerts if a.level == "item" and a.key == SURGE_ITEM]
    assert [(a.kind, a.state) for a in mine] == [("surge", "raised"), ("surge", "cleared")]
    raised, cleared = mine
    # Detected within the configured number of windows after the surge started.
    window_ms = settings.alerts.window_s * 1000
    assert (
        wins[0] * window_ms < raised.window_end <= (wins[0] + max(settings.alerts.surge_horizons)) * window_ms
    )
    guard = (
        settings.alerts.fast_min_surge_count if raised.source == "fast" else settings.alerts.min_surge_count
    )
    assert raised.observed >= guard
    assert raised.observed >= settings.alerts.min_surge_ratio * raised.expected
    # Found by a sequential look inside the first hour of the surge, not when the hour closed.
    assert raised.source == "fast" and raised.window_end < (wins[0] + 1) * window_ms
    assert cleared.window_end > raised.window_end
    # Nothing else in the shop alerted but the item and its category (once each at most), beside
    # what the untouched stream raises on its own.
    clean = DemandMonitor(settings.override(redis={"prefix": settings.redis.prefix + "-clean"}), redis_client)
    natural = {(a.level, a.key) for a in replay(clean, df, cats) + clean.flush()}
    clean.reset()
    assert {(a.level, a.key) for a in alerts} - natural <= {("item", SURGE_ITEM), ("category", category)}
    alerts = [a for a in alerts if (a.level, a.key) not in natural]
    # The surge lifts the category's baseline share; a quiet spell of the category afterwards is
    # no stock-out (the waiting-time test is for items only), and the surge raises and clears once.
    assert [a for a in alerts if a.level == "category" and a.kind == "drop"] == []
    cat_alerts = [a.state for a in alerts if a.level == "category" and a.kind == "surge"]
    assert cat_alerts in ([], ["raised", "cleared"])

    assert boosted is not None
    factors, reasons = boosted
    assert factors[0] >= settings.alerts.boost and reasons[0] == "trending"
    if cat_alerts:  # the category surged too: its other items are boosted with the category reason
        assert factors[1] == pytest.approx(settings.alerts.boost) and reasons[1] == f"trending_in:{category}"
    else:
        assert factors[1] == 1.0 and reasons[1] is None
    assert factors[2] == 1.0 and reasons[2] is None
    # Cleared: the boost is gone.
    after, reasons_after = adjustments.factors(probe_items, probe_cats)
    assert max(after.tolist()) <= 1.0 and reasons_after == [None, None, None]
    if not any(a.kind == "drop" for a in alerts):
        assert after.tolist() == [1.0, 1.0, 1.0]


def test_stock_out_is_detected_as_a_drop(settings: Settings, redis_client, retail_slice) -> None:
    df, cats = retail_slice
    item = "85123A"  # the best seller (~0.7 buyers per active hour), sold out from INJECT_AT on
    stream = df[~((df["item_id"] == item) & (df["ts"] >= INJECT_AT))]
    monitor = DemandMonitor(settings, redis_client)
    alerts = replay(monitor, stream, cats)
    mine = [a for a in alerts if a.level == "item" and a.key == item]
    assert [(a.kind, a.state) for a in mine] == [("drop", "raised")]
    last = active_windows_after(df, INJECT_AT, max(settings.alerts.drop_horizons))[-1]
    assert INJECT_AT < mine[0].window_end <= (last + 1) * settings.alerts.window_s * 1000
    assert mine[0].observed <= settings.alerts.max_drop_ratio * mine[0].expected
    factors, reasons = RedisDemandAdjustments(settings, redis_client).factors([item], [cats[item]])
    assert factors[0] <= settings.alerts.damping and reasons == [None]


def test_restart_and_reprocessing_lose_and_double_count_nothing(
    settings: Settings, redis_client, retail_slice
) -> None:
    df, cats = retail_slice
    df = df[df["ts"] < INJECT_AT]
    cut = len(df) // 2
    first, second = df.iloc[:cut], df.iloc[cut:]

    # Reference: one monitor, each event once.
    ref_settings = settings.override(redis={"prefix": settings.redis.prefix + "-ref"})
    ref = DemandMonitor(ref_settings, redis_client)
    replay(ref, df, cats)

    # A worker processes the first half, then "crashes" before committing its last batch.
    a = DemandMonitor(settings, redis_client)
    replay(a, first, cats)
    open_before = a.open_counts()
    state_before = a.state().to_bytes()
    assert open_before, "the cut should leave a window open"

    # A new instance (restart, or another worker after a rebalance) sees the same state...
    b = DemandMonitor(settings, settings.redis.client())
    assert b.open_counts() == open_before
    assert b.state().to_bytes() == state_before
    # ...gets the uncommitted batch again: nothing is counted twice...
    redo = to_events(first.iloc[-1500:])
    assert b.process(redo, cats) == []
    assert b.open_counts() == open_before
    assert b.stats.counted == 0 and b.stats.repeats + b.stats.late == len(redo)
    # ...and continues: the result is the one of the uninterrupted run.
    replay(b, second, cats)
    assert b.open_counts() == ref.open_counts()
    got, want = b.state(), ref.state()
    assert got.last_window == want.last_window and got.active_windows == want.active_windows
    assert sorted(got.keys) == sorted(want.keys)  # key order follows Redis hash order: compare by key
    order = [want.index[k] for k in got.keys]
    np.testing.assert_allclose(got.share_num, want.share_num[order], rtol=1e-9)
    np.testing.assert_array_equal(got.seen, want.seen[order])
    np.testing.assert_array_equal(got.alert, want.alert[order])
    np.testing.assert_allclose(got.ring_o, want.ring_o[:, order], rtol=1e-6)


def test_weights_and_ignored_events(settings: Settings, redis_client) -> None:
    p = settings.profile
    monitor = DemandMonitor(settings, redis_client)
    t0 = 1_300_000_000_000 // 3_600_000 * 3_600_000
    evs = [
        Event(event_id="1", type=EventType.VIEW, user_id="u1", ts=t0 + 1, item_id="a"),
        Event(event_id="2", type=EventType.PURCHASE, user_id="u1", ts=t0 + 2, item_id="a"),  # max wins
        Event(event_id="3", type=EventType.CLICK, user_id="u2", ts=t0 + 3, item_id="a"),
        Event(
            event_id="4", type=EventType.ADD_TO_CART, user_id="u3", ts=t0 + 4, item_id="b", category="bags"
        ),
        Event(event_id="5", type=EventType.SEARCH, user_id="u4", ts=t0 + 5, query="lamp"),
    ]
    assert monitor.process(evs, {"a": "lamps"}) == []
    (counts,) = monitor.open_counts().values()
    assert counts["i:a"] == pytest.approx(p.weight_purchase + p.weight_click)
    assert counts["c:lamps"] == pytest.approx(p.weight_purchase + p.weight_click)
    assert counts["i:b"] == pytest.approx(p.weight_add_to_cart)
    assert counts["c:bags"] == pytest.approx(p.weight_add_to_cart)  # the event's own category
    assert monitor.stats.ignored == 1 and monitor.stats.counted == 4
    # A late event (its window already closed) is not counted.
    later = Event(event_id="6", type=EventType.VIEW, user_id="u9", ts=t0 + 3 * 3_600_000, item_id="a")
    monitor.process([later], {})
    assert monitor.stats.windows_closed == 1
    monitor.process([Event(event_id="7", type=EventType.VIEW, user_id="u8", ts=t0 + 9, item_id="a")], {})
    assert monitor.stats.late == 1


def test_adjustments_validate_their_input(settings: Settings, redis_client) -> None:
    adjustments = RedisDemandAdjustments(settings, redis_client)
    factors, reasons = adjustments.factors([], [])
    assert factors.shape == (0,) and reasons == []
    with pytest.raises(ValueError, match="one per item"):
        adjustments.factors(["a", "b"], ["x"])
