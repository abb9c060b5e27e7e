"""The OpenAPI 3.1 document of the worker's HTTP API (served at ``GET /openapi.json``).

It describes every view of ``streams/web.py``: health, readiness, the pull endpoint, the spec
itself and the live explorer (page, scripts, JSON API, server-sent events).
``tests/streams/test_api_contract.py`` runs schemathesis from this document against a live
worker: every response must match it and no request may give a server error.
"""

from __future__ import annotations

import copy
from typing import Any

from streams.recommend import MAX_K, MAX_QUERY_CHARS

__all__ = ["MAX_USER_ID_CHARS", "USERS_LIMIT_MAX", "openapi_document"]

MAX_USER_ID_CHARS = 128  # as for the user_id of an event (streamrec/events.py)
USERS_LIMIT_MAX = 500

_NULLABLE_STR = {"type": ["string", "null"]}
_NULLABLE_INT = {"type": ["integer", "null"]}
_TS = {"type": "integer", "description": "Epoch milliseconds."}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


def _obj(props: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
        **extra,
    }


_SCHEMAS: dict[str, Any] = {
    "Error": _obj({"error": {"type": "string"}}),
    "RecommendedItem": _obj(
        {
            "item_id": {"type": "string"},
            "score": {"type": "number"},
            "reason": {
                "type": "string",
                "description": "similar_to:<item>, matches_query, popular, popular_in:<category>, "
                "trending_in:<category>, buy_again, ...",
            },
        }
    ),
    "Recommendations": _obj(
        {
            "user_id": {"type": "string"},
            "items": {"type": "array", "items": _ref("RecommendedItem")},
            "model_version": {"type": "string"},
            "generated_at": _TS,
            "source_event_id": {
                **_NULLABLE_STR,
                "description": "The event that triggered a push; null when pulled.",
            },
            "event_to_result_ms": {**_NULLABLE_INT, "description": "Event time to result; null when pulled."},
            "v": {"type": "integer", "description": "Message schema version (when present)."},
        },
        required=[
            "user_id",
            "items",
            "model_version",
            "generated_at",
            "source_event_id",
            "event_to_result_ms",
        ],
    ),
    "Health": _obj({"status": {"enum": ["ok", "failed"]}, "error": _NULLABLE_STR}),
    "Ready": _obj(
        {
            "ready": {"type": "boolean"},
            "components_loaded": {"type": "boolean"},
            "rebalancing": {"type": "boolean"},
            "waiting_for": {
                "type": "array",
                "items": {"type": "string"},
                "description": "Services the worker waits for now (Redis or Kafka down), with the setting naming them.",
            },
            "assigned_partitions": {"type": "array", "items": {"type": "integer"}},
            "batches": {"type": "integer"},
        }
    ),
    "ActiveUser": _obj(
        {
            "user_id": {"type": "string"},
            "last_ts": _TS,
            "last_type": {"type": "string"},
            "events": {
                "type": "integer",
                "description": "Events recorded for the user (at most events_per_user).",
            },
        }
    ),
    "ActiveUsers": _obj(
        {
            "users": {
                "type": "array",
                "items": _ref("ActiveUser"),
                "description": "Most recently active first.",
            },
            "tracked_users": {"type": "integer"},
            "max_users": {"type": "integer"},
            "events_per_user": {"type": "integer"},
            "events_seen": {"type": "integer", "description": "Applied events this worker recorded."},
        }
    ),
    "RecordedEvent": _obj(
        {
            "event_id": {"type": "string"},
            "type": {"enum": ["view", "click", "add_to_cart", "purchase", "search"]},
            "item_id": _NULLABLE_STR,
            "item_text": _NULLABLE_STR,
            "category": _NULLABLE_STR,
            "query": _NULLABLE_STR,
            "ts": _TS,
        }
    ),
    "ProfileSummary": _obj(
        {
            "recent_items": {"type": "array", "items": {"type": "string"}},
            "purchased_items": {"type": "array", "items": {"type": "string"}},
            "last_ts": _NULLABLE_INT,
            "n_events": {"type": "object", "additionalProperties": {"type": "integer"}},
            "query_text": _NULLABLE_STR,
        }
    ),
    "UserView": _obj(
        {
            "user_id": {"type": "string"},
            "events": {"type": "array", "items": _ref("RecordedEvent"), "description": "Newest first."},
            "profile": {"oneOf": [_ref("ProfileSummary"), {"type": "null"}]},
            "recommendations": {"oneOf": [_ref("Recommendations"), {"type": "null"}]},
            "item_texts": {"type": "object", "additionalProperties": {"type": "string"}},
        }
    ),
    "Alert": _obj(
        {
            "key": {"type": "string", "description": "Item id or category."},
            "level": {"enum": ["item", "category"]},
            "kind": {"enum": ["surge", "drop"]},
            "text": _NULLABLE_STR,
        }
    ),
    "Alerts": _obj({"alerts": {"type": "array", "items": _ref("Alert")}, "total": {"type": "integer"}}),
}

_USER_PATH = {"name": "user_id", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
_K = {
    "name": "k",
    "in": "query",
    "required": False,
    "description": "How many items (default `scoring.top_k`).",
    "schema": {"type": "integer", "minimum": 1, "maximum": MAX_K},
}
_LOADING = _error("The worker is still loading its model.")


def _get(
    summary: str, responses: dict[str, Any], params: list[dict[str, Any]] | None = None, **kw: Any
) -> dict:
    op: dict[str, Any] = {"summary": summary, "responses": responses, **kw}
    if params:
        op["parameters"] = params
    return {"get": op}


def _text(media: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {media: {"schema": {"type": "string"}}}}


_PATHS: dict[str, Any] = {
    "/healthz": _get(
        "Liveness: the process runs.",
        {"200": _json(_ref("Health"), "Running."), "500": _json(_ref("Health"), "The worker crashed.")},
        operationId="healthz",
    ),
    "/readyz": _get(
        "Readiness: services loaded, not rebalancing, agent running.",
        {"200": _json(_ref("Ready"), "Ready."), "503": _json(_ref("Ready"), "Not ready.")},
        operationId="readyz",
    ),
    "/recommendations/{user_id}": _get(
        "Fresh top-K for a user (the pull path); the popular fallback for a user without a profile.",
        {
            "200": _json(_ref("Recommendations"), "The same JSON as a results-topic message."),
            "400": _error("A bad `k` or `q`."),
            "503": _LOADING,
        },
        [
            _USER_PATH,
            _K,
            {
                "name": "q",
                "in": "query",
                "required": False,
                "description": "An ad-hoc search query, encoded on the fly.",
                "schema": {"type": "string", "maxLength": MAX_QUERY_CHARS},
            },
        ],
        operationId="recommendations",
    ),
    "/openapi.json": _get(
        "This document.",
        {"200": _json({"type": "object"}, "The OpenAPI 3.1 document.")},
        operationId="openapi",
    ),
    "/explorer": _get(
        "The live explorer page.", {"200": _text("text/html", "The page.")}, operationId="explorer"
    ),
    "/explorer/app.js": _get(
        "The explorer's script.", {"200": _text("text/javascript", "Script.")}, operationId="explorer_js"
    ),
    "/explorer/app.css": _get(
        "The explorer's style sheet.", {"200": _text("text/css", "Style sheet.")}, operationId="explorer_css"
    ),
    "/explorer/api/users": _get(
        "The users this worker saw most recently (its partitions only; in memory, since its start).",
        {"200": _json(_ref("ActiveUsers"), "Users."), "400": _error("A bad `limit`."), "503": _LOADING},
        [
            {
                "name": "limit",
                "in": "query",
                "required": False,
                "schema": {"type": "integer", "minimum": 1, "maximum": USERS_LIMIT_MAX, "default": 50},
            }
        ],
        operationId="explorer_users",
    ),
    "/explorer/api/user/{user_id}": _get(
        "A user's recent events (as this worker saw them), profile summary and current recommendations.",
        {"200": _json(_ref("UserView"), "The user."), "400": _error("A bad `k`."), "503": _LOADING},
        [_USER_PATH, {**_K, "description": "How many recommendations (default 10)."}],
        operationId="explorer_user",
    ),
    "/explorer/api/alerts": _get(
        "The active demand alerts (surges and drops, by item and category).",
        {"200": _json(_ref("Alerts"), "Alerts."), "400": _error("A bad `limit`."), "503": _LOADING},
        [
            {
                "name": "limit",
                "in": "query",
                "required": False,
                "schema": {"type": "integer", "minimum": 1, "maximum": USERS_LIMIT_MAX, "default": 100},
            }
        ],
        operationId="explorer_alerts",
    ),
    "/explorer/stream": _get(
        "Server-sent events: every recommendation list pushed for `user` (event `push`, data "
        '`{"message": <Recommendations>, "item_texts": {...}, "dropped": n}`), comments as keep-alives. '
        "Slow clients lose their oldest messages; the stream ends after a few minutes (EventSource reconnects).",
        {
            "200": _text("text/event-stream", "The stream."),
            "400": _error("`user` is missing or too long."),
            "503": _error("Too many open streams, or the worker is still loading."),
        },
        [
            {
                "name": "user",
                "in": "query",
                "required": True,
                "schema": {"type": "string", "minLength": 1, "maxLength": MAX_USER_ID_CHARS},
            }
        ],
        operationId="explorer_stream",
    ),
}

_DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "streamrec worker",
        "version": "1",
        "description": "Health, readiness, pull recommendations and the live explorer of one stream worker.",
    },
    "paths": _PATHS,
    "components": {"schemas": _SCHEMAS},
}


def openapi_document(server_url: str | None = None) -> dict[str, Any]:
    """A copy of the document, with ``servers`` set to ``server_url`` when given."""
    doc = copy.deepcopy(_DOCUMENT)
    if server_url:
        doc["servers"] = [{"url": server_url}]
    return doc
