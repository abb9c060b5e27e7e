"""The shared producer's delivery errors go to the flush of the records they belong to."""

from __future__ import annotations

import os

import pytest

from streamrec.kafka import KafkaProducer, ProduceError, ensure_topics


def test_a_failed_record_raises_in_its_own_keys_flush_only(settings) -> None:
    """One round's list rejected by the broker (too large) fails that round's confirmation, not
    a concurrent round's whose lists were delivered; the error is taken once."""
    ensure_topics(settings)
    topic = settings.topics.results
    # The producer accepts 3 MB, the broker 1 MB (its default message.max.bytes): a real delivery error.
    producer = KafkaProducer(settings, **{"message.max.bytes": 3_000_000})
    producer.produce(topic, os.urandom(1_500_000), b"u-bad")  # random bytes: lz4 cannot shrink them
    producer.produce(topic, b'{"items": []}', b"u-good")
    producer.flush(30.0, topic=topic, keys={b"u-good"})  # delivered: no error of its own
    with pytest.raises(ProduceError, match="1 failed"):
        producer.flush(30.0, topic=topic, keys={b"u-bad", b"u-other"})
    producer.flush(30.0, topic=topic, keys={b"u-bad"})  # taken once: nothing left for that key
    assert producer.take_errors() == []
