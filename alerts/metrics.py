"""Prometheus metrics of the demand monitor (default registry, prefix ``streamrec_``).

Labels are bounded: ``kind`` is surge|drop, ``level`` is item|category.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

anomalies_raised = Counter(
    "streamrec_anomalies_raised",
    "Demand anomalies raised, by kind (surge, drop) and level.",
    ["kind", "level"],
)
anomalies_active = Gauge(
    "streamrec_anomalies_active",
    "Demand anomalies active after the last window this worker closed, by kind and level.",
    ["kind", "level"],
)
demand_events = Counter(
    "streamrec_demand_events", "Events counted into demand windows (not late, not search)."
)

for _kind in ("surge", "drop"):
    for _level in ("item", "category"):
        anomalies_raised.labels(_kind, _level)
        anomalies_active.labels(_kind, _level)
