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
    assert (tmp_path / "spikes.png").stat().st_size > 0
