"""Validation of raw records and the dead-letter topic.

Every record of the events topic is decoded with :func:`streamrec.events.decode` (strict schema,
version, timestamps, sizes, NaN/negative values); then the item ids of the whole batch are
checked against the catalog in one :meth:`ItemVectors.lookup`. A record that fails becomes a
:class:`DeadLetter`, produced to the dead-letter topic with:

* the **original bytes** as value and the original key (nothing re-encoded);
* headers ``streamrec.dlq.reason`` (bounded label: not_json, bad_type, missing_field,
  unknown_type, bad_timestamp, bad_value, bad_version, oversized, empty, unknown_item),
  ``streamrec.dlq.detail`` (the decoder's message, at most 1000 bytes),
  ``streamrec.dlq.topic`` / ``.partition`` / ``.offset`` (where it was read) and
  ``streamrec.dlq.ts`` (epoch ms when it was dead-lettered).

:func:`parse_dead_letter_headers` turns the headers back into a dict for tools and tests.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from streamrec.events import Event, EventType, InvalidEvent, decode
from streamrec.interfaces import ItemVectors
from streamrec.kafka import KafkaProducer, consumer_config
from streamrec.settings import Settings

log = logging.getLogger(__name__)

HEADER_PREFIX = "streamrec.dlq."
MAX_DETAIL_BYTES = 1000


@dataclass(slots=True)
class RawRecord:
    """One record as read from Kafka: undecoded value and where it came from."""

    value: bytes | None
    key: bytes | None = None
    topic: str = ""
    partition: int = -1
    offset: int = -1


@dataclass(slots=True)
class DeadLetter:
    """A record that is not a valid event, and why."""

    record: RawRecord
    reason: str
    detail: str

    def headers(self, now_ms: int | None = None) -> list[tuple[str, bytes]]:
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        r = self.record
        return [
            (HEADER_PREFIX + "reason", self.reason.encode()),
            (HEADER_PREFIX + "detail", self.detail.encode(errors="replace")[:MAX_DETAIL_BYTES]),
            (HEADER_PREFIX + "topic", r.topic.encode()),
            (HEADER_PREFIX + "partition", str(r.partition).encode()),
            (HEADER_PREFIX + "offset", str(r.offset).encode()),
            (HEADER_PREFIX + "ts", str(now_ms).encode()),
        ]


def parse_dead_letter_headers(headers: Sequence[tuple[str, bytes]] | None) -> dict[str, str]:
    """``{"reason": ..., "detail": ..., "topic": ..., "partition": ..., "offset": ..., "ts": ...}``."""
    return {
        k[len(HEADER_PREFIX) :]: v.decode(errors="replace")
        for k, v in (headers or [])
        if k.startswith(HEADER_PREFIX)
    }


@dataclass
class ValidatedBatch:
    """The valid events of a batch (with their records and item vectors) and the dead letters."""

    events: list[Event]
    records: list[RawRecord]
    item_vectors: np.ndarray  # (n, dim) float32; zero rows for searches
    dead: list[DeadLetter]


class Validator:
    """Decodes a batch of records and checks item ids against the catalog (vectorised)."""

    def __init__(self, items: ItemVectors | None) -> None:
        self.items = items
        self.dim = int(items.dim) if items is not None else 0

    def validate(self, records: Sequence[RawRecord], now_ms: int | None = None) -> ValidatedBatch:
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        events: list[Event] = []
        kept: list[RawRecord] = []
        dead: list[DeadLetter] = []
        for r in records:
            try:
                events.append(decode(r.value, now_ms=now_ms))
                kept.append(r)
            except InvalidEvent as exc:
                dead.append(DeadLetter(r, exc.reason, exc.detail))
            except Exception as exc:  # never let one record stop the worker
                dead.append(DeadLetter(r, "invalid", f"{type(exc).__name__}: {exc}"))
        vectors = np.zeros((len(events), self.dim), np.float32)
        if self.items is not None and events:
            need = [k for k, e in enumerate(events) if e.type is not EventType.SEARCH]
            if need:
                vecs, found = self.items.lookup([events[k].item_id or "" for k in need])
                need_arr = np.asarray(need, np.int64)
                found = np.asarray(found, bool)
                vectors[need_arr[found]] = vecs[found]
                missing = set(need_arr[~found].tolist())
                if missing:
                    for k in sorted(missing):
                        e = events[k]
                        dead.append(
                            DeadLetter(
                                kept[k], "unknown_item", f"item_id {e.item_id!r} is not in the catalog"
                            )
                        )
                    keep = [k for k in range(len(events)) if k not in missing]
                    events = [events[k] for k in keep]
                    kept = [kept[k] for k in keep]
                    vectors = vectors[keep]
        return ValidatedBatch(events, kept, vectors, dead)


class DeadLetterSink(Protocol):
    """Where dead letters go."""

    async def send(self, letters: Sequence[DeadLetter]) -> None: ...


class KafkaDeadLetterSink:
    """Produces dead letters to the dead-letter topic, exactly once per source record.

    ``send`` returns only when every letter is acknowledged by the broker, so the source
    offsets are committed only after their dead letters are safe.

    Exactly once across crashes and rebalances: the letter of a record read from partition p
    goes to partition p of the dead-letter topic (same partition count), so that partition is
    written only by the current owner of p, in offset order. Its last record's source offset
    is therefore the high-water mark of what was already dead-lettered: a batch redelivered
    after a crash (offsets not committed yet) skips the letters already written. The mark is
    read from the topic once per partition and ownership (:meth:`forget` on rebalance).
    """

    def __init__(
        self,
        producer: KafkaProducer,
        topic: str,
        flush_timeout_s: float = 30.0,
        tail_reader: Callable[[int], int | None] | None = None,
    ) -> None:
        self.producer = producer
        self.topic = topic
        self.flush_timeout_s = flush_timeout_s
        self.tail_reader = tail_reader  # dead-letter partition → last source offset written there
        self._marks: dict[tuple[str, int], int] = {}
        self.skipped = 0  # letters already in the topic (redelivered batches)

    def forget(self) -> None:
        """Partitions moved: read the high-water marks again before the next letters."""
        self._marks.clear()

    def _mark(self, r: RawRecord) -> int:
        key = (r.topic, r.partition)
        if key not in self._marks:
            last = self.tail_reader(r.partition) if self.tail_reader is not None else None
            self._marks[key] = -1 if last is None else last
        return self._marks[key]

    def _produce_and_flush(self, letters: Sequence[DeadLetter]) -> None:
        now_ms = int(time.time() * 1000)
        sent: dict[tuple[str, int], int] = {}
        # In source order: the marks assume each partition's letters are written in offset order.
        for d in sorted(letters, key=lambda d: (d.record.topic, d.record.partition, d.record.offset)):
            r = d.record
            exact = self.tail_reader is not None and r.partition >= 0 and r.offset >= 0
            if exact and r.offset <= max(self._mark(r), sent.get((r.topic, r.partition), -1)):
                self.skipped += 1
                continue
            part = r.partition if exact else None
            self.producer.produce(self.topic, r.value, r.key, d.headers(now_ms), partition=part)
            if exact:
                sent[(r.topic, r.partition)] = max(sent.get((r.topic, r.partition), -1), r.offset)
        self.producer.flush(self.flush_timeout_s, topic=self.topic)
        for key, off in sent.items():
            self._marks[key] = max(self._marks.get(key, -1), off)

    async def send(self, letters: Sequence[DeadLetter]) -> None:
        if letters:
            await asyncio.get_running_loop().run_in_executor(None, self._produce_and_flush, letters)


def dead_letter_tail_reader(settings: Settings) -> Callable[[int], int | None]:
    """``read(p)``: the source offset in the last record of dead-letter partition ``p`` (None if empty).

    Raises when the dead-letter topic has fewer partitions than the events topic (then the
    letters of a source partition could not stay in one partition).
    """
    from confluent_kafka import Consumer, TopicPartition

    topic = settings.topics.dead_letter
    conf = consumer_config(
        settings, f"{settings.kafka.consumer_group}-dlq-tail", **{"enable.partition.eof": True}
    )
    consumer = Consumer(conf)
    meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
    n = len(meta.partitions) if meta is not None and meta.error is None else 0
    if n < settings.topics.partitions:
        consumer.close()
        raise ValueError(
            f"dead-letter topic {topic!r} has {n} partitions, fewer than the events topic's "
            f"{settings.topics.partitions} (STREAMREC_TOPICS_PARTITIONS): give it as many partitions"
        )
    lock = threading.Lock()

    def read(partition: int) -> int | None:
        with lock:
            low, high = _watermarks(consumer, TopicPartition(topic, partition))
            if high <= low:
                return None
            consumer.assign([TopicPartition(topic, partition, high - 1)])
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                msg = consumer.poll(0.5)
                if msg is None or msg.error() is not None:
                    continue
                offset = parse_dead_letter_headers(msg.headers() or []).get("offset")  # type: ignore[arg-type]
                return int(offset) if offset is not None else None
            raise RuntimeError(f"could not read the last record of {topic}[{partition}] within 10 s")

    return read


def _watermarks(consumer: Any, tp: Any, timeout_s: float = 15.0) -> tuple[int, int]:
    """(low, high) offsets of ``tp``, retried while the partition's leader is being elected."""
    from confluent_kafka import KafkaException

    deadline = time.monotonic() + timeout_s
    delay = 0.1
    while True:
        try:
            low, high = consumer.get_watermark_offsets(tp, timeout=5)
            return int(low), int(high)
        except KafkaException:
            if time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
