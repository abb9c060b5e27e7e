"""The HTTP API against its OpenAPI document: schemathesis on a live worker (real catalog + encoder).

``schemathesis run <worker>/openapi.json --checks all`` generates valid and invalid requests for
every operation of ``streams/openapi.py`` (examples, boundary coverage, fuzzing; deterministic)
and fails on any 5xx, any response that does not match the document (status, content type,
body schema), valid input that is rejected, invalid input that is accepted, or a method the
document does not list that is not answered 405. ``/explorer/stream`` (server-sent events: a
response that does not end) is left to the browser test.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from support.worker import wait_until

from devstack.produce import EventProducer
from streamrec.events import make_event

pytestmark = pytest.mark.timeout(900)

MAX_EXAMPLES = 30


def test_the_api_matches_its_openapi_document(
    worker, topics, settings, retail_model_dir, redis_client, tmp_path: Path
) -> None:
    w = worker(
        items="inference.catalog:load_catalog",
        encoder="inference.encoder:load_encoder",
        STREAMREC_MODEL_DIR=str(retail_model_dir),
        STREAMREC_SCORING_COALESCE_MS="200",
        STREAMREC_ENCODER_PROVIDERS='["CPUExecutionProvider"]',
    ).start()
    w.wait_ready(timeout=180)

    # A few users with events, so the explorer and the pull path have profiles to show.
    producer = EventProducer(settings)
    now = int(time.time() * 1000)
    items = ["85123A", "71053", "84406B", "22423", "47566"]
    for n, item in enumerate(items):
        producer.send(make_event("click", f"api-user-{n % 2}", item_id=item, ts=now + n))
    producer.send(make_event("search", "api-user-0", query="red heart lantern", ts=now + 10))
    producer.flush(30)

    def seen() -> bool:
        status, body = w.get("/explorer/api/user/api-user-0")
        return status == 200 and len(orjson.loads(body)["events"]) >= 4

    wait_until(seen, 60, "api-user-0's events in the explorer")
    status, body = w.get("/openapi.json")
    assert status == 200 and orjson.loads(body)["openapi"].startswith("3.1")

    cmd = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        w.url("/openapi.json"),
        "--checks",
        "all",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--generation-deterministic",
        "--workers",
        "1",
        "--request-timeout",
        "30",
        "--exclude-path",
        "/explorer/stream",
        "--no-color",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path / "schemathesis"),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=800, cwd=tmp_path)
    report = out.stdout + out.stderr
    (tmp_path / "schemathesis.log").write_text(report)
    assert out.returncode == 0, f"schemathesis failed (exit {out.returncode}):\n{report[-12000:]}"
    assert "No issues found" in report or " passed" in report, report[-4000:]
    assert w.proc is not None and w.proc.poll() is None, f"the worker died:\n{w.tail()}"
