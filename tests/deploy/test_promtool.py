"""deploy/prometheus: promtool checks the config and rules and runs the rule unit tests.

promtool comes from the Debian package ``prometheus`` (.ci/run installs it); without it these
tests fail (they do not skip) so CI never passes without checking the rules.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PROM = REPO / "deploy" / "prometheus"
OPERATORS = REPO / "docs" / "operators.md"
SEVERITIES = {"critical", "warning", "info"}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not on PATH: install it with `apt-get install -y prometheus` (.ci/run does)")
    return path


def _run(promtool: str, *args: str) -> str:
    proc = subprocess.run([promtool, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"promtool {' '.join(args)} failed ({proc.returncode}):\n{out}"
    return out


def test_check_config(promtool):
    out = _run(promtool, "check", "config", "deploy/prometheus/prometheus.yml")
    assert "SUCCESS" in out


def test_check_rules(promtool):
    out = _run(promtool, "check", "rules", "deploy/prometheus/rules.yml")
    n = len(_alerts())
    assert f"SUCCESS: {n} rules found" in out


def test_rule_unit_tests(promtool):
    out = _run(promtool, "test", "rules", "deploy/prometheus/rules_test.yml")
    assert "SUCCESS" in out and "FAILED" not in out


def test_promtool_catches_a_wrong_expectation(promtool, tmp_path):
    """The rule tests can fail: a changed expected annotation is reported."""
    shutil.copy(PROM / "rules.yml", tmp_path / "rules.yml")
    text = (PROM / "rules_test.yml").read_text()
    broken = text.replace("severity: critical", "severity: page", 1)
    assert broken != text
    (tmp_path / "rules_test.yml").write_text(broken)
    proc = subprocess.run(
        [promtool, "test", "rules", "rules_test.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "FAILED" in proc.stdout + proc.stderr


def _alerts() -> list[dict]:
    groups = yaml.safe_load((PROM / "rules.yml").read_text())["groups"]
    return [r for g in groups for r in g["rules"] if "alert" in r]


def test_every_alert_is_tested_firing_and_not_firing():
    tests = yaml.safe_load((PROM / "rules_test.yml").read_text())["tests"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {a["alert"] for a in _alerts()}
    assert names - fires == set(), f"alerts with no firing test: {sorted(names - fires)}"
    assert names - quiet == set(), f"alerts with no not-firing test: {sorted(names - quiet)}"
    assert (fires | quiet) <= names, f"tests of unknown alerts: {sorted((fires | quiet) - names)}"


def test_required_alerts_exist():
    by_metric = {
        "lag growing": "streamrec_consumer_lag",
        "dead-letter rate": "streamrec_events_dead_lettered_total",
        "event->result p99": "streamrec_event_to_result_seconds_bucket",
        "encoder on CPU": 'provider="CPUExecutionProvider"',
        "worker down": "up{",
        "worker absent": "absent(streamrec_worker_up",
        "demand spike": "streamrec_anomalies_raised_total",
    }
    exprs = [a["expr"] for a in _alerts()]
    missing = [what for what, needle in by_metric.items() if not any(needle in e for e in exprs)]
    assert not missing, f"no alert rule for: {missing}"
    assert any("histogram_quantile(0.99" in e for e in exprs)
    assert any('gpu="true"' in e for e in exprs)


def _anchors(markdown: str) -> set[str]:
    """GitHub heading anchors of a Markdown document."""
    out = set()
    for line in markdown.splitlines():
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(slug)
    return out


def test_alerts_have_severity_annotations_and_runbooks():
    anchors = _anchors(OPERATORS.read_text())
    for a in _alerts():
        name = a["alert"]
        assert a.get("labels", {}).get("severity") in SEVERITIES, (
            f"{name}: severity must be one of {SEVERITIES}"
        )
        ann = a.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            assert ann.get(key), f"{name}: missing annotation {key}"
        doc, _, anchor = ann["runbook_url"].partition("#")
        assert doc == "docs/operators.md", f"{name}: runbook_url must point at docs/operators.md"
        assert anchor in anchors, f"{name}: docs/operators.md has no section #{anchor}"
