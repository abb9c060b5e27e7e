"""The worker's HTTP endpoints on faust's web server: health, readiness, recommendations.

``GET /healthz``: the process runs (500 once the worker crashed); ``GET /readyz``: services
loaded, not rebalancing, agent not crashed, Redis and Kafka answering (503 otherwise, with
``waiting_for`` naming the service and its setting), with the assigned partitions.

``GET /recommendations/{user_id}?k=20&q=red+lantern`` returns the same JSON as a
results-topic message (``streams/recommend.py``). ``k`` is 1..200 (default
``scoring.top_k``); ``q`` is an optional ad-hoc search query of at most 512 characters,
encoded on the fly through the encoder's micro-batcher. A user without a profile gets
the popular fallback (reason ``popular``, in the category of nothing: global popularity).

Errors: 400 with ``{"error": ...}`` for a bad ``k`` or ``q``; 503 while the worker is
still loading its model.

``GET /openapi.json`` is the OpenAPI 3.1 document of every view here (``streams/openapi.py``).
``GET /explorer`` is the live explorer page (``streams/explorer/``), over
``/explorer/api/users``, ``/explorer/api/user/{user_id}``, ``/explorer/api/alerts`` and the
server-sent events of ``/explorer/stream?user=...`` (``streams/explorer.py``).
"""

from __future__ import annotations

import asyncio
import logging
import re
from importlib import resources
from typing import Any

import faust
import orjson
from aiohttp import web as aioweb

from alerts.detector import SURGE
from streamrec.settings import Settings
from streams import metrics
from streams.context import WorkerContext, WorkerState
from streams.explorer import Explorer, event_json
from streams.openapi import MAX_USER_ID_CHARS, USERS_LIMIT_MAX, openapi_document
from streams.recommend import MAX_K

log = logging.getLogger(__name__)


LOADING = {"error": "the worker is still loading its model; retry shortly"}
_INT = re.compile(r"-?[0-9]{1,9}")  # ASCII digits only: int() would also take " 7", "+7", "7_0", "٧"


def query_int(request: Any, name: str) -> int | None:
    """The integer query parameter ``name`` (None when absent); ValueError with a message when bad."""
    raw = request.query.get(name)
    if raw is None:
        return None
    if not _INT.fullmatch(raw):
        raise ValueError(f"{name} must be an integer, got {raw!r}")
    return int(raw)


def register_views(app: faust.App, state: WorkerState, settings: Settings) -> None:
    """Attach health, readiness, recommendations, ``/openapi.json`` and the explorer to ``app``."""
    _register_health(app, state, settings)
    _register_recommendations(app, state)
    _register_explorer(app, state)
    _register_explorer_api(app, state)

    @app.page("/openapi.json")
    async def openapi(web: Any, request: Any) -> Any:
        return web.json(openapi_document())


def _register_recommendations(app: faust.App, state: WorkerState) -> None:
    @app.page("/recommendations/{user_id}")
    async def recommendations(web: Any, request: Any, user_id: str) -> Any:
        ctx = state.ctx
        service = ctx.push.service if ctx is not None and ctx.push is not None else None
        if service is None:
            metrics.recommendation_requests.labels("unavailable").inc()
            return web.json(LOADING, status=503)
        q = request.query.get("q")
        try:
            k = query_int(request, "k")
        except ValueError as exc:
            metrics.recommendation_requests.labels("bad_request").inc()
            return web.json({"error": str(exc)}, status=400)
        try:
            body = await service.recommend_one(user_id, k=k, q=q)
        except ValueError as exc:
            metrics.recommendation_requests.labels("bad_request").inc()
            return web.json({"error": str(exc)}, status=400)
        except Exception:
            log.exception("recommendations for %s failed", user_id)
            metrics.recommendation_requests.labels("error").inc()
            return web.json({"error": "internal error; see the worker log"}, status=500)
        metrics.recommendation_requests.labels("ok").inc()
        return web.json(body)


def _register_health(app: faust.App, state: WorkerState, s: Settings) -> None:
    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        crashed = bool(getattr(app, "crashed", False)) or state.error is not None
        body = {"status": "failed" if crashed else "ok", "error": str(state.error) if state.error else None}
        return web.json(body, status=500 if crashed else 200)

    @app.page("/readyz")
    async def readyz(web: Any, request: Any) -> Any:
        waiting = state.waiting_for()
        ready = state.loaded.is_set() and state.error is None and not app.rebalancing and not waiting
        body = {
            "ready": ready,
            "waiting_for": waiting,
            "components_loaded": state.loaded.is_set(),
            "rebalancing": bool(app.rebalancing),
            "assigned_partitions": sorted(
                tp.partition
                for tp in (app.consumer.assignment() if app.consumer is not None else ())
                if tp.topic == s.topics.events
            ),
            "batches": state.batches,
        }
        return web.json(body, status=200 if ready else 503)


# -- the live explorer ----------------------------------------------------------------------
STREAM_KEEPALIVE_S = 10.0
STREAM_POLL_S = 0.5  # how soon an open stream notices the worker stopping
STREAM_MAX_S = 300.0  # then the stream ends and the browser's EventSource reconnects
_STATIC = {"app.js": "text/javascript", "app.css": "text/css", "index.html": "text/html"}
_static_cache: dict[str, str] = {}


def _static(name: str) -> str:
    if name not in _static_cache:
        _static_cache[name] = (resources.files("streams") / "explorer" / name).read_text("utf-8")
    return _static_cache[name]


def _loaded(state: WorkerState) -> tuple[WorkerContext, Explorer] | None:
    ctx = state.ctx
    if ctx is None or ctx.explorer is None:
        return None
    return ctx, ctx.explorer


def _register_explorer(app: faust.App, state: WorkerState) -> None:
    """The page, its script and style sheet, and the live push stream."""

    @app.page("/explorer")
    async def explorer_page(web: Any, request: Any) -> Any:
        return web.text(_static("index.html"), content_type=_STATIC["index.html"])

    @app.page("/explorer/app.js")
    async def explorer_js(web: Any, request: Any) -> Any:
        return web.text(_static("app.js"), content_type=_STATIC["app.js"])

    @app.page("/explorer/app.css")
    async def explorer_css(web: Any, request: Any) -> Any:
        return web.text(_static("app.css"), content_type=_STATIC["app.css"])

    @app.page("/explorer/stream")
    async def explorer_stream(web: Any, request: Any) -> Any:
        user = request.query.get("user")
        if not user or len(user) > MAX_USER_ID_CHARS:
            return web.json({"error": f"user must be 1..{MAX_USER_ID_CHARS} characters"}, status=400)
        loaded = _loaded(state)
        if loaded is None:
            return web.json(LOADING, status=503)
        return await _stream_pushes(app, request, loaded[1], user, web)


async def _stream_pushes(app: faust.App, request: Any, ex: Explorer, user: str, web: Any) -> Any:
    """Server-sent events of ``user``'s pushes until the client leaves, the worker stops or
    STREAM_MAX_S pass (an open stream must not hold up the worker's shutdown)."""
    sub = ex.feed.subscribe(user)
    if sub is None:
        return web.json({"error": "too many open explorer streams; retry later"}, status=503)
    resp = aioweb.StreamResponse(headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    resp.content_type = "text/event-stream"
    loop = asyncio.get_running_loop()
    end = loop.time() + STREAM_MAX_S
    try:
        await resp.prepare(request)
        await resp.write(b"retry: 2000\nevent: hello\ndata: " + orjson.dumps({"user_id": user}) + b"\n\n")
        await ex.texts.ensure()  # pushes queue up meanwhile
        quiet_since = loop.time()
        while loop.time() < end and not app.should_stop:
            try:
                msg = await asyncio.wait_for(sub.queue.get(), timeout=STREAM_POLL_S)
            except TimeoutError:
                if loop.time() - quiet_since >= STREAM_KEEPALIVE_S:
                    await resp.write(b": keep-alive\n\n")
                    quiet_since = loop.time()
                continue
            quiet_since = loop.time()
            texts = ex.texts.of(_item_ids(msg))
            data = orjson.dumps({"message": msg, "item_texts": texts, "dropped": sub.dropped})
            await resp.write(b"event: push\ndata: " + data + b"\n\n")
    except (ConnectionResetError, ConnectionError):
        pass  # the client left
    finally:
        ex.feed.unsubscribe(sub)
    return resp


def _item_ids(msg: dict[str, Any]) -> list[str | None]:
    """The items of a results message and those its reasons name (``similar_to:<item>``)."""
    ids: list[str | None] = [x["item_id"] for x in msg["items"]]
    ids += [x["reason"][11:] for x in msg["items"] if x["reason"].startswith("similar_to:")]
    return ids


def _bounded(request: Any, name: str, default: int, hi: int) -> int:
    value = query_int(request, name)
    if value is None:
        return default
    if not 1 <= value <= hi:
        raise ValueError(f"{name} must be between 1 and {hi}, got {value}")
    return value


def _register_explorer_api(app: faust.App, state: WorkerState) -> None:
    """The page's JSON: recently active users, one user, active demand alerts."""

    @app.page("/explorer/api/users")
    async def explorer_users(web: Any, request: Any) -> Any:
        loaded = _loaded(state)
        if loaded is None:
            return web.json(LOADING, status=503)
        try:
            limit = _bounded(request, "limit", 50, USERS_LIMIT_MAX)
        except ValueError as exc:
            return web.json({"error": str(exc)}, status=400)
        rec = loaded[1].recorder
        return web.json(
            {
                "users": rec.recent_users(limit),
                "tracked_users": len(rec.users),
                "max_users": rec.max_users,
                "events_per_user": rec.per_user,
                "events_seen": rec.events_seen,
            }
        )

    @app.page("/explorer/api/user/{user_id}")
    async def explorer_user(web: Any, request: Any, user_id: str) -> Any:
        loaded = _loaded(state)
        if loaded is None:
            return web.json(LOADING, status=503)
        try:
            k = _bounded(request, "k", 10, MAX_K)
        except ValueError as exc:
            return web.json({"error": str(exc)}, status=400)
        return web.json(await _user_view(*loaded, user_id, k))

    @app.page("/explorer/api/alerts")
    async def explorer_alerts(web: Any, request: Any) -> Any:
        loaded = _loaded(state)
        if loaded is None:
            return web.json(LOADING, status=503)
        try:
            limit = _bounded(request, "limit", 100, USERS_LIMIT_MAX)
        except ValueError as exc:
            return web.json({"error": str(exc)}, status=400)
        ctx, ex = loaded
        await ex.texts.ensure()
        detector = await asyncio.get_running_loop().run_in_executor(None, ctx.demand.monitor.state)
        active = detector.active_keys()
        alerts = []
        for key, kind in active[:limit]:
            level, _, name = key.partition(":")
            item = level == "i"
            alerts.append(
                {
                    "key": name,
                    "level": "item" if item else "category",
                    "kind": "surge" if kind == SURGE else "drop",
                    "text": ex.texts.texts.get(name) if item else None,
                }
            )
        return web.json({"alerts": alerts, "total": len(active)})


async def _user_view(ctx: WorkerContext, ex: Explorer, user_id: str, k: int) -> dict[str, Any]:
    texts = await ex.texts.ensure()
    events = ex.recorder.events_of(user_id)
    loop = asyncio.get_running_loop()
    profile = await loop.run_in_executor(None, ctx.store.get_profile, user_id)
    recs = await ctx.push.service.recommend_one(user_id, k=k) if ctx.push is not None else None
    ids: list[str | None] = [e.item_id for e in events]
    summary = None
    if profile is not None:
        ids += profile.recent_items + profile.purchased_items
        summary = {
            "recent_items": profile.recent_items,
            "purchased_items": profile.purchased_items,
            "last_ts": profile.last_ts,
            "n_events": profile.n_events,
            "query_text": profile.query_text,
        }
    if recs is not None:
        ids += _item_ids(recs)
    return {
        "user_id": user_id,
        "events": [event_json(e, texts, ex.categories) for e in events],
        "profile": summary,
        "recommendations": recs,
        "item_texts": ex.texts.of(ids),
    }
