"""Sequential looks (short horizons per slot) and the waiting-time drop test, on simulated streams."""

from __future__ import annotations

import numpy as np

from alerts.detector import DROP, SURGE, Transition, look, new_state
from streamrec.settings import AlertSettings

SPW = 12  # slots per window (300 s slots of 3600 s windows)


def _stream(
    cfg: AlertSettings,
    rates: np.ndarray,
    n_windows: int,
    seed: int = 0,
    extra: dict[int, list[int]] | None = None,
    stop: tuple[int, int] | None = None,
    cats: dict[int, str] | None = None,
) -> list[Transition]:
    """Slots of a stationary negative-binomial shop: per window each item's rate is Gamma(r)-
    distributed around ``rates`` (the detector's over-dispersion), slots are Poisson within it.
    ``extra``: slot -> item indices with one extra buyer; ``stop``: (item, first window) sold out;
    ``cats``: item index -> category (a category's count is the sum of its items')."""
    rng = np.random.default_rng(seed)
    state = new_state(cfg)
    cats = cats or {}
    state.link({f"i:{i}": f"c:{c}" for i, c in cats.items()})
    out: list[Transition] = []
    r = cfg.nb_size
    for w in range(n_windows):
        lam = rates * rng.gamma(r, 1.0 / r, len(rates))
        for j in range(SPW):
            slot = w * SPW + j
            n = rng.poisson(lam / SPW).astype(float)
            for i in (extra or {}).get(slot, []):
                n[i] += 1
            if stop is not None and w >= stop[1]:
                n[stop[0]] = 0
            counts = {f"i:{i}": float(c) for i, c in enumerate(n) if c}
            for i, c in cats.items():
                if n[i]:
                    counts[f"c:{c}"] = counts.get(f"c:{c}", 0.0) + float(n[i])
            out += look(state, slot, counts, float(n.sum()), float(n.sum()), cfg)
    return out


def test_false_alarm_rate_of_the_looks_stays_near_its_target() -> None:
    # A lax threshold so that false alarms are countable: raises per (key, look) must stay at or
    # below the per-look target (Bonferroni over horizons and the guard make it conservative).
    cfg = AlertSettings(
        warmup_windows=10,
        fast_p_raise=1e-3,
        fast_min_surge_count=0,
        min_surge_ratio=1.0,
        fast_min_shop_events=0,
        wait_p_raise=1e-12,
    )
    rates = np.full(60, 1.0)
    n_windows = 160
    out = _stream(cfg, rates, n_windows)
    fast = [t for t in out if t.source == "fast" and t.raised]
    looks = len(rates) * (n_windows - cfg.warmup_windows - 1) * SPW
    rate = len(fast) / looks
    assert rate <= 2 * cfg.fast_p_raise, (len(fast), looks)
    # ...and with the default thresholds a stationary shop raises nothing at all.
    assert [t for t in _stream(AlertSettings(warmup_windows=10), rates, 120, seed=1) if t.raised] == []


def test_a_four_buyers_per_hour_surge_is_found_by_a_look_within_its_first_hour() -> None:
    cfg = AlertSettings(warmup_windows=10, fast_min_shop_events=5)
    rates = np.concatenate([[0.02], np.full(59, 1.0)])  # item 0: a long-tail item, 0.02 buyers / h
    start = 200 * SPW
    surge = {start + j: [0] for j in (1, 4, 7, 10)}  # +4 buyers in the hour, spread over it
    out = _stream(cfg, rates, 203, extra=surge)
    mine = [t for t in out if t.key == "i:0" and t.raised]
    assert mine and mine[0].kind == SURGE and mine[0].source == "fast"
    assert mine[0].end_ms is not None and mine[0].end_ms <= (start + SPW) * cfg.slot_s * 1000
    assert [t for t in out if t.raised and t.key != "i:0"] == []


def test_waiting_time_flags_a_popular_items_stock_out_within_hours() -> None:
    cfg = AlertSettings(warmup_windows=10)
    rates = np.concatenate([[2.0], np.full(59, 1.0)])  # item 0 sells 2 per active hour
    out = _stream(cfg, rates, 130, stop=(0, 110))
    mine = [t for t in out if t.key == "i:0" and t.raised]
    assert mine and mine[0].kind == DROP and mine[0].source == "wait"
    assert mine[0].window - 110 <= 8  # within a trading day (E* ~ 9 events at 2 per hour)
    assert [t for t in out if t.raised and t.key != "i:0"] == []


def test_a_category_does_not_alert_again_for_its_own_alerting_item() -> None:
    # Item 0 is the only product of category "solo" (Online Retail has many such categories):
    # its surge raises one alert, for the item, not a second one for the category.
    cfg = AlertSettings(warmup_windows=10, fast_min_shop_events=5)
    rates = np.concatenate([[0.02], np.full(59, 1.0)])
    start = 200 * SPW
    surge = {start + j: [0] for j in range(0, 2 * SPW, 2)}  # +6 buyers an hour for two hours
    out = _stream(cfg, rates, 204, extra=surge, cats={0: "solo", 1: "solo-too", 2: "solo-too"})
    raised = [t for t in out if t.raised]
    assert [t.key for t in raised] == ["i:0"], [(t.key, t.source) for t in raised]


def test_a_category_wide_surge_still_alerts_when_no_single_item_explains_it() -> None:
    # Ten long-tail items of one category each get a buyer or two more per hour: no item is
    # significant on its own, the category is, and its alert is not suppressed.
    cfg = AlertSettings(warmup_windows=10, fast_min_shop_events=5)
    rates = np.concatenate([np.full(10, 0.05), np.full(50, 1.0)])
    start = 200 * SPW
    surge = {start + j: list(range(10)) for j in range(0, 3 * SPW, 6)}  # +2 per item and hour
    out = _stream(cfg, rates, 204, extra=surge, cats={i: "wide" for i in range(10)})
    raised = [t for t in out if t.raised]
    assert any(t.key == "c:wide" and t.kind == SURGE for t in raised), [(t.key, t.source) for t in raised]
    # with every item alerting on its own, the category would add nothing and stays quiet
    busy = _stream(cfg, rates, 204, extra={s: [0] * 8 for s in surge}, cats={0: "wide", 1: "wide"})
    assert "c:wide" not in {t.key for t in busy if t.raised}


def test_a_steady_sellers_stock_out_is_flagged_although_the_silence_outlasts_the_recent_windows() -> None:
    # Item 0 sells 0.4 an active hour, like the Online Retail top items: its silence becomes
    # significant only after ~30 windows, when most of the longest horizon is already silent.
    # What it sold before the silence began still counts as "selling lately".
    cfg = AlertSettings(warmup_windows=10)
    rates = np.concatenate([[0.4], np.full(59, 1.0)])
    out = _stream(cfg, rates, 200, stop=(0, 120), cats={0: "steady", 1: "steady"})
    mine = [t for t in out if t.key == "i:0" and t.raised]
    assert mine and mine[0].kind == DROP and mine[0].source == "wait"
    assert 20 <= mine[0].window - 120 <= max(cfg.drop_horizons), mine[0].window
    # the category's own quiet spell is no stock-out: no waiting-time alert for it
    assert [t for t in out if t.raised and t.key != "i:0"] == []
