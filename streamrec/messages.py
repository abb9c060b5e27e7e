"""Message types of the output topics, as msgspec Structs: the one definition of their wire format.

* :class:`ResultMessage`: a record of the results topic (and the pull endpoint's JSON body),
  keyed by ``user_id``; built by ``streams.recommend.result_message``.
* :class:`DeadLetterHeaders`: the headers of a dead-letter record (``streamrec.dlq.<name>``;
  the record's value is the original bytes), as ``streams.validation.parse_dead_letter_headers``
  returns them: every value a string, as on the wire.

The input events are :class:`streamrec.events.Event`, the alerts ``alerts.models.AnomalyAlert``.
``streamrec.schemas`` publishes the JSON Schemas of all four (``deploy/schemas/``).
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

import msgspec

__all__ = [
    "DEAD_LETTER_REASONS",
    "RESULTS_VERSION",
    "DeadLetterHeaders",
    "DeadLetterReason",
    "RecommendedItem",
    "ResultMessage",
]

RESULTS_VERSION = 1

# The bounded ``streamrec.dlq.reason`` labels: the InvalidEvent reasons of streamrec.events.decode,
# the catalog check (unknown_item) and the catch-all of an unexpected error (invalid).
DeadLetterReason = Literal[
    "empty",
    "oversized",
    "not_json",
    "bad_type",
    "missing_field",
    "unknown_type",
    "bad_timestamp",
    "bad_value",
    "bad_version",
    "unknown_item",
    "invalid",
]
DEAD_LETTER_REASONS: tuple[str, ...] = get_args(DeadLetterReason)


class RecommendedItem(msgspec.Struct, frozen=True):
    """One recommended item: ``score`` is its probability among the candidates (rounded to 6
    digits); ``reason`` is ``similar_to:<item_id>``, ``matches_query``, ``buy_again``,
    ``trending_in:<category>``, ``trending`` or ``popular``."""

    item_id: str
    score: Annotated[float, msgspec.Meta(ge=0, le=1)]
    reason: str


class ResultMessage(msgspec.Struct, frozen=True, kw_only=True):
    """Fresh top-K recommendations for one user.

    ``generated_at`` is epoch ms (wall clock). ``source_event_id`` is the user's newest event in
    the profile the list was computed from (a user's newest list names their newest event) and
    ``event_to_result_ms`` the time from that event's ``ts`` to ``generated_at``; both are null
    on the pull endpoint. ``v`` is the message version.
    """

    user_id: Annotated[str, msgspec.Meta(min_length=1)]
    items: list[RecommendedItem]
    model_version: str
    generated_at: int
    source_event_id: str | None
    event_to_result_ms: int | None
    v: int = RESULTS_VERSION


Digits = Annotated[str, msgspec.Meta(pattern=r"^-?[0-9]+$")]


class DeadLetterHeaders(msgspec.Struct, frozen=True, kw_only=True):
    """The headers of a dead-letter record, without the ``streamrec.dlq.`` prefix.

    ``reason`` is a bounded label, ``detail`` the decoder's message (at most 1000 bytes on the
    wire); ``topic`` / ``partition`` / ``offset`` say where the record was read (-1: unknown) and
    ``ts`` when it was dead-lettered (epoch ms). Header values are strings, numbers in decimal.
    """

    reason: DeadLetterReason
    detail: Annotated[str, msgspec.Meta(max_length=1000)]
    topic: str
    partition: Digits
    offset: Digits
    ts: Annotated[str, msgspec.Meta(pattern=r"^[0-9]+$")]
