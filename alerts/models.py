"""The alert record of the alerts topic (msgspec, JSON on the wire)."""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = ["AnomalyAlert", "decode_alert", "encode_alert"]


class AnomalyAlert(msgspec.Struct, frozen=True, kw_only=True):
    """A demand anomaly that was raised or cleared by the demand detector.

    ``key`` is the item id (``level="item"``) or the category (``level="category"``).
    ``observed`` / ``expected`` are demand in event units (distinct shoppers, weighted by event
    type and scaled back to events) over the horizon that decided, which spans
    ``[window_start, window_end)`` (epoch ms, event time). ``score`` is -log10 of the
    (Bonferroni-corrected) tail probability. ``raised_at`` is the wall-clock time (epoch ms)
    the record was made, for both ``state="raised"`` and ``state="cleared"``. ``source`` says which
    test decided: ``window`` (an hour window closed: the slow horizons), ``fast`` (a sequential
    look at the short horizons, mid-window) or ``wait`` (the time since the key's last event);
    for looks ``window_end`` is the event time of the newest evidence. ``synthetic`` is true when
    the key was fed by synthetic events (``alerts.synthetic_user_prefix``, the demo's injected
    surge): such an alert is a demonstration, not real demand.
    """

    key: str
    level: Literal["item", "category"]
    kind: Literal["surge", "drop"]
    state: Literal["raised", "cleared"]
    observed: float
    expected: float
    score: float
    window_start: int
    window_end: int
    raised_at: int
    source: Literal["window", "fast", "wait"] = "window"
    synthetic: bool = False

    @property
    def record_key(self) -> str:
        """Kafka record key: ``<level>:<key>`` (one key's alerts stay in order)."""
        return f"{self.level}:{self.key}"


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(AnomalyAlert)


def encode_alert(alert: AnomalyAlert) -> bytes:
    """JSON bytes of an alert."""
    return _encoder.encode(alert)


def decode_alert(raw: bytes) -> AnomalyAlert:
    """Parse JSON bytes of an alert (raises msgspec.ValidationError on a bad record)."""
    return _decoder.decode(raw)
