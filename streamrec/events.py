"""Shopper events: the versioned wire schema of the input topic.

An event is one JSON object, keyed by ``user_id`` on the events topic::

    {"v": 1, "event_id": "3f1c...", "type": "click", "user_id": "17850",
     "session_id": "17850-1", "item_id": "85123A", "ts": 1291191960000,
     "price": 2.55, "quantity": 6, "category": "holder"}

    {"v": 1, "event_id": "9a0b...", "type": "search", "user_id": "17850",
     "session_id": "17850-1", "query": "red heart lantern", "ts": 1291191990000}

``item_id`` is required for every type but ``search``; ``query`` is required for
``search``. ``ts`` is epoch milliseconds (event time). Decoding is strict: wrong
types, missing fields and unknown types raise :class:`InvalidEvent` with a short
machine-readable reason, which the stream worker sends to the dead-letter topic.
"""

from __future__ import annotations

import math
import time
import uuid
from enum import StrEnum
from typing import Annotated

import msgspec

SCHEMA_VERSION = 1
MAX_EVENT_BYTES = 16 * 1024
MAX_QUERY_CHARS = 512
# Events older than this (2000-01-01) or further than a day in the future are absurd.
MIN_TS_MS = 946_684_800_000
MAX_FUTURE_MS = 24 * 3600 * 1000


class EventType(StrEnum):
    VIEW = "view"
    CLICK = "click"
    ADD_TO_CART = "add_to_cart"
    PURCHASE = "purchase"
    SEARCH = "search"


Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class Event(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=False):
    event_id: Id
    type: EventType
    user_id: Id
    ts: int
    session_id: str | None = None
    item_id: str | None = None
    query: str | None = None
    price: float | None = None
    quantity: int | None = None
    category: str | None = None
    v: int = SCHEMA_VERSION


class InvalidEvent(ValueError):
    """A record that is not a valid event. ``reason`` is a short, bounded label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


_decoder = msgspec.json.Decoder(Event)
_encoder = msgspec.json.Encoder()


def validate(ev: Event, *, now_ms: int | None = None) -> Event:
    """Semantic checks that the schema alone cannot express."""
    if ev.v != SCHEMA_VERSION:
        raise InvalidEvent("bad_version", f"schema version {ev.v} is not {SCHEMA_VERSION}")
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    if ev.ts < MIN_TS_MS or ev.ts > now_ms + MAX_FUTURE_MS:
        raise InvalidEvent("bad_timestamp", f"ts={ev.ts} is outside [{MIN_TS_MS}, now+1d]")
    if ev.type is EventType.SEARCH:
        if not ev.query or not ev.query.strip():
            raise InvalidEvent("missing_field", "search event without query")
        if len(ev.query) > MAX_QUERY_CHARS:
            raise InvalidEvent("oversized", f"query of {len(ev.query)} chars > {MAX_QUERY_CHARS}")
    elif not ev.item_id:
        raise InvalidEvent("missing_field", f"{ev.type.value} event without item_id")
    for name in ("price",):
        val = getattr(ev, name)
        if val is not None and (math.isnan(val) or math.isinf(val) or val < 0):
            raise InvalidEvent("bad_value", f"{name}={val}")
    if ev.quantity is not None and ev.quantity < 0:
        raise InvalidEvent("bad_value", f"quantity={ev.quantity}")
    return ev


def decode(raw: bytes | None, *, now_ms: int | None = None) -> Event:
    """Decode and validate one record value; raise :class:`InvalidEvent` when it is not an event."""
    if raw is None:
        raise InvalidEvent("empty", "record has no value")
    if len(raw) > MAX_EVENT_BYTES:
        raise InvalidEvent("oversized", f"{len(raw)} bytes > {MAX_EVENT_BYTES}")
    if not raw.isascii():  # JSON is UTF-8 throughout (RFC 8259); msgspec skips unknown keys unchecked
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidEvent("not_json", f"not valid UTF-8 at byte {exc.start}: {exc.reason}") from exc
    try:
        ev = _decoder.decode(raw)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        if "missing required field" in msg.lower():
            raise InvalidEvent("missing_field", msg) from exc
        if "invalid enum value" in msg.lower():
            raise InvalidEvent("unknown_type", msg) from exc
        raise InvalidEvent("bad_type", msg) from exc
    except msgspec.DecodeError as exc:
        raise InvalidEvent("not_json", str(exc)) from exc
    return validate(ev, now_ms=now_ms)


def encode(ev: Event) -> bytes:
    return _encoder.encode(ev)


def new_event_id() -> str:
    return uuid.uuid4().hex


def make_event(
    type: str | EventType,
    user_id: str,
    *,
    item_id: str | None = None,
    query: str | None = None,
    ts: int | None = None,
    event_id: str | None = None,
    session_id: str | None = None,
    price: float | None = None,
    quantity: int | None = None,
    category: str | None = None,
) -> Event:
    """Build an event (fills event_id and ts when not given)."""
    return Event(
        event_id=event_id or new_event_id(),
        type=EventType(type),
        user_id=str(user_id),
        ts=int(time.time() * 1000) if ts is None else int(ts),
        session_id=session_id,
        item_id=item_id,
        query=query,
        price=price,
        quantity=quantity,
        category=category,
    )
