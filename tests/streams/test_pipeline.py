"""EventPipeline in-process on real Redis and Kafka: hooks, dead letters, idempotency."""

from __future__ import annotations

import asyncio

import orjson
from support.profile_reference import (
    HashingEncoder,
    RandomItems,
    assert_profile_matches,
    generate_events,
    reference_profiles,
)
from support.worker import read_topic

from profiles.store import ProfileStore
from streamrec.events import encode
from streamrec.kafka import KafkaProducer
from streams.pipeline import EventPipeline
from streams.validation import KafkaDeadLetterSink, RawRecord, Validator


def _records(events, start: int = 0, partition: int = 0) -> list[RawRecord]:
    return [
        RawRecord(encode(e), e.user_id.encode(), "ev", partition, start + i) for i, e in enumerate(events)
    ]


def test_pipeline_applies_valid_events_dead_letters_the_rest_and_calls_hooks(settings, topics, redis_client):
    items, enc = RandomItems(), HashingEncoder()
    store = ProfileStore(redis_client, settings, items=items)
    calls = []

    async def hook(events, changed):
        calls.append(([e.event_id for e in events], set(changed)))

    async def failing_hook(events, changed):
        raise RuntimeError("a broken hook must not lose the batch")

    pipe = EventPipeline(
        store,
        Validator(items),
        KafkaDeadLetterSink(KafkaProducer(settings), settings.topics.dead_letter),
        enc,
        hooks=[failing_hook],
    )
    pipe.add_hook(hook)
    events = generate_events(12, 600, seed=21)
    recs = _records(events)
    recs.insert(10, RawRecord(b"nope", b"u0", "ev", 1, 0))
    res = asyncio.run(pipe.process(recs))
    assert (res.records, res.valid, res.dead_lettered) == (601, 600, 1)
    assert res.dead_reasons == {"not_json": 1}
    assert len(calls) == 1  # the failing hook was logged, the next one still ran
    ids, changed = calls[0]
    assert sorted(ids) == sorted(e.event_id for e in events)
    assert changed == {e.user_id for e in events}
    ref = reference_profiles(events, items, enc, settings.profile)
    got = store.get_profiles(list(ref))
    for u, r in ref.items():
        assert_profile_matches(got[u], r)
    (m,) = read_topic(settings, settings.topics.dead_letter, expect=1)
    assert m.value() == b"nope"

    # The same batch again (a replay): nothing applied, hooks not called, profiles unchanged.
    calls.clear()
    res = asyncio.run(pipe.process(recs))
    assert res.apply.applied == 0 and res.apply.skipped == {"duplicate": 600} and not calls
    assert pipe.positions[("ev", 0)] == 599


def test_blocking_hooks_share_one_worker_thread_and_a_failing_one_stops_none(settings, redis_client, caplog):
    """Blocking hooks run one after the other in one executor thread (one hop per batch, not
    one per hook), off the event loop; a failing one is logged and the next still runs."""
    import threading

    items = RandomItems()
    store = ProfileStore(redis_client, settings, items=items)
    seen: list[tuple[str, int, int]] = []

    class Blocking:
        def __init__(self, name: str, fail: bool = False) -> None:
            self.name, self.fail = name, fail

        def run_blocking(self, events, changed):
            seen.append((self.name, threading.get_ident(), len(events)))
            if self.fail:
                raise RuntimeError(f"{self.name} broke")

        async def __call__(self, events, changed):  # the pipeline must not use this path
            raise AssertionError("a blocking hook is run through run_blocking")

    class NoDeadLetters:
        async def send(self, letters):
            assert not letters

    async_calls: list[int] = []

    async def on_loop(events, changed):
        async_calls.append(threading.get_ident())

    hooks = [Blocking("a"), Blocking("b", fail=True), on_loop, Blocking("c")]
    pipe = EventPipeline(store, Validator(items), NoDeadLetters(), None, hooks=hooks)
    events = generate_events(5, 40, seed=3)
    loop_thread = threading.get_ident()
    with caplog.at_level("ERROR"):
        res = asyncio.run(pipe.process(_records(events)))
    assert res.apply.applied == 40
    assert [n for n, _, _ in seen] == ["a", "b", "c"] and all(k == 40 for _, _, k in seen)
    assert len({t for _, t, _ in seen}) == 1 and seen[0][1] != loop_thread
    assert async_calls == [loop_thread]
    assert "b broke" in caplog.text


def test_search_without_encoder_keeps_text_only(settings, redis_client):
    items = RandomItems()

    class NoDeadLetters:
        async def send(self, letters):
            assert not letters

    store = ProfileStore(redis_client, settings, items=items)
    pipe = EventPipeline(store, Validator(items), NoDeadLetters(), encoder=None)
    rec = RawRecord(orjson.dumps({"v": 1, "event_id": "s1", "type": "search", "user_id": "u", "ts": 1_700_000_000_000,
                                  "query": "red lantern"}), b"u", "ev", 0, 0)  # fmt: skip
    asyncio.run(pipe.process([rec]))
    p = store.get_profile("u")
    assert p.query_text == "red lantern" and p.query is None and p.n_events == {"search": 1}
    assert p.long_term is None and p.session is None
