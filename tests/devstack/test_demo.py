"""The main job, end to end in --quick mode: export → index → user model (one short epoch) → worker →
replay of real data → fresh recommendations on the results topic, malformed input dead-lettered."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid

import pytest


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(900)
def test_demo_quick_end_to_end(stack, tmp_path):
    uid = uuid.uuid4().hex[:8]
    summary = tmp_path / "summary.json"
    env = {
        **os.environ,
        "STREAMREC_STATE_DIR": str(tmp_path / "state"),
        "STREAMREC_TOPICS_EVENTS": f"demo-{uid}.events",
        "STREAMREC_TOPICS_RESULTS": f"demo-{uid}.results",
        "STREAMREC_TOPICS_DEAD_LETTER": f"demo-{uid}.dlq",
        "STREAMREC_TOPICS_ALERTS": f"demo-{uid}.alerts",
        "STREAMREC_KAFKA_CONSUMER_GROUP": f"demo-{uid}",
        "STREAMREC_REDIS_PREFIX": f"demo{uid}",
        "STREAMREC_WEB_PORT": str(_port()),
        "STREAMREC_METRICS_PORT": str(_port()),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "streamrec.cli", "demo", "--quick", "--rate", "80", "--duration", "12",
         "--json-summary", str(summary)],
        env=env, capture_output=True, text=True, timeout=880,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads(summary.read_text())
    assert data["events_sent"] == int(80 * 12)
    surge = data["surge"]  # the one synthetic surge the demo injects, flagged as such
    assert surge["buyers_injected"] >= 6
    assert data["events_valid"] == data["events_sent"] + surge["buyers_injected"]
    assert surge["alert_after_s"] is not None and surge["alert_after_s"] < 10, surge
    assert surge["alerts"][0]["synthetic"] is True and surge["alerts"][0]["key"] in {
        surge["item"],
        surge["category"],
    }
    assert "synthetic surge:" in proc.stdout
    assert data["dashboard_active_alerts"] >= 1  # the Grafana panel's gauge shows it
    assert data["dead_lettered"] == 2  # the two malformed records the demo sends on purpose
    assert data["results_received"] > 0
    share = data["reason_share"]  # what the pushed slots were: re-buys beside discoveries
    assert share and abs(sum(share.values()) - 1.0) < 0.01, share
    assert set(share) <= {"buy_again", "similar_to", "matches_query", "trending", "trending_in", "popular"}
    assert data["event_to_result_ms"]["p50"] is not None
    assert "fresh recommendations for user" in proc.stdout
    assert (tmp_path / "state" / "model" / "manifest.json").exists()
    # the demo serves what `eval replay` measures: item vectors + the user model trained over them
    um = json.loads((tmp_path / "state" / "model" / "user" / "manifest.json").read_text())
    assert um["metrics"]["refit"]["splits"] == ["train", "valid"]
    assert "training the user model" in proc.stdout
