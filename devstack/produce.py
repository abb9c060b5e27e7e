"""The dataset replayer behind ``streamrec produce``: datasets become events on the events topic.

:class:`EventProducer` sends :class:`~streamrec.events.Event` objects (or raw bytes) to the
events topic keyed by ``user_id`` (so one user's events stay in one partition, in order),
through the one producer module (:mod:`streamrec.kafka`).

:func:`dataset_events` turns a dataset (``streamrec.datasets``) into events: Online Retail
purchases become ``purchase`` events with quantity, price and category; the Scientific
dataset's interactions become ``click`` events; a generic dataset keeps its ``type``/``query``
columns. Each user's session id changes after ``profile.session_inactivity_s`` of inactivity.
With ``now_ms`` the events are re-timed to the present, keeping their relative spacing divided
by ``speed``. :func:`replay` sends them at a rate (or as fast as possible) with a progress bar.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import click
import numpy as np
import pandas as pd
from tqdm import tqdm

from streamrec.datasets import Dataset
from streamrec.events import Event, EventType, encode
from streamrec.kafka import KafkaProducer, ProduceError
from streamrec.settings import Settings

__all__ = ["EventProducer", "ProduceError", "dataset_events", "replay"]

log = logging.getLogger(__name__)

# Interaction types of the named datasets, as events.
DATASET_EVENT_TYPE = {"online-retail": "purchase", "scientific": "click"}


class EventProducer:
    """Events to the events topic, keyed by ``user_id`` (one user's events stay in order)."""

    def __init__(self, settings: Settings, topic: str | None = None, **overrides: Any) -> None:
        self.topic = topic or settings.topics.events
        self.kafka = KafkaProducer(settings, **{"linger.ms": 10, **overrides})

    def send_raw(
        self, value: bytes | None, key: bytes | str | None = None, headers: list | None = None
    ) -> None:
        self.kafka.produce(self.topic, value, key, headers)
        self.kafka.poll(0)

    def send(self, event: Event) -> None:
        self.send_raw(encode(event), event.user_id.encode())

    def send_many(self, events: Iterable[Event]) -> int:
        n = 0
        for e in events:
            self.send(e)
            n += 1
        return n

    @property
    def delivered(self) -> int:
        return self.kafka.delivered

    def flush(self, timeout: float = 60.0) -> int:
        """Wait for every queued record; raise :class:`ProduceError` if any failed."""
        self.kafka.flush(timeout)
        return self.kafka.delivered

    def poll(self, timeout: float = 0.0) -> None:
        self.kafka.poll(timeout)


def _session_numbers(users: np.ndarray, ts: np.ndarray, timeout_ms: float) -> np.ndarray:
    """Per event, the index of its user's session (new after ``timeout_ms`` of inactivity)."""
    order = np.lexsort((ts, users))
    u, t = users[order], ts[order]
    new_user = np.r_[True, u[1:] != u[:-1]]
    new_session = new_user | np.r_[False, np.diff(t) > timeout_ms]
    cum = np.cumsum(new_session)
    first = np.maximum.accumulate(np.where(new_user, np.arange(len(u)), 0))
    numbers = cum - cum[first]
    out = np.empty(len(u), np.int64)
    out[order] = numbers
    return out


def dataset_events(
    ds: Dataset,
    split: str = "test",
    *,
    settings: Settings,
    limit: int | None = None,
    now_ms: int | None = None,
    speed: float = 1.0,
) -> Iterator[Event]:
    """The dataset's interactions of ``split`` ("all" for every split) as events, in time order."""
    df = ds.interactions if split == "all" else ds.split(split)
    if limit is not None:
        df = df.iloc[:limit]
    if df.empty:
        return
    users = df["user_id"].to_numpy()
    ts = df["ts"].to_numpy(np.int64)
    sess = _session_numbers(users, ts, settings.profile.session_inactivity_s * 1000.0)
    if now_ms is not None:
        if speed <= 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        ts = now_ms + ((ts - ts[0]) / speed).astype(np.int64)
    forced = DATASET_EVENT_TYPE.get(ds.name)
    types = np.full(len(df), forced, object) if forced else df["type"].to_numpy()
    cat = ds.item_category()
    items = df["item_id"].to_numpy()
    queries = df["query"].to_numpy() if "query" in df else np.full(len(df), "", object)
    qty = df["quantity"].to_numpy() if "quantity" in df else None
    price = df["price"].to_numpy() if "price" in df else None
    for k in range(len(df)):
        t = EventType(types[k])
        item = items[k] or None
        yield Event(
            event_id=uuid.uuid4().hex,
            type=t,
            user_id=str(users[k]),
            ts=int(ts[k]),
            session_id=f"{users[k]}-{sess[k]}",
            item_id=None if t is EventType.SEARCH else item,
            query=(queries[k] or None) if t is EventType.SEARCH else None,
            price=None if price is None or pd.isna(price[k]) else float(price[k]),
            quantity=None if qty is None or pd.isna(qty[k]) else int(qty[k]),
            category=(cat.get(item) or None) if item else None,
        )


def replay(
    producer: EventProducer,
    events: Iterable[Event],
    *,
    total: int | None = None,
    rate: float = 0.0,
    paced_by_event_time: bool = False,
    progress: bool = True,
) -> int:
    """Send events at ``rate`` per second (0: as fast as possible); returns the number sent.

    With ``paced_by_event_time`` an event is not sent before the wall clock reaches its ``ts``
    (re-timed events then never lie in the future).
    """
    sent = 0
    t0 = time.monotonic()
    bar = tqdm(
        total=total, unit="ev", desc=f"produce → {producer.topic}", disable=not progress, smoothing=0.05
    )
    try:
        for ev in events:
            if rate > 0:
                while (wait := t0 + sent / rate - time.monotonic()) > 0:
                    producer.poll(min(wait, 0.05))
            if paced_by_event_time:
                while (wait := ev.ts / 1000.0 - time.time()) > 0:
                    producer.poll(min(wait, 0.2))
            producer.send(ev)
            sent += 1
            if sent % 1000 == 0:
                bar.update(1000)
        bar.update(sent % 1000)
        producer.flush()
    finally:
        bar.close()
    return sent


@click.command()
@click.option(
    "--dataset",
    default="online-retail",
    show_default=True,
    help="online-retail, scientific, or a generic dataset folder.",
)
@click.option(
    "--split", type=click.Choice(["train", "valid", "test", "all"]), default="test", show_default=True
)
@click.option(
    "--rate", type=float, default=0.0, show_default=True, help="Events per second; 0 = as fast as possible."
)
@click.option("--limit", type=int, default=None, help="Send at most this many events.")
@click.option("--users", type=int, default=None, help="Only a random sample of this many users.")
@click.option(
    "--now",
    "retime",
    is_flag=True,
    help="Re-time events to the present (relative spacing / --speed); they are sent as their time comes.",
)
@click.option(
    "--speed",
    type=float,
    default=1.0,
    show_default=True,
    help="With --now: event-time speed-up (3600 = one hour of the dataset per second).",
)
@click.option("--topic", default=None, help="Topic (default: STREAMREC_TOPICS_EVENTS).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def produce(
    dataset: str,
    split: str,
    rate: float,
    limit: int | None,
    users: int | None,
    retime: bool,
    speed: float,
    topic: str | None,
    quiet: bool,
) -> None:
    """Replay a dataset into the events topic (keyed by user_id) at a rate, with a progress bar."""
    from streamrec.datasets import load_dataset
    from streamrec.kafka import ensure_topics
    from streamrec.settings import get_settings

    logging.basicConfig(level=logging.WARNING)
    s = get_settings()
    if speed <= 0:
        raise click.BadParameter("must be > 0", param_hint="--speed")
    try:
        ds = load_dataset(dataset, s.data_dir).subset(users)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if topic:
        s = s.model_copy(update={"topics": s.topics.model_copy(update={"events": topic})})
    try:
        ensure_topics(s)
    except Exception as exc:
        raise click.ClickException(
            f"cannot reach Kafka at {s.kafka.bootstrap_servers}: {exc}; start the stack with `streamrec up`"
        ) from exc
    n = len(ds.interactions) if split == "all" else int((ds.interactions["split"] == split).sum())
    total = min(n, limit) if limit is not None else n
    now_ms = int(time.time() * 1000) if retime else None
    events = dataset_events(ds, split, settings=s, limit=limit, now_ms=now_ms, speed=speed)
    producer = EventProducer(s)
    t0 = time.monotonic()
    try:
        sent = replay(
            producer, events, total=total, rate=rate, paced_by_event_time=retime, progress=not quiet
        )
    except ProduceError as exc:
        raise click.ClickException(str(exc)) from exc
    except KeyboardInterrupt:
        producer.flush(10)
        click.echo(f"interrupted after {producer.delivered} events", err=True)
        raise SystemExit(130) from None
    dt = time.monotonic() - t0
    click.echo(
        f"sent {sent} {ds.name}/{split} events to {s.topics.events} in {dt:.1f}s ({sent / max(dt, 1e-9):,.0f}/s)"
    )
