"""Profile store on the real Redis: reference equality, idempotency, ordering, concurrency."""

from __future__ import annotations

import msgspec
import numpy as np
import orjson
import pytest
from support.profile_reference import (
    DIM,
    HashingEncoder,
    RandomItems,
    assert_profile_matches,
    generate_events,
    reference_profiles,
)

from profiles.store import Position, ProfileStore, ProfileStoreError
from streamrec.events import make_event


@pytest.fixture
def items() -> RandomItems:
    return RandomItems()


@pytest.fixture
def encoder() -> HashingEncoder:
    return HashingEncoder()


@pytest.fixture
def store(redis_client, settings, items) -> ProfileStore:
    return ProfileStore(redis_client, settings, items=items)


def _apply(
    store: ProfileStore, events, encoder, start_offset: int = 0, topic: str = "ev", partition: int = 0
):
    qv = {i: encoder.encode([e.query])[0] for i, e in enumerate(events) if e.type.value == "search"}
    pos = [Position(topic, partition, start_offset + i) for i in range(len(events))]
    return store.apply_batch(events, positions=pos, query_vectors=qv)


def _dump(redis_client, store: ProfileStore, users) -> dict:
    return {
        u: (redis_client.hgetall(store.profile_key(u)), redis_client.zrange(store.ids_key(u), 0, -1))
        for u in users
    }


def test_batches_equal_numpy_reference(store, items, encoder, settings):
    events = generate_events(40, 1500, seed=1)
    rng = np.random.default_rng(3)
    cuts = np.sort(rng.choice(np.arange(1, len(events)), size=25, replace=False))
    off = 0
    for batch in np.split(np.array(events, dtype=object), cuts):
        res = _apply(store, list(batch), encoder, start_offset=off)
        off += len(batch)
        assert res.applied == len(batch) and not res.skipped
    ref = reference_profiles(events, items, encoder, settings.profile)
    got = store.get_profiles(list(ref))
    assert set(got) == set(ref)
    for u, r in ref.items():
        assert_profile_matches(got[u], r)
    # The vectors are stored as binary float32, inside the one profile record.
    some = next(iter(ref))
    raw = msgspec.msgpack.decode(store.redis.hget(store.profile_key(some), "b"))
    np.testing.assert_array_equal(np.frombuffer(raw[0], np.float32), got[some].long_term)
    assert len(raw[0]) == DIM * 4
    assert store.profile_key(some) == f"{{{settings.redis.prefix}:u:{some}}}:p"


def test_profile_in_the_older_layout_is_updated_and_rewritten(store, encoder, redis_client):
    """A hash written by an older version (one field per attribute) takes new events; the
    write leaves only the current layout behind."""
    events = generate_events(1, 30, seed=5)
    user = events[0].user_id
    _apply(store, events[:20], encoder)
    before = store.get_profile(user)
    key = store.profile_key(user)
    lt = before.long_term.tobytes()
    redis_client.hdel(key, "b")
    redis_client.hset(
        key,
        mapping={
            "lt": lt, "ltw": repr(before.long_term_weight), "ltr": str(before.long_term_ts),
            "se": before.session.tobytes() if before.session is not None else b"",
            "sew": repr(before.session_weight), "sid": before.session_id or "",
            "q": before.query.tobytes() if before.query is not None else b"",
            "qt": before.query_text or "", "qts": "" if before.query_ts is None else str(before.query_ts),
            "last": str(before.last_ts), "leid": before.last_event_id,
            "n": orjson.dumps(before.n_events), "ri": orjson.dumps(before.recent_items),
            "re": orjson.dumps(before.recent_events), "pi": orjson.dumps(before.purchased_items),
            "pc": orjson.dumps(before.purchase_counts), "mv": before.model_version or "",
        },
    )  # fmt: skip
    assert store.get_profile(user).n_events == before.n_events  # read from the old fields
    # A worker of this version (nothing cached: the old layout was written by an older one).
    store = ProfileStore(redis_client, store.settings, items=store.items)
    res = _apply(store, events[20:], encoder, start_offset=20)
    assert res.applied == 10
    fields = set(redis_client.hkeys(key))
    assert fields == {b"b", b"v", b"w", b"o:ev:0"}, fields  # hz appears once event ids are evicted
    ref = reference_profiles(events, store.items, encoder, store.settings.profile)
    assert_profile_matches(store.get_profile(user), ref[user])


def test_write_reloads_its_script_after_redis_lost_the_script_cache(store, encoder, redis_client, settings):
    """A restarted Redis has no scripts: the write loads its script and goes on, exactly once."""
    events = generate_events(8, 200, seed=11)
    _apply(store, events[:100], encoder)
    redis_client.script_flush()
    res = _apply(store, events[100:], encoder, start_offset=100)
    assert res.applied == 100 and not res.skipped and not res.conflicts
    ref = reference_profiles(events, store.items, encoder, settings.profile)
    got = store.get_profiles(list(ref))
    for u, r in ref.items():
        assert_profile_matches(got[u], r)


def test_cold_start_first_event_creates_profile(store, encoder):
    e = make_event("click", "new-user", item_id="i3", ts=1_700_000_000_000, session_id="s1")
    assert store.get_profile("new-user") is None
    res = _apply(store, [e], encoder)
    p = store.get_profile("new-user")
    assert res.changed_users == {"new-user"}
    np.testing.assert_allclose(p.long_term, store.items.lookup(["i3"])[0][0], rtol=1e-6)
    np.testing.assert_allclose(p.session, p.long_term)
    assert p.n_events == {"click": 1} and p.recent_items == ["i3"] and p.purchased_items == []
    assert p.last_ts == e.ts and p.last_event_id == e.event_id and p.session_id == "s1"


def test_replay_and_reproduced_duplicates_leave_profiles_identical(store, encoder, redis_client):
    events = generate_events(10, 300, seed=2)
    _apply(store, events[:200], encoder)
    _apply(store, events[200:], encoder, start_offset=200)
    users = {e.user_id for e in events}
    before = _dump(redis_client, store, users)
    # A consumer that crashed before committing reads the same records again.
    res = _apply(store, events[50:300], encoder, start_offset=50)
    assert res.applied == 0 and res.skipped == {"duplicate": 250} and not res.changed_users
    # A producer retry re-sends the same events: same event ids, new offsets.
    res = _apply(store, events[:120], encoder, start_offset=1000)
    assert res.applied == 0 and res.skipped == {"duplicate": 120}
    after = _dump(redis_client, store, users)
    for u in users:  # byte-identical profile fields (offset watermarks may move forward)
        b = {k: v for k, v in before[u][0].items() if not k.startswith(b"o:")}
        a = {k: v for k, v in after[u][0].items() if not k.startswith(b"o:")}
        assert a == b and after[u][1] == before[u][1]
    # Duplicates inside one batch count once.
    e = make_event("view", "dup", item_id="i1", ts=1_700_000_000_000)
    res = _apply(store, [e, e, e], encoder, start_offset=5000)
    assert res.applied == 1 and res.skipped == {"duplicate": 2}
    assert store.get_profile("dup").n_events == {"view": 1}


def test_out_of_order_within_batch_is_applied_in_event_time(store, items, encoder, settings):
    events = generate_events(8, 400, seed=4)
    shuffled = list(np.random.default_rng(0).permutation(np.array(events, dtype=object)))
    # Each user's events go to one partition, so give every event a distinct offset.
    _apply(store, shuffled, encoder)
    # The reference takes events by time; ties (same ms) keep arrival order, here the shuffled one.
    ref = reference_profiles(shuffled, items, encoder, settings.profile)
    got = store.get_profiles(list(ref))
    for u, r in ref.items():
        assert_profile_matches(got[u], r)


def test_late_event_in_a_later_batch(store, items, encoder, settings):
    t = 1_700_000_000_000
    first = [make_event("click", "u", item_id=f"i{k}", ts=t + k * 60_000, session_id="s") for k in range(5)]
    late = make_event("purchase", "u", item_id="i9", ts=t - 3 * 24 * 3600_000, session_id="old")
    _apply(store, first, encoder)
    before = store.get_profile("u")
    _apply(store, [late], encoder, start_offset=10)
    after = store.get_profile("u")
    ref = reference_profiles([*first, late], items, encoder, settings.profile)["u"]
    # Long-term: exact, as if it had arrived in order (decayed against its own time).
    np.testing.assert_allclose(after.long_term, ref.long_term, rtol=2e-4, atol=2e-5)
    assert not np.allclose(after.long_term, before.long_term)
    # Session, recency and last event describe the present: unchanged by a late event.
    np.testing.assert_array_equal(after.session, before.session)
    assert after.session_id == "s" and after.last_ts == before.last_ts
    assert after.recent_items == before.recent_items and after.last_event_id == before.last_event_id
    assert after.purchased_items == ["i9"] and after.n_events == {"click": 5, "purchase": 1}


def test_session_resets_after_inactivity_and_query_is_latest_search(store, encoder, settings):
    t = 1_700_000_000_000
    timeout = int(settings.profile.session_inactivity_s * 1000)
    evs = [
        make_event("view", "u", item_id="i1", ts=t),
        make_event("search", "u", query="glass jar", ts=t + 1000),
        make_event("search", "u", query="tea set", ts=t + 2000),
        make_event("click", "u", item_id="i2", ts=t + 2000 + timeout + 1),
    ]
    _apply(store, evs, encoder)
    p = store.get_profile("u")
    i2 = store.items.lookup(["i2"])[0][0]
    np.testing.assert_allclose(p.session, i2, rtol=1e-6)  # only the new session's item
    assert not np.allclose(p.long_term, i2)
    assert p.query_text == "tea set" and p.query_ts == t + 2000
    np.testing.assert_allclose(p.query, encoder.encode(["tea set"])[0], rtol=1e-6)
    # An older search arriving later does not replace the newer query.
    _apply(store, [make_event("search", "u", query="wooden star", ts=t + 1500)], encoder, start_offset=10)
    assert store.get_profile("u").query_text == "tea set"


def test_unknown_items_are_skipped_not_applied(store, encoder):
    good = make_event("view", "u", item_id="i1", ts=1_700_000_000_000)
    bad = make_event("view", "u", item_id="no-such-item", ts=1_700_000_001_000)
    res = _apply(store, [good, bad], encoder)
    assert res.applied == 1 and res.skipped == {"unknown_item": 1}
    assert store.get_profile("u").n_events == {"view": 1}


def test_dedupe_horizon_rejects_forgotten_duplicates_as_stale(redis_client, settings, items, encoder):
    settings = settings.override(profile={"dedupe_event_ids": 5})
    store = ProfileStore(redis_client, settings, items=items)
    t = 1_700_000_000_000
    evs = [make_event("view", "u", item_id=f"i{k}", ts=t + k * 1000) for k in range(10)]
    _apply(store, evs, encoder)
    assert redis_client.zcard(store.ids_key("u")) == 5
    p = store.get_profile("u")
    assert p.dedupe_horizon_ts == t + 4000
    # A re-produced event whose id was forgotten: older than the horizon, skipped as stale.
    res = _apply(store, [evs[1]], encoder, start_offset=100)
    assert res.skipped == {"stale": 1}
    # A remembered one is a duplicate; a genuinely new late event newer than the horizon applies.
    res = _apply(
        store, [evs[8], make_event("view", "u", item_id="i50", ts=t + 4500)], encoder, start_offset=200
    )
    assert res.skipped == {"duplicate": 1} and res.applied == 1
    assert store.get_profile("u").n_events == {"view": 11}


def test_applied_event_ids_keep_their_exact_times_and_bytes(store, redis_client, encoder):
    """The write script gets a user's event ids and times packed in one argument: every id comes
    back byte for byte, scored by its exact event time (the horizon too), over more than one ZADD
    chunk of the script."""
    odd = ["a b", "ü-ünïcode", "x" * 300, "1764859200123", "with\nnewline"]
    t = 1_764_859_200_123  # millisecond times: 13 digits, exact in a Lua number
    evs = [make_event("view", "u", item_id=f"i{k % 7}", ts=t + k, event_id=f"e{k}") for k in range(2500)]
    evs += [make_event("view", "u", item_id="i1", ts=t + 9_000 + k, event_id=e) for k, e in enumerate(odd)]
    evs.append(make_event("view", "u", item_id="i1", ts=4_102_444_800_999, event_id="year-2100"))
    res = _apply(store, evs, encoder)
    assert res.applied == len(evs)
    keep = store.cfg.dedupe_event_ids
    stored = redis_client.zrange(store.ids_key("u"), 0, -1, withscores=True)
    want = sorted(((e.event_id.encode(), float(e.ts)) for e in evs), key=lambda x: (x[1], x[0]))[-keep:]
    assert stored == want
    evicted = sorted(e.ts for e in evs)[-keep - 1] if len(evs) > keep else 0
    assert store.get_profile("u").dedupe_horizon_ts == evicted
    assert _apply(store, evs[-3:], encoder, start_offset=10_000).skipped == {"duplicate": 3}
    # All of them again at new offsets, in one batch: the remembered ones are duplicates, the
    # forgotten ones older than the horizon stale.
    again = [e for e in evs if e.ts != evicted]
    res = _apply(store, again, encoder, start_offset=20_000)
    assert res.applied == 0 and res.skipped == {"duplicate": keep, "stale": len(again) - keep}


def test_conflict_between_read_and_write_retries(redis_client, settings, items):
    """Another worker writes a user between this store's read and write (rebalance overlap)."""
    settings = settings.override(profile={"cache_users": 0})  # every batch reads the user
    store = ProfileStore(redis_client, settings, items=items)
    store.apply_batch([make_event("view", "u", item_id="i1", ts=1_700_000_000_000)])
    real_decode = store._decode
    state = {"raced": False}

    def decode_then_race(user_id, h):
        prof = real_decode(user_id, h)
        if not state["raced"]:
            state["raced"] = True  # another worker writes the user right after our read
            ProfileStore(redis_client, settings, items=items).apply_batch(
                [make_event("purchase", "u", item_id="i7", ts=1_700_000_000_500)]
            )
        return prof

    store._decode = decode_then_race  # type: ignore[method-assign]
    res = store.apply_batch([make_event("click", "u", item_id="i2", ts=1_700_000_001_000)])
    assert res.conflicts == 1 and res.applied == 1
    p = ProfileStore(redis_client, settings, items=items).get_profile("u")
    assert p.n_events == {"view": 1, "purchase": 1, "click": 1}
    assert p.version == 3


def test_store_refuses_decoding_client(settings):
    client = settings.redis.client(decode_responses=True)
    with pytest.raises(ProfileStoreError, match="decode_responses=False"):
        ProfileStore(client, settings)
    client.close()


def test_conflict_is_found_behind_a_watermark_only_write(redis_client, settings, items):
    """A user whose events are all duplicates gets a watermark-only write in the same pipeline as
    another user's compare-and-set: the conflict of the second must still be seen and retried."""
    settings = settings.override(profile={"cache_users": 0})  # every batch reads the users
    store = ProfileStore(redis_client, settings, items=items)
    t = 1_700_000_000_000
    dup = make_event("view", "a", item_id="i1", ts=t)
    store.apply_batch(
        [dup, make_event("view", "b", item_id="i1", ts=t)],
        positions=[Position("ev", 0, 1), Position("ev", 0, 2)],
    )
    real_decode = store._decode
    state = {"raced": False}

    def decode_then_race(user_id, h):
        prof = real_decode(user_id, h)
        if user_id == "b" and not state["raced"]:
            state["raced"] = True
            ProfileStore(redis_client, settings, items=items).apply_batch(
                [make_event("purchase", "b", item_id="i7", ts=t + 500)]
            )
        return prof

    store._decode = decode_then_race  # type: ignore[method-assign]
    # a's event re-produced at a new offset (a duplicate: watermark only), b's click races.
    res = store.apply_batch(
        [dup, make_event("click", "b", item_id="i2", ts=t + 1000)],
        positions=[Position("ev", 0, 3), Position("ev", 0, 4)],
    )
    assert state["raced"] and res.conflicts == 1 and res.applied == 1
    assert ProfileStore(redis_client, settings, items=items).get_profile("b").n_events == {
        "view": 1,
        "purchase": 1,
        "click": 1,
    }


def _cache_count(result: str) -> float:
    from profiles import metrics

    return metrics.profile_cache.labels(result)._value.get()


def test_cached_copy_written_since_by_another_worker_is_read_again(redis_client, settings, items):
    """The store skips the read of a user it wrote; when another worker wrote the user since,
    the write finds out, and the user is read and computed again in the same batch."""
    t = 1_700_000_000_000
    mine = ProfileStore(redis_client, settings, items=items)
    other = ProfileStore(redis_client, settings, items=items)
    mine.apply_batch([make_event("view", "u", item_id="i1", ts=t)])
    hits, outdated = _cache_count("hit"), _cache_count("outdated")
    mine.apply_batch([make_event("click", "u", item_id="i2", ts=t + 1)])  # from the copy
    assert _cache_count("hit") == hits + 1 and _cache_count("outdated") == outdated
    other.apply_batch([make_event("purchase", "u", item_id="i7", ts=t + 2)])
    res = mine.apply_batch([make_event("click", "u", item_id="i3", ts=t + 3)])
    assert res.applied == 1 and res.changed_users == {"u"} and not res.conflicts
    assert _cache_count("outdated") == outdated + 1
    p = other.get_profile("u")
    assert p.n_events == {"view": 1, "click": 2, "purchase": 1} and p.version == 4
    assert p.purchased_items == ["i7"] and [e[0] for e in p.recent_events] == ["i3", "i7", "i2", "i1"]


def test_reproduced_duplicate_of_a_cached_user_is_skipped(redis_client, settings, items):
    """An event re-produced at a new offset: the cached copy has no applied-id set, the write
    checks the ids and the user is read again, so the duplicate is still skipped."""
    store = ProfileStore(redis_client, settings, items=items)
    t = 1_700_000_000_000
    ev = make_event("purchase", "u", item_id="i1", ts=t)
    store.apply_batch([ev], positions=[Position("ev", 0, 1)])
    before = redis_client.hgetall(store.profile_key("u"))
    res = store.apply_batch([ev], positions=[Position("ev", 0, 2)])
    assert res.applied == 0 and res.skipped == {"duplicate": 1} and not res.changed_users
    after = redis_client.hgetall(store.profile_key("u"))
    assert after.pop(b"o:ev:0") == b"2" and before.pop(b"o:ev:0") == b"1"
    assert after == before  # the profile itself is untouched
    assert store.get_profile("u").purchase_counts == {"i1": 1}


def test_cached_write_checks_every_id_of_a_long_batch(redis_client, settings, items):
    """The write from a cached copy checks every id of the batch: a re-produced event at the end
    of a 2,500-event batch is still found, and the user is read again; its new events apply once,
    the duplicate not at all."""
    store = ProfileStore(redis_client, settings.override(profile={"dedupe_event_ids": 5000}), items=items)
    t = 1_700_000_000_000
    old = make_event("purchase", "u", item_id="i1", ts=t)
    store.apply_batch([old], positions=[Position("ev", 0, 1)])
    new = [make_event("view", "u", item_id=f"i{k % 9}", ts=t + 1 + k) for k in range(2499)]
    res = store.apply_batch([*new, old], positions=[Position("ev", 0, 2 + k) for k in range(2500)])
    assert res.applied == 2499 and res.skipped == {"duplicate": 1} and res.changed_users == {"u"}
    p = store.get_profile("u")
    assert p.n_events == {"purchase": 1, "view": 2499} and p.offsets == {"ev:0": 2501}
    assert redis_client.zcard(store.ids_key("u")) == 2500


def test_user_deleted_and_written_again_up_to_the_same_version_is_not_taken_from_the_cache(
    redis_client, settings, items
):
    """The version alone cannot tell: deleted, then written once by another worker, the user is
    back at the cached version. The write token tells, and the deleted event stays deleted."""
    t = 1_700_000_000_000
    mine = ProfileStore(redis_client, settings, items=items)
    other = ProfileStore(redis_client, settings, items=items)
    mine.apply_batch([make_event("purchase", "u", item_id="i1", ts=t)])
    other.delete_users(["u"])
    other.apply_batch([make_event("view", "u", item_id="i2", ts=t + 1)])
    assert other.get_profile("u").version == 1  # as in mine's copy
    res = mine.apply_batch([make_event("click", "u", item_id="i3", ts=t + 2)])
    assert res.applied == 1
    p = other.get_profile("u")
    assert p.n_events == {"view": 1, "click": 1} and p.purchased_items == [] and p.version == 2


def test_cache_keeps_the_users_written_last(redis_client, settings, items):
    settings = settings.override(profile={"cache_users": 3})
    store = ProfileStore(redis_client, settings, items=items)
    t = 1_700_000_000_000
    store.apply_batch([make_event("view", f"u{k}", item_id="i1", ts=t + k) for k in range(5)])
    hits, misses = _cache_count("hit"), _cache_count("miss")
    store.apply_batch([make_event("view", f"u{k}", item_id="i2", ts=t + 10) for k in (4, 3, 2, 1, 0)])
    assert _cache_count("hit") == hits + 3 and _cache_count("miss") == misses + 2
    for k in range(5):
        assert store.get_profile(f"u{k}").n_events == {"view": 2}
