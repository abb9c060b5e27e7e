"""The live explorer's worker-side state: recent events per user, the live push feed, item texts.

``GET /explorer`` (``streams/web.py``) is a small page over three in-memory helpers:

* :class:`EventRecorder`, a pipeline hook: the last ``per_user`` applied events of the last
  ``max_users`` users **this worker** saw (an LRU of deques; O(events) appends, no I/O). With
  several workers each one shows the users of its own partitions only; a restart starts empty.
* :class:`LiveFeed`, a pusher listener: every pushed results message of a watched user goes to
  that user's subscribers (the ``GET /explorer/stream`` server-sent events). Bounded: at most
  ``max_subscribers`` streams and ``queue_size`` messages each; a slow client loses its oldest
  message, the push path never waits. With nobody watching a push costs one dict lookup.
* :class:`ItemTexts`: item id → text for the page, loaded once on the first explorer request
  (never by the event path): a ``text`` column of the model folder's ``catalog/items.parquet``
  when there is one, else the first dataset under ``settings.data_dir`` whose items cover the
  catalog. Without either, the page shows item ids and categories only.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from streamrec.events import Event
from streamrec.settings import Settings

__all__ = ["EventRecorder", "Explorer", "ItemTexts", "LiveFeed", "build_explorer"]

log = logging.getLogger(__name__)

MAX_USERS = 5000
EVENTS_PER_USER = 20


class EventRecorder:
    """Pipeline hook: the last ``per_user`` applied events of the ``max_users`` most recent users."""

    def __init__(self, max_users: int = MAX_USERS, per_user: int = EVENTS_PER_USER) -> None:
        self.max_users = max_users
        self.per_user = per_user
        self.users: OrderedDict[str, deque[Event]] = OrderedDict()  # least recently active first
        self.events_seen = 0

    async def __call__(self, events: Sequence[Event], changed_users: set[str]) -> None:
        self.record(events)

    def record(self, events: Sequence[Event]) -> None:
        users = self.users
        for ev in events:
            d = users.get(ev.user_id)
            if d is None:
                d = users[ev.user_id] = deque(maxlen=self.per_user)
                if len(users) > self.max_users:
                    users.popitem(last=False)
            else:
                users.move_to_end(ev.user_id)
            d.append(ev)
        self.events_seen += len(events)

    def recent_users(self, limit: int) -> list[dict[str, Any]]:
        """The most recently active users, newest first."""
        out: list[dict[str, Any]] = []
        for user in reversed(self.users):
            if len(out) >= limit:
                break
            evs = self.users[user]
            last = evs[-1]
            out.append({"user_id": user, "last_ts": last.ts, "last_type": str(last.type), "events": len(evs)})
        return out

    def events_of(self, user_id: str) -> list[Event]:
        """The user's recorded events, newest first (empty for a user this worker has not seen)."""
        return list(reversed(self.users.get(user_id, ())))


@dataclass(eq=False)
class Subscriber:
    """One open event stream: a bounded queue of pushed messages."""

    user_id: str
    queue: asyncio.Queue[dict[str, Any]]
    dropped: int = 0


class LiveFeed:
    """Pusher listener → per-user subscribers; never blocks, drops the oldest for slow clients."""

    def __init__(self, max_subscribers: int = 100, queue_size: int = 32) -> None:
        self.max_subscribers = max_subscribers
        self.queue_size = queue_size
        self.by_user: dict[str, set[Subscriber]] = {}
        self.count = 0
        self.delivered = 0
        self.dropped = 0

    def __call__(self, user_id: str, message: dict[str, Any]) -> None:
        """The listener (called by the pusher on the event loop for every pushed message)."""
        subs = self.by_user.get(user_id)
        if not subs:
            return
        for sub in subs:
            if sub.queue.full():
                sub.queue.get_nowait()
                sub.dropped += 1
                self.dropped += 1
            sub.queue.put_nowait(message)
            self.delivered += 1

    def subscribe(self, user_id: str) -> Subscriber | None:
        """A new subscriber, or None when ``max_subscribers`` streams are open."""
        if self.count >= self.max_subscribers:
            return None
        sub = Subscriber(user_id, asyncio.Queue(self.queue_size))
        self.by_user.setdefault(user_id, set()).add(sub)
        self.count += 1
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        subs = self.by_user.get(sub.user_id)
        if subs is not None and sub in subs:
            subs.discard(sub)
            self.count -= 1
            if not subs:
                del self.by_user[sub.user_id]


class ItemTexts:
    """item id → display text, loaded once in a thread on first use (see the module docstring)."""

    def __init__(self, settings: Settings, item_ids: Sequence[str] | None) -> None:
        self.settings = settings
        self.item_ids = list(item_ids) if item_ids is not None else []
        self.texts: dict[str, str] = {}
        self.source = "not loaded"
        self._lock = threading.Lock()
        self._loaded = False
        self._task: asyncio.Future[None] | None = None

    async def ensure(self) -> dict[str, str]:
        """The texts (loading them the first time; failures leave an empty map)."""
        if not self._loaded:
            if self._task is None:
                self._task = asyncio.get_running_loop().run_in_executor(None, self.load)
            await asyncio.shield(self._task)
        return self.texts

    def load(self) -> None:
        with self._lock:
            if self._loaded:
                return
            try:
                self.texts, self.source = self._read()
            except Exception as exc:  # the page works without texts
                log.warning("explorer: no item texts (%s)", exc)
                self.texts, self.source = {}, f"none ({exc})"
            self._loaded = True
            log.info("explorer: %d item texts from %s", len(self.texts), self.source)

    def _read(self) -> tuple[dict[str, str], str]:
        import pandas as pd

        from streamrec.datasets import DATASETS, load_dataset

        items_file = self.settings.resolved_model_dir / "catalog" / "items.parquet"
        if items_file.is_file():
            df = pd.read_parquet(items_file)
            if "text" in df.columns:
                return dict(zip(df["item_id"].astype(str), df["text"].astype(str), strict=True)), str(
                    items_file
                )
        sample = self.item_ids[:: max(1, len(self.item_ids) // 200)] if self.item_ids else []
        for name in DATASETS:
            try:
                ds = load_dataset(name, self.settings.data_dir)
            except (FileNotFoundError, OSError):
                continue
            texts = ds.item_text()
            if not sample or sum(i in texts for i in sample) >= 0.9 * len(sample):
                return {str(k): str(v) for k, v in texts.items()}, f"dataset {name}"
        return {}, "none (no dataset covers the catalog)"

    def of(self, item_ids: Sequence[str | None]) -> dict[str, str]:
        """Texts of the given ids that are known (an empty map before they are loaded)."""
        texts = self.texts
        return {i: texts[i] for i in item_ids if i is not None and i in texts}


@dataclass
class Explorer:
    """The explorer's parts, built with the worker (``WorkerContext.explorer``)."""

    recorder: EventRecorder
    feed: LiveFeed
    texts: ItemTexts
    categories: dict[str, str] = field(default_factory=dict)  # item id -> category


def build_explorer(settings: Settings, items: Any) -> Explorer:
    """An explorer over ``items`` (a catalog: ``ids`` / ``categories`` when it has them)."""
    raw_ids = getattr(items, "ids", None)
    ids = [str(i) for i in raw_ids] if raw_ids is not None else []
    cats = getattr(items, "categories", None)
    if cats is None or len(cats) != len(ids):
        cats = [""] * len(ids)
    return Explorer(
        EventRecorder(), LiveFeed(), ItemTexts(settings, ids), dict(zip(ids, map(str, cats), strict=True))
    )


def event_json(ev: Event, texts: dict[str, str], categories: dict[str, str]) -> dict[str, Any]:
    """One recorded event as the explorer API shows it."""
    item = ev.item_id
    return {
        "event_id": ev.event_id,
        "type": str(ev.type),
        "item_id": item,
        "item_text": texts.get(item) if item else None,
        "category": (categories.get(item) or ev.category or None) if item else None,
        "query": ev.query,
        "ts": ev.ts,
    }
