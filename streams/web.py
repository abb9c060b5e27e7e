"""The worker's HTTP endpoints on faust's web server: health, readiness, recommendations.

``GET /healthz``: the process runs (500 once the worker crashed); ``GET /readyz``: services
loaded, not rebalancing, agent not crashed (503 otherwise), with the assigned partitions.

``GET /recommendations/{user_id}?k=20&q=red+lantern`` returns the same JSON as a
results-topic message (``streams/recommend.py``). ``k`` is 1..200 (default
``scoring.top_k``); ``q`` is an optional ad-hoc search query of at most 512 characters,
encoded on the fly through the encoder's micro-batcher. A user without a profile gets
the popular fallback (reason ``popular``, in the category of nothing: global popularity).

Errors: 400 with ``{"error": ...}`` for a bad ``k`` or ``q``; 503 while the worker is
still loading its model.
"""

from __future__ import annotations

import logging
from typing import Any

import faust

from streamrec.settings import Settings
from streams import metrics
from streams.context import WorkerState

log = logging.getLogger(__name__)


def register_views(app: faust.App, state: WorkerState, settings: Settings) -> None:
    """Attach ``/healthz``, ``/readyz`` and ``/recommendations/{user_id}`` to ``app``."""
    _register_health(app, state, settings)

    @app.page("/recommendations/{user_id}")
    async def recommendations(web: Any, request: Any, user_id: str) -> Any:
        ctx = state.ctx
        service = ctx.push.service if ctx is not None and ctx.push is not None else None
        if service is None:
            metrics.recommendation_requests.labels("unavailable").inc()
            return web.json({"error": "the worker is still loading its model; retry shortly"}, status=503)
        k_raw = request.query.get("k")
        q = request.query.get("q")
        try:
            k = int(k_raw) if k_raw is not None else None
        except ValueError:
            metrics.recommendation_requests.labels("bad_request").inc()
            return web.json({"error": f"k must be an integer, got {k_raw!r}"}, status=400)
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
        ready = state.loaded.is_set() and state.error is None and not app.rebalancing
        body = {
            "ready": ready,
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
