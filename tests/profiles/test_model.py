"""profiles.model without Redis: any batching of a stream gives the reference's profiles; the
stored record encodes and decodes a profile back to equal values, and the older one-field-per-
attribute layout is still read."""

from __future__ import annotations

import copy
import dataclasses

import msgspec
import numpy as np
import pytest
from support.profile_reference import (
    HashingEncoder,
    RandomItems,
    RefProfile,
    generate_events,
    reference_profiles,
)

from profiles.model import TYPE_INDEX, EventColumns, Profile, apply
from profiles.store import _LEGACY_DECODERS, ProfileStore, _Blob
from streamrec.events import Event, EventType, make_event
from streamrec.settings import ProfileSettings

T0 = 1_700_000_000_000


@pytest.fixture(scope="module")
def items() -> RandomItems:
    return RandomItems()


@pytest.fixture(scope="module")
def encoder() -> HashingEncoder:
    return HashingEncoder()


@pytest.fixture(
    scope="module",
    params=[ProfileSettings(), ProfileSettings(recent_items=4, recent_events=3)],
    ids=["defaults", "short-recent-lists"],
)
def cfg(request) -> ProfileSettings:
    return request.param


def _columns(
    batch: list[Event], users: list[str], items: RandomItems, encoder: HashingEncoder
) -> EventColumns:
    index = {u: k for k, u in enumerate(users)}
    is_search = np.array([e.type is EventType.SEARCH for e in batch])
    vectors, found = items.lookup([e.item_id or "" for e in batch])
    assert found[~is_search].all()
    vectors[is_search] = 0.0
    query_vectors = np.zeros_like(vectors)
    for r in np.flatnonzero(is_search):
        query_vectors[r] = encoder.encode([batch[r].query])[0]
    return EventColumns(
        user=np.array([index[e.user_id] for e in batch], np.int64),
        ts=np.array([e.ts for e in batch], np.int64),
        type=np.array([TYPE_INDEX[e.type] for e in batch], np.int64),
        vectors=vectors,
        event_ids=[e.event_id for e in batch],
        item_ids=[e.item_id for e in batch],
        session_ids=[e.session_id for e in batch],
        queries=[e.query for e in batch],
        query_vectors=query_vectors,
        has_query_vector=is_search,
    )


def _run_model(
    batches: list[list[Event]], items: RandomItems, encoder: HashingEncoder, cfg: ProfileSettings
) -> dict[str, Profile]:
    """The profiles after applying the batches in turn, each the way the store applies one."""
    state: dict[str, Profile] = {}
    for batch in batches:
        users = list(dict.fromkeys(e.user_id for e in batch))
        before = [state.get(u, Profile(user_id=u)) for u in users]
        snapshot = copy.deepcopy(before)
        after = apply(before, _columns(batch, users, items, encoder), cfg, items.dim, items.model_version)
        for old, kept in zip(before, snapshot, strict=True):  # the input profiles are not modified
            _assert_same_profile(old, kept)
        state.update(zip(users, after, strict=True))
    return state


def _switching_sessions(events: list[Event], seed: int) -> list[Event]:
    """The events with session ids that also change without a pause, and some events without one."""
    rng = np.random.default_rng(seed)
    session: dict[str, int] = {}
    out = []
    for e in events:
        session[e.user_id] = session.get(e.user_id, 0) + int(rng.random() < 0.15)
        sid = None if rng.random() < 0.2 else f"{e.user_id}-x{session[e.user_id]}"
        out.append(msgspec.structs.replace(e, session_id=sid))
    return out


def _cut(events: list[Event], cuts) -> list[list[Event]]:
    return [list(b) for b in np.split(np.array(events, dtype=object), cuts) if len(b)]


def _assert_matches_reference(got: Profile, ref: RefProfile) -> None:
    uid = got.user_id
    for name in ("long_term", "session", "query"):
        a, b = getattr(got, name), getattr(ref, name)
        assert (a is None) == (b is None), f"user {uid}: {name} presence"
        if a is not None:
            assert a.dtype == np.float32
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=f"user {uid}: {name}")
    assert got.long_term_weight == pytest.approx(ref.lt_w, rel=1e-9)
    assert got.session_weight == pytest.approx(ref.se_w, rel=1e-9)
    assert got.long_term_ts == ref.lt_ref
    assert got.n_events == ref.counts, f"user {uid}: counts"
    assert got.recent_items == ref.recent, f"user {uid}: recent items"
    assert got.purchased_items == ref.purchased, f"user {uid}: purchased items"
    assert got.purchase_counts == ref.bought, f"user {uid}: purchase counts"
    assert (got.last_ts, got.last_event_id, got.session_id) == (ref.last, ref.leid, ref.sid)
    assert (got.query_text, got.query_ts) == (ref.query_text, ref.query_ts)


def _assert_all_match(got: dict[str, Profile], ref: dict[str, RefProfile], model_version: str) -> None:
    assert set(got) == set(ref)
    for u, r in ref.items():
        _assert_matches_reference(got[u], r)
        assert got[u].model_version == model_version


def _assert_same_profile(a: Profile, b: Profile) -> None:
    for f in dataclasses.fields(Profile):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            assert x is not None and y is not None, f.name
            assert x.dtype == y.dtype and np.array_equal(x, y), f.name
        else:
            assert x == y, f"{f.name}: {x!r} != {y!r}"
            assert type(x) is type(y), f.name


@pytest.mark.parametrize("sessions", ["sessions-by-pause", "switching-sessions"])
@pytest.mark.parametrize("batching", ["one-batch", "one-event-per-batch", "random-cuts"])
def test_any_batching_of_a_stream_equals_the_reference(batching, sessions, items, encoder, cfg):
    events = generate_events(25, 700, seed=11)
    if sessions == "switching-sessions":
        events = _switching_sessions(events, seed=4)
    if batching == "one-batch":
        batches = [events]
    elif batching == "one-event-per-batch":
        batches = [[e] for e in events]
    else:
        rng = np.random.default_rng(5)
        batches = _cut(events, np.sort(rng.choice(np.arange(1, len(events)), size=40, replace=False)))
    got = _run_model(batches, items, encoder, cfg)
    _assert_all_match(got, reference_profiles(events, items, encoder, cfg), items.model_version)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_cuts_of_shuffled_batches_equal_the_reference(seed, items, encoder, cfg):
    """Events arrive out of order inside each batch (ties of one ms then keep arrival order)."""
    events = generate_events(12, 500, seed=seed)
    if seed > 1:
        events = _switching_sessions(events, seed)
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, len(events)), size=int(rng.integers(1, 30)), replace=False))
    batches = [list(rng.permutation(np.array(b, dtype=object))) for b in _cut(events, cuts)]
    got = _run_model(batches, items, encoder, cfg)
    arrived = [e for b in batches for e in b]
    _assert_all_match(got, reference_profiles(arrived, items, encoder, cfg), items.model_version)


def test_late_event_in_a_later_batch_changes_only_the_long_term_past(items, encoder, cfg):
    first = [make_event("click", "u", item_id=f"i{k}", ts=T0 + k * 60_000, session_id="s") for k in range(5)]
    late = make_event("purchase", "u", item_id="i9", ts=T0 - 3 * 24 * 3600_000, session_id="old")
    before = _run_model([first], items, encoder, cfg)["u"]
    after = _run_model([first, [late]], items, encoder, cfg)["u"]
    ref = reference_profiles([*first, late], items, encoder, cfg)["u"]
    # Long-term: as if the late event had arrived in order.
    np.testing.assert_allclose(after.long_term, ref.long_term, rtol=0, atol=1e-6)
    assert after.long_term_weight == pytest.approx(ref.lt_w, rel=1e-9)
    # The present (session, recency, last event) is unchanged; the purchase and count are added.
    np.testing.assert_array_equal(after.session, before.session)
    assert (after.session_id, after.last_ts, after.last_event_id) == ("s", before.last_ts, first[-1].event_id)
    assert after.recent_items == before.recent_items
    assert after.purchased_items == ["i9"] and after.purchase_counts == {"i9": 1}
    assert after.n_events == {"click": 5, "purchase": 1}


def test_late_event_batched_with_a_new_one(items, encoder, cfg):
    first = [make_event("click", "u", item_id=f"i{k}", ts=T0 + k * 60_000, session_id="s") for k in range(5)]
    late = make_event("view", "u", item_id="i9", ts=T0 - 3600_000, session_id="old")
    new = make_event("view", "u", item_id="i20", ts=T0 + 5 * 60_000, session_id="s")
    got = _run_model([first, [late, new]], items, encoder, cfg)["u"]
    in_order = reference_profiles([*first, new], items, encoder, cfg)["u"]
    everything = reference_profiles([*first, late, new], items, encoder, cfg)["u"]
    np.testing.assert_allclose(got.long_term, everything.long_term, rtol=0, atol=1e-6)
    # The present only sees the in-order events.
    np.testing.assert_allclose(got.session, in_order.session, rtol=0, atol=1e-6)
    assert got.recent_items == in_order.recent == ["i20", "i4", "i3", "i2", "i1", "i0"][: cfg.recent_items]
    assert (got.last_event_id, got.session_id, got.last_ts) == (new.event_id, "s", new.ts)
    assert got.n_events == {"click": 5, "view": 2}


# Purchases of i1, i2, i3, i1 with room for 2 purchased items: i1 leaves the list, then returns.
_REENTRY = [
    make_event("purchase", "u", item_id=i, ts=T0 + k * 1000) for k, i in enumerate(["i1", "i2", "i3", "i1"])
]


def test_purchased_list_cap_event_by_event(items, encoder):
    cfg = ProfileSettings(purchased_items=2)
    got = _run_model([[e] for e in _REENTRY], items, encoder, cfg)["u"]
    _assert_matches_reference(got, reference_profiles(_REENTRY, items, encoder, cfg)["u"])
    assert got.purchased_items == ["i1", "i3"] and got.purchase_counts == {"i1": 1, "i3": 1}


def test_purchased_list_cap_in_one_batch(items, encoder):
    """An item that leaves the capped purchased list and returns within one batch restarts at 1."""
    cfg = ProfileSettings(purchased_items=2)
    got = _run_model([_REENTRY], items, encoder, cfg)["u"]
    _assert_matches_reference(got, reference_profiles(_REENTRY, items, encoder, cfg)["u"])


@pytest.mark.parametrize("seed", [4, 5])
def test_capped_purchases_are_a_function_of_the_events_whatever_the_cuts(seed, items, encoder):
    """Heavy buyers over a tiny cap: every batching gives the same purchased list and counts."""
    cfg = ProfileSettings(purchased_items=3, recent_items=4)
    events = generate_events(4, 600, seed=seed, n_items=12)
    rng = np.random.default_rng(seed)
    ref = reference_profiles(events, items, encoder, cfg)
    assert max(sum(r.bought.values()) for r in ref.values()) > 3  # the cap is really exercised
    for n_cuts in (0, 5, 60, len(events) - 1):
        cuts = np.sort(rng.choice(np.arange(1, len(events)), size=n_cuts, replace=False))
        got = _run_model(_cut(events, cuts), items, encoder, cfg)
        for u, r in ref.items():
            assert got[u].purchased_items == r.purchased and got[u].purchase_counts == r.bought, (u, n_cuts)


def test_apply_needs_events_for_every_profile(items, encoder, cfg):
    e = make_event("view", "a", item_id="i1", ts=T0)
    cols = _columns([e], ["a"], items, encoder)
    with pytest.raises(ValueError, match="at least one event for every profile"):
        apply([Profile(user_id="a"), Profile(user_id="b")], cols, cfg, items.dim)
    assert apply([], cols, cfg, items.dim) == []


def _as_redis_hash(pairs: list, version: int, horizon: int) -> dict[bytes, bytes]:
    """What HGETALL returns after the write script stored ``pairs`` (it also sets v and hz)."""
    assert len(pairs) % 2 == 0
    h = {}
    for name, value in zip(pairs[::2], pairs[1::2], strict=True):
        h[name.encode()] = value if isinstance(value, bytes) else str(value).encode()
    return {**h, b"v": str(version).encode(), b"hz": str(horizon).encode()}


def test_stored_record_covers_every_profile_attribute():
    blob = list(_Blob.__struct_fields__)
    script = {"user_id", "offsets", "version", "dedupe_horizon_ts"}  # the key, offset fields, the Lua
    assert set(blob) | script == {f.name for f in dataclasses.fields(Profile)}
    assert [attr for attr, _, _ in _LEGACY_DECODERS] == blob  # the old layout read every attribute


def test_profile_round_trips_through_the_stored_record(items, encoder, cfg):
    events = generate_events(6, 300, seed=9)
    profiles = _run_model(_cut(events, [100, 180]), items, encoder, cfg)
    full = max(profiles.values(), key=lambda p: p.total_events)
    assert full.query is not None and full.purchased_items and full.session is not None
    full = dataclasses.replace(full, version=7, dedupe_horizon_ts=T0 - 5, offsets={"ev:0": 12, "ev:3": 4})
    empty = Profile(user_id="new")
    for p in (full, empty, dataclasses.replace(empty, session_id="s", query_text="tea set", query_ts=T0)):
        pairs = ProfileStore._encode(p)
        back = ProfileStore._decode(p.user_id, _as_redis_hash(pairs, p.version, p.dedupe_horizon_ts))
        _assert_same_profile(back, p)
        # Encoding the decoded profile gives the same bytes.
        assert ProfileStore._encode(back) == pairs


def _layout_profile() -> Profile:
    return Profile(
        user_id="u",
        long_term=np.array([1.0, -2.0], np.float32),
        long_term_weight=3.0,
        long_term_ts=T0,
        session_id="s1",
        query_text="jar",
        last_ts=T0 + 1,
        last_event_id="e1",
        n_events={"view": 2},
        recent_items=["i1", "i2"],
        recent_events=[["i1", "view", T0 + 1]],
        purchase_counts={},
        model_version="m",
        offsets={"ev:0": 3},
        version=4,
        dedupe_horizon_ts=T0 - 9,
    )


def test_stored_layout_is_pinned():
    """Field names and the record's order are the stored format (profiles in Redis must stay readable)."""
    p = _layout_profile()
    pairs = ProfileStore._encode(p)
    assert pairs[0::2] == ["b", "o:ev:0"] and pairs[3] == "3"
    lt = np.array([1.0, -2.0], np.float32).tobytes()
    assert msgspec.msgpack.decode(pairs[1]) == [
        lt, 3.0, T0, None, 0.0, "s1", None, "jar", None, T0 + 1, "e1",
        {"view": 2}, ["i1", "i2"], [["i1", "view", T0 + 1]], [], {}, "m",
    ]  # fmt: skip


def test_older_one_field_per_attribute_layout_is_still_read():
    p = _layout_profile()
    legacy = {
        b"lt": np.array([1.0, -2.0], np.float32).tobytes(),
        b"ltw": b"3.0",
        b"ltr": str(T0).encode(),
        b"se": b"",
        b"sew": b"0.0",
        b"sid": b"s1",
        b"q": b"",
        b"qt": b"jar",
        b"qts": b"",
        b"last": str(T0 + 1).encode(),
        b"leid": b"e1",
        b"n": b'{"view":2}',
        b"ri": b'["i1","i2"]',
        b"re": f'[["i1","view",{T0 + 1}]]'.encode(),
        b"pi": b"[]",
        b"pc": b"{}",
        b"mv": b"m",
        b"o:ev:0": b"3",
        b"v": b"4",
        b"hz": str(T0 - 9).encode(),
    }
    _assert_same_profile(ProfileStore._decode("u", legacy), p)
