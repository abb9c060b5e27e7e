"""devstack.promstack.LocalPrometheus: a real Prometheus server scraping a real exporter.

The exporter is prometheus_client's HTTP server on a private registry, started by the test.
"""

from __future__ import annotations

import socket
import time

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from devstack.promstack import DEFAULT_RULES, LocalPrometheus, PrometheusError, find_binary

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    try:
        return find_binary("prometheus")
    except PrometheusError as exc:
        pytest.fail(str(exc))


@pytest.fixture
def exporter():
    """A live /metrics endpoint on a free loopback port, with a private registry."""
    reg = CollectorRegistry()
    server, thread = start_http_server(0, addr="127.0.0.1", registry=reg)
    yield reg, f"127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_scrapes_exporter_and_answers_queries(prometheus_binary, exporter):
    reg, target = exporter
    events = Counter("streamrec_selftest_events", "test counter", ["type"], registry=reg)
    up = Gauge("streamrec_worker_up", "test gauge", registry=reg)
    events.labels("view").inc(5)
    up.set(1)
    with LocalPrometheus([target], rules_files=[DEFAULT_RULES], labels={"gpu": "false"}) as prom:
        prom.wait_for("up == 1", 30)
        assert prom.targets_health() == {f"http://{target}/metrics": "up"}
        got = prom.wait_for('streamrec_selftest_events_total{type="view"}', 30)
        assert len(got) == 1
        labels = got[0]["metric"]
        assert (
            labels["job"] == "streamrec-worker" and labels["instance"] == target and labels["gpu"] == "false"
        )
        assert float(got[0]["value"][1]) == 5.0

        # Live: a later increment shows up in a later scrape.
        events.labels("view").inc(2)
        prom.wait_for(
            'streamrec_selftest_events_total{type="view"}',
            30,
            predicate=lambda r: bool(r) and float(r[0]["value"][1]) == 7.0,
        )
        assert {"streamrec_selftest_events_total", "streamrec_worker_up"} <= prom.series_names()
        assert prom.values("sum(streamrec_worker_up)") == {(): 1.0}


def test_loads_evaluates_and_fires_the_alert_rules(prometheus_binary, exporter):
    """The real server loads deploy/prometheus/rules.yml, evaluates every rule without error,
    and the rules react to the exporter's series (fired, pending, inactive)."""
    reg, target = exporter
    up = Gauge("streamrec_worker_up", "test gauge", registry=reg)
    up.set(1)
    raised = Counter("streamrec_anomalies_raised", "test counter", ["kind", "level"], registry=reg)
    raised.labels("surge", "item")  # pre-initialised at 0
    expected = {
        r["alert"]
        for g in yaml.safe_load(DEFAULT_RULES.read_text())["groups"]
        for r in g["rules"]
        if "alert" in r
    }
    with LocalPrometheus([target], rules_files=[DEFAULT_RULES]) as prom:
        prom.wait_for('streamrec_anomalies_raised_total{kind="surge"} == 0', 30)

        def rules() -> dict[str, dict]:
            return {r["name"]: r for g in prom.rule_groups() for r in g["rules"]}

        def wait_rules(pred, what: str) -> dict[str, dict]:
            deadline = time.monotonic() + 30
            while not pred(current := rules()):
                assert time.monotonic() < deadline, f"timed out waiting for {what}: {current}"
                time.sleep(0.3)
            return current

        got = wait_rules(
            lambda r: (
                all(not x["lastEvaluation"].startswith("0001") for x in r.values())
                and r["StreamrecNoWorkers"]["state"] == "inactive"
            ),
            "every rule evaluated with a worker up",
        )
        assert set(got) == expected
        bad = {name: r.get("lastError") for name, r in got.items() if r["health"] != "ok"}
        assert not bad, f"rules failing on a real server: {bad}"
        assert all(r["state"] == "inactive" for r in got.values()), {n: r["state"] for n, r in got.items()}

        # A surge is raised: the spike alert fires (no `for`); the worker stops being ready:
        # its alert goes pending (for: 5m).
        raised.labels("surge", "item").inc()
        up.set(0)
        wait_rules(
            lambda r: (
                r["StreamrecDemandSpikeRaised"]["state"] == "firing"
                and r["StreamrecWorkerNotReady"]["state"] == "pending"
            ),
            "the spike alert firing and the not-ready alert pending",
        )
        (alert,) = [
            a
            for a in prom.api("alerts")["alerts"]
            if a["labels"]["alertname"] == "StreamrecDemandSpikeRaised"
        ]
        assert alert["labels"]["kind"] == "surge" and alert["labels"]["severity"] == "info"
        assert alert["annotations"]["runbook_url"] == "docs/operators.md#streamrecdemandspikeraised"


def test_fixed_port_in_use_is_a_clear_error(prometheus_binary, exporter):
    _, target = exporter
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        prom = LocalPrometheus([target], port=port, startup_timeout_s=20)
        with pytest.raises(PrometheusError, match="address already in use"):
            prom.start()
        assert prom._proc is None  # nothing left running


def test_missing_binary_and_bad_arguments():
    with pytest.raises(PrometheusError, match="apt-get install -y prometheus"):
        find_binary("prometheus-not-installed-here")
    with pytest.raises(ValueError, match="at least one scrape target"):
        LocalPrometheus([])
    with pytest.raises(PrometheusError, match="does not exist"):
        LocalPrometheus(["127.0.0.1:1"], rules_files=["/nonexistent/rules.yml"])


def test_query_errors_are_reported(prometheus_binary, exporter):
    _, target = exporter
    with LocalPrometheus([target]) as prom:
        with pytest.raises(PrometheusError, match="bad_data"):
            prom.query("sum(")
