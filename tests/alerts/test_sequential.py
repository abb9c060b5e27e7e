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
) -> list[Transition]:
    """Slots of a stationary negative-binomial shop: per window each item's rate is Gamma(r)-
    distributed around ``rates`` (the detector's over-dispersion), slots are Poisson within it.
    ``extra``: slot -> item indices with one extra buyer; ``stop``: (item, first window) sold out."""
    rng = np.random.default_rng(seed)
    state = new_state(cfg)
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
