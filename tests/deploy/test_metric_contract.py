"""The metric names of the dashboards and alert rules are the ones the workers expose.

``deploy_metric_names()`` extracts every ``streamrec_*`` series name used by a Grafana panel
(or template variable) under deploy/grafana/dashboards and by an alert rule of
deploy/prometheus/rules.yml. ``exposed_names()`` and ``scraped_names()`` give what a
registry or a live /metrics scrape exposes, so a live-scrape test can assert
``deploy_metric_names() <= scraped_names(text)``.

Reuse from another test module in this folder: ``from test_metric_contract import deploy_metric_names``.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO / "deploy" / "grafana" / "dashboards"
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
METRICS_MODULES = ("streams.metrics", "profiles.metrics", "inference.metrics", "alerts.metrics")

_NAME = re.compile(r"\bstreamrec_[A-Za-z0-9_]*[A-Za-z0-9]")
_BY = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
# Labels Prometheus or the scrape config attach to every target (not declared by the workers).
TARGET_LABELS = {"job", "instance", "gpu", "namespace", "pod", "container", "le"}

# The contract (see the metric modules): name as declared -> (type, label names).
CONTRACT: dict[str, tuple[str, tuple[str, ...]]] = {
    # streams/metrics.py
    "streamrec_events_consumed": ("counter", ("type",)),
    "streamrec_events_valid": ("counter", ("type",)),
    "streamrec_events_dead_lettered": ("counter", ("reason",)),
    "streamrec_batch_size": ("histogram", ()),
    "streamrec_batch_processing_seconds": ("histogram", ()),
    "streamrec_consumer_lag": ("gauge", ("topic", "partition")),
    "streamrec_worker_up": ("gauge", ()),
    "streamrec_dependency_up": ("gauge", ("dependency",)),
    "streamrec_rebalances": ("counter", ()),
    "streamrec_results_published": ("counter", ()),
    "streamrec_pushes_recovered": ("counter", ()),
    "streamrec_pushes_handed_over": ("counter", ()),
    "streamrec_scoring_process_restarts": ("counter", ()),
    "streamrec_event_to_result_seconds": ("histogram", ()),
    "streamrec_stage_seconds": ("histogram", ("stage",)),
    "streamrec_recommendation_requests": ("counter", ("status",)),
    # profiles/metrics.py
    "streamrec_profile_writes": ("counter", ()),
    "streamrec_profile_events_skipped": ("counter", ("reason",)),
    "streamrec_redis_seconds": ("histogram", ("op",)),
    "streamrec_profile_cache": ("counter", ("result",)),
    # inference/metrics.py
    "streamrec_encoder_batch_size": ("histogram", ()),
    "streamrec_encoder_seconds": ("histogram", ()),
    "streamrec_encoder_provider": ("gauge", ("provider",)),
    "streamrec_model": ("info", ("version", "base_model", "variant")),
    "streamrec_scoring_seconds": ("histogram", ()),
    "streamrec_scoring_batch_users": ("histogram", ()),
    # alerts/metrics.py
    "streamrec_anomalies_raised": ("counter", ("kind", "level")),
    "streamrec_anomalies_active": ("gauge", ("kind", "level")),
    "streamrec_demand_events": ("counter", ()),
}

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "enum": ("",),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "unknown": ("",),
}


def series_names(name: str, kind: str) -> set[str]:
    """The series names a metric family of this type exposes (``foo`` counter -> ``foo_total``...)."""
    return {name + suffix for suffix in _SUFFIXES[kind]}


def _walk_exprs(node: object) -> Iterator[str]:
    """Every PromQL string of a Grafana dashboard: panel targets and template variable queries."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                yield value
            elif key == "query" and isinstance(value, str):
                yield value
            else:
                yield from _walk_exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk_exprs(item)


def dashboard_exprs() -> list[str]:
    """PromQL of every dashboard JSON under deploy/grafana/dashboards."""
    files = sorted(DASHBOARDS.glob("*.json"))
    assert files, f"no dashboard JSON under {DASHBOARDS}"
    return [e for f in files for e in _walk_exprs(json.loads(f.read_text()))]


def alert_rules() -> list[dict]:
    """Every rule of deploy/prometheus/rules.yml."""
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def rule_exprs() -> list[str]:
    return [r["expr"] for r in alert_rules()]


def metric_names_in(exprs: list[str]) -> set[str]:
    return {m for e in exprs for m in _NAME.findall(e)}


def deploy_metric_names() -> set[str]:
    """Every ``streamrec_*`` series name used by a dashboard panel or an alert rule."""
    return metric_names_in(dashboard_exprs()) | metric_names_in(rule_exprs())


def exposed_names(registry: CollectorRegistry = REGISTRY) -> set[str]:
    """Series names the registry's metric families expose, labelled children or not.

    A labelled metric with no child yet has no sample, but it is declared: its names count.
    """
    names: set[str] = set()
    for family in registry.collect():
        names |= series_names(family.name, family.type)
        names |= {s.name for s in family.samples}
    return names


def scraped_names(text: str) -> set[str]:
    """Series names present in a /metrics scrape (Prometheus text format)."""
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def contract_series_names() -> set[str]:
    return {n for name, (kind, _) in CONTRACT.items() for n in series_names(name, kind)}


# -- tests ------------------------------------------------------------------------------------------


def test_extraction_finds_names_in_panels_and_rules():
    dash, rules = metric_names_in(dashboard_exprs()), metric_names_in(rule_exprs())
    # Spot checks of the parser on both sources (histogram buckets, counters, info).
    assert {"streamrec_event_to_result_seconds_bucket", "streamrec_model_info"} <= dash
    assert {"streamrec_events_consumed_total", "streamrec_consumer_lag", "streamrec_worker_up"} <= rules
    assert deploy_metric_names() == dash | rules
    assert not any(n.endswith("_") for n in deploy_metric_names())


def test_every_used_name_is_in_the_contract():
    unknown = deploy_metric_names() - contract_series_names()
    assert not unknown, (
        f"dashboards/rules use metrics outside the contract: {sorted(unknown)}; fix the name or add the "
        "metric to its package's metrics module and to CONTRACT"
    )


def test_grouping_labels_are_declared():
    declared = {lbl for _, labels in CONTRACT.values() for lbl in labels} | TARGET_LABELS
    used = {
        lbl.strip()
        for e in dashboard_exprs() + rule_exprs()
        for group in _BY.findall(e)
        for lbl in group.split(",")
        if lbl.strip()
    }
    assert used, "no `by (...)` clause found: the parser is broken"
    assert used <= declared, f"labels not declared by any metric: {sorted(used - declared)}"


def test_contract_metrics_all_used():
    """Every contract metric is on the dashboard or in a rule (nothing exported unseen)."""
    used = deploy_metric_names()
    unused = [n for n, (kind, _) in CONTRACT.items() if not series_names(n, kind) & used]
    assert not unused, f"contract metrics on no dashboard panel and in no rule: {unused}"


def test_metrics_modules_expose_every_deploy_name():
    """Import the four metrics modules; the default REGISTRY must expose every used name."""
    missing_modules = []
    for mod in METRICS_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name and mod.startswith(exc.name):
                missing_modules.append(mod)
            else:
                raise
    if missing_modules:
        pytest.fail(
            f"metrics modules not written yet: {missing_modules}; each package declares its "
            "streamrec_* metrics there at import time (see CONTRACT)"
        )
    missing = deploy_metric_names() - exposed_names(REGISTRY)
    assert not missing, (
        f"dashboards/rules use {sorted(missing)}, which no metrics module declares; "
        "declare them (see CONTRACT) or fix deploy/"
    )
    # Types and label names as the contract says (the dashboards group by these labels).
    collectors = REGISTRY._names_to_collectors  # noqa: SLF001 - the only way to read label names
    for name, (kind, labels) in CONTRACT.items():
        key = name + "_info" if kind == "info" else name
        collector = collectors.get(key) or collectors.get(name)
        assert collector is not None, f"{name} is not registered"
        assert getattr(collector, "_type", kind) == kind, f"{name} is a {collector._type}, contract: {kind}"
        if kind == "info":  # an Info's labels are the keys of .info({...}), not label names
            continue
        assert tuple(getattr(collector, "_labelnames", ())) == labels, (
            f"{name} has labels {collector._labelnames}, contract: {labels}"
        )


def test_exposed_and_scraped_names_helpers():
    """The helpers see through prometheus_client's suffixes (checked on a private registry)."""
    from prometheus_client import Counter, Gauge, Histogram, Info, generate_latest

    reg = CollectorRegistry()
    c = Counter("streamrec_t_events", "t", ["type"], registry=reg)
    Histogram("streamrec_t_seconds", "t", registry=reg)
    Gauge("streamrec_t_up", "t", registry=reg).set(1)
    Info("streamrec_t_model", "t", registry=reg).info({"version": "v1"})
    exposed = exposed_names(reg)
    assert {"streamrec_t_events_total", "streamrec_t_seconds_bucket", "streamrec_t_seconds_count"} <= exposed
    assert {"streamrec_t_up", "streamrec_t_model_info"} <= exposed
    scraped = scraped_names(generate_latest(reg).decode())
    assert "streamrec_t_events_total" not in scraped  # labelled, no child yet: not in a scrape
    c.labels("view").inc()
    assert "streamrec_t_events_total" in scraped_names(generate_latest(reg).decode())
    assert {"streamrec_t_seconds_bucket", "streamrec_t_model_info", "streamrec_t_up"} <= scraped
