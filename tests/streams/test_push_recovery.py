"""Derived state is state: every user whose profile changed gets a fresh push, even across a crash.

The store marks a user as owed a push in the same pipeline as their profile write; the pusher
clears the mark only once a list computed from that profile version (or a later one) is
delivered. A worker that died in between leaves the marks, and the next one pushes them.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import orjson

from inference.catalog import CatalogIndex
from inference.scoring import Scorer
from profiles.store import Position, ProfileStore
from streamrec.events import make_event
from streams import metrics
from streams.recommend import RecommendationPusher, RecommendationService, _Pending
from streams.scoring_backend import LocalScoring

T0 = 1_700_000_000_000


def _catalog() -> CatalogIndex:
    rng = np.random.default_rng(5)
    v = rng.normal(size=(60, 16)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return CatalogIndex.from_arrays([f"i{k}" for k in range(60)], v, "t", categories=["c"] * 60)


def _pusher(settings, store, catalog, published, confirm=True) -> RecommendationPusher:
    service = RecommendationService(
        settings, store, LocalScoring(store, Scorer(catalog, settings.scoring, settings.profile))
    )

    def publish(user: str, value: bytes) -> None:
        published.append(user)

    return RecommendationPusher(
        settings, service, publish, confirm=(lambda pushed: store.clear_pending(pushed)) if confirm else None
    )


def _apply(store: ProfileStore, events, offset0: int) -> None:
    store.apply_batch(events, positions=[Position("ev", 0, offset0 + k) for k in range(len(events))])


def test_users_changed_before_a_crash_are_pushed_by_the_next_worker(settings, redis_client):
    catalog = _catalog()
    store = ProfileStore(redis_client, settings, items=catalog)
    users = [f"u{k}" for k in range(6)]
    events = [
        make_event("click", u, item_id=f"i{k * 3 + j}", ts=T0 + j)
        for k, u in enumerate(users)
        for j in range(3)
    ]
    _apply(store, events, 0)
    # The worker died here: profiles written, nothing pushed.
    assert sorted(u for u, _ in store.pending_pushes()) == users

    async def next_worker() -> list[str]:
        published: list[str] = []
        pusher = _pusher(settings, store, catalog, published)
        assert await pusher.recover() == len(users)
        await pusher.flush_due(force=True)
        await pusher.stop()  # waits for the delivery confirmations
        return published

    assert sorted(asyncio.run(next_worker())) == users
    assert store.pending_pushes() == []


def test_a_user_changed_again_after_the_read_stays_owed(settings, redis_client):
    catalog = _catalog()
    store = ProfileStore(redis_client, settings, items=catalog)
    _apply(store, [make_event("view", "a", item_id="i1", ts=T0)], 0)
    [(user, version)] = store.pending_pushes()
    _apply(store, [make_event("view", "a", item_id="i2", ts=T0 + 1)], 1)  # changes after our read
    assert store.clear_pending([(user, version)]) == 0
    assert store.pending_pushes() == [("a", version + 1)]
    assert store.clear_pending([("a", version + 1)]) == 1 and store.pending_pushes() == []


def test_a_push_that_was_not_delivered_stays_owed(settings, redis_client):
    catalog = _catalog()
    store = ProfileStore(redis_client, settings, items=catalog)
    _apply(store, [make_event("view", "b", item_id="i3", ts=T0)], 0)

    def undelivered(pushed):
        raise RuntimeError("broker down")

    async def run() -> None:
        published: list[str] = []
        pusher = _pusher(settings, store, catalog, published, confirm=False)
        pusher._confirm = undelivered
        await pusher.recover()
        await pusher.flush_due(force=True)
        await pusher.stop()
        assert published == ["b"]

    asyncio.run(run())
    assert [u for u, _ in store.pending_pushes()] == ["b"]


def _failing_once(settings, redis_client, monkeypatch, delivered_meanwhile: str | None = None):
    """Users b and c owed a push, and a confirmation that fails its first call (the broker
    restarted mid-flush; ``delivered_meanwhile``'s list was delivered by another push then) and
    clears what it confirms after that. Returns (catalog, store, attempts, confirm)."""
    import streams.recommend as recommend

    monkeypatch.setattr(recommend, "CONFIRM_RETRY_S", 0.05)
    catalog = _catalog()
    store = ProfileStore(redis_client, settings, items=catalog)
    _apply(
        store, [make_event("view", "b", item_id="i3", ts=T0), make_event("view", "c", item_id="i4", ts=T0)], 0
    )
    attempts: list[list[str]] = []

    def flaky(pushed):
        attempts.append(sorted(u for u, _ in pushed))
        if len(attempts) == 1:
            store.clear_pending([(u, v) for u, v in pushed if u == delivered_meanwhile])
            raise RuntimeError("broker restarted: 2 messages timed out")
        store.clear_pending(pushed)

    return catalog, store, attempts, flaky


async def _run_pusher(settings, store, catalog, confirm, until_revoked=None) -> list[str]:
    """A running pusher over what is owed, until nothing is owed and no confirmation is pending
    (the loop runs on its own: no sweep, no further hook call); with ``until_revoked``, revoked
    as soon as that list has an attempt and given the retry's wait. Returns the users published."""
    published: list[str] = []
    pusher = _pusher(settings, store, catalog, published, confirm=False)
    pusher._confirm = confirm
    await pusher.recover()
    pusher.start()
    for _ in range(400):
        if until_revoked:
            await pusher.revoke()  # the partitions moved while the retry waits
            await asyncio.sleep(0.3)
            break
        if store.pending_pushes() == [] and not pusher._confirming:
            break
        await asyncio.sleep(0.025)
    await pusher.stop()
    return published


def test_a_push_whose_delivery_failed_is_pushed_again_without_waiting_for_the_sweep(
    settings, redis_client, monkeypatch
):
    """The broker did not acknowledge a round (restarted mid-flush): its users are pushed again
    a moment later by the running pusher, and the second, delivered push clears what they owe."""
    catalog, store, attempts, flaky = _failing_once(settings, redis_client, monkeypatch)
    published = asyncio.run(_run_pusher(settings, store, catalog, flaky))
    assert attempts == [["b", "c"], ["b", "c"]]
    assert sorted(published) == ["b", "b", "c", "c"]
    assert store.pending_pushes() == []


def test_after_a_failed_delivery_only_what_is_still_owed_is_pushed_again(settings, redis_client, monkeypatch):
    """c's list was delivered meanwhile (a newer push, the sweep): only b is pushed again; and a
    revocation during the wait leaves the users to their next owner."""
    catalog, store, attempts, flaky = _failing_once(
        settings, redis_client, monkeypatch, delivered_meanwhile="c"
    )
    assert sorted(asyncio.run(_run_pusher(settings, store, catalog, flaky))) == ["b", "b", "c"]
    assert attempts == [["b", "c"], ["b"]] and store.pending_pushes() == []

    attempts.clear()
    _apply(store, [make_event("view", "b", item_id="i5", ts=T0 + 5)], 2)
    assert sorted(asyncio.run(_run_pusher(settings, store, catalog, flaky, until_revoked=attempts))) == ["b"]
    assert attempts == [["b"]]
    assert [u for u, _ in store.pending_pushes()] == ["b"]  # still owed, for the next owner


def test_a_push_loop_that_ended_is_restarted_by_the_next_change_or_the_owed_sweep(settings, redis_client):
    """The loop should only end in stop(); if it ends otherwise (here: cancelled), its pending
    users must not be stranded: the next change restarts it, and so does the owed sweep."""
    catalog = _catalog()
    store = ProfileStore(redis_client, settings, items=catalog)

    async def wait_for(published: list[str], n: int) -> None:
        for _ in range(400):
            if len(published) >= n:
                return
            await asyncio.sleep(0.025)

    async def run() -> tuple[list[str], list[str]]:
        published: list[str] = []
        pusher = _pusher(settings, store, catalog, published)
        pusher.start()
        assert pusher._task is not None
        pusher._task.cancel()
        await asyncio.sleep(0.01)
        ev = make_event("view", "d", item_id="i7", ts=T0)
        _apply(store, [ev], 0)
        await pusher([ev], {"d"})  # the next change
        await wait_for(published, 1)
        after_change = list(published)
        assert pusher._task is not None
        pusher._task.cancel()
        await asyncio.sleep(0.01)
        pusher.pending["e"] = _Pending(0.0, "x", T0, None)  # pending when the loop died
        _apply(store, [make_event("view", "e", item_id="i8", ts=T0)], 1)
        await pusher.recover()  # the owed sweep
        await wait_for(published, 2)
        await pusher.stop()
        return after_change, published

    after_change, published = asyncio.run(run())
    assert after_change == ["d"]
    assert published == ["d", "e"]


def test_a_confirmed_user_is_recovered_again_when_a_later_change_stays_owed(settings, redis_client):
    """Once a user's push is confirmed, nothing of it may keep them out of the owed sweep: a later
    change whose push was handed over (a revocation) is recovered by the next sweep. (The in-flight
    set once counted the profile version per push instead of one, so confirmed users stayed in it
    and the sweep skipped them for good: the broker-restart fault test's stray owed push.)"""
    catalog = _catalog()
    store = ProfileStore(redis_client, settings, items=catalog)

    async def run() -> list[str]:
        published: list[str] = []
        pusher = _pusher(settings, store, catalog, published)
        for k in range(3):  # three confirmed pushes: profile versions 1, 2, 3
            ev = make_event("view", "f", item_id=f"i{k}", ts=T0 + k)
            _apply(store, [ev], k)
            await pusher([ev], {"f"})
            await pusher.flush_due(force=True)
            await asyncio.gather(*pusher._confirming)
        assert store.pending_pushes() == [] and "f" not in pusher._unconfirmed
        _apply(store, [make_event("view", "f", item_id="i9", ts=T0 + 9)], 9)  # owed, push handed over
        assert await pusher.recover() == 1
        await pusher.flush_due(force=True)
        await pusher.stop()
        return published

    assert asyncio.run(run()) == ["f", "f", "f", "f"]
    assert store.pending_pushes() == []


def test_a_restarted_worker_pushes_what_a_killed_one_owed(settings, topics, worker, redis_client):
    """Worker 1 writes profiles but has no push path (as if it died before pushing); it is killed
    with SIGKILL. Worker 2 (same group, pushing) must publish a fresh list for every such user,
    computed from their newest event, and then owe nothing."""
    from support.profile_reference import generate_events
    from support.worker import read_topic, wait_until

    from devstack.produce import EventProducer

    events = generate_events(12, 240, seed=4)
    events = [e for e in events if e.type.value != "search"]
    prod = EventProducer(settings)
    for e in events:
        prod.send(e)
    prod.flush()
    store = ProfileStore(redis_client, settings)
    users = {e.user_id for e in events}
    first = worker().start()  # support.profile_reference:make_items: item vectors, no top-k → no push
    first.wait_ready()
    wait_until(lambda: {u for u, _ in store.pending_pushes()} == users, 90, "every user owed a push")
    first.kill()
    assert read_topic(settings, settings.topics.results, expect=0, timeout=2) == []

    second = worker(items="support.profile_reference:make_catalog").start()
    second.wait_ready()
    last = {}
    for e in events:
        if e.user_id not in last or e.ts >= last[e.user_id].ts:
            last[e.user_id] = e
    msgs = read_topic(settings, settings.topics.results, expect=len(users), timeout=60)
    got = {orjson.loads(m.value())["user_id"]: orjson.loads(m.value()) for m in msgs}
    assert set(got) == users
    assert all(got[u]["source_event_id"] == last[u].event_id and got[u]["items"] for u in users)
    wait_until(lambda: store.pending_pushes() == [], 30, "the owed pushes cleared after delivery")


def test_a_failed_round_is_retried_and_readiness_says_what_it_waits_for(settings, redis_client):
    """A round that fails on Kafka keeps its users pending; the pusher names what it waits for
    (``/readyz`` shows it) until a round goes through, then clears it."""
    from confluent_kafka import KafkaException

    catalog = _catalog()
    store = ProfileStore(redis_client, settings, items=catalog)
    _apply(store, [make_event("view", "c", item_id="i4", ts=T0)], 0)

    async def until(pred, what: str) -> None:
        for _ in range(200):
            if pred():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    async def run() -> None:
        published: list[str] = []
        pusher = _pusher(settings, store, catalog, published)
        ok = pusher.publish
        seen: list[str | None] = []

        def flaky(user: str, value: bytes) -> None:
            if not seen:
                seen.append(None)
                raise KafkaException("broker down")
            ok(user, value)

        pusher.publish = flaky
        await pusher.recover()
        await until(lambda: pusher.backoff.waiting_for is not None, "the pusher to wait")
        assert "STREAMREC_KAFKA_BOOTSTRAP_SERVERS" in (pusher.backoff.waiting_for or "")
        await until(lambda: published == ["c"], "the retried push")
        await until(lambda: pusher.backoff.waiting_for is None, "the wait to clear")
        await pusher.stop()

    asyncio.run(run())
    assert store.pending_pushes() == []


def test_a_worker_recovers_only_the_users_of_the_partitions_it_owns(settings, redis_client):
    """With several workers, only a user's owner pushes them after a rebalance: a recovered list
    from another worker could land after the owner's fresher one."""
    catalog = _catalog()
    store = ProfileStore(redis_client, settings, items=catalog)
    topic = settings.topics.events
    for k, u in enumerate(["p0", "p1", "p2"]):
        store.apply_batch([make_event("view", u, item_id=f"i{k}", ts=T0)], positions=[Position(topic, k, 7)])
    _apply(store, [make_event("view", "elsewhere", item_id="i9", ts=T0)], 0)  # no partition of ours

    async def recovered(partitions) -> list[str]:
        pusher = _pusher(settings, store, catalog, [])
        pusher.owned = partitions
        n = await pusher.recover()
        assert n == len(pusher.pending)
        return sorted(pusher.pending)

    before = metrics.pushes_recovered._value.get()
    assert asyncio.run(recovered({f"{topic}:1"})) == ["elsewhere", "p1"]
    assert metrics.pushes_recovered._value.get() - before == 2
    assert asyncio.run(recovered({f"{topic}:0", f"{topic}:2"})) == ["elsewhere", "p0", "p2"]
    assert asyncio.run(recovered(set())) == ["elsewhere"]
    assert asyncio.run(recovered(None)) == ["elsewhere", "p0", "p1", "p2"]


class _HeldRound:
    """Holds the pusher's scoring inside its worker thread until released (a round in flight)."""

    def __init__(self, pusher: RecommendationPusher) -> None:
        self.scoring, self.release = threading.Event(), threading.Event()
        score = pusher.service.recommend_many

        def held(*args, **kwargs):
            self.scoring.set()
            self.release.wait(10)
            return score(*args, **kwargs)

        pusher.service.recommend_many = held  # type: ignore[method-assign]

    async def started(self) -> None:
        while not self.scoring.is_set():
            await asyncio.sleep(0.01)


def test_a_round_scored_before_a_revocation_publishes_nothing_and_stays_owed(settings, redis_client):
    """Partitions revoked while a round is being scored: its lists are not published (the next
    owner pushes them), the pending users are forgotten, the producer is drained, and every user
    stays owed until the next owner's push is delivered."""
    catalog = _catalog()
    store = ProfileStore(redis_client, settings, items=catalog)
    _apply(store, [make_event("view", u, item_id="i5", ts=T0) for u in ("r1", "r2", "r3")], 0)
    drained: list[int] = []

    async def run() -> list[str]:
        published: list[str] = []
        pusher = _pusher(settings, store, catalog, published)
        pusher._drain = lambda: drained.append(len(published))
        held = _HeldRound(pusher)
        await pusher.recover()
        assert sorted(pusher.pending) == ["r1", "r2", "r3"]
        round_ = asyncio.ensure_future(pusher.flush_due(force=True))
        await held.started()
        await pusher.recover()  # the round's users are owed still: pending again meanwhile
        handed = metrics.pushes_handed_over._value.get()
        await pusher.revoke()
        assert metrics.pushes_handed_over._value.get() - handed == 3
        held.release.set()
        await round_
        assert pusher.pending == {}
        await pusher.stop()
        return published

    assert asyncio.run(run()) == []
    assert drained == [0]
    assert sorted(u for u, _ in store.pending_pushes()) == ["r1", "r2", "r3"]


def test_stop_while_a_round_is_scored_returns_and_publishes_it(settings, redis_client):
    """A worker's shutdown (SIGTERM) during a scoring round: the round publishes and stop()
    returns (its wake-up is not lost when the round ends)."""
    catalog = _catalog()
    store = ProfileStore(redis_client, settings, items=catalog)
    _apply(store, [make_event("view", "s1", item_id="i6", ts=T0)], 0)

    async def run() -> list[str]:
        published: list[str] = []
        pusher = _pusher(settings, store, catalog, published)
        held = _HeldRound(pusher)
        await pusher.recover()  # starts the pusher's loop, which takes s1 into a round
        await held.started()
        stopping = asyncio.ensure_future(pusher.stop())
        await asyncio.sleep(0.05)
        held.release.set()
        await asyncio.wait_for(stopping, 10)
        return published

    assert asyncio.run(run()) == ["s1"]
    assert store.pending_pushes() == []


def test_a_rebalance_during_a_redis_outage_does_not_stop_the_worker(settings, redis_client):
    """Taking up the owed pushes at a rebalance while Redis is down must not crash the worker
    (faust stops an app whose rebalance callback raises): it is retried until it goes through."""
    from types import SimpleNamespace

    from redis.exceptions import ConnectionError as RedisConnectionError

    from streams.app import recover_owed
    from streams.context import WorkerState

    catalog = _catalog()
    store = ProfileStore(redis_client, settings, items=catalog)
    topic = settings.topics.events
    store.apply_batch([make_event("view", "o1", item_id="i7", ts=T0)], positions=[Position(topic, 3, 0)])

    async def run() -> None:
        pusher = _pusher(settings, store, catalog, [])
        state = WorkerState()
        state.ctx = SimpleNamespace(push=SimpleNamespace(pusher=pusher))  # type: ignore[assignment]
        state.assigned = {f"{topic}:3"}
        owed = store.pending_pushes

        def down(*args, **kwargs):
            raise RedisConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

        store.pending_pushes = down  # type: ignore[method-assign]
        await recover_owed(state)  # raised into faust before
        assert state.recovery_due and pusher.pending == {}
        store.pending_pushes = owed  # type: ignore[method-assign]
        await recover_owed(state)  # the probe's next look, Redis back
        assert not state.recovery_due and list(pusher.pending) == ["o1"]
        await pusher.stop()

    asyncio.run(run())


def test_a_pushed_list_names_the_newest_event_of_the_profile_it_was_computed_from(settings, redis_client):
    """The label is what was scored: a user made pending by one event (or recovered from a profile
    read earlier) whose profile has a newer event when the round reads it is pushed with that
    newer event (a recovered label lagging the profile left a stale newest list in the chaos drill)."""
    catalog = _catalog()
    store = ProfileStore(redis_client, settings, items=catalog)
    first = make_event("view", "n1", item_id="i1", ts=T0)
    newer = make_event("view", "n1", item_id="i2", ts=T0 + 5)
    _apply(store, [first], 0)

    async def run() -> list[dict]:
        sent: list[dict] = []
        pusher = _pusher(settings, store, catalog, [])
        pusher.publish = lambda user, value: sent.append(orjson.loads(value))
        await pusher([first], {"n1"})
        _apply(store, [newer], 1)  # applied before the round reads the profile; its hook comes later
        await pusher.flush_due(force=True)
        await pusher.stop()
        return sent

    sent = asyncio.run(run())
    assert [m["source_event_id"] for m in sent] == [newer.event_id]
    assert store.pending_pushes() == []


def test_after_stop_a_late_batch_leaves_its_users_owed_instead_of_pushing(settings, redis_client):
    """A batch that finishes after the pusher stopped (worker shutdown) does not restart it: its
    partitions may already belong to another worker, which recovers the owed users."""
    catalog = _catalog()
    store = ProfileStore(redis_client, settings, items=catalog)
    late = make_event("view", "z1", item_id="i8", ts=T0)

    async def run() -> list[str]:
        published: list[str] = []
        pusher = _pusher(settings, store, catalog, published)
        await pusher.stop()
        _apply(store, [late], 0)
        await pusher([late], {"z1"})
        assert pusher.pending == {} and pusher._task is None
        await asyncio.sleep(0.05)
        return published

    assert asyncio.run(run()) == []
    assert [u for u, _ in store.pending_pushes()] == ["z1"]


def test_lists_of_users_whose_partition_is_another_workers_are_not_published(settings, redis_client):
    """Checked when a list is about to go out: a late batch after a revocation or a retried round
    must not push a user whose partition another worker owns now; the user stays owed for it."""
    catalog = _catalog()
    store = ProfileStore(redis_client, settings, items=catalog)
    topic = settings.topics.events
    for k, u in enumerate(["q0", "q1"]):
        store.apply_batch([make_event("view", u, item_id=f"i{k}", ts=T0)], positions=[Position(topic, k, 9)])

    async def run() -> list[str]:
        published: list[str] = []
        pusher = _pusher(settings, store, catalog, published)
        pusher.owned = {f"{topic}:1"}
        pusher.pending.update({u: _Pending(0.0, "e", T0, None) for u in ("q0", "q1")})
        handed = metrics.pushes_handed_over._value.get()
        await pusher.flush_due(force=True)
        assert metrics.pushes_handed_over._value.get() - handed == 1
        await pusher.stop()
        return published

    assert asyncio.run(run()) == ["q1"]
    assert [u for u, _ in store.pending_pushes()] == ["q0"]


def test_the_probe_sweeps_owed_pushes_of_owned_partitions_periodically(settings, redis_client):
    """A change no hook named (a batch written by a worker that stopped before its hooks ran)
    is pushed by the partition's owner within ``stream.owed_sweep_s``, not at the next rebalance."""
    from types import SimpleNamespace

    from streams.app import probe
    from streams.context import WorkerState

    catalog = _catalog()
    store = ProfileStore(redis_client, settings, items=catalog)
    topic = settings.topics.events

    async def run() -> None:
        pusher = _pusher(settings, store, catalog, [])
        pusher._task = asyncio.get_running_loop().create_future()  # no loop: watch pending only
        state = WorkerState()
        state.ctx = SimpleNamespace(push=SimpleNamespace(pusher=pusher), store=store)  # type: ignore[assignment]
        state.assigned = {f"{topic}:2"}
        store.apply_batch([make_event("view", "w1", item_id="i3", ts=T0)], positions=[Position(topic, 2, 0)])
        await probe(state, settings)  # first look: a sweep
        assert list(pusher.pending) == ["w1"]
        store.apply_batch([make_event("view", "w2", item_id="i4", ts=T0)], positions=[Position(topic, 2, 1)])
        await probe(state, settings)  # within owed_sweep_s of the last one: no sweep
        assert list(pusher.pending) == ["w1"]
        state.last_sweep -= settings.stream.owed_sweep_s
        await probe(state, settings)
        assert sorted(pusher.pending) == ["w1", "w2"]
        pusher._task.cancel()

    asyncio.run(run())
