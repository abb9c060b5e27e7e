"""The detector maths on its own (no Redis): tails, surges, drops, hysteresis, state encoding."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from alerts.detector import (
    DROP,
    LEVEL_CATEGORY,
    LEVEL_ITEM,
    SURGE,
    DetectorState,
    Transition,
    detect,
    horizon_max,
    key_level,
    nb_lower_tail,
    nb_upper_tail,
    new_state,
    validate_horizons,
)
from streamrec.settings import AlertSettings

N_ITEMS = 30
RATE = 2.0  # buyers per item and window: well above every guard


def _counts(
    rng: np.random.Generator, override: dict[int, float] | None = None
) -> tuple[dict[str, float], float]:
    """One window of a steady synthetic shop: N_ITEMS items (Poisson RATE), one category per 10 items."""
    n = rng.poisson(RATE, N_ITEMS).astype(float)
    for i, v in (override or {}).items():
        n[i] = v
    counts: dict[str, float] = {}
    for i, c in enumerate(n):
        if c:
            counts[f"i:{i}"] = c
            counts[f"c:cat{i // 10}"] = counts.get(f"c:cat{i // 10}", 0.0) + c
    return counts, float(n.sum())


def _run(
    cfg: AlertSettings, n_windows: int, episode: range, value: float, seed: int = 0
) -> tuple[DetectorState, list[Transition]]:
    rng = np.random.default_rng(seed)
    state = new_state(cfg)
    out: list[Transition] = []
    for w in range(n_windows):
        counts, total = _counts(rng, {0: value} if w in episode else None)
        out += detect(state, w, counts, total, total, cfg)  # weight 1: total_w2 == total_w
    return state, out


def test_negative_binomial_tails_match_scipy() -> None:
    k = np.array([1.0, 3.0, 7.0, 20.0])
    mean, r = 4.0, 3.0
    p = r / (r + mean)
    np.testing.assert_allclose(nb_upper_tail(k, np.full(4, mean), r), stats.nbinom.sf(k - 1, r, p), rtol=1e-9)
    np.testing.assert_allclose(nb_lower_tail(k, np.full(4, mean), r), stats.nbinom.cdf(k, r, p), rtol=1e-9)
    assert nb_upper_tail(np.array([0.0]), np.array([4.0]), r)[0] == 1.0
    assert nb_lower_tail(np.array([0.0]), np.array([0.0]), r)[0] == 1.0


def test_steady_demand_raises_nothing() -> None:
    _, transitions = _run(AlertSettings(), 400, range(0), 0.0)
    assert transitions == []


def test_surge_raises_once_within_the_horizons_and_clears_once() -> None:
    cfg = AlertSettings()
    start = 150
    _, transitions = _run(cfg, 260, range(start, start + 4), 12.0)
    item = [t for t in transitions if t.key == "i:0"]
    assert [(t.kind, t.raised) for t in item] == [(SURGE, True), (SURGE, False)]
    raised, cleared = item
    assert raised.level == LEVEL_ITEM
    assert start <= raised.window < start + max(cfg.surge_horizons)
    assert raised.observed > cfg.min_surge_ratio * raised.expected
    assert raised.score >= -np.log10(cfg.p_raise)
    assert raised.first_window <= raised.window
    assert cleared.window > start + 3
    # Only the surging item and (maybe) its category moved.
    assert {t.key for t in transitions} <= {"i:0", "c:cat0"}


def test_drop_needs_the_long_horizons_and_is_detected() -> None:
    cfg = AlertSettings()
    start = 150
    _, transitions = _run(cfg, 260, range(start, 260), 0.0)
    item = [t for t in transitions if t.key == "i:0"]
    assert [(t.kind, t.raised) for t in item] == [(DROP, True)]
    assert start <= item[0].window < start + max(cfg.drop_horizons)
    assert item[0].observed <= cfg.max_drop_ratio * item[0].expected
    # With the surge horizons only, the same collapse is never significant.
    short = AlertSettings(drop_horizons=[1, 3, 8])
    _, transitions = _run(short, 260, range(start, 260), 0.0)
    assert not [t for t in transitions if t.key == "i:0" and t.kind == DROP]


def test_warmup_blocks_new_keys() -> None:
    cfg = AlertSettings()
    _, transitions = _run(cfg, cfg.warmup_windows - 5, range(20, 30), 40.0)
    assert transitions == []


def test_state_round_trip_continues_identically() -> None:
    cfg = AlertSettings()
    rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(1)
    a, b = new_state(cfg), new_state(cfg)
    ta: list[Transition] = []
    tb: list[Transition] = []
    for w in range(200):
        over = {0: 15.0} if 150 <= w < 154 else None
        ca, na = _counts(rng_a, over)
        cb, nb = _counts(rng_b, over)
        ta += detect(a, w, ca, na, na, cfg)
        tb += detect(b, w, cb, nb, nb, cfg)
        b = DetectorState.from_bytes(b.to_bytes(), horizon_max(cfg))  # "restart" after every window
    assert ta == tb and ta
    np.testing.assert_array_equal(a.share_num, b.share_num)
    np.testing.assert_array_equal(a.alert, b.alert)
    assert a.sold_o is not None and a.sold_o.any()
    np.testing.assert_array_equal(a.sold_o, b.sold_o)


def test_a_state_stored_before_sold_o_takes_the_rings_sums() -> None:
    import msgspec

    from alerts.detector import _StateWire

    cfg = AlertSettings()
    state, _ = _run(cfg, 100, range(0), 0.0)
    wire = msgspec.msgpack.decode(state.to_bytes(), type=_StateWire)
    old = msgspec.msgpack.encode(msgspec.structs.replace(wire, sold_o=b""))
    again = DetectorState.from_bytes(old, horizon_max(cfg))
    assert again.ring_o is not None and again.sold_o is not None
    np.testing.assert_allclose(again.sold_o, again.ring_o.sum(axis=0))
    assert again.sold_o.any()


def test_state_with_other_horizons_restarts_the_sums_only() -> None:
    cfg = AlertSettings()
    state, _ = _run(cfg, 100, range(0), 0.0)
    again = DetectorState.from_bytes(state.to_bytes(), horizon_max(cfg) + 4)
    assert again.ring_o.shape == (horizon_max(cfg) + 4, state.size)
    assert not again.ring_o.any() and again.filled == 0
    np.testing.assert_array_equal(again.share_num, state.share_num)
    assert again.keys == state.keys


def test_windows_must_increase_and_keys_must_be_typed() -> None:
    cfg = AlertSettings()
    state = new_state(cfg)
    detect(state, 5, {"i:a": 1.0}, 1.0, 1.0, cfg)
    with pytest.raises(ValueError, match="not after the last closed window"):
        detect(state, 5, {"i:a": 1.0}, 1.0, 1.0, cfg)
    assert key_level("c:lantern") == LEVEL_CATEGORY
    with pytest.raises(ValueError, match="must start with"):
        key_level("lantern")


def test_horizons_are_validated() -> None:
    validate_horizons(AlertSettings())
    assert horizon_max(AlertSettings(surge_horizons=[1, 3], drop_horizons=[30])) == 30
    with pytest.raises(ValueError, match="drop_horizons"):
        validate_horizons(AlertSettings(drop_horizons=[]))
    with pytest.raises(ValueError, match="surge_horizons"):
        validate_horizons(AlertSettings(surge_horizons=[0, 3]))
