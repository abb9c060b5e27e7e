"""`streamrec eval spikes --quick` (the CI smoke path) end to end on the real data and Redis."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from streamrec.cli import main


def test_eval_spikes_quick_writes_report_plot_and_json(stack, tmp_path: Path) -> None:
    out = tmp_path / "spikes.json"
    res = CliRunner().invoke(
        main, ["eval", "spikes", "--quick", "--output", str(out), "--results-dir", str(tmp_path)]
    )
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    for method in ("detector", "baseline"):
        r = result[method]
        assert set(r) >= {"precision", "recall", "median_delay_windows", "false_alarms_per_day", "per_size"}
        assert {(row["kind"], row["size"]) for row in r["per_size"]} == {("surge", 2.0), ("drop", 1.0)}
        assert all(row["injections"] > 0 for row in r["per_size"])
    # The detector finds most of the injected surges (the baseline is compared in the report).
    surge = next(row for row in result["detector"]["per_size"] if row["kind"] == "surge")
    assert surge["recall"] >= 0.5
    md = (tmp_path / "spikes.md").read_text()
    assert "| detector | surge | 2 |" in md and "| baseline |" in md
    assert "How fast a surge can be told" in md and result["surge_floor"]["natural_episodes"]
    assert (tmp_path / "spikes.png").stat().st_size > 0


def test_surge_floor_counts_natural_bursts_of_rare_items_and_the_waits() -> None:
    """Bursts are counted once per episode, only for rare items with a history, after the warm-up."""
    import pandas as pd
    from scipy.stats import gamma

    from evaluation.spikes import WEEK_MS, surge_floor

    H = 3_600_000
    rows = []
    # Shop traffic: one purchase of a filler item every active hour for 10 weeks.
    for h in range(0, 10 * 7 * 24, 1):
        rows.append((h * H, f"f{h}", "filler"))
    # "rare": 4 buyers spread over the 4 weeks before week 8 (rate ~0.006/active h), then at
    # week 8 three buyers within 10 minutes (one 3-buyer episode, one 2-buyer one).
    for w in range(4, 8):
        rows.append((w * WEEK_MS + 7 * H, f"r{w}", "rare"))
    for j in range(3):
        rows.append((8 * WEEK_MS + j * 5 * 60_000, f"b{j}", "rare"))
    # "busy": a buyer every hour, bursts included, never counted (above max_rate).
    for h in range(4 * 7 * 24, 10 * 7 * 24):
        rows.append((h * H + 1, f"x{h}", "busy"))
        rows.append((h * H + 2, f"y{h}", "busy"))
    # "early": a burst during the warm-up, not counted.
    rows += [(2 * H + 10, "e1", "early"), (2 * H + 20, "e2", "early"), (2 * H + 30, "e3", "early")]
    df = pd.DataFrame(rows, columns=["ts", "user_id", "item_id"]).sort_values("ts", kind="stable")
    df = df.reset_index(drop=True).assign(category="")
    out = surge_floor(df, H, rates_per_window=(4.0,), buyers=(2, 3), within_min=(15,), warmup_ms=6 * WEEK_MS)
    got = {(e["buyers"], e["within_min"]): e["episodes"] for e in out["natural_episodes"]}
    assert got == {(2, 15): 1, (3, 15): 1}
    waits = {w["buyers"]: w for w in out["surge_waits"]}
    assert waits[2]["median_wait_min"] == round(float(gamma.median(2, scale=15.0)), 1)  # 4/h: mean gap 15 min
    assert 0 < waits[3]["p_within_30_min"] < waits[2]["p_within_30_min"] < 1


def test_the_trending_baselines_drop_guard_is_its_own() -> None:
    """Tuning the detector's drop guard does not move the reference it is compared with."""
    import pandas as pd

    from evaluation.spikes import replay_baseline
    from streamrec.settings import Settings

    rows = []
    for w in range(200):  # item "a" has 3 buyers an hour until it stops at hour 150; "b" goes on
        for j in range(3):
            if w < 150:
                rows.append((w * 3_600_000 + j, f"u{w}-{j}", "a", ""))
            rows.append((w * 3_600_000 + 10 + j, f"v{w}-{j}", "b", ""))
    df = pd.DataFrame(rows, columns=["ts", "user_id", "item_id", "category"])
    base = Settings()
    strict = base.override(alerts={"min_drop_expected": 1_000.0})
    a = replay_baseline(df, base, 3.0, 3.0)
    b = replay_baseline(df, strict, 3.0, 3.0)
    assert [(x.key, x.kind) for x in a if x.state == "raised"] == [("a", "drop")]
    assert a == b
