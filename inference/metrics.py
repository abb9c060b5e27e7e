"""Prometheus metrics of the encoder and the scorer (default registry, prefix ``streamrec_``).

Declared once at import time. ``inference.encoder`` updates the encoder metrics and the model
info; ``inference.scoring`` the scoring histograms. Labels are bounded: ``provider`` is one of
ONNX Runtime's execution providers, the model info holds the one served model.
"""

from __future__ import annotations

from prometheus_client import Gauge, Histogram, Info

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

encoder_batch_size = Histogram(
    "streamrec_encoder_batch_size", "Texts per encoder (ONNX Runtime) batch.", buckets=_BATCH_BUCKETS
)
encoder_seconds = Histogram(
    "streamrec_encoder_seconds",
    "Wall time of one encoder batch: tokenisation and ONNX Runtime inference.",
    buckets=_LATENCY_BUCKETS,
)
encoder_provider = Gauge(
    "streamrec_encoder_provider",
    "1 for the ONNX Runtime execution provider the encoder actually uses, 0 for the others.",
    ["provider"],
)
model = Info("streamrec_model", "The served encoder model: version, base model and ONNX variant.")
scoring_seconds = Histogram(
    "streamrec_scoring_seconds",
    "Wall time of one scoring batch (context blend, top-k, softmax, filters, MMR, reasons).",
    buckets=_LATENCY_BUCKETS,
)
user_model_seconds = Histogram(
    "streamrec_user_model_seconds",
    "Wall time of one user-model batch (features from the profiles' recent events, ONNX Runtime).",
    buckets=_LATENCY_BUCKETS,
)
scoring_batch_users = Histogram(
    "streamrec_scoring_batch_users", "Users scored together in one scoring batch.", buckets=_BATCH_BUCKETS
)

KNOWN_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
for _p in KNOWN_PROVIDERS:  # pre-initialised: dashboards show 0 rather than "no data"
    encoder_provider.labels(provider=_p).set(0)


def set_provider(provider: str) -> None:
    """Mark ``provider`` as the one in use (1) and every other known provider 0."""
    for p in {*KNOWN_PROVIDERS, provider}:
        encoder_provider.labels(provider=p).set(1 if p == provider else 0)


def set_model(version: str, base_model: str, variant: str) -> None:
    """Publish the served model (``streamrec_model_info``)."""
    model.info({"version": version, "base_model": base_model, "variant": variant})
