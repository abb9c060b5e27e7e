"""Scoring in a child process: the same lists as in-process scoring, restarts after a crash,
co-visitation learned there, and a failed round loses no pending user."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from support.profile_reference import make_catalog

from inference.scoring import ScoredItem
from profiles.store import Position, ProfileStore
from streamrec.events import make_event
from streams.recommend import RecommendationPusher, RecommendationService
from streams.scoring_backend import LocalScoring, ProcessScoring, ScoreBatch, Scored, local_scoring

T0 = 1_700_000_000_000
ITEMS = "support.profile_reference:make_catalog"


@pytest.fixture
def shop(settings, redis_client):
    """(settings with co-visitation on, catalog, store with 12 users' click histories)."""
    s = settings.override(  # inline folds: both backends see the same counts at the same call
        scoring={"covisit_weight": 0.3, "covisit_candidates": 20, "covisit_fold_background": False}
    )
    catalog = make_catalog(s)
    store = ProfileStore(redis_client, s, items=catalog)
    events = [
        make_event(
            "click", f"u{u}", item_id=catalog.ids[(u * 7 + j * 3) % len(catalog.ids)], ts=T0 + 1000 * j
        )
        for u in range(12)
        for j in range(6)
    ]
    store.apply_batch(events, positions=[Position("ev", 0, k) for k in range(len(events))])
    return s, catalog, store, events


def _ids(lists: list[list[ScoredItem]]) -> list[list[str]]:
    return [[it.item_id for it in x] for x in lists]


def test_the_child_process_scores_exactly_as_the_worker_thread_would(shop, redis_client):
    s, catalog, store, events = shop
    users = [f"u{u}" for u in range(12)] + ["nobody"]
    local = local_scoring(s, catalog, redis_client)
    remote = ProcessScoring(s, ITEMS)
    try:
        assert remote.pid is not None and remote.pid != os.getpid()
        assert remote.model_version == local.model_version
        # both learn co-visitation from the same applied events; a recorder folds on a record
        # call once a second has passed since it started, so both fold this one
        time.sleep(1.1)
        pairs = [(e.user_id, e.item_id or "") for e in events]
        for backend in (local, remote):
            backend.record([u for u, _ in pairs], [i for _, i in pairs])
        assert local.recorder is not None and local.recorder.covisit.nnz > 0
        refs: list[int | None] = [T0 + 10_000] * len(users)
        batch = ScoreBatch(users, 10, ref_ms=refs, now_ms=T0 + 10_000)
        remote_out = remote.score(batch)
        got, want = remote_out.lists, local.score(batch).lists
        assert any(it.reason.startswith("similar_to") for x in want for it in x)
        assert _ids(got) == _ids(want)
        for g, w in zip(got, want, strict=True):
            assert [it.reason for it in g] == [it.reason for it in w]
            assert [it.score for it in g] == pytest.approx([it.score for it in w], abs=1e-6)
        assert len(got[0]) == 10 and got[-1]  # a cold user gets the fallback
        assert remote_out.versions == {u: p.version for u, p in store.get_profiles(users).items()}
        assert set(remote_out.timings) >= {"profiles_read", "scoring"}
    finally:
        remote.close()
    assert remote.pid is None


def test_recording_never_waits_for_a_scoring_round_and_is_applied_before_the_next(shop, redis_client):
    """The pipeline's co-visitation hook must not stall consuming for a round's duration."""
    import threading

    s, catalog, store, events = shop
    users = [f"u{u}" for u in range(12)]
    local = local_scoring(s, catalog, redis_client)
    remote = ProcessScoring(s, ITEMS)
    try:
        time.sleep(1.1)  # both recorders fold on this record call (see the test above)
        pairs = [(e.user_id, e.item_id or "") for e in events]
        local.record([u for u, _ in pairs], [i for _, i in pairs])
        with remote._call_lock:  # a scoring round in flight holds the call lock
            t = threading.Thread(target=remote.record, args=([u for u, _ in pairs], [i for _, i in pairs]))
            t.start()
            t.join(10)
            assert not t.is_alive(), "record waited for the scoring round"
        batch = ScoreBatch(users, 10, ref_ms=[T0 + 10_000] * len(users), now_ms=T0 + 10_000)
        want = local.score(batch).lists
        assert any(it.reason.startswith("similar_to") for x in want for it in x)
        assert _ids(remote.score(batch).lists) == _ids(want)  # the record was applied first
    finally:
        remote.close()


def test_a_killed_scoring_process_fails_its_call_and_the_next_call_restarts_it(shop):
    s, catalog, store, events = shop
    remote = ProcessScoring(s, ITEMS)
    try:
        first = remote.score(ScoreBatch(["u1", "u2"], 5, now_ms=T0)).lists
        pid = remote.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        remote._proc.join(10)  # reaped: the next call sees it dead
        again = remote.score(ScoreBatch(["u1", "u2"], 5, now_ms=T0)).lists
        assert remote.restarts == 1 and remote.pid not in (None, pid)
        assert _ids(again) == _ids(first)
    finally:
        remote.close()


def test_after_close_no_call_starts_a_child_again(shop):
    """A hook that records co-visitation late, while the worker stops, must not spawn a new
    scoring process (loading the model would hold the shutdown for tens of seconds)."""
    s = shop[0]
    remote = ProcessScoring(s, ITEMS)
    remote.close()
    remote.record(["u1"], ["i1"])
    assert remote.pid is None and remote.restarts == 0  # no child started by a late record
    with pytest.raises(RuntimeError, match="closed"):
        remote.score(ScoreBatch(["u1"], 5))
    assert remote.pid is None and remote.restarts == 0


def test_a_child_that_cannot_load_its_catalog_says_why(settings):
    with pytest.raises(RuntimeError, match="failed to start.*cannot load"):
        ProcessScoring(settings, "no_such_module:catalog")


class _Flaky:
    """A backend that fails its first call (a scoring process that died mid-round)."""

    def __init__(self, inner: LocalScoring) -> None:
        self.inner = inner
        self.calls = 0

    @property
    def model_version(self) -> str:
        return self.inner.model_version

    def score(self, batch: ScoreBatch) -> Scored:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("the scoring process died while scoring")
        return self.inner.score(batch)

    def record(self, users, items) -> None:  # noqa: ANN001
        pass

    def close(self) -> None:
        pass


def test_users_of_a_failed_round_stay_pending_and_are_pushed_by_the_next(shop, redis_client):
    s, catalog, store, events = shop
    flaky = _Flaky(local_scoring(s, catalog, redis_client))
    published: list[str] = []
    pusher = RecommendationPusher(
        s, RecommendationService(s, store, flaky), lambda user, value: published.append(user)
    )

    async def run() -> None:
        await pusher(events, {e.user_id for e in events})
        for _ in range(200):
            if len(published) >= 12:
                break
            await asyncio.sleep(0.02)
        await pusher.stop()

    asyncio.run(run())
    assert flaky.calls >= 2
    assert sorted(published) == sorted({e.user_id for e in events})


def test_a_redis_failure_in_the_child_is_reported_as_redis(settings):
    """The worker's retry log and /readyz must name Redis when the scoring process lost it,
    not "an unexpected error": the exception crosses the pipe as its traceback and a tag."""
    import socket

    from streams.faults import REDIS, dependency_of

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    s = settings.override(redis={"url": f"redis://127.0.0.1:{port}/0"})
    remote = ProcessScoring(s, ITEMS)
    try:
        with pytest.raises(RuntimeError, match="failed in the scoring process") as err:
            remote.score(ScoreBatch(["u1", "u2"], 5, now_ms=T0))
        assert dependency_of(err.value) == REDIS
        assert "ConnectionError" in str(err.value)
    finally:
        remote.close()
