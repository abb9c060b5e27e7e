"""User profiles in Redis: binary float32 vectors, one pipeline per batch, exactly-once effect.

Keys (every key of a user shares the hash tag ``{<prefix>:u:<user_id>}``, so one user's keys
live in one Redis Cluster slot and one Lua script can update them atomically):

``{<prefix>:u:<user_id>}:p``   hash: the profile: ``b`` one msgpack record of every attribute
                               (``_Blob``; vectors as raw float32 bytes), ``v`` the
                               compare-and-set version, ``hz`` the dedupe horizon and one
                               ``o:<topic>:<partition>`` offset per source partition
``{<prefix>:u:<user_id>}:ids`` sorted set: the last ``profile.dedupe_event_ids`` applied event
                               ids, scored by event time

Exactly-once effect (Kafka delivers at least once):

* **Replays** (a consumer that crashed or lost its partitions before committing reads the same
  records again): the profile hash keeps, per source ``topic:partition``, the newest offset
  applied to this user; a record at or below it is skipped as ``duplicate``. The offsets are
  written by the same Lua script, atomically with the profile.
* **Re-produced duplicates** (same ``event_id``, new offset): an event whose id is in the
  user's id set is skipped as ``duplicate``. The set is bounded; when ids are evicted, the
  newest evicted event time becomes the user's *dedupe horizon*, and an event older than the
  horizon whose id is no longer known is skipped as ``stale`` (it could be a forgotten
  duplicate). In-order streams never hit this.
* **Concurrent writers** (two workers on one user during a rebalance): each user's write is a
  compare-and-set on the hash's version; a user whose version moved since the read is re-read
  and recomputed (``profile.write_retries`` times).

Reads and writes are one pipeline round trip each per batch (plus one per conflict retry).
Users the store wrote recently skip the read (``profile.cache_users``): it keeps the profiles as
it last wrote them, and the compare-and-set of a cached copy also checks the hash's write token
(new at every write: nobody, not even a delete and new writes up to the same version, wrote the
user since) and that none of the batch's event ids is applied yet (the check the read's
ZMSCORE makes otherwise). A copy that fails either check is dropped and the user read and
computed again, in the same batch.
The whole profile is one hash field and the applied event ids go as one msgpack argument, so a
write sends about a dozen arguments per user whatever its number of events (rather than forty
plus two per event: command packing in the client was a third of the profile stage), and a read
decodes one msgpack record. Hashes of the older layout (one field per attribute, ``_LEGACY_DECODERS``) are
still read, and rewritten in the current layout, their old fields removed, by the next write.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import orjson
from redis.exceptions import NoScriptError

from profiles import metrics
from profiles.model import EVENT_TYPES, TYPE_INDEX, EventColumns, Profile, apply
from streamrec.events import Event, EventType
from streamrec.interfaces import ItemVectors
from streamrec.redis_routing import RoutedPipeline
from streamrec.settings import Settings

__all__ = ["ApplyResult", "Position", "Profile", "ProfileStore", "ProfileStoreError"]

log = logging.getLogger(__name__)

_ids_encoder = msgspec.msgpack.Encoder()

# Compare-and-set write of one user: profile fields, offsets and applied event ids.
# KEYS: profile hash, ids zset. ARGV: expected version, #field args, #ids, ids to keep, #fields
# to delete, expected write token ('' = the profile was just read), new write token, field/value
# pairs..., the ids as one msgpack array [score, member, ...], fields to delete...
# Returns {new version, dedupe horizon}; {-1, 0} when the user was written since (version or
# token moved), {-2, 0} when written from a cached copy and one of the ids is applied already.
# The ids travel as one argument (Redis's Lua has cmsgpack): as two arguments per event, packing
# them in the client was a quarter of the profile stage. Scores are event times in ms, exact in a
# Lua number. The token, new at every write, tells a cached copy from a user deleted and written
# again up to the same version.
_WRITE_LUA = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if cur ~= tonumber(ARGV[1]) then return {-1, 0} end
local nf = tonumber(ARGV[2])
local ni = tonumber(ARGV[3])
local keep = tonumber(ARGV[4])
local nd = tonumber(ARGV[5])
local base = 7
local ids = {}
if ni > 0 then ids = cmsgpack.unpack(ARGV[base + nf + 1]) end
if ARGV[6] ~= '' then
  if (redis.call('HGET', KEYS[1], 'w') or '') ~= ARGV[6] then return {-1, 0} end
  for i = 2, 2 * ni, 2 do
    if redis.call('ZSCORE', KEYS[2], ids[i]) then return {-2, 0} end
  end
end
redis.call('HSET', KEYS[1], 'v', cur + 1, 'w', ARGV[7], unpack(ARGV, base + 1, base + nf))
if nd > 0 then
  redis.call('HDEL', KEYS[1], unpack(ARGV, base + nf + 2, base + nf + 1 + nd))
end
if ni > 0 then
  local i = 1
  local last = 2 * ni
  while i <= last do
    local j = math.min(i + 1999, last)
    redis.call('ZADD', KEYS[2], unpack(ids, i, j))
    i = j + 1
  end
  local extra = redis.call('ZCARD', KEYS[2]) - keep
  if extra > 0 then
    local top = redis.call('ZRANGE', KEYS[2], extra - 1, extra - 1, 'WITHSCORES')
    local hz = tonumber(redis.call('HGET', KEYS[1], 'hz') or '0')
    if tonumber(top[2]) > hz then redis.call('HSET', KEYS[1], 'hz', top[2]) end
    redis.call('ZREMRANGEBYRANK', KEYS[2], 0, extra - 1)
  end
end
return {cur + 1, tonumber(redis.call('HGET', KEYS[1], 'hz') or '0')}
"""


# ARGV: user, version, user, version, ...: remove a user owed a push only if not changed since.
_CLEAR_PENDING_LUA = """
local n = 0
for i = 1, #ARGV, 2 do
  local s = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if s and tonumber(s) <= tonumber(ARGV[i + 1]) then
    redis.call('ZREM', KEYS[1], ARGV[i])
    n = n + 1
  end
end
return n
"""


class ProfileStoreError(RuntimeError):
    """The profile store cannot do what was asked; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Position:
    """Where an event was read: its topic, partition and offset."""

    topic: str
    partition: int
    offset: int

    @property
    def tp(self) -> str:
        return f"{self.topic}:{self.partition}"


@dataclass
class ApplyResult:
    """What one :meth:`ProfileStore.apply_batch` did."""

    applied: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    changed_users: set[str] = field(default_factory=set)
    conflicts: int = 0  # users recomputed after a concurrent write
    applied_index: list[int] = field(default_factory=list)  # positions in the batch of applied events

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n


class _Blob(msgspec.Struct, array_like=True):
    """Every Profile attribute the store writes, as the msgpack array in hash field ``b``
    (vectors as raw float32 bytes). Field order is the stored format: append, never reorder."""

    long_term: bytes | None
    long_term_weight: float
    long_term_ts: int | None
    session: bytes | None
    session_weight: float
    session_id: str | None
    query: bytes | None
    query_text: str | None
    query_ts: int | None
    last_ts: int | None
    last_event_id: str | None
    n_events: dict[str, int]
    recent_items: list[str]
    recent_events: list[list[str | int]]
    purchased_items: list[str]
    purchase_counts: dict[str, int]
    model_version: str | None


_BLOB_FIELD = "b"
_OFFSET_PREFIX = "o:"
_SCRIPT_FIELDS = ("version", "v"), ("dedupe_horizon_ts", "hz")  # written by _WRITE_LUA only
# Also written by _WRITE_LUA only: the write token ("w"), read by the script alone.
_BLOB_ENCODER = msgspec.msgpack.Encoder()
_BLOB_DECODER = msgspec.msgpack.Decoder(_Blob)


def _vector_bytes(x: np.ndarray | None) -> bytes | None:
    return None if x is None else np.asarray(x, np.float32).tobytes()


def _vector(b: bytes | None) -> np.ndarray | None:
    return np.frombuffer(b, dtype=np.float32).copy() if b else None


def _to_blob(p: Profile) -> bytes:
    return _BLOB_ENCODER.encode(
        _Blob(
            _vector_bytes(p.long_term),
            float(p.long_term_weight),
            p.long_term_ts,
            _vector_bytes(p.session),
            float(p.session_weight),
            p.session_id,
            _vector_bytes(p.query),
            p.query_text,
            p.query_ts,
            p.last_ts,
            p.last_event_id,
            p.n_events,
            p.recent_items,
            p.recent_events,
            p.purchased_items,
            p.purchase_counts,
            p.model_version,
        )
    )


def _from_blob(raw: bytes) -> dict[str, Any]:
    b = _BLOB_DECODER.decode(raw)
    values = {a: getattr(b, a) for a in b.__struct_fields__}
    for a in ("long_term", "session", "query"):
        values[a] = _vector(values[a])
    return values


# -- the older layout: one hash field per attribute (read, never written) ----------------------
_LEGACY_DECODERS: tuple[tuple[str, bytes, Callable[[bytes | None], Any]], ...] = (
    ("long_term", b"lt", _vector),
    ("long_term_weight", b"ltw", lambda b: float(b) if b else 0.0),
    ("long_term_ts", b"ltr", lambda b: int(float(b)) if b else None),
    ("session", b"se", _vector),
    ("session_weight", b"sew", lambda b: float(b) if b else 0.0),
    ("session_id", b"sid", lambda b: b.decode() if b else None),
    ("query", b"q", _vector),
    ("query_text", b"qt", lambda b: b.decode() if b else None),
    ("query_ts", b"qts", lambda b: int(float(b)) if b else None),
    ("last_ts", b"last", lambda b: int(float(b)) if b else None),
    ("last_event_id", b"leid", lambda b: b.decode() if b else None),
    ("n_events", b"n", lambda b: orjson.loads(b) if b else {}),
    ("recent_items", b"ri", lambda b: orjson.loads(b) if b else []),
    ("recent_events", b"re", lambda b: orjson.loads(b) if b else []),
    ("purchased_items", b"pi", lambda b: orjson.loads(b) if b else []),
    ("purchase_counts", b"pc", lambda b: orjson.loads(b) if b else {}),
    ("model_version", b"mv", lambda b: b.decode() if b else None),
)
_LEGACY_FIELD_NAMES = tuple(name.decode() for _, name, _ in _LEGACY_DECODERS)


@dataclass
class _UserEvents:
    """One user's part of a batch, read and de-duplicated."""

    profile: Profile  # as read (an empty one for a new user)
    legacy: bool = False  # stored in the older one-field-per-attribute layout (rewrite it)
    cached: str = ""  # write token of the cached copy the profile came from ("" = read from Redis)
    kept: list[int] = field(default_factory=list)  # batch indices of the events to apply
    offsets: dict[str, int] = field(default_factory=dict)  # newest offset of the events, by topic:partition
    skipped: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class ProfileStore:
    """Reads and atomically updates user profiles in Redis.

    ``redis_client`` is a ``redis.Redis`` (or ``RedisCluster``) created with
    ``decode_responses=False`` (``settings.redis.client()``), since vectors are binary.
    ``items`` is used to look up item vectors when :meth:`apply_batch` is not given them.
    """

    def __init__(self, redis_client, settings: Settings, items: ItemVectors | None = None) -> None:
        if redis_client.get_encoder().decode_responses:  # redis.Redis and RedisCluster alike
            raise ProfileStoreError(
                "the Redis client decodes responses to str, but profile vectors are binary: "
                "create it with decode_responses=False (settings.redis.client() does)"
            )
        self.redis = redis_client
        self.settings = settings
        self.cfg = settings.profile
        self.items = items
        self.prefix = settings.redis.prefix
        self._write = redis_client.register_script(_WRITE_LUA)
        self._clear = redis_client.register_script(_CLEAR_PENDING_LUA)
        # user -> (profile as last written, its write token); least recently written first.
        self._cache: OrderedDict[str, tuple[Profile, str]] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._tokens = itertools.count()
        self._token_prefix = os.urandom(6).hex()

    # -- keys ------------------------------------------------------------------------------
    def profile_key(self, user_id: str) -> str:
        return f"{{{self.prefix}:u:{user_id}}}:p"

    def ids_key(self, user_id: str) -> str:
        return f"{{{self.prefix}:u:{user_id}}}:ids"

    @property
    def pending_key(self) -> str:
        """Sorted set: users whose profile changed and who have no delivered push since (score = version)."""
        return f"{self.prefix}:push:pending"

    # -- pushes owed ----------------------------------------------------------------------
    def pending_pushes(self, limit: int = 100_000) -> list[tuple[str, int]]:
        """(user, profile version) of the users still owed a push (after a crash: the lost ones)."""
        rows = self.redis.zrange(self.pending_key, 0, limit - 1, withscores=True)
        return [(u.decode() if isinstance(u, bytes) else str(u), int(v)) for u, v in rows]

    def clear_pending(self, pushed: Sequence[tuple[str, int]]) -> int:
        """Users pushed from these profile versions are no longer owed one (unless changed since)."""
        if not pushed:
            return 0
        args: list[str | int] = [x for u, v in pushed for x in (u, v)]
        return int(self._clear(keys=[self.pending_key], args=args))

    # -- reads -----------------------------------------------------------------------------
    def get_profiles(self, user_ids: Sequence[str]) -> dict[str, Profile]:
        """Profiles of the given users that exist (one pipeline round trip)."""
        users = list(dict.fromkeys(str(u) for u in user_ids))
        if not users:
            return {}
        t0 = time.perf_counter()
        pipe = RoutedPipeline(self.redis)
        for u in users:
            key = self.profile_key(u)
            pipe.on(key).hgetall(key)
        raw = pipe.execute()
        metrics.redis_seconds.labels("read").observe(time.perf_counter() - t0)
        return {u: self._decode(u, h) for u, h in zip(users, raw, strict=True) if h}

    def get_profile(self, user_id: str) -> Profile | None:
        return self.get_profiles([user_id]).get(str(user_id))

    def delete_users(self, user_ids: Sequence[str]) -> int:
        """Forget users (profile and dedupe ids). Returns the number of keys removed."""
        with self._cache_lock:
            for u in user_ids:
                self._cache.pop(str(u), None)
        keys = [k for u in user_ids for k in (self.profile_key(u), self.ids_key(u))]
        return int(self.redis.delete(*keys)) if keys else 0

    # -- the cache of written profiles ----------------------------------------------------
    def _take_cached(self, users: Sequence[str]) -> dict[str, tuple[Profile, str]]:
        """Remove and return the cached copies of these users (put back once written again)."""
        if not self.cfg.cache_users:
            return {}
        with self._cache_lock:
            pop = self._cache.pop
            out = {u: hit for u in users if (hit := pop(u, None)) is not None}
        metrics.profile_cache.labels("hit").inc(len(out))
        metrics.profile_cache.labels("miss").inc(len(users) - len(out))
        return out

    def _put_cached(self, written: Sequence[tuple[str, Profile, str]]) -> None:
        cap = self.cfg.cache_users
        if not cap or not written:
            return
        with self._cache_lock:
            cache = self._cache
            for u, p, token in written[-cap:]:
                cache[u] = (p, token)
            while len(cache) > cap:
                cache.popitem(last=False)

    @staticmethod
    def _decode(user_id: str, h: Mapping[bytes, bytes]) -> Profile:
        prefix = _OFFSET_PREFIX.encode()
        offsets = {k[len(prefix) :].decode(): int(v) for k, v in h.items() if k.startswith(prefix)}
        raw = h.get(_BLOB_FIELD.encode())
        if raw is not None:
            values = _from_blob(raw)
        else:
            values = {attr: decode(h.get(key)) for attr, key, decode in _LEGACY_DECODERS}
        for attr, name in _SCRIPT_FIELDS:
            v = h.get(name.encode())
            values[attr] = int(float(v)) if v else 0
        return Profile(user_id=user_id, offsets=offsets, **values)

    @staticmethod
    def _encode(p: Profile) -> list[bytes | str | int | float]:
        """Field/value pairs of the hash: the profile record, then one per source offset."""
        out: list[bytes | str | int | float] = [_BLOB_FIELD, _to_blob(p)]
        for tp, off in p.offsets.items():
            out += [f"{_OFFSET_PREFIX}{tp}", str(off)]
        return out

    # -- writes ----------------------------------------------------------------------------
    def apply_batch(
        self,
        events: Sequence[Event],
        *,
        positions: Sequence[Position | None] | None = None,
        item_vectors: np.ndarray | None = None,
        item_found: np.ndarray | None = None,
        query_vectors: Mapping[int, np.ndarray] | None = None,
    ) -> ApplyResult:
        """Apply a batch of valid events to their users' profiles, exactly once.

        ``positions[i]`` is where ``events[i]`` was read (enables replay detection; ``None``
        for events that did not come from Kafka). ``item_vectors``/``item_found`` are the
        item vectors of the events (rows of searches ignored); without them they are looked
        up in ``items``. ``query_vectors`` maps an event index to its encoded query (searches).
        Events of unknown items are skipped (``unknown_item``). Raises redis errors as they
        come: the caller retries the batch, which is safe because the update is idempotent.
        """
        res = ApplyResult()
        n = len(events)
        if n == 0:
            return res
        if positions is not None and len(positions) != n:
            raise ValueError(f"positions has {len(positions)} entries for {n} events")
        if item_vectors is None:
            if self.items is None:
                raise ProfileStoreError("apply_batch needs item_vectors or a store built with items=")
            ids = [e.item_id or "" for e in events]
            item_vectors, item_found = self.items.lookup(ids)
        item_vectors = np.asarray(item_vectors, np.float32)
        if item_found is None:
            item_found = np.ones(n, bool)
        query_vectors = query_vectors or {}
        by_user: dict[str, list[int]] = defaultdict(list)
        for i, e in enumerate(events):
            if e.type is not EventType.SEARCH and not item_found[i]:
                res.skip("unknown_item")
                continue
            by_user[e.user_id].append(i)

        pending = dict(by_user)
        for attempt in range(self.cfg.write_retries + 1):
            if not pending:
                break
            conflicted = self._apply_users(pending, events, positions, item_vectors, query_vectors, res)
            if conflicted and attempt == self.cfg.write_retries:
                raise ProfileStoreError(
                    f"{len(conflicted)} profiles kept changing under concurrent writers after "
                    f"{self.cfg.write_retries} retries; is more than one consumer group writing the same "
                    "Redis prefix? Raise profile.write_retries or check the deployment"
                )
            res.conflicts += len(conflicted)
            pending = {u: pending[u] for u in conflicted}
        res.applied_index.sort()
        for reason, k in res.skipped.items():
            metrics.profile_events_skipped.labels(reason).inc(k)
        metrics.profile_writes.inc(len(res.changed_users))
        return res

    def _apply_users(
        self,
        by_user: Mapping[str, list[int]],
        events: Sequence[Event],
        positions: Sequence[Position | None] | None,
        item_vectors: np.ndarray,
        query_vectors: Mapping[int, np.ndarray],
        res: ApplyResult,
        use_cache: bool = True,
    ) -> list[str]:
        """Read (or take from the cache), de-duplicate, compute and write the given users; return
        the conflicted ones. Users whose cached copy was out of date are done again from Redis."""
        users = list(by_user)
        cached = self._take_cached(users) if use_cache else {}
        misses = [u for u in users if u not in cached]
        raw = iter(self._read_users(misses, by_user, events) if misses else ())
        state = []
        for u in users:
            hit = cached.get(u)
            if hit is None:
                h, scores = next(raw), next(raw)
                ue = _UserEvents(
                    self._decode(u, h) if h else Profile(user_id=u),
                    legacy=bool(h) and _BLOB_FIELD.encode() not in h,
                )
            else:  # the ids are checked by the write
                ue, scores = _UserEvents(hit[0], cached=hit[1]), None
            state.append(self._dedupe(ue, scores, by_user[u], events, positions))
        updated = self._compute(state, events, item_vectors, query_vectors)
        conflicted, outdated = self._write_users(users, state, updated, events)
        _tally(users, state, updated, [*conflicted, *outdated], res)
        if outdated:
            metrics.profile_cache.labels("outdated").inc(len(outdated))
            conflicted += self._apply_users(
                {u: by_user[u] for u in outdated},
                events,
                positions,
                item_vectors,
                query_vectors,
                res,
                use_cache=False,
            )
        return conflicted

    def _read_users(
        self, users: Sequence[str], by_user: Mapping[str, list[int]], events: Sequence[Event]
    ) -> list:
        """One pipeline: per user, the profile hash and which of its event ids were applied."""
        t0 = time.perf_counter()
        pipe = RoutedPipeline(self.redis)
        for u in users:
            pk, ik = self.profile_key(u), self.ids_key(u)
            pipe.on(pk).hgetall(pk)
            pipe.on(ik).zmscore(ik, [events[i].event_id for i in by_user[u]])
        raw = pipe.execute()
        metrics.redis_seconds.labels("read").observe(time.perf_counter() - t0)
        return raw

    @staticmethod
    def _dedupe(
        ue: _UserEvents,
        scores: Sequence[float | None] | None,
        indices: Sequence[int],
        events: Sequence[Event],
        positions: Sequence[Position | None] | None,
    ) -> _UserEvents:
        """Keep the user's events not applied yet (replays, duplicates, stale). ``scores`` (the
        events' ids in the user's applied-id set) is None for a cached profile: its write checks."""
        prof, offs, skips = ue.profile, ue.offsets, ue.skipped
        seen: set[str] = set()
        for j, i in enumerate(indices):
            e = events[i]
            pos = positions[i] if positions is not None else None
            if pos is not None:
                if pos.offset <= prof.offsets.get(pos.tp, -1):
                    skips["duplicate"] += 1
                    continue
                offs[pos.tp] = max(offs.get(pos.tp, -1), pos.offset)
            if (scores is not None and scores[j] is not None) or e.event_id in seen:
                skips["duplicate"] += 1
                continue
            if e.ts < prof.dedupe_horizon_ts:
                skips["stale"] += 1
                continue
            seen.add(e.event_id)
            ue.kept.append(i)
        return ue

    def _compute(
        self,
        state: Sequence[_UserEvents],
        events: Sequence[Event],
        item_vectors: np.ndarray,
        query_vectors: Mapping[int, np.ndarray],
    ) -> dict[int, Profile]:
        """New profiles (by position in ``state``) of the users with events to apply, in one model call.

        Users whose events were all skipped only need their offsets moved (see _write_users).
        """
        live = [k for k, s in enumerate(state) if s.kept]
        if not live:
            return {}
        cols = _event_columns([state[k].kept for k in live], events, item_vectors, query_vectors)
        mv = getattr(self.items, "model_version", None) if self.items is not None else None
        new = apply([state[k].profile for k in live], cols, self.cfg, item_vectors.shape[1], mv)
        return dict(zip(live, new, strict=True))

    def _write_users(
        self,
        users: Sequence[str],
        state: Sequence[_UserEvents],
        updated: Mapping[int, Profile],
        events: Sequence[Event],
    ) -> tuple[list[str], list[str]]:
        """One pipeline: a compare-and-set write per updated user. Returns the conflicted users
        and those whose cached copy was out of date; the users written go to the cache.

        The script goes as a bare EVALSHA: a registered script in a redis-py pipeline costs a
        SCRIPT EXISTS round trip on every execute. When Redis lost its script cache (a restart)
        the script is loaded and the pipeline sent again: nothing of it ran but idempotent
        commands (the owed-push marks and watermarks) and the CAS writes that did run see a
        moved version and are re-read, like any conflict."""
        t0 = time.perf_counter()
        try:
            out, order = self._send_writes(users, state, updated, events)
        except NoScriptError:
            self.redis.script_load(_WRITE_LUA)
            out, order = self._send_writes(users, state, updated, events)
        metrics.redis_seconds.labels("write").observe(time.perf_counter() - t0)
        # Replies by position: the watermark-only HSETs of other users sit in the same pipeline.
        conflicted: list[str] = []
        outdated: list[str] = []
        written: list[tuple[str, Profile, str]] = []
        for k, pos, token in order:
            version, horizon = (int(x) for x in out[pos])
            if version > 0:
                p = updated[k]
                p.version, p.dedupe_horizon_ts = version, horizon
                written.append((users[k], p, token))
            elif state[k].cached:  # not a concurrent write in this batch: the copy was old
                outdated.append(users[k])
            else:
                conflicted.append(users[k])
        self._put_cached(written)
        return conflicted, outdated

    def _send_writes(
        self,
        users: Sequence[str],
        state: Sequence[_UserEvents],
        updated: Mapping[int, Profile],
        events: Sequence[Event],
    ) -> tuple[list[Any], list[tuple[int, int, str]]]:
        pipe = RoutedPipeline(self.redis)  # one pipeline per Redis Cluster node (scripts included)
        # Users about to change owe a fresh push: marked before the write (at least once), cleared
        # by the pusher once a list computed from this version or a later one is delivered.
        owed = {users[k]: state[k].profile.version + 1 for k in updated}
        if owed:
            pipe.on(self.pending_key).zadd(self.pending_key, owed, gt=True)
        # (user index, position of its CAS reply in the pipeline, the write's token)
        order: list[tuple[int, int, str]] = []
        prefix = self._token_prefix
        for k, u in enumerate(users):
            s = state[k]
            if k in updated:
                p = updated[k]
                p.offsets.update(s.offsets)
                fields = self._encode(p)
                ids = _ids_encoder.encode([x for i in s.kept for x in (events[i].ts, events[i].event_id)])
                drop = _LEGACY_FIELD_NAMES if s.legacy else ()
                token = f"{prefix}{next(self._tokens):x}"
                args: list[bytes | str | int | float] = [
                    s.profile.version,
                    len(fields),
                    len(s.kept),
                    self.cfg.dedupe_event_ids,
                    len(drop),
                    s.cached,
                    token,
                ]
                args += [*fields, ids, *drop]
                order.append((k, len(pipe), token))
                pk = self.profile_key(u)
                pipe.on(pk).evalsha(self._write.sha, 2, pk, self.ids_key(u), *args)
            elif s.offsets and s.profile.version:  # never create a profile from duplicates alone
                # Only skipped events: advance the replay watermark (monotonic, no CAS needed).
                pk = self.profile_key(u)
                for tp, off in s.offsets.items():
                    if off > s.profile.offsets.get(tp, -1):
                        pipe.on(pk).hset(pk, f"{_OFFSET_PREFIX}{tp}", off)
        return pipe.execute(), order


def _event_columns(
    keeps: Sequence[Sequence[int]],
    events: Sequence[Event],
    item_vectors: np.ndarray,
    query_vectors: Mapping[int, np.ndarray],
) -> EventColumns:
    """The model's columns of the kept events; user r of the model call has the events ``keeps[r]``."""
    idx = [i for kept in keeps for i in kept]
    user_col = np.concatenate([np.full(len(kept), r, np.int64) for r, kept in enumerate(keeps)])
    evs = [events[i] for i in idx]
    qv = None
    has_q = None
    if query_vectors:
        qv = np.zeros((len(idx), item_vectors.shape[1]), np.float32)
        has_q = np.zeros(len(idx), bool)
        for r, i in enumerate(idx):
            v = query_vectors.get(i)
            if v is not None:
                qv[r] = v
                has_q[r] = True
    vecs = item_vectors[idx].copy()
    is_search = np.fromiter((e.type is EventType.SEARCH for e in evs), bool, len(evs))
    vecs[is_search] = 0.0
    return EventColumns(
        user=user_col,
        ts=np.fromiter((e.ts for e in evs), np.int64, len(evs)),
        type=np.fromiter((TYPE_INDEX[e.type] for e in evs), np.int64, len(evs)),
        vectors=vecs,
        event_ids=[e.event_id for e in evs],
        item_ids=[e.item_id for e in evs],
        session_ids=[e.session_id for e in evs],
        queries=[e.query for e in evs],
        query_vectors=qv,
        has_query_vector=has_q,
    )


def _tally(
    users: Sequence[str],
    state: Sequence[_UserEvents],
    updated: Mapping[int, Profile],
    conflicted: Sequence[str],
    res: ApplyResult,
) -> None:
    """Count applied and skipped events of the users written (a conflicted user's count on its retry)."""
    done = set(conflicted)
    for k, u in enumerate(users):
        if u in done:
            continue
        if k in updated:
            res.applied += len(state[k].kept)
            res.applied_index.extend(state[k].kept)
            res.changed_users.add(u)
        for reason, c in state[k].skipped.items():
            res.skip(reason, c)


def events_total(p: Profile) -> int:
    """Events applied to a profile (all types)."""
    return sum(p.n_events.get(t, 0) for t in EVENT_TYPES)
