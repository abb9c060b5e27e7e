"""The real stack end to end: producer → Kafka → `streamrec worker` (faust) → Redis profiles.

Profiles are compared with the plain-numpy reference (tests/profiles/profile_reference.py).
"""

from __future__ import annotations

import threading

import orjson
import pytest
from support.profile_reference import (
    generate_events,
)
from support.schemas import assert_valid
from support.worker import check_reference, committed_equals_end, read_topic, total_applied, wait_until

from devstack.produce import EventProducer
from profiles.store import ProfileStore
from streams.validation import parse_dead_letter_headers

pytestmark = pytest.mark.timeout(300)


def _malformed() -> list[tuple[bytes | None, str]]:
    ok = {"v": 1, "event_id": "m1", "type": "view", "user_id": "mx", "ts": 1_700_000_000_000, "item_id": "i1"}
    return [
        (b"this is not json", "not_json"),
        (orjson.dumps({**ok, "event_id": "m2", "ts": "yesterday"}), "bad_type"),
        (orjson.dumps({k: v for k, v in ok.items() if k != "user_id"} | {"event_id": "m3"}), "missing_field"),
        (orjson.dumps({**ok, "event_id": "m4", "type": "teleport"}), "unknown_type"),
        (orjson.dumps({**ok, "event_id": "m5", "ts": 5}), "bad_timestamp"),
        (orjson.dumps({**ok, "event_id": "m6"})[:-1] + b', "price": NaN}', "not_json"),
        (orjson.dumps({**ok, "event_id": "m7", "category": "x" * 20_000}), "oversized"),
        (orjson.dumps({**ok, "event_id": "m8", "item_id": "no-such-item"}), "unknown_item"),
        (orjson.dumps({**ok, "event_id": "m9", "price": -3.0}), "bad_value"),
        (None, "empty"),
    ]


def test_replay_equals_reference_with_duplicates_and_dead_letters(settings, topics, redis_client, worker):
    events = generate_events(30, 1500, seed=11)
    for e in events:  # the produced events follow the published schema
        assert_valid("events", e)
    bad = _malformed()
    prod = EventProducer(settings)
    for e in events[:1000]:
        prod.send(e)
    for value, _ in bad:  # malformed records interleaved with valid ones (same batches)
        prod.send_raw(value, b"mx")
    for e in events[1000:]:
        prod.send(e)
    for e in events[200:500]:  # a producer retry re-sends events: same ids, new offsets
        prod.send(e)
    prod.flush()

    w = worker().start()
    w.wait_ready()
    store = ProfileStore(redis_client, settings)
    users = {e.user_id for e in events}
    wait_until(lambda: committed_equals_end(settings), 120, "every record processed and committed")
    assert total_applied(store, users) == len(events)
    check_reference(store, events, settings)
    assert store.get_profile("mx") is None  # none of the malformed records was applied

    letters = read_topic(settings, settings.topics.dead_letter, expect=len(bad))
    assert len(letters) == len(bad)
    by_value = {m.value(): parse_dead_letter_headers(m.headers()) for m in letters}
    for value, reason in bad:
        h = by_value[value]  # original bytes kept as the value
        assert_valid("dead-letter-headers", h)
        assert h["reason"] == reason, (value, h)
        assert h["topic"] == settings.topics.events and int(h["offset"]) >= 0 and 0 <= int(h["partition"]) < 4
        assert h["detail"]
    assert w.metric("streamrec_events_dead_lettered_total") == len(bad)
    assert w.metric("streamrec_profile_events_skipped_total", 'reason="duplicate"') == 300
    assert w.metric("streamrec_worker_up") == 1.0
    assert w.get("/healthz")[0] == 200
    assert w.stop() == 0


def test_crash_before_commit_and_graceful_stop_lose_nothing_and_apply_nothing_twice(
    settings, topics, redis_client, worker
):
    events = generate_events(25, 2400, seed=12)
    first, second, third = events[:800], events[800:1400], events[1400:]
    store = ProfileStore(redis_client, settings)
    users = {e.user_id for e in events}
    prod = EventProducer(settings)
    prod.send_many(first)
    prod.flush()

    # Offsets are committed only every 10 minutes: a kill -9 leaves everything uncommitted.
    make = lambda: worker(STREAMREC_STREAM_COMMIT_INTERVAL_S="600", STREAMREC_STREAM_BATCH_MAX="50")  # noqa: E731
    w1 = make().start()
    w1.wait_ready()
    wait_until(lambda: total_applied(store, users) == len(first), 120, "the first part applied")
    w1.kill()
    assert not committed_equals_end(settings)

    # While no worker runs, more events arrive; the restarted worker re-reads the first part.
    prod.send_many(second)
    prod.flush()
    w2 = make().start()
    w2.wait_ready()
    wait_until(
        lambda: total_applied(store, users) == len(first) + len(second), 120, "the second part applied"
    )
    assert w2.metric("streamrec_profile_events_skipped_total", 'reason="duplicate"') >= len(first)

    # Graceful stop in the middle of a stream that is still being produced.
    feeder = threading.Thread(target=lambda: _produce_slowly(settings, third))
    feeder.start()
    wait_until(lambda: total_applied(store, users) > len(first) + len(second), 60, "the third part started")
    assert w2.stop() == 0
    feeder.join()
    w3 = make().start()
    w3.wait_ready()
    wait_until(lambda: total_applied(store, users) == len(events), 120, "every event applied")
    check_reference(store, events, settings)
    assert w3.stop() == 0


def _produce_slowly(settings, events) -> None:
    from devstack.produce import replay

    replay(EventProducer(settings), events, total=len(events), rate=400, progress=False)
