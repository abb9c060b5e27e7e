"""The one Kafka producer module: every record streamrec writes goes through :class:`KafkaProducer`.

Dead letters, pushed results, alerts and the dataset replayer share one configuration
builder (:func:`producer_config`: acks=all, idempotence, lz4, a short linger), one bounded
retry when librdkafka's local queue is full, delivery errors collected per topic, and
flush-or-raise. A worker builds one producer and hands it to every component that writes.

:func:`consumer_config` is the matching builder for the confluent-kafka consumers of tools
and tests; :func:`ensure_topics` creates the application's topics through the admin client.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Sequence
from typing import Any

from streamrec.settings import Settings

# Delivery errors kept per topic until a flush takes them (beyond: dropped, the flush still raises
# on what it waited for)
MAX_KEPT_ERRORS = 10_000

__all__ = [
    "KafkaProducer",
    "ProduceError",
    "arrived",
    "consumer_config",
    "ensure_topics",
    "producer_config",
    "timing_consumer_config",
]

Headers = Sequence[tuple[str, bytes]]


class ProduceError(RuntimeError):
    """Records could not be queued or delivered; the message says how many, where and why."""


def producer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """librdkafka producer properties from the settings (security included), then ``overrides``."""
    return {
        **settings.kafka.librdkafka_config(),
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": settings.kafka.linger_ms,
        "batch.num.messages": 10000,
        "compression.type": "lz4",
        **overrides,
    }


def consumer_config(settings: Settings, group_id: str, **overrides: Any) -> dict[str, Any]:
    """librdkafka consumer properties from the settings, reading from the earliest offset."""
    return {
        **settings.kafka.librdkafka_config(),
        "group.id": group_id,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        **overrides,
    }


def timing_consumer_config(settings: Settings, group_id: str, **overrides: Any) -> dict[str, Any]:
    """:func:`consumer_config` for a reader that times arrivals (with :func:`arrived`): the broker
    answers a fetch within 5 ms instead of librdkafka's 500 when no record is there yet."""
    return consumer_config(settings, group_id, **{"fetch.wait.max.ms": 5, **overrides})


def arrived(consumer: Any, wait_s: float = 0.1, max_records: int = 1000) -> list[Any]:
    """A confluent-kafka consumer's records as soon as one is there (at most ``wait_s`` for the
    first): ``poll`` wakes on the first record, then what else is already fetched is taken
    without waiting. For readers that time arrivals: ``consume(n, timeout)`` waits for n records
    or the whole timeout, which would add up to the timeout to every measured latency."""
    first = consumer.poll(wait_s)
    if first is None:
        return []
    return [first, *consumer.consume(num_messages=max_records, timeout=0)]


class KafkaProducer:
    """A confluent-kafka producer with bounded back-pressure and per-topic delivery errors.

    ``produce`` never blocks longer than ``queue_full_timeout_s`` when the local queue is full
    (it polls so deliveries drain, then raises :class:`ProduceError`); ``flush`` waits for
    every queued record and raises when some are still queued or failed.
    """

    def __init__(self, settings: Settings, *, queue_full_timeout_s: float = 30.0, **overrides: Any) -> None:
        from confluent_kafka import Producer

        self.queue_full_timeout_s = queue_full_timeout_s
        self._producer = Producer(producer_config(settings, **overrides))
        self._lock = threading.Lock()
        self.delivered = 0
        self._errors: dict[str, list[tuple[bytes | None, str]]] = {}  # topic -> (record key, error)

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is None:
            self.delivered += 1
            return
        with self._lock:
            errs = self._errors.setdefault(msg.topic() or "?", [])
            if len(errs) < MAX_KEPT_ERRORS:
                errs.append((msg.key(), str(err)))

    def produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | str | None = None,
        headers: Headers | None = None,
        partition: int | None = None,
    ) -> None:
        """Queue one record (to ``partition``, or by key); waits (bounded) only while the queue is full."""
        deadline: float | None = None
        extra: dict[str, Any] = {} if partition is None else {"partition": partition}
        while True:
            try:
                self._producer.produce(
                    topic,
                    value=value,
                    key=key,
                    headers=list(headers) if headers else None,
                    on_delivery=self._on_delivery,
                    **extra,
                )
                return
            except BufferError as exc:
                now = time.monotonic()
                deadline = deadline if deadline is not None else now + self.queue_full_timeout_s
                if now >= deadline:
                    raise ProduceError(
                        f"the producer's local queue stayed full for {self.queue_full_timeout_s:.0f}s "
                        f"producing to {topic!r}: the brokers do not take records fast enough; check "
                        "`streamrec status` and the broker log"
                    ) from exc
                self._producer.poll(0.05)

    def poll(self, timeout: float = 0.0) -> int:
        """Serve delivery callbacks; returns how many were served."""
        return int(self._producer.poll(timeout))

    def take_errors(self, topic: str | None = None, keys: Collection[bytes] | None = None) -> list[str]:
        """Delivery errors seen so far (of ``topic``, or all; of the records keyed ``keys``, or
        all), cleared by the call; the others stay for their owners."""
        with self._lock:
            topics = list(self._errors) if topic is None else [topic]
            taken: list[str] = []
            for t in topics:
                errs = self._errors.pop(t, [])
                if keys is None:
                    taken += [e for _, e in errs]
                    continue
                rest = [(k, e) for k, e in errs if k not in keys]
                taken += [e for k, e in errs if k in keys]
                if rest:
                    self._errors[t] = rest
            return taken

    def flush(
        self, timeout: float = 30.0, topic: str | None = None, keys: Collection[bytes] | None = None
    ) -> None:
        """Wait until every queued record is delivered; raise :class:`ProduceError` otherwise.

        With ``topic`` only that topic's delivery errors raise, with ``keys`` only those of the
        records with these keys (e.g. one round's users): the others stay for their owner.
        Records still queued at the timeout always raise (they may be anyone's).
        """
        left = int(self._producer.flush(timeout))
        errors = self.take_errors(topic, keys)
        if left or errors:
            where = f"to {topic!r}" if topic else "to Kafka"
            raise ProduceError(
                f"{left} record(s) still queued after {timeout:.0f}s and {len(errors)} failed producing {where} "
                f"(first error: {errors[:1]}); check that the topic exists and the brokers at "
                "STREAMREC_KAFKA_BOOTSTRAP_SERVERS answer (`streamrec status`)"
            )

    def wait_delivered(self, timeout: float = 30.0) -> int:
        """Wait until every queued record is delivered or failed; the records still queued after
        ``timeout``. Delivery errors are left for :meth:`flush` callers (whose records they are)."""
        return int(self._producer.flush(timeout))

    def __len__(self) -> int:
        """Records queued and not yet delivered."""
        return len(self._producer)


def ensure_topics(
    settings: Settings, extra: dict[str, int] | None = None, timeout: float = 15.0
) -> list[str]:
    """Create the application's topics with the configured partitions (admin client).

    Returns the names that were created; existing topics are left as they are.
    """
    from confluent_kafka.admin import AdminClient, NewTopic

    t = settings.topics
    wanted = {t.events: t.partitions, t.results: t.partitions, t.dead_letter: t.partitions, t.alerts: 1}
    wanted.update(extra or {})
    admin = AdminClient(settings.kafka.librdkafka_config())
    existing = set(admin.list_topics(timeout=timeout).topics)
    new = [
        NewTopic(name, num_partitions=n, replication_factor=t.replication_factor)
        for name, n in wanted.items()
        if name not in existing
    ]
    created = []
    if new:
        for name, fut in admin.create_topics(new, operation_timeout=timeout).items():
            try:
                fut.result(timeout)
                created.append(name)
            except Exception as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise
    return created
