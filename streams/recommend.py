"""Fresh recommendations: pushed to the results topic when a profile changes, served on request.

Push: the pipeline calls :class:`RecommendationPusher` (a hook) after each batch of
profile updates with the users whose profiles changed. A user's events within
``scoring.coalesce_ms`` of the first one of a burst give one recomputation; due users are
scored together (one profile pipeline read, one matrix product per ``scoring.batch_users``)
and published to the results topic keyed by user_id:

    {"user_id": "17850", "items": [{"item_id": "85123A", "score": 0.0931, "reason": "similar_to:71053"}],
     "model_version": "minilm-ft-20261128-1a2b3c", "generated_at": 1795880000123,
     "source_event_id": "3f1c...", "event_to_result_ms": 212}

Pull: :meth:`RecommendationService.recommend_one` backs ``GET /recommendations/{user_id}``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from inference.encoder import MicroBatcher
from inference.popularity import RedisPopularity
from inference.scoring import ScoredItem
from profiles.store import ProfileStore
from streamrec.events import Event
from streamrec.interfaces import BlockingHook, Catalog, Hook, TextEncoder
from streamrec.kafka import KafkaProducer, ProduceError
from streamrec.settings import Settings
from streams import metrics
from streams.faults import Backoff
from streams.scoring_backend import CoVisitHook, ScoreBatch, ScoringBackend, scoring_backend

log = logging.getLogger(__name__)

MAX_K = 200
MAX_QUERY_CHARS = 512
# seconds before the users of a round whose delivery was not acknowledged are pushed again
CONFIRM_RETRY_S = 1.0


def result_message(
    user_id: str,
    items: Sequence[ScoredItem],
    model_version: str,
    source_event_id: str | None,
    event_ts_ms: int | None,
    now_ms: int | None = None,
) -> dict[str, Any]:
    """The results-topic message (also the pull endpoint's JSON body): a
    :class:`streamrec.messages.ResultMessage` as builtins (its JSON Schema is published)."""
    import msgspec

    from streamrec.messages import RecommendedItem, ResultMessage

    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    msg = ResultMessage(
        user_id=str(user_id),
        items=[RecommendedItem(str(i), round(float(s), 6), str(r)) for i, s, r in items],
        model_version=str(model_version),
        generated_at=int(now_ms),
        source_event_id=source_event_id,
        event_to_result_ms=int(now_ms - event_ts_ms) if event_ts_ms is not None else None,
    )
    return msgspec.to_builtins(msg)


class RecommendationService:
    """Profiles + scorer (+ query encoder): the one place that turns users into top-K lists.

    The scoring itself runs in the ``backend`` (``streams/scoring_backend.py``): in a child
    process on the worker, in the calling thread in tests and evaluations. ``store`` is the
    worker's own profile store (owed pushes after a crash)."""

    def __init__(
        self,
        settings: Settings,
        store: ProfileStore,
        backend: ScoringBackend,
        query_encoder: MicroBatcher | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.backend = backend
        self.query_encoder = query_encoder

    @property
    def model_version(self) -> str:
        return self.backend.model_version

    def recommend_many(
        self,
        user_ids: Sequence[str],
        k: int,
        category_hints: Sequence[str | None] | None = None,
        query_vectors: Sequence[np.ndarray | None] | None = None,
        ref_ms: Sequence[int | None] | None = None,
        now_ms: int | None = None,
        versions: dict[str, int] | None = None,
        sources: dict[str, tuple[str | None, int | None]] | None = None,
        partitions: dict[str, list[str]] | None = None,
    ) -> list[list[ScoredItem]]:
        """Top-k lists of the users; ``versions`` (if given) receives the profile versions read,
        ``sources`` each profile's newest event (id, time): what the list was computed from,
        ``partitions`` the "topic:partition" its events were read from."""
        batch = ScoreBatch(
            list(user_ids),
            k,
            list(category_hints) if category_hints else None,
            list(query_vectors) if query_vectors else None,
            list(ref_ms) if ref_ms else None,
            now_ms,
        )
        out = self.backend.score(batch)
        if versions is not None:
            versions.update(out.versions)
        if sources is not None:
            sources.update(out.sources)
        if partitions is not None:
            partitions.update(out.partitions)
        return out.lists

    async def recommend_one(self, user_id: str, k: int | None = None, q: str | None = None) -> dict[str, Any]:
        """The pull path. Raises ValueError with a user-facing message on bad input."""
        k = self.settings.scoring.top_k if k is None else k
        if not 1 <= k <= MAX_K:
            raise ValueError(f"k must be between 1 and {MAX_K}, got {k}")
        qv = None
        if q is not None:
            q = q.strip()
            if len(q) > MAX_QUERY_CHARS:
                raise ValueError(f"q must be at most {MAX_QUERY_CHARS} characters, got {len(q)}")
            if q:
                if self.query_encoder is None:
                    raise ValueError("ad-hoc queries need the encoder, which this worker has not loaded")
                qv = await self.query_encoder.encode(q)
        items = await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.recommend_many([user_id], k, query_vectors=[qv])[0]
        )
        return result_message(user_id, items, self.model_version, None, None)


@dataclass
class _Pending:
    since: float  # monotonic seconds when the user's profile first changed after their last push
    event_id: str  # the newest event seen for the user (the scored profile's own comes first)
    event_ts: int
    category: str | None


class RecommendationPusher:
    """Pipeline hook: push fresh top-K lists, leading edge first, trailing coalesced.

    A user's first change after a quiet spell is scored at once (leading edge). Changes within
    the coalescing window of their last push wait and give one trailing recomputation at the
    end of that window, from the newest profile. The window is twice the recent scoring round
    time, at most ``scoring.coalesce_ms``: a few milliseconds at low load, wider under load. A round scores every due user together (one
    profile read, one matrix product per ``scoring.batch_users``) in a worker thread while the
    event loop goes on consuming; changes that arrive during a round join the next one. So
    under load coalescing widens by itself to at least the round time: each user gets fewer,
    fresher pushes, the pending set holds each user once, and lag stays bounded.

    No timer ticks: the loop sleeps until a change arrives or the earliest trailing push is due.
    """

    def __init__(
        self,
        settings: Settings,
        service: RecommendationService,
        publish: Callable[[str, bytes], None],
        flush: Callable[[], object] | None = None,
        confirm: Callable[[Sequence[tuple[str, int]]], object] | None = None,
        drain: Callable[[], object] | None = None,
    ) -> None:
        self.settings = settings
        self.service = service
        # (user, profile version) pushed → wait for delivery, then clear the users' owed pushes.
        self._confirm = confirm
        self._confirming: set[asyncio.Task] = set()
        self.publish = publish  # (key, value) -> None; e.g. KafkaProducer.produce on the results topic
        self._flush_producer = flush
        self._drain = drain  # blocks until every published list is at the broker (revocation)
        self._generation = 0  # bumped on revocation: a round scored before it publishes nothing
        # "topic:partition" of the events topic this worker owns (None: no group, push everyone).
        # Checked when a list is about to be published, so nothing is pushed for a user whose
        # partition is another worker's (a late batch after a revocation, a retried round).
        self.owned: Collection[str] | None = None
        self._unconfirmed: Counter[str] = Counter()  # published users whose delivery is not confirmed yet
        self.pending: dict[str, _Pending] = {}
        self.max_window_s = settings.scoring.coalesce_ms / 1000.0
        self._round_s = 0.0  # moving average of a scoring round's duration
        self.backoff = Backoff("recommendation push", settings)  # spacing and logs while Redis/Kafka is down
        self._last_push: dict[str, float] = {}  # user -> monotonic time of the last push (recent only)
        self._push_log: deque[tuple[float, str]] = deque()  # (time, user) in push order, to prune
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._closed = False  # stop() ran: no new round ever starts
        self.rounds = 0
        # Called with every pushed message (user id, message dict), e.g. the explorer's live feed.
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []

    async def __call__(self, events: Sequence[Event], changed_users: set[str]) -> None:
        """Hook entry: remember which users need fresh recommendations, wake the loop."""
        if self._closed:  # shutting down: the changes stay owed in Redis for the next owner
            return
        now = time.monotonic()
        latest: dict[str, Event] = {}
        for ev in events:
            if ev.user_id in changed_users:
                cur = latest.get(ev.user_id)
                if cur is None or ev.ts >= cur.ts:
                    latest[ev.user_id] = ev
        for u, ev in latest.items():
            p = self.pending.get(u)
            if p is None:
                self.pending[u] = _Pending(now, ev.event_id, ev.ts, ev.category)
            else:  # not pushed yet: point at the newest event
                p.event_id, p.event_ts, p.category = ev.event_id, ev.ts, ev.category or p.category
        if latest:
            self._wake.set()
        self.start()  # also revives a loop that ended (see _loop_ended): pending users are never stranded

    def start(self) -> None:
        if self._closed:
            return
        if self._task is None or self._task.done():
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(self._run(), name="recommendation-pusher")
            self._task.add_done_callback(self._loop_ended)

    def _loop_ended(self, task: asyncio.Task) -> None:
        """The push loop ends only in :meth:`stop`; anything else is logged, and the next change or
        owed-push recovery starts it again."""
        if self._stopping:
            return
        exc = None if task.cancelled() else task.exception()
        log.error(
            "the recommendation push loop ended unexpectedly (%s); %d users pending, restarted by the next change",
            "cancelled" if task.cancelled() else f"{type(exc).__name__}: {exc}",
            len(self.pending),
            exc_info=exc,
        )

    async def stop(self) -> None:
        """Push what is pending and stop for good (worker shutdown): a batch that finishes after
        this leaves its users owed in Redis instead of restarting the loop, so no list is pushed
        once the partitions may already belong to another worker."""
        self._closed = True
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)  # a loop that died was logged
            self._task = None
        await self.flush_due(force=True)
        if self._confirming:
            await asyncio.gather(*self._confirming, return_exceptions=True)

    async def _confirm_delivery(self, pushed: list[tuple[str, int]], generation: int) -> None:
        """Wait for the broker to acknowledge a round's lists; on failure take up the owed pushes.

        A list not acknowledged leaves its user owed in Redis. ``CONFIRM_RETRY_S`` later the
        owner takes up what is still owed (:meth:`recover`: only users whose push was not
        delivered meanwhile, scored from their newest profile), not at the next owed sweep, so a
        broker restart costs the users seconds, not a sweep period. Delivery is at least once: a
        list that was only late (still queued when the flush gave up) may arrive besides the new one.
        """
        assert self._confirm is not None
        failed = False
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._confirm, pushed)
        except Exception:
            failed = True
            log.exception(
                "delivery of %d pushed lists not confirmed; owed pushes taken up in %.0fs",
                len(pushed),
                CONFIRM_RETRY_S,
            )
        finally:
            self._unconfirmed.subtract(u for u, _ in pushed)
            for u, _ in pushed:
                if self._unconfirmed[u] <= 0:
                    del self._unconfirmed[u]
        if not failed or self._closed:
            return
        await asyncio.sleep(CONFIRM_RETRY_S)  # spacing: a producer that fails at once is not spun on
        if self._closed or generation != self._generation:
            return  # shutting down or revoked: the users stay owed for their next owner
        try:
            await self.recover()
        except Exception:  # Redis down too: the owed sweep takes them up once it answers
            log.exception("owed pushes not taken up after an unconfirmed delivery; left to the sweep")

    async def recover(self) -> int:
        """Owe a push to every user whose profile changed without a delivered push (after a crash).

        With ``owned`` set, only the users whose events partition this worker owns now: only a
        user's owner pushes them, so a recovered list cannot land after the owner's fresher one.
        ``None`` recovers the whole owed set (one worker). A profile that names no partition of the
        events topic is recovered by every worker (at least once).
        """
        store = self.service.store
        loop = asyncio.get_running_loop()
        generation = self._generation
        owed = await loop.run_in_executor(None, store.pending_pushes)
        users = [u for u, _ in owed if u not in self.pending and u not in self._unconfirmed]
        profiles = await loop.run_in_executor(None, store.get_profiles, users) if users else {}
        if generation != self._generation:  # revoked while reading: the new owners take them up
            return 0
        now = time.monotonic()
        mine = 0
        for u in users:
            prof = profiles.get(u)
            if prof is None or u in self.pending or u in self._unconfirmed:
                continue  # gone, named by a hook while we read, or a list of theirs is on its way
            if self.owned is not None and not self._owns(prof.offsets, self.owned):
                continue
            self.pending[u] = _Pending(now, prof.last_event_id or "", prof.last_ts or 0, None)
            mine += 1
        if mine:
            metrics.pushes_recovered.inc(mine)
            log.info("owed pushes recovered: %d users", mine)
        if self.pending:  # recovered, or pending already: make sure a live loop pushes them
            self._wake.set()
            self.start()
        return mine

    def _owns(self, tps: Iterable[str], partitions: Collection[str]) -> bool:
        """A profile whose events came from ``tps`` belongs to the owner of one of them (one
        partition per user: events are keyed by user id); one with none of the events topic is
        everyone's."""
        prefix = self.settings.topics.events + ":"
        mine = [tp for tp in tps if tp.startswith(prefix)]
        return not mine or any(tp in partitions for tp in mine)

    async def revoke(self) -> None:
        """Partitions revoked (a rebalance): forget the users not pushed yet and drain the producer.

        They stay owed in Redis, so whoever owns their partitions next (this worker too) recovers
        them; a round scored before the revocation publishes nothing; the lists already published
        reach the broker before the rebalance ends, ahead of anything the next owner pushes.
        """
        self._generation += 1
        self.owned = set()  # until the next assignment
        dropped = len(self.pending)
        self.pending.clear()
        if self._drain is not None:
            try:
                await asyncio.get_running_loop().run_in_executor(None, self._drain)
            except Exception:  # they stay owed: the partitions' next owner pushes them again
                log.exception("published lists not confirmed at revocation; they stay owed")
        if dropped:
            metrics.pushes_handed_over.inc(dropped)
            log.info("partitions revoked: %d users not pushed yet are left to their next owner", dropped)

    async def _run(self) -> None:
        while not self._stopping:
            try:
                pushed = await self.flush_due()
            except Exception as exc:  # never let one bad round stop the pusher: its users stay pending
                await asyncio.sleep(self.backoff.failed(exc))
                continue
            if pushed or not self.pending:
                self.backoff.succeeded()  # a round went through, or nothing is owed any more
            wait = self._next_due_in()
            if wait is None or wait > 0:
                self._wake.clear()
                # nothing became due, and no stop() came while the round ran (its wake-up was
                # just cleared)
                if self._next_due_in() != 0.0 and not self._stopping:
                    try:
                        await asyncio.wait_for(self._wake.wait(), timeout=wait)
                    except TimeoutError:
                        pass

    @property
    def window_s(self) -> float:
        """The coalescing window now: 2 × the moving average round time, capped by ``coalesce_ms``."""
        return min(self.max_window_s, 2.0 * self._round_s)

    def _prune(self, now: float) -> None:
        while self._push_log and now - self._push_log[0][0] >= self.max_window_s:
            at, u = self._push_log.popleft()
            if self._last_push.get(u) == at:
                del self._last_push[u]

    def _due_at(self, u: str) -> float:
        last = self._last_push.get(u)
        return 0.0 if last is None else last + self.window_s

    def _next_due_in(self) -> float | None:
        """Seconds until the next pending user is due (0 = now), None when nothing is pending."""
        if not self.pending:
            return None
        now = time.monotonic()
        self._prune(now)
        return max(0.0, min(self._due_at(u) for u in self.pending) - now)

    def _take_due(self, force: bool) -> tuple[list[str], list[_Pending]]:
        now = time.monotonic()
        self._prune(now)
        users = [u for u in self.pending if force or self._due_at(u) <= now]
        return users, [self.pending.pop(u) for u in users]

    async def flush_due(self, force: bool = False) -> int:
        """Score and publish every due user (all pending with ``force``). Returns users published."""
        due, pend = self._take_due(force)
        if not due:
            return 0
        batch = self.settings.scoring.batch_users
        loop = asyncio.get_running_loop()
        self.rounds += 1
        stage = metrics.stage_seconds
        started = time.monotonic()
        for p in pend:
            stage.labels("push_wait").observe(started - p.since)
        versions: dict[str, int] = {}
        sources: dict[str, tuple[str | None, int | None]] = {}
        partitions: dict[str, list[str]] = {}
        done = 0
        generation = self._generation
        try:
            for start in range(0, len(due), batch):
                users, ps = due[start : start + batch], pend[start : start + batch]
                t0 = time.perf_counter()
                lists = await loop.run_in_executor(
                    None,
                    functools.partial(
                        self.service.recommend_many,
                        users,
                        self.settings.scoring.top_k,
                        category_hints=[p.category for p in ps],
                        ref_ms=[p.event_ts for p in ps],
                        versions=versions,
                        sources=sources,
                        partitions=partitions,
                    ),
                )
                t1 = time.perf_counter()
                stage.labels("score").observe(t1 - t0)
                if generation != self._generation:  # revoked meanwhile: the next owners push them
                    versions.clear()
                    done = len(due)
                    break
                n_scored = len(users)
                if self.owned is not None:  # another worker's users now: they stay owed for it
                    users, ps, lists = self._owned_only(users, ps, lists, partitions, versions)
                self._publish(users, ps, lists, sources)
                stage.labels("publish").observe(time.perf_counter() - t1)
                done = start + n_scored
        except BaseException:
            if generation == self._generation:  # not pushed: they stay pending, retried next round
                self._restore(due[done:], pend[done:])
            raise
        if self._flush_producer is not None:
            self._flush_producer()
        if self._confirm is not None and versions:
            self._unconfirmed.update(versions.keys())  # one count per user and round (not the version)
            task = loop.create_task(self._confirm_delivery(list(versions.items()), generation))
            self._confirming.add(task)
            task.add_done_callback(self._confirming.discard)
        self._round_s = 0.8 * self._round_s + 0.2 * (time.monotonic() - started)
        return len(due)

    def _owned_only(
        self,
        users: Sequence[str],
        ps: Sequence[_Pending],
        lists: Sequence[list[ScoredItem]],
        partitions: Mapping[str, list[str]],
        versions: dict[str, int],
    ) -> tuple[list[str], list[_Pending], list[list[ScoredItem]]]:
        """The users (and their pending entries and lists) whose partition this worker owns now;
        the others lose their version (no confirmation: they stay owed for their owner)."""
        owned = self.owned if self.owned is not None else ()
        keep = [j for j, u in enumerate(users) if self._owns(partitions.get(u, ()), owned)]
        if len(keep) < len(users):
            for j in set(range(len(users))).difference(keep):
                versions.pop(users[j], None)
            metrics.pushes_handed_over.inc(len(users) - len(keep))
        return [users[j] for j in keep], [ps[j] for j in keep], [lists[j] for j in keep]

    def _restore(self, users: Sequence[str], pend: Sequence[_Pending]) -> None:
        """Put users whose round failed back into the pending set (a newer change keeps its
        event, the older ``since`` is kept)."""
        for u, p in zip(users, pend, strict=True):
            cur = self.pending.get(u)
            if cur is None:
                self.pending[u] = p
            else:
                cur.since = min(cur.since, p.since)

    def _publish(
        self,
        users: Sequence[str],
        ps: Sequence[_Pending],
        lists: Sequence[list[ScoredItem]],
        sources: Mapping[str, tuple[str | None, int | None]],
    ) -> None:
        """Publish the lists. A list names the newest event of the profile it was computed from
        (``sources``), not the event that made the user pending: a user recovered from a profile
        read a moment ago, or changed again while the round ran, is labelled with what was scored."""
        version = self.service.model_version
        now_ms = int(time.time() * 1000)
        now = time.monotonic()
        for u, p, items in zip(users, ps, lists, strict=True):
            event_id, event_ts = sources.get(u, (None, None))
            if event_id is None or event_ts is None:
                event_id, event_ts = p.event_id, p.event_ts
            msg = result_message(u, items, version, event_id, event_ts, now_ms)
            self.publish(u, orjson.dumps(msg))
            for listener in self.listeners:
                listener(u, msg)
            self._last_push[u] = now
            self._push_log.append((now, u))
            lag_s = (now_ms - event_ts) / 1000.0
            if 0 <= lag_s < 3600:  # replays of historic data would swamp the histogram
                metrics.event_to_result_seconds.observe(lag_s)
        metrics.results_published.inc(len(users))


class PopularityRecorder:
    """Pipeline hook: count applied events into the decayed popularity (cold-start fallback)."""

    def __init__(self, popularity: RedisPopularity, item_category: Mapping[str, str]) -> None:
        self.popularity = popularity
        self.item_category = item_category

    def run_blocking(self, events: Sequence[Event], changed_users: set[str]) -> None:
        """The pipeline's entry (:class:`streamrec.interfaces.BlockingHook`), in its worker thread."""
        self.popularity.record(events, self.item_category)


@dataclass
class PushPath:
    """The recommendation services of a worker: pull service, push hook, popularity recorder."""

    service: RecommendationService
    pusher: RecommendationPusher
    popularity: PopularityRecorder
    query_encoder: MicroBatcher | None
    covisit: CoVisitHook | None = None  # counts the applied events into the scorer's co-visitation

    @property
    def hooks(self) -> list[Hook | BlockingHook]:
        return [self.popularity, *([self.covisit] if self.covisit else []), self.pusher]

    async def close(self) -> None:
        """Publish what is pending (worker shutdown), then stop the scoring backend; the caller
        flushes the producer."""
        try:
            await self.pusher.stop()
        finally:
            await asyncio.get_running_loop().run_in_executor(None, self.service.backend.close)


def build_push_path(
    settings: Settings,
    catalog: Catalog,
    store: ProfileStore,
    redis_client: Any,
    encoder: TextEncoder | None,
    producer: KafkaProducer,
    item_category: Mapping[str, str],
    items_factory: str | None = None,
) -> PushPath:
    """Scoring backend (a child process when ``scoring.process`` and the catalog plug-in
    ``items_factory`` allow it), query micro-batcher, pull service, pusher.

    ``item_category`` is the catalog's item → category map (the same one the demand hook uses).
    """
    s = settings
    backend = scoring_backend(s, catalog, redis_client, items_factory)
    batcher = None
    if encoder is not None:
        batcher = MicroBatcher(encoder, max_batch=s.encoder.max_batch, max_wait_ms=s.encoder.max_wait_ms)
    service = RecommendationService(s, store, backend, query_encoder=batcher)
    topic = s.topics.results

    def publish(key: str, value: bytes) -> None:
        producer.produce(topic, value, key.encode())

    def confirm(pushed: Sequence[tuple[str, int]]) -> None:
        # raises when some are still queued or one of these users' lists failed (not another round's)
        producer.flush(30.0, topic=topic, keys={u.encode() for u, _ in pushed})
        store.clear_pending(pushed)

    def drain() -> None:
        left = producer.wait_delivered(10.0)  # errors stay for the confirmations that own them
        if left:
            raise ProduceError(f"{left} record(s) still queued after 10s at a partition revocation")

    pusher = RecommendationPusher(s, service, publish, flush=producer.poll, confirm=confirm, drain=drain)
    covisit = CoVisitHook(backend) if s.scoring.covisit_weight > 0 else None
    popularity = PopularityRecorder(RedisPopularity(s, redis_client), item_category)
    return PushPath(service, pusher, popularity, batcher, covisit)
