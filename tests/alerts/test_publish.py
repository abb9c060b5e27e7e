"""Alert records on a real Kafka topic, and the worker hook (demand_hook) end to end."""

from __future__ import annotations

import time

import msgspec
import pytest
from confluent_kafka import Consumer
from support.demand import INJECT_AT, active_windows_after, batches, with_surge
from support.schemas import assert_valid

from alerts.hook import DemandHook, demand_hook
from alerts.models import AnomalyAlert, decode_alert, encode_alert
from alerts.monitor import DemandMonitor
from alerts.publish import AlertPublisher, publish_alerts
from streamrec.kafka import KafkaProducer, ensure_topics
from streamrec.settings import Settings


def consume(settings: Settings, topic: str, n: int, timeout: float = 30.0) -> list[tuple[bytes, bytes]]:
    """Read ``n`` records (key, value) from the start of ``topic`` (fails after ``timeout`` s)."""
    consumer = Consumer(
        {
            **settings.kafka.librdkafka_config(),
            "group.id": settings.kafka.consumer_group + "-alerts-test",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    out: list[tuple[bytes, bytes]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < n and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            assert_valid("alerts", msg.value())
            out.append((msg.key(), msg.value()))
    finally:
        consumer.close()
    assert len(out) == n, f"consumed {len(out)} of {n} alert records from {topic} within {timeout:.0f}s"
    return out


def _alert(**kw: object) -> AnomalyAlert:
    base = dict(
        key="85123A",
        level="item",
        kind="surge",
        state="raised",
        observed=12.0,
        expected=1.5,
        score=9.2,
        window_start=1_296_550_800_000,
        window_end=1_296_554_400_000,
        raised_at=1_700_000_000_000,
    )
    base.update(kw)
    return AnomalyAlert(**base)  # type: ignore[arg-type]


def test_alert_json_round_trip_and_validation() -> None:
    a = _alert()
    assert decode_alert(encode_alert(a)) == a
    assert a.record_key == "item:85123A"
    with pytest.raises(msgspec.ValidationError):
        decode_alert(encode_alert(a).replace(b'"surge"', b'"spike"'))


def test_alerts_published_to_a_real_topic_are_consumed_back(settings: Settings) -> None:
    topic = settings.topics.alerts
    ensure_topics(settings)
    alerts = [_alert(), _alert(key="lantern", level="category", kind="drop", observed=0.0, expected=14.0)]
    producer = KafkaProducer(settings)
    assert publish_alerts(producer, topic, alerts) == 2
    assert publish_alerts(producer, topic, []) == 0
    got = consume(settings, topic, 2)
    assert sorted((k, decode_alert(v)) for k, v in got) == sorted((a.record_key.encode(), a) for a in alerts)


def test_demand_hook_publishes_the_surge(settings: Settings, redis_client, retail_slice) -> None:
    df, cats = retail_slice
    ensure_topics(settings)
    item = "84378"
    wins = active_windows_after(df, INJECT_AT, 3)
    stream = with_surge(df, item, cats[item], wins, buyers=8)
    stream = stream[stream["ts"] < (wins[-1] + 3) * 3_600_000]  # through the raise, not the clear
    ids = sorted(cats)
    publisher = AlertPublisher(KafkaProducer(settings), settings.topics.alerts)
    hook = demand_hook(settings, redis_client, {i: cats[i] for i in ids}, publisher)
    assert isinstance(hook, DemandHook) and isinstance(hook.monitor, DemandMonitor)

    for evs in batches(stream):  # as the pipeline's worker thread calls it
        hook.run_blocking(evs, set())
    hook.run_blocking([], set())  # an empty batch is a no-op
    active = hook.monitor.state().active_keys()
    assert (f"i:{item}", 1) in active  # 1 = SURGE
    # Every active alert was published once, as a raised record (nothing cleared yet).
    records = [decode_alert(v) for _, v in consume(settings, settings.topics.alerts, len(active))]
    assert {(f"{'i' if a.level == 'item' else 'c'}:{a.key}", a.state) for a in records} == {
        (k, "raised") for k, _ in active
    }
