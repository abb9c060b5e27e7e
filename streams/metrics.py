"""Prometheus metrics of the stream worker (default registry, prefix ``streamrec_``).

Declared once at import time; every module of ``streams`` updates these objects. Labels are
bounded: event types (or ``unknown``), dead-letter reasons, topic/partition of the events topic.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

events_consumed = Counter(
    "streamrec_events_consumed",
    "Records read from the events topic, by event type ('unknown' if invalid).",
    ["type"],
)
events_valid = Counter(
    "streamrec_events_valid", "Records that decoded and validated as events, by type.", ["type"]
)
events_dead_lettered = Counter(
    "streamrec_events_dead_lettered", "Records sent to the dead-letter topic, by reason.", ["reason"]
)
batch_size = Histogram("streamrec_batch_size", "Records per processed batch.", buckets=_BATCH_BUCKETS)
batch_processing_seconds = Histogram(
    "streamrec_batch_processing_seconds",
    "Wall time of one batch: validation, dead letters, profile update, hooks.",
    buckets=_LATENCY_BUCKETS,
)
consumer_lag = Gauge(
    "streamrec_consumer_lag",
    "Records of the events topic not yet processed (end offset - next offset to process).",
    ["topic", "partition"],
)
worker_up = Gauge("streamrec_worker_up", "1 while the stream worker is running and ready to process.")
dependency_up = Gauge(
    "streamrec_dependency_up",
    "1 while the worker reaches the service (redis: PING every second; kafka: the last batch's writes).",
    ["dependency"],
)
rebalances = Counter("streamrec_rebalances", "Consumer-group rebalances seen by this worker.")
scoring_process_restarts = Counter(
    "streamrec_scoring_process_restarts",
    "Scoring child processes started again after one died (streams/scoring_backend.py).",
)
pushes_recovered = Counter(
    "streamrec_pushes_recovered",
    "Users owed a push (changed, no delivered list) taken up at start, rebalance or Redis's return.",
)
pushes_handed_over = Counter(
    "streamrec_pushes_handed_over",
    "Users not pushed yet at a partition revocation, left (still owed) to the partitions' next owner.",
)
results_published = Counter(
    "streamrec_results_published", "Recommendation lists published to the results topic."
)
event_to_result_seconds = Histogram(
    "streamrec_event_to_result_seconds",
    "From an event's time to its recommendation list being published.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0),
)
recommendation_requests = Counter(
    "streamrec_recommendation_requests", "Pull requests for recommendations, by status.", ["status"]
)

# Where each millisecond goes, event → pushed list. Stages, in path order:
#   kafka_to_batch  record create time (producer clock) → its batch starts processing
#   validate        decode + catalog check;  dead_letters  produce + wait for delivery
#   encode_queries  search queries through the encoder;  profiles  Redis read, apply, write
#   hooks           demand monitor, popularity, push bookkeeping (run concurrently)
#   push_wait       profile changed → its scoring round starts (leading edge ≈ 0; coalescing)
#   score           the round trip to the scorer, per round: score_read (profiles read) and
#                   score_compute (the scorer) inside it, the rest transport and waits
#   publish         serialise + queue to Kafka
stage_seconds = Histogram(
    "streamrec_stage_seconds",
    "Seconds spent per stage of the event → pushed recommendation path (see streams/metrics.py).",
    ["stage"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0),
)
