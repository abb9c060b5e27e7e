"""The published JSON Schemas (deploy/schemas/): up to date, valid draft 2020-12, and faithful to
the worker's decoder on real and malformed records."""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path

import orjson
import pytest
from jsonschema import Draft202012Validator
from support.schemas import assert_valid, errors, malformed_records

from alerts.models import AnomalyAlert, encode_alert
from devstack.produce import dataset_events
from inference.scoring import ScoredItem
from streamrec.datasets import load_dataset
from streamrec.events import MAX_EVENT_BYTES, MIN_TS_MS, InvalidEvent, decode, encode, make_event
from streamrec.messages import DEAD_LETTER_REASONS
from streamrec.schemas import SCHEMA_DIR, SCHEMAS, check, main, render, schema_path, version
from streams.recommend import result_message
from streams.validation import DeadLetter, RawRecord, parse_dead_letter_headers

REPO = Path(__file__).resolve().parents[2]
GOOD = {"v": 1, "event_id": "e1", "type": "click", "user_id": "u1", "ts": 1_700_000_000_000, "item_id": "i1"}


def _reason(raw: bytes) -> str | None:
    """The decoder's dead-letter reason of ``raw`` (None: a valid event)."""
    try:
        decode(raw)
    except InvalidEvent as exc:
        return exc.reason
    return None


def test_committed_schema_files_equal_the_generated_ones() -> None:
    stale = check()
    diff = ""
    if stale:
        name = next(n for n in SCHEMAS if schema_path(n) == stale[0])
        old = stale[0].read_text().splitlines() if stale[0].exists() else []
        diff = "\n".join(list(difflib.unified_diff(old, render(name).splitlines(), lineterm=""))[:40])
    assert not stale, (
        f"stale schema files {[p.name for p in stale]}: a message type changed; "
        f"run `python -m streamrec.schemas --write` and commit deploy/schemas/\n{diff}"
    )
    assert SCHEMA_DIR == REPO / "deploy" / "schemas"


def test_write_and_check_round_trip(tmp_path: Path, capsys) -> None:
    assert main(["--check", "--dir", str(tmp_path)]) == 1  # nothing written yet
    assert main(["--write", "--dir", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(schema_path(n).name for n in SCHEMAS)
    assert main(["--dir", str(tmp_path)]) == 0
    path = schema_path("alerts", tmp_path)
    path.write_text(path.read_text().replace('"score"', '"scores"'))
    assert main(["--check", "--dir", str(tmp_path)]) == 1
    assert "python -m streamrec.schemas --write" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_schema_is_valid_draft_2020_12_with_its_metadata(name: str) -> None:
    doc = json.loads(schema_path(name).read_text())
    Draft202012Validator.check_schema(doc)
    assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert doc["$id"].endswith(f"{name}:v{version(name)}") and doc["title"] and doc["description"]
    assert schema_path(name).name == f"{name}.v{version(name)}.schema.json"
    assert f"version {version(name)}" in doc["description"]
    root = doc["$defs"][SCHEMAS[name].__name__]
    if "v" in root["properties"]:
        assert root["properties"]["v"]["const"] == version(name)


# -- events ----------------------------------------------------------------------------


def test_events_made_by_the_code_validate() -> None:
    now = 1_700_000_000_000
    events = [
        make_event("view", "u1", item_id="85123A"),
        make_event("click", "u1", item_id="85123A", ts=now, session_id="u1-1", category="holder"),
        make_event("add_to_cart", "u1", item_id="85123A", ts=now, price=2.55, quantity=6),
        make_event("purchase", "u1", item_id="85123A", ts=now, price=0.0, quantity=0),
        make_event("search", "u1", query="red heart lantern ☕", ts=now),
    ]
    for e in events:
        assert_valid("events", e)
        assert_valid("events", encode(e))  # the wire bytes (omit_defaults: v is absent)


def test_real_dataset_events_validate(data_dir: Path, base_settings) -> None:
    ds = load_dataset("online-retail", data_dir)
    events = list(dataset_events(ds, "test", settings=base_settings, limit=400))
    assert len(events) == 400 and {e.type.value for e in events}
    for e in events:
        raw = encode(e)
        assert _reason(raw) is None
        assert_valid("events", raw)


# Valid JSON that the decoder rejects and JSON Schema cannot: the catalog (unknown_item) and the
# upper bound of ts, relative to the wall clock (now + 1 day).
INEXPRESSIBLE = {"unknown_item", "bad_timestamp (in the future)"}


def _kind(value: bytes, reason: str) -> str:
    if reason == "bad_timestamp" and orjson.loads(value)["ts"] >= MIN_TS_MS:
        return "bad_timestamp (in the future)"
    return reason


def test_malformed_records_of_the_worker_tests_are_rejected_by_the_schema_too() -> None:
    """tests/streams/test_validation.py's list: each valid-JSON record the decoder rejects is
    rejected by the schema, except the INEXPRESSIBLE kinds, which the schema accepts."""
    rejected, accepted, not_json = [], [], []
    for value, reason in malformed_records():
        try:
            doc = orjson.loads(value)  # strict JSON: no NaN, UTF-8 only
        except (orjson.JSONDecodeError, TypeError):  # TypeError: no value at all (None)
            not_json.append(reason)
            continue
        assert _reason(value) == (None if reason == "unknown_item" else reason)  # the catalog's
        kind = _kind(value, reason)
        bad = errors("events", doc)
        if kind in INEXPRESSIBLE:
            assert not bad, (kind, value)
            accepted.append(kind)
        else:
            assert bad, f"the schema accepts a {reason} record: {value[:200]!r}"
            rejected.append(reason)
    assert set(accepted) == INEXPRESSIBLE
    assert {"bad_type", "missing_field", "unknown_type", "bad_timestamp", "bad_value", "bad_version"} <= set(
        rejected
    )
    assert set(not_json) == {"not_json", "empty"}


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        ({**GOOD, "type": "search", "item_id": None, "query": "   "}, "missing_field"),
        ({**GOOD, "type": "search", "query": "x" * 513}, "oversized"),
        ({**GOOD, "item_id": ""}, "missing_field"),
        ({**GOOD, "item_id": None}, "missing_field"),
        ({**GOOD, "price": -0.5}, "bad_value"),
        ({**GOOD, "quantity": 1.5}, "bad_type"),
        ({**GOOD, "event_id": ""}, "bad_type"),
        ({**GOOD, "ts": "1700000000000"}, "bad_type"),
        ({**GOOD, "ts": MIN_TS_MS - 1}, "bad_timestamp"),
        ({**GOOD, "session_id": 3}, "bad_type"),
        ({k: v for k, v in GOOD.items() if k != "type"}, "missing_field"),
    ],
)
def test_the_schema_and_the_decoder_agree_on_more_rules(doc: dict, reason: str) -> None:
    assert _reason(orjson.dumps(doc)) == reason
    assert errors("events", doc)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        # The record's size (16 KiB): no JSON Schema keyword measures the document.
        (orjson.dumps({**GOOD, "note": "x" * MAX_EVENT_BYTES}), "oversized"),
        # JSON Schema's "integer" is any number with a zero fraction; msgspec wants an int literal.
        (orjson.dumps({**GOOD, "ts": 1_700_000_000_000.0}), "bad_type"),
        # 1e400 is a JSON number ≥ 0; msgspec refuses it (out of a double's range).
        (orjson.dumps(GOOD)[:-1] + b',"price":1e400}', "bad_type"),
    ],
)
def test_what_the_schema_cannot_say(raw: bytes, reason: str) -> None:
    assert _reason(raw) == reason
    assert not errors("events", json.loads(raw))


# -- results, dead letters, alerts ---------------------------------------------------------


def test_result_messages_validate_and_carry_the_version() -> None:
    items = [ScoredItem("85123A", 0.09311111, "similar_to:71053"), ScoredItem("21733", 0.0712, "popular")]
    pushed = result_message("17850", items, "minilm-ft-1a2b", "3f1c", 1_700_000_000_000, 1_700_000_000_212)
    assert (
        pushed["v"] == 1 and pushed["event_to_result_ms"] == 212 and pushed["items"][0]["score"] == 0.093111
    )
    assert_valid("results", pushed)
    assert_valid("results", orjson.dumps(pushed))
    pulled = result_message("17850", [], "minilm-ft-1a2b", None, None)
    assert_valid("results", pulled)
    assert errors("results", {**pushed, "v": 2})
    assert errors("results", {k: v for k, v in pushed.items() if k != "source_event_id"})
    assert errors("results", {**pushed, "items": [{"item_id": "x", "score": 1.5, "reason": "popular"}]})


@pytest.mark.parametrize("reason", DEAD_LETTER_REASONS)
def test_dead_letter_headers_validate(reason: str) -> None:
    letter = DeadLetter(RawRecord(b"{}", b"k", "streamrec.events", 3, 1234), reason, "é" * 1200)
    headers = parse_dead_letter_headers(letter.headers())
    assert_valid("dead-letter-headers", headers)
    unknown = DeadLetter(RawRecord(b"{}"), reason, "x").headers()  # partition/offset -1
    assert_valid("dead-letter-headers", parse_dead_letter_headers(unknown))
    assert errors("dead-letter-headers", {**headers, "reason": "weird"})
    assert errors("dead-letter-headers", {**headers, "offset": "12a"})
    assert errors("dead-letter-headers", {k: v for k, v in headers.items() if k != "ts"})


def test_the_reason_labels_are_every_reason_the_code_gives() -> None:
    """A new InvalidEvent / DeadLetter reason must be added to DeadLetterReason (and the schema)."""
    found = set()
    for path in ("streamrec/events.py", "streams/validation.py"):
        src = (REPO / path).read_text()
        found |= set(re.findall(r'InvalidEvent\(\s*"(\w+)"', src))
        found |= set(re.findall(r'DeadLetter\(\s*\w+,\s*"(\w+)"', src))
        found |= set(re.findall(r'\w+\[k\],\s*"(\w+)"', src))  # DeadLetter(kept[k], "unknown_item", ...)
    assert {"not_json", "unknown_item", "invalid"} <= found
    assert found == set(DEAD_LETTER_REASONS)


def test_alerts_validate() -> None:
    alert = AnomalyAlert(
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
    assert_valid("alerts", encode_alert(alert))
    assert errors("alerts", {**orjson.loads(encode_alert(alert)), "state": "gone"})
