"""Prometheus metrics of the profile store (default registry, prefix ``streamrec_``)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

profile_writes = Counter("streamrec_profile_writes", "User profiles written to Redis.")
profile_events_skipped = Counter(
    "streamrec_profile_events_skipped",
    "Events not applied to a profile: duplicate (already applied), stale (older than the dedupe "
    "horizon), unknown_item (no item vector).",
    ["reason"],
)
redis_seconds = Histogram(
    "streamrec_redis_seconds",
    "Redis round trips of the profile store, by operation (read, write).",
    ["op"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
profile_cache = Counter(
    "streamrec_profile_cache",
    "Users of a batch by where their profile came from: hit (the copy the worker last wrote), miss "
    "(read from Redis), outdated (a cached copy the write found out of date: read again).",
    ["result"],
)
