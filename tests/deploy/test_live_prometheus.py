"""A real Prometheus server scrapes a real `streamrec worker` during a replay on the live stack.

Events (valid, malformed, re-sent) go through Kafka to the worker subprocess; LocalPrometheus
scrapes the worker's metrics port every second and the test reads the results back through
Prometheus' HTTP API: the counts match what was produced, and every dashboard/rule metric
declared by the worker's own packages (streams, profiles) is a series in Prometheus.
"""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.metrics import MetricWrapperBase
from support.profile_reference import generate_events
from test_metric_contract import deploy_metric_names, series_names

import profiles.metrics
import streams.metrics
from devstack.produce import EventProducer
from devstack.promstack import DEFAULT_RULES, LocalPrometheus

pytestmark = pytest.mark.timeout(300)


def declared_series(*modules) -> set[str]:
    """Series names of the metrics a module declares (attributes that are prometheus_client metrics)."""
    out: set[str] = set()
    for mod in modules:
        for obj in vars(mod).values():
            if isinstance(obj, MetricWrapperBase):
                for fam in obj.describe():
                    out |= series_names(fam.name, fam.type)
    return out


def test_prometheus_scrapes_worker_after_replay(settings, topics, worker):
    events = generate_events(12, 240, seed=3)
    prod = EventProducer(settings)
    for e in events:
        prod.send(e)
    for e in events[:20]:  # a producer retry: same event ids again (skipped as duplicates)
        prod.send(e)
    for _ in range(3):
        prod.send_raw(b"not json at all", b"bad-user")
    prod.flush()
    produced = len(events) + 20 + 3

    w = worker(STREAMREC_STREAM_LAG_INTERVAL_S="1").start()
    w.wait_ready()
    # A pull request (any status) makes the labelled request counter appear.
    try:
        urllib.request.urlopen(w.url(f"/recommendations/{events[0].user_id}"), timeout=10).read()
    except OSError:
        pass

    target = f"127.0.0.1:{settings.metrics_port}"
    with LocalPrometheus([target], rules_files=[DEFAULT_RULES], labels={"gpu": "false"}) as prom:
        got = prom.wait_for(f"sum(streamrec_events_consumed_total) == {produced}", 120)
        assert got, w.tail()
        assert prom.values("sum(streamrec_events_valid_total)") == {(): float(len(events) + 20)}
        assert prom.values("sum by (reason) (streamrec_events_dead_lettered_total)") == {
            (("reason", "not_json"),): 3.0
        }
        up = prom.wait_for("streamrec_worker_up == 1", 30)
        assert up[0]["metric"]["job"] == "streamrec-worker" and up[0]["metric"]["instance"] == target
        # Lag per partition of this test's events topic, worked off to 0.
        lag = prom.wait_for(
            f'sum by (partition) (streamrec_consumer_lag{{topic="{settings.topics.events}"}})',
            60,
            predicate=lambda r: (
                len(r) == settings.topics.partitions and all(float(x["value"][1]) == 0 for x in r)
            ),
        )
        assert sorted(int(x["metric"]["partition"]) for x in lag) == list(range(settings.topics.partitions))
        prom.wait_for('sum(streamrec_profile_events_skipped_total{reason="duplicate"}) == 20', 30)

        # Every dashboard/rule metric the worker's own packages declare is a series in Prometheus.
        expected = deploy_metric_names() & declared_series(streams.metrics, profiles.metrics)
        assert len(expected) >= 10
        missing = expected - prom.series_names()
        assert not missing, f"declared and used on dashboards/rules but not scraped: {sorted(missing)}"

        # The alert rules evaluate against the live series: nothing fires for a healthy worker.
        firing = prom.query('ALERTS{alertstate="firing"}')
        assert firing == [], firing
    assert w.stop() == 0
