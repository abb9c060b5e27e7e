"""Publishing alert records to the alerts topic (confluent-kafka)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from alerts.models import AnomalyAlert, encode_alert

__all__ = ["AlertPublishError", "publish_alerts"]


class AlertPublishError(RuntimeError):
    """Alerts could not be delivered to Kafka."""


def publish_alerts(
    producer: Any, topic: str, alerts: Sequence[AnomalyAlert], flush_timeout_s: float | None = 10.0
) -> int:
    """Produce ``alerts`` as JSON to ``topic`` (key ``<level>:<key>``); return how many were queued.

    ``producer`` is a ``confluent_kafka.Producer``. With ``flush_timeout_s`` the call waits until
    the broker acknowledged them and raises :class:`AlertPublishError` when some were not
    delivered (alerts are rare: a flush per batch that raised one is cheap); ``None`` only queues.
    """
    if not alerts:
        return 0
    errors: list[str] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    for alert in alerts:
        while True:
            try:
                producer.produce(
                    topic, key=alert.record_key.encode(), value=encode_alert(alert), on_delivery=on_delivery
                )
                break
            except BufferError:  # local queue full: let it drain
                producer.poll(0.1)
    producer.poll(0)
    if flush_timeout_s is not None:
        left = producer.flush(flush_timeout_s)
        if left:
            raise AlertPublishError(
                f"{left} alert record(s) to {topic!r} not delivered within {flush_timeout_s}s: "
                "check that the Kafka brokers answer"
            )
        if errors:
            raise AlertPublishError(f"alert delivery to {topic!r} failed: {errors[0]}")
    return len(alerts)
