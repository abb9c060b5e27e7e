"""Publishing alert records to the alerts topic, through the worker's one Kafka producer."""

from __future__ import annotations

from collections.abc import Sequence

from alerts.models import AnomalyAlert, encode_alert
from streamrec.kafka import KafkaProducer, ProduceError

__all__ = ["AlertPublishError", "AlertPublisher", "publish_alerts"]


class AlertPublishError(ProduceError):
    """Alerts could not be delivered to Kafka."""


def publish_alerts(
    producer: KafkaProducer, topic: str, alerts: Sequence[AnomalyAlert], flush_timeout_s: float | None = 10.0
) -> int:
    """Produce ``alerts`` as JSON to ``topic`` (key ``<level>:<key>``); return how many were queued.

    With ``flush_timeout_s`` the call waits until the broker acknowledged them and raises
    :class:`AlertPublishError` when some were not delivered (alerts are rare: a flush per batch
    that raised one is cheap); ``None`` only queues.
    """
    if not alerts:
        return 0
    for alert in alerts:
        producer.produce(topic, encode_alert(alert), alert.record_key.encode())
    producer.poll(0)
    if flush_timeout_s is not None:
        try:
            producer.flush(flush_timeout_s, topic=topic)
        except ProduceError as exc:
            raise AlertPublishError(f"alerts: {exc}") from exc
    return len(alerts)


class AlertPublisher:
    """``publisher(alerts)``: the alerts topic of one producer."""

    def __init__(self, producer: KafkaProducer, topic: str) -> None:
        self.producer = producer
        self.topic = topic

    def __call__(self, alerts: Sequence[AnomalyAlert]) -> None:
        publish_alerts(self.producer, self.topic, alerts)
