"""Where the worker's scoring runs: in this process (a thread) or in a child process.

The worker consumes, validates, writes profiles and runs the demand monitor on its event loop;
scoring a round of users (profiles read, user model, matrix product, MMR, reasons) is the
CPU-heavy part. In a thread it shares the GIL with the consumer, so on a small machine the
consumer falls behind as soon as scoring saturates. :class:`ProcessScoring` runs the very same
:class:`LocalScoring` (same builder, same :class:`inference.scoring.Scorer`) in a child
process started with ``spawn``: the two really run in parallel on two cores, and a round trip
costs one pickled request and one pickled reply over a pipe.

Both implement :class:`ScoringBackend`:

* ``score(ScoreBatch)`` → :class:`Scored`: the users' top-k lists (profiles read by the
  backend from Redis, so the newest profile version is what is scored), the profile versions
  read and the stage timings;
* ``record(users, items)``: applied events for the co-visitation signal, which lives with
  the scorer (in the child when there is one);
* ``close()``.

The child owns its own Redis client and its own copy of the catalog and the models. It
answers requests one at a time, in order (a ``record`` sent before a ``score`` is counted
before it). If it dies, the call in flight raises and the next call starts a new child;
the co-visitation counts learned from the stream since the start are lost with it (the
model folder's seed is reloaded), the profiles are not (they are in Redis).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Protocol

import numpy as np

from inference.catalog import CatalogIndex
from inference.covisit import CoVisitation, CoVisitRecorder, load_covisit
from inference.popularity import RedisPopularity
from inference.scoring import PackedList, Request, ScoredItem, Scorer, unpack
from inference.user_model import load_user_model
from profiles.store import ProfileStore
from streamrec.interfaces import Catalog
from streamrec.plugins import load_factory
from streamrec.runtime import settle_heap
from streamrec.settings import Settings
from streams.faults import DependencyError, dependency_of

log = logging.getLogger(__name__)

# Thread counts of the numeric libraries, read once at their import (the child's environment).
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass
class ScoreBatch:
    """Users to score together: user i with its triggering event's category, an ad-hoc query
    vector and its reference time (see :class:`inference.scoring.Request`)."""

    user_ids: list[str]
    k: int
    category_hints: list[str | None] | None = None
    query_vectors: list[np.ndarray | None] | None = None
    ref_ms: list[int | None] | None = None
    now_ms: int | None = None

    def requests(self, profiles: Mapping[str, Any]) -> list[Request]:
        return [
            Request(
                user_id=u,
                profile=profiles.get(u),
                k=self.k,
                category_hint=self.category_hints[i] if self.category_hints else None,
                query_vector=self.query_vectors[i] if self.query_vectors else None,
                ref_ms=self.ref_ms[i] if self.ref_ms else None,
            )
            for i, u in enumerate(self.user_ids)
        ]


@dataclass
class Scored:
    """A batch's lists (one per user, in order), the profile versions read, each profile's
    newest event (id, time) the list was computed from, and the timings in seconds:
    ``profiles_read``, ``user_model`` (when there is one), ``scoring`` (the scorer)."""

    lists: list[list[ScoredItem]]
    versions: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    sources: dict[str, tuple[str | None, int | None]] = field(default_factory=dict)
    # "topic:partition" of each profile's events (the pusher's ownership check)
    partitions: dict[str, list[str]] = field(default_factory=dict)


class ScoringBackend(Protocol):
    """What the push and pull paths need of scoring (see the module doc)."""

    @property
    def model_version(self) -> str: ...

    def score(self, batch: ScoreBatch) -> Scored: ...

    def record(self, user_ids: Sequence[str], item_ids: Sequence[str]) -> None: ...

    def close(self) -> None: ...


def build_scorer(
    settings: Settings, catalog: Catalog, redis_client: Any, threads: int = 0
) -> tuple[Scorer, CoVisitRecorder | None]:
    """The served scorer: demand adjustments and popularity from Redis, the model folder's user
    model and co-visitation seed (learning from the stream through the returned recorder).
    ``threads``: the user model's ONNX Runtime threads (0 = one per core)."""
    from alerts.effects import RedisDemandAdjustments

    s = settings  # with the model folder's tuned weights already (streams.context.build_context)
    if isinstance(catalog, CatalogIndex):
        catalog.prepare()  # a large catalog's ANN index, before the first round rather than in it
    user_model = None
    if s.scoring.user_model and isinstance(catalog, CatalogIndex):
        # the catalog plug-in (inference.catalog.load_catalog) already added the residuals
        user_model = load_user_model(s.resolved_model_dir, catalog, residuals=False, threads=threads)
    covisit, recorder = None, None
    if s.scoring.covisit_weight > 0:
        seed = load_covisit(s.resolved_model_dir, catalog.ids, catalog.index_of)
        covisit = seed[0] if seed is not None else CoVisitation(len(catalog.ids))
        recorder = CoVisitRecorder(
            covisit,
            catalog.index_of,
            s.scoring.covisit_window,
            s.scoring.covisit_users,
            fold_in_background=s.scoring.covisit_fold_background,
        )
        log.info(
            "co-visitation: %d pairs from the model folder's seed (%s), learning from the stream",
            covisit.nnz,
            "kept dense too" if covisit.has_dense else "sparse",
        )
    scorer = Scorer(
        catalog,
        s.scoring,
        s.profile,
        adjustments=RedisDemandAdjustments(s, redis_client),
        popularity=RedisPopularity(s, redis_client),
        user_model=user_model,
        covisit=covisit,
    )
    return scorer, recorder


class LocalScoring:
    """Profiles read from the store, scored by the scorer, in the calling thread."""

    def __init__(self, store: ProfileStore, scorer: Scorer, recorder: CoVisitRecorder | None = None) -> None:
        self.store = store
        self.scorer = scorer
        self.recorder = recorder

    @property
    def model_version(self) -> str:
        return self.scorer.catalog.model_version

    def score(self, batch: ScoreBatch) -> Scored:
        out, packed = self.score_packed(batch)
        out.lists = [unpack(p) for p in packed]
        return out

    def score_packed(self, batch: ScoreBatch) -> tuple[Scored, list[PackedList]]:
        """:meth:`score` with the lists apart, as the scorer builds them (what the scoring
        process sends); the returned :class:`Scored` has no lists."""
        from streams import metrics

        t0 = time.perf_counter()
        profiles = self.store.get_profiles(batch.user_ids)
        read_s = time.perf_counter() - t0
        metrics.stage_seconds.labels("score_read").observe(read_s)
        out = Scored(
            [],
            {u: p.version for u, p in profiles.items()},
            {"profiles_read": read_s},
            {u: (p.last_event_id, p.last_ts) for u, p in profiles.items()},
            {u: list(p.offsets) for u, p in profiles.items()},
        )
        lists = self.scorer.recommend_packed(
            batch.requests(profiles), now_ms=batch.now_ms, timings=out.timings
        )
        metrics.stage_seconds.labels("score_compute").observe(out.timings["scoring"])
        return out, lists

    def record(self, user_ids: Sequence[str], item_ids: Sequence[str]) -> None:
        if self.recorder is not None and len(user_ids):
            self.recorder.record(user_ids, item_ids)

    def close(self) -> None:
        pass


def local_scoring(settings: Settings, catalog: Catalog, redis_client: Any, threads: int = 0) -> LocalScoring:
    scorer, recorder = build_scorer(settings, catalog, redis_client, threads)
    return LocalScoring(ProfileStore(redis_client, settings, items=catalog), scorer, recorder)


# -- the child process ---------------------------------------------------------------------------


def _child(conn: Connection, settings: Settings, items_factory: str) -> None:
    """Entry point of the scoring process: build the local backend, answer requests in order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker stops us (close, or EOF on the pipe)
    logging.basicConfig(
        level=settings.log_level,
        format="[%(asctime)s] [scoring %(process)d] %(levelname)s %(name)s: %(message)s",
    )
    try:
        catalog = load_factory(items_factory)(settings)
        if not isinstance(catalog, Catalog):
            raise TypeError(f"{items_factory} returned {type(catalog).__name__}, which has no top-k index")
        backend = local_scoring(settings, catalog, settings.redis.client(), settings.scoring.process_threads)
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", backend.model_version))
    settle_heap()
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the worker is gone
            return
        kind = msg[0]
        if kind == "stop":
            return
        try:
            if kind == "record":
                backend.record(msg[1], msg[2])
            elif kind == "score":
                out, packed = backend.score_packed(msg[1])
                conn.send(
                    (
                        "ok",
                        packed,
                        out.versions,
                        out.timings,
                        out.sources,
                        out.partitions,
                    )
                )
        except Exception as exc:
            if kind == "score":  # the worker's retry and /readyz name the service that failed here
                conn.send(("error", traceback.format_exc(limit=8), dependency_of(exc)))
            else:
                log.exception("scoring process: %s message failed", kind)


class ProcessScoring:
    """:class:`LocalScoring` in a child process (see the module doc). Thread-safe.

    Two locks over the one pipe: ``_call_lock`` pairs each score request with its reply (a pull
    request waits for the push round in progress), ``_send_lock`` guards writes and the child's
    (re)start. A ``record`` only writes, so the pipeline's co-visitation hook never waits for a
    scoring round: the child reads the record after the round, in order, before the next request.
    """

    def __init__(self, settings: Settings, items_factory: str, start_timeout_s: float = 300.0) -> None:
        self.settings = settings
        self.items_factory = items_factory
        self.start_timeout_s = start_timeout_s
        self._call_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._proc: Any = None
        self._conn: Connection | None = None
        self._version = ""
        self.restarts = 0
        self._closed = False  # after close(): no call starts a child again (a late hook at shutdown)
        with self._send_lock:
            self._start()

    @property
    def model_version(self) -> str:
        return self._version

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _start(self) -> None:
        ctx = mp.get_context("spawn")  # never fork a process that runs an event loop and threads
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=_child,
            args=(child, self.settings, self.items_factory),
            name="streamrec-scoring",
            daemon=True,
        )
        threads = self.settings.scoring.process_threads
        saved = {k: os.environ.get(k) for k in _THREAD_VARS}
        if threads:  # read by BLAS when the child imports numpy: set them for the child only
            os.environ.update({k: str(threads) for k in _THREAD_VARS})
        try:
            proc.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        child.close()
        if not parent.poll(self.start_timeout_s):
            proc.kill()
            raise RuntimeError(
                f"the scoring process did not start within {self.start_timeout_s:.0f}s (loading the model folder "
                f"{self.settings.resolved_model_dir}); set STREAMREC_SCORING_PROCESS=false to score in the worker"
            )
        try:
            status, detail = parent.recv()
        except EOFError:
            status, detail = "error", f"it exited with code {proc.exitcode}"
        if status != "ready":
            proc.join(5)
            raise RuntimeError(f"the scoring process failed to start: {detail}")
        self._proc, self._conn, self._version = proc, parent, str(detail)
        log.info("scoring process %d ready (model %s)", proc.pid, self._version)

    def _connection(self) -> Connection:
        """The live pipe; a new child when the last one died (never after :meth:`close`)."""
        if self._closed:
            raise RuntimeError("the scoring backend is closed (the worker is stopping)")
        if self._conn is None or self._proc is None or not self._proc.is_alive():
            if self._proc is not None:
                log.error(
                    "the scoring process %d exited (code %s); starting a new one",
                    self._proc.pid,
                    self._proc.exitcode,
                )
                self.restarts += 1
                from streams import metrics

                metrics.scoring_process_restarts.inc()
                self._drop()
            self._start()
        assert self._conn is not None
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn, self._proc = None, None

    def score(self, batch: ScoreBatch) -> Scored:
        n = len(batch.user_ids)
        conn: Connection | None = None
        with self._call_lock:
            try:
                with self._send_lock:
                    conn = self._connection()
                    conn.send(("score", batch))
                reply = conn.recv()  # records sent meanwhile wait in the pipe; no other reader
            except (EOFError, OSError) as exc:
                with self._send_lock:
                    if self._conn is conn:
                        self._drop()
                raise RuntimeError(f"the scoring process died while scoring {n} users") from exc
        if reply[0] != "ok":
            _, trace, dependency = reply
            # An outage is one line per retry (the error itself); a bug keeps its traceback.
            detail = f" {trace.strip().splitlines()[-1]}" if dependency else f"\n{trace}"
            raise DependencyError(f"scoring {n} users failed in the scoring process:{detail}", dependency)
        _, packed, versions, timings, sources, partitions = reply
        observe_timings(timings, n)
        return Scored([unpack(p) for p in packed], versions, timings, sources, partitions)

    def record(self, user_ids: Sequence[str], item_ids: Sequence[str]) -> None:
        if not len(user_ids) or self._closed:  # at shutdown the counts die with the child anyway
            return
        with self._send_lock:  # never waits for a scoring round (see the class doc)
            try:
                self._connection().send(("record", list(user_ids), list(item_ids)))
            except (EOFError, OSError):
                self._drop()  # counts of this batch are lost; the next call restarts the child
                log.warning("the scoring process is gone; %d co-visitation events not counted", len(user_ids))

    def close(self) -> None:
        with self._call_lock, self._send_lock:
            self._closed = True
            if self._conn is not None:
                try:
                    self._conn.send(("stop",))
                except (EOFError, OSError):
                    pass
            if self._proc is not None:
                self._proc.join(10)
                if self._proc.is_alive():
                    self._proc.kill()
            self._drop()


class CoVisitHook:
    """Pipeline hook: the applied events' (user, item) pairs to the backend's co-visitation."""

    def __init__(self, backend: ScoringBackend) -> None:
        self.backend = backend

    def run_blocking(self, events: Sequence[Any], changed_users: set[str]) -> None:
        """The pipeline's entry (:class:`streamrec.interfaces.BlockingHook`), in its worker thread."""
        pairs = [(e.user_id, e.item_id) for e in events if e.item_id]
        if pairs:
            users, items = zip(*pairs, strict=True)
            self.backend.record(users, items)


def scoring_backend(
    settings: Settings, catalog: Catalog, redis_client: Any, items_factory: str | None
) -> ScoringBackend:
    """A child process when ``scoring.process`` is on and the catalog plug-in can be rebuilt there
    (``items_factory``); otherwise scoring in this process."""
    if settings.scoring.process and items_factory:
        return ProcessScoring(settings, items_factory)
    return local_scoring(settings, catalog, redis_client)


def observe_timings(timings: Mapping[str, float], users: int) -> None:
    """A child's timings into the worker's histograms (the child's own registry is not scraped)."""
    from inference import metrics as im
    from streams import metrics

    if "profiles_read" in timings:
        metrics.stage_seconds.labels("score_read").observe(timings["profiles_read"])
    if "user_model" in timings:
        im.user_model_seconds.observe(timings["user_model"])
    if "scoring" in timings:
        im.scoring_seconds.observe(timings["scoring"])
        metrics.stage_seconds.labels("score_compute").observe(timings["scoring"])
    im.scoring_batch_users.observe(users)


__all__ = [
    "CoVisitHook",
    "LocalScoring",
    "ProcessScoring",
    "ScoreBatch",
    "Scored",
    "ScoringBackend",
    "build_scorer",
    "local_scoring",
    "observe_timings",
    "scoring_backend",
]
