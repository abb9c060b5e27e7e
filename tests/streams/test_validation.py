"""Validation and dead letters: every kind of malformed record, with its reason, on real Kafka."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from support.profile_reference import RandomItems
from support.schemas import assert_valid
from support.worker import read_topic

from streamrec.events import decode
from streamrec.kafka import KafkaProducer
from streams.validation import (
    DeadLetter,
    KafkaDeadLetterSink,
    RawRecord,
    Validator,
    parse_dead_letter_headers,
)

GOOD = {"v": 1, "event_id": "e1", "type": "click", "user_id": "u1", "ts": 1_700_000_000_000, "item_id": "i1"}


def _rec(value, offset: int = 0) -> RawRecord:
    return RawRecord(value=value, key=b"u1", topic="ev", partition=2, offset=offset)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"\xff\xfe garbage", "not_json"),
        # Stray bytes inside a key the schema does not know: the whole record must be UTF-8.
        (orjson.dumps(GOOD)[:-1] + b', "sess\xb1on_id": "s1"}', "not_json"),
        (orjson.dumps(GOOD)[:-1] + b', "note": "caf\xc3"}', "not_json"),
        (
            b'{"v": 1, "event_id": "e", "type": "view", "user_id": "u", "ts": NaN, "item_id": "i1"}',
            "not_json",
        ),
        (orjson.dumps([1, 2, 3]), "bad_type"),
        (orjson.dumps({**GOOD, "user_id": 17}), "bad_type"),
        (orjson.dumps({k: v for k, v in GOOD.items() if k != "event_id"}), "missing_field"),
        (orjson.dumps({k: v for k, v in GOOD.items() if k != "item_id"}), "missing_field"),
        (orjson.dumps({**GOOD, "type": "search", "item_id": None}), "missing_field"),
        (orjson.dumps({**GOOD, "type": "like"}), "unknown_type"),
        (orjson.dumps({**GOOD, "ts": 4_102_444_800_000}), "bad_timestamp"),
        (orjson.dumps({**GOOD, "ts": 0}), "bad_timestamp"),
        (orjson.dumps({**GOOD, "quantity": -1}), "bad_value"),
        (orjson.dumps({**GOOD, "v": 2}), "bad_version"),
        (orjson.dumps({**GOOD, "user_id": "x" * 300}), "bad_type"),
        (b"{" + b" " * 17000 + b"}", "oversized"),
        (orjson.dumps({**GOOD, "item_id": "not-in-catalog"}), "unknown_item"),
        (None, "empty"),
    ],
)
def test_malformed_records_become_dead_letters_with_reason(value, reason):
    batch = Validator(RandomItems()).validate([_rec(orjson.dumps(GOOD)), _rec(value, 1)])
    assert [e.event_id for e in batch.events] == ["e1"]  # the valid one in the same batch goes on
    assert len(batch.dead) == 1
    d = batch.dead[0]
    assert d.reason == reason, d.detail
    assert_valid("dead-letter-headers", parse_dead_letter_headers(d.headers()))
    assert d.record.value == value and d.record.offset == 1 and d.detail


def test_item_vectors_come_with_the_valid_events():
    items = RandomItems()
    recs = [_rec(orjson.dumps({**GOOD, "event_id": f"e{k}", "item_id": f"i{k}"}), k) for k in range(5)]
    recs.append(
        _rec(orjson.dumps({**GOOD, "event_id": "s", "type": "search", "item_id": None, "query": "jar"}), 9)
    )
    batch = Validator(items).validate(recs)
    assert len(batch.events) == 6 and not batch.dead
    assert (batch.item_vectors[:5] == items.matrix[:5]).all()
    assert not batch.item_vectors[5].any()


def test_dead_letter_sink_keeps_original_bytes_reason_and_source(settings, topics):
    sink = KafkaDeadLetterSink(KafkaProducer(settings), settings.topics.dead_letter)
    raw = b'{"broken": '
    letter = DeadLetter(RawRecord(raw, b"k1", settings.topics.events, 3, 1234), "not_json", "unexpected end")
    asyncio.run(sink.send([letter]))
    (m,) = read_topic(settings, settings.topics.dead_letter, expect=1)
    assert m.value() == raw and m.key() == b"k1"
    h = parse_dead_letter_headers(m.headers())
    assert_valid("dead-letter-headers", h)
    assert h["reason"] == "not_json" and h["detail"] == "unexpected end"
    assert (h["topic"], h["partition"], h["offset"]) == (settings.topics.events, "3", "1234")
    assert int(h["ts"]) > 0


def test_valid_utf8_beyond_ascii_is_accepted():
    raw = orjson.dumps({**GOOD, "type": "search", "item_id": None, "query": "café lanterne ☕"})
    ev = decode(raw, now_ms=GOOD["ts"])
    assert ev.query == "café lanterne ☕"


def test_dead_letters_of_a_redelivered_batch_are_written_once(settings, topics):
    """A worker crashed after writing a batch's dead letters and before committing: the next
    owner gets the batch again and must not write its letters a second time."""
    from streams.validation import dead_letter_tail_reader

    def letters(offsets, partition):
        return [
            DeadLetter(RawRecord(b"bad %d" % o, b"k", settings.topics.events, partition, o), "not_json", "x")
            for o in offsets
        ]

    first = KafkaDeadLetterSink(
        KafkaProducer(settings), settings.topics.dead_letter, tail_reader=dead_letter_tail_reader(settings)
    )
    asyncio.run(first.send(letters([3, 5, 8], 1) + letters([2], 0)))
    # The "next owner": a fresh sink (no memory) gets the same batch plus newer records.
    second = KafkaDeadLetterSink(
        KafkaProducer(settings), settings.topics.dead_letter, tail_reader=dead_letter_tail_reader(settings)
    )
    asyncio.run(second.send(letters([3, 5, 8, 9, 12], 1) + letters([2, 4], 0)))
    asyncio.run(second.send(letters([12, 13], 1)))  # a repeat within one owner, too
    assert second.skipped == 5
    got = read_topic(settings, settings.topics.dead_letter, 8)
    by_source = sorted(
        (
            int(parse_dead_letter_headers(m.headers())["partition"]),
            int(parse_dead_letter_headers(m.headers())["offset"]),
        )
        for m in got
    )
    assert by_source == [(0, 2), (0, 4), (1, 3), (1, 5), (1, 8), (1, 9), (1, 12), (1, 13)]
    assert all(m.partition() == int(parse_dead_letter_headers(m.headers())["partition"]) for m in got)
