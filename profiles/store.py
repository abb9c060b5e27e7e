"""User profiles in Redis: binary float32 vectors, one pipeline per batch, exactly-once effect.

Keys (every key of a user shares the hash tag ``{<prefix>:u:<user_id>}``, so one user's keys
live in one Redis Cluster slot and one Lua script can update them atomically):

``{<prefix>:u:<user_id>}:p``   hash: the profile (see ``_FIELDS``; vectors are raw float32 bytes)
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
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import orjson

from profiles import metrics
from profiles.model import EVENT_TYPES, TYPE_INDEX, EventColumns, Profile, apply
from streamrec.events import Event
from streamrec.interfaces import ItemVectors
from streamrec.settings import Settings

__all__ = ["ApplyResult", "Position", "Profile", "ProfileStore", "ProfileStoreError"]

log = logging.getLogger(__name__)

# Compare-and-set write of one user: profile fields, offsets and applied event ids.
# KEYS: profile hash, ids zset. ARGV: expected version, #field args, #ids, ids to keep,
# field/value pairs..., score/member pairs...  Returns the new version or -1 on conflict.
_WRITE_LUA = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if cur ~= tonumber(ARGV[1]) then return -1 end
local nf = tonumber(ARGV[2])
local ni = tonumber(ARGV[3])
local keep = tonumber(ARGV[4])
local base = 4
redis.call('HSET', KEYS[1], 'v', cur + 1, unpack(ARGV, base + 1, base + nf))
if ni > 0 then
  local i = base + nf + 1
  local last = base + nf + 2 * ni
  while i <= last do
    local j = math.min(i + 1999, last)
    redis.call('ZADD', KEYS[2], unpack(ARGV, i, j))
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
return cur + 1
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


def _f32(b: bytes | None) -> np.ndarray | None:
    return np.frombuffer(b, dtype=np.float32).copy() if b else None


def _s(b: bytes | None) -> str | None:
    return b.decode() if b else None


def _i(b: bytes | None) -> int | None:
    return int(float(b)) if b else None


class ProfileStore:
    """Reads and atomically updates user profiles in Redis.

    ``redis_client`` is a ``redis.Redis`` (or ``RedisCluster``) created with
    ``decode_responses=False`` (``settings.redis.client()``), since vectors are binary.
    ``items`` is used to look up item vectors when :meth:`apply_batch` is not given them.
    """

    def __init__(self, redis_client, settings: Settings, items: ItemVectors | None = None) -> None:
        kwargs = getattr(getattr(redis_client, "connection_pool", None), "connection_kwargs", {})
        if kwargs.get("decode_responses"):
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

    # -- keys ------------------------------------------------------------------------------
    def profile_key(self, user_id: str) -> str:
        return f"{{{self.prefix}:u:{user_id}}}:p"

    def ids_key(self, user_id: str) -> str:
        return f"{{{self.prefix}:u:{user_id}}}:ids"

    # -- reads -----------------------------------------------------------------------------
    def get_profiles(self, user_ids: Sequence[str]) -> dict[str, Profile]:
        """Profiles of the given users that exist (one pipeline round trip)."""
        users = list(dict.fromkeys(str(u) for u in user_ids))
        if not users:
            return {}
        t0 = time.perf_counter()
        pipe = self.redis.pipeline(transaction=False)
        for u in users:
            pipe.hgetall(self.profile_key(u))
        raw = pipe.execute()
        metrics.redis_seconds.labels("read").observe(time.perf_counter() - t0)
        return {u: self._decode(u, h) for u, h in zip(users, raw, strict=True) if h}

    def get_profile(self, user_id: str) -> Profile | None:
        return self.get_profiles([user_id]).get(str(user_id))

    def delete_users(self, user_ids: Sequence[str]) -> int:
        """Forget users (profile and dedupe ids). Returns the number of keys removed."""
        keys = [k for u in user_ids for k in (self.profile_key(u), self.ids_key(u))]
        return int(self.redis.delete(*keys)) if keys else 0

    @staticmethod
    def _decode(user_id: str, h: Mapping[bytes, bytes]) -> Profile:
        g = h.get
        offsets = {k[2:].decode(): int(v) for k, v in h.items() if k.startswith(b"o:")}
        return Profile(
            user_id=user_id,
            long_term=_f32(g(b"lt")),
            session=_f32(g(b"se")),
            query=_f32(g(b"q")),
            query_text=_s(g(b"qt")),
            query_ts=_i(g(b"qts")),
            last_ts=_i(g(b"last")),
            n_events=orjson.loads(g(b"n")) if g(b"n") else {},
            recent_items=orjson.loads(g(b"ri")) if g(b"ri") else [],
            purchased_items=orjson.loads(g(b"pi")) if g(b"pi") else [],
            purchase_counts=orjson.loads(g(b"pc")) if g(b"pc") else {},
            last_event_id=_s(g(b"leid")),
            session_id=_s(g(b"sid")),
            long_term_weight=float(g(b"ltw") or 0.0),
            long_term_ts=_i(g(b"ltr")),
            session_weight=float(g(b"sew") or 0.0),
            model_version=_s(g(b"mv")),
            version=int(g(b"v") or 0),
            offsets=offsets,
            dedupe_horizon_ts=_i(g(b"hz")) or 0,
        )

    @staticmethod
    def _encode(p: Profile) -> list[bytes | str | int | float]:
        """Field/value pairs of the hash (absent vectors are written as empty values)."""

        def vec(x: np.ndarray | None) -> bytes:
            return b"" if x is None else np.asarray(x, np.float32).tobytes()

        out: list[bytes | str | int | float] = [
            "lt", vec(p.long_term), "ltw", repr(float(p.long_term_weight)),
            "ltr", "" if p.long_term_ts is None else str(p.long_term_ts),
            "se", vec(p.session), "sew", repr(float(p.session_weight)), "sid", p.session_id or "",
            "q", vec(p.query), "qt", p.query_text or "", "qts", "" if p.query_ts is None else str(p.query_ts),
            "last", "" if p.last_ts is None else str(p.last_ts), "leid", p.last_event_id or "",
            "n", orjson.dumps(p.n_events), "ri", orjson.dumps(p.recent_items),
            "pi", orjson.dumps(p.purchased_items), "pc", orjson.dumps(p.purchase_counts),
            "mv", p.model_version or "",
        ]  # fmt: skip
        for tp, off in p.offsets.items():
            out += [f"o:{tp}", str(off)]
        # Empty strings mean "absent" on read.
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
            if e.type.value != "search" and not item_found[i]:
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
    ) -> list[str]:
        """Read, de-duplicate, compute and write the given users; return the conflicted ones."""
        users = list(by_user)
        t0 = time.perf_counter()
        pipe = self.redis.pipeline(transaction=False)
        for u in users:
            pipe.hgetall(self.profile_key(u))
            pipe.zmscore(self.ids_key(u), [events[i].event_id for i in by_user[u]])
        raw = pipe.execute()
        metrics.redis_seconds.labels("read").observe(time.perf_counter() - t0)

        profiles: list[Profile] = []
        keep: list[list[int]] = []
        new_offsets: list[dict[str, int]] = []
        skipped: list[dict[str, int]] = []
        for k, u in enumerate(users):
            h, scores = raw[2 * k], raw[2 * k + 1]
            prof = self._decode(u, h) if h else Profile(user_id=u)
            offs: dict[str, int] = {}
            skips: dict[str, int] = defaultdict(int)
            skipped.append(skips)
            kept: list[int] = []
            seen: set[str] = set()
            for j, i in enumerate(by_user[u]):
                e = events[i]
                pos = positions[i] if positions is not None else None
                if pos is not None:
                    if pos.offset <= prof.offsets.get(pos.tp, -1):
                        skips["duplicate"] += 1
                        continue
                    offs[pos.tp] = max(offs.get(pos.tp, -1), pos.offset)
                if scores[j] is not None or e.event_id in seen:
                    skips["duplicate"] += 1
                    continue
                if e.ts < prof.dedupe_horizon_ts:
                    skips["stale"] += 1
                    continue
                seen.add(e.event_id)
                kept.append(i)
            profiles.append(prof)
            keep.append(kept)
            new_offsets.append(offs)

        # Users with events to apply go through the model; users whose events were all skipped
        # only need their offsets moved (so a replay of them is cheap), without a version check.
        live = [k for k in range(len(users)) if keep[k]]
        updated: dict[int, Profile] = {}
        if live:
            idx = [i for k in live for i in keep[k]]
            user_col = np.concatenate([np.full(len(keep[k]), r, np.int64) for r, k in enumerate(live)])
            evs = [events[i] for i in idx]
            qv = None
            has_q = None
            if query_vectors:
                dim = item_vectors.shape[1]
                qv = np.zeros((len(idx), dim), np.float32)
                has_q = np.zeros(len(idx), bool)
                for r, i in enumerate(idx):
                    v = query_vectors.get(i)
                    if v is not None:
                        qv[r] = v
                        has_q[r] = True
            vecs = item_vectors[idx].copy()
            is_search = np.fromiter((e.type.value == "search" for e in evs), bool, len(evs))
            vecs[is_search] = 0.0
            cols = EventColumns(
                user=user_col,
                ts=np.fromiter((e.ts for e in evs), np.int64, len(evs)),
                type=np.fromiter((TYPE_INDEX[e.type.value] for e in evs), np.int64, len(evs)),
                vectors=vecs,
                event_ids=[e.event_id for e in evs],
                item_ids=[e.item_id for e in evs],
                session_ids=[e.session_id for e in evs],
                queries=[e.query for e in evs],
                query_vectors=qv,
                has_query_vector=has_q,
            )
            mv = getattr(self.items, "model_version", None) if self.items is not None else None
            new = apply([profiles[k] for k in live], cols, self.cfg, item_vectors.shape[1], mv)
            updated = dict(zip(live, new, strict=True))

        t0 = time.perf_counter()
        pipe = self.redis.pipeline(transaction=False)
        order: list[int] = []
        for k, u in enumerate(users):
            if k in updated:
                p = updated[k]
                p.offsets.update(new_offsets[k])
                fields = self._encode(p)
                ids_args: list[str | int] = []
                for i in keep[k]:
                    ids_args += [events[i].ts, events[i].event_id]
                args = [
                    profiles[k].version,
                    len(fields),
                    len(keep[k]),
                    self.cfg.dedupe_event_ids,
                    *fields,
                    *ids_args,
                ]
                self._write(keys=[self.profile_key(u), self.ids_key(u)], args=args, client=pipe)
                order.append(k)
            elif new_offsets[k]:
                # Only skipped events: advance the replay watermark (monotonic, no CAS needed).
                pk = self.profile_key(u)
                if profiles[k].version:  # never create a profile from duplicates alone
                    for tp, off in new_offsets[k].items():
                        if off > profiles[k].offsets.get(tp, -1):
                            pipe.hset(pk, f"o:{tp}", off)
        out = pipe.execute() if len(pipe) else []
        metrics.redis_seconds.labels("write").observe(time.perf_counter() - t0)

        conflicted: list[str] = []
        results = iter(out)
        for k in order:
            if int(next(results)) < 0:
                conflicted.append(users[k])
        # A conflicted user is re-read and recomputed: its skips are counted on the retry.
        done = set(conflicted)
        for k, u in enumerate(users):
            if u in done:
                continue
            if k in updated:
                res.applied += len(keep[k])
                res.applied_index.extend(keep[k])
                res.changed_users.add(u)
            for reason, c in skipped[k].items():
                res.skip(reason, c)
        return conflicted


def events_total(p: Profile) -> int:
    """Events applied to a profile (all types)."""
    return sum(p.n_events.get(t, 0) for t in EVENT_TYPES)
