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


def test_arrived_gives_what_is_fetched_in_one_call_and_nothing_from_an_empty_topic(settings) -> None:
    """The readers that time arrivals (the demo's live view, the bench) take records with
    ``arrived``: the first as soon as it is there, then every record already fetched."""
    from confluent_kafka import Consumer

    from streamrec.kafka import arrived, consumer_config

    ensure_topics(settings)
    topic = settings.topics.results
    consumer = Consumer(consumer_config(settings, f"{settings.kafka.consumer_group}-arrived"))
    consumer.subscribe([topic])
    try:
        assert arrived(consumer, 2.0) == []  # nothing produced: the wait ends empty
        producer = KafkaProducer(settings)
        for k in range(5):
            producer.produce(topic, b"r%d" % k, b"u")
        producer.flush(30.0)
        got: list[bytes] = []
        for _ in range(50):  # the first call may come before the fetch holds them all
            got += [m.value() for m in arrived(consumer, 1.0) if m.error() is None]
            if len(got) >= 5:
                break
        assert got == [b"r%d" % k for k in range(5)]  # in order, each once
    finally:
        consumer.close()


def test_timing_consumer_config_is_the_consumer_config_with_a_short_fetch_wait(settings) -> None:
    from streamrec.kafka import consumer_config, timing_consumer_config

    cfg = timing_consumer_config(settings, "g", **{"auto.offset.reset": "latest"})
    assert cfg == {**consumer_config(settings, "g"), "fetch.wait.max.ms": 5, "auto.offset.reset": "latest"}
