"""Benchmarks of the stream worker: ``streamrec bench ingest`` (and ``e2e``, below).

``ingest`` measures, per worker (one process, one consumer), on the Online Retail replay and on a
synthetic stream shaped like it (1M events; ``--quick``: 20k):

* **raw consume**: records/s reading the events topic with aiokafka (the client faust uses),
  no processing;
* **ingest**: events/s from the same topic through the worker's pipeline (validation, dead
  letters, one Redis read and one write pipeline per batch) into profiles in Redis, with
  p50/p99 batch latency; ``ratio_ingest_vs_raw_consume`` = ingest / raw (target >= 0.5);
* **naive baseline**: the same pipeline with one event per batch (a Redis round trip per event),
  on a slice of the stream; ``ratio_pipeline_vs_naive`` = batched / naive, both without Kafka.

Item vectors are seeded random unit vectors (dim 384, like the served encoder) for the
dataset's item ids: ingest cost does not depend on their values, and no trained model is needed.
Topics and Redis keys are unique to the run and removed at the end.

``e2e`` (event produced → list received on the results topic) draws its events after a real
shop (:func:`shaped_workload`: Online Retail's shopper activity and item sales), a clickstream
by default, and measures the bare Kafka round trip beside it.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import click
import numpy as np
import orjson
import pandas as pd

from streamrec.kafka import arrived, timing_consumer_config
from streamrec.settings import Settings, get_settings

BENCH_DIM = 384


def random_items(ids: Sequence[str], dim: int = BENCH_DIM, seed: int = 0):
    """A catalog index over seeded random unit vectors (the bench needs no trained model)."""
    from inference.catalog import CatalogIndex

    m = np.random.default_rng(seed).standard_normal((len(ids), dim), dtype=np.float32)
    return CatalogIndex.from_arrays(
        list(ids), m / np.linalg.norm(m, axis=1, keepdims=True), f"bench-random-{dim}"
    )


class _NullDeadLetters:
    async def send(self, letters) -> None:  # the bench streams contain no malformed records
        if letters:
            raise RuntimeError(f"{len(letters)} unexpected dead letters in the bench stream")


class ShopCounts(NamedTuple):
    """What a dataset says about its shop's traffic: each shopper's events, each item's, and the
    sizes of its orders (a shopper's events at one time), ids in sorted order."""

    users: np.ndarray
    user_events: np.ndarray
    items: np.ndarray
    item_events: np.ndarray
    order_sizes: np.ndarray


def shop_counts(ds) -> ShopCounts:
    """:class:`ShopCounts` of a dataset (the ingest bench's stream and the e2e levels' shape)."""
    inter = ds.interactions
    users, ucount = np.unique(inter["user_id"].to_numpy(), return_counts=True)
    items, icount = np.unique(inter["item_id"].to_numpy(), return_counts=True)
    return ShopCounts(users, ucount, items, icount, inter.groupby(["user_id", "ts"]).size().to_numpy())


def synthetic_retail(ds, n: int, seed: int = 0) -> list[bytes]:
    """``n`` purchase events shaped like Online Retail: its user activity, item popularity,
    invoice sizes (bursts of lines at one time) and event rate, with fresh ids."""
    from streamrec.events import Event, EventType, encode

    rng = np.random.default_rng(seed)
    inter = ds.interactions
    users, ucount, items, icount, inv = shop_counts(ds)
    span = float(inter["ts"].max() - inter["ts"].min())
    gap_ms = span / max(len(inv), 1)
    cat = ds.item_category()
    out: list[bytes] = []
    t = int(inter["ts"].min())
    pu = ucount / ucount.sum()
    pi = icount / icount.sum()
    while len(out) < n:
        k = 4096
        us = rng.choice(users, size=k, p=pu)
        sizes = rng.choice(inv, size=k)
        gaps = rng.exponential(gap_ms, size=k).astype(np.int64)
        its = rng.choice(items, size=int(sizes.sum()), p=pi)
        qty = rng.integers(1, 25, size=its.size)
        pos = 0
        for u, s, g in zip(us, sizes, gaps, strict=True):
            t += int(g)
            for j in range(int(s)):
                item = its[pos + j]
                ev = Event(
                    event_id=uuid.uuid4().hex,
                    type=EventType.PURCHASE,
                    user_id=str(u),
                    ts=t,
                    session_id=f"{u}-{t // 3_600_000}",
                    item_id=str(item),
                    price=2.5,
                    quantity=int(qty[pos + j]),
                    category=cat.get(item) or None,
                )
                out.append(encode(ev))
            pos += int(s)
            if len(out) >= n:
                break
    return out[:n]


def _bench_settings(base: Settings, tag: str) -> Settings:
    run = uuid.uuid4().hex[:8]
    return base.override(
        topics={
            "events": f"bench-{run}-{tag}.events",
            "dead_letter": f"bench-{run}-{tag}.dlq",
            "results": f"bench-{run}-{tag}.results",
            "alerts": f"bench-{run}-{tag}.alerts",
        },
        redis={"prefix": f"bench{run}"},
    )


def _produce(s: Settings, values: Sequence[bytes]) -> None:
    from devstack.produce import EventProducer

    p = EventProducer(s)
    for v in values:
        p.send_raw(v, _user_key(v))
    p.flush(120)


def _user_key(v: bytes) -> bytes:
    # user_id is always present in bench events; a cheap scan avoids a full decode per record
    i = v.index(b'"user_id":"') + 11
    return v[i : v.index(b'"', i)]


async def _consume(s: Settings, n: int, process=None, group: str | None = None) -> dict[str, Any]:
    """Read ``n`` records of the events topic with aiokafka; optionally process each batch."""
    from aiokafka import AIOKafkaConsumer

    from streams.validation import RawRecord

    c = AIOKafkaConsumer(
        s.topics.events,
        group_id=group or f"bench-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_poll_records=s.stream.max_poll_records,
        **s.kafka.aiokafka_kwargs(),
    )
    await c.start()
    got = 0
    lat: list[float] = []
    t0 = None
    try:
        while got < n:
            res = await c.getmany(timeout_ms=1000, max_records=s.stream.batch_max)
            if not res:
                continue
            if t0 is None:
                t0 = time.perf_counter()
            msgs = [m for batch in res.values() for m in batch]
            got += len(msgs)
            if process is not None:
                b0 = time.perf_counter()
                await process([RawRecord(m.value, m.key, m.topic, m.partition, m.offset) for m in msgs])
                lat.append(time.perf_counter() - b0)
        dt = time.perf_counter() - (t0 or time.perf_counter())
    finally:
        await c.stop()
    out: dict[str, Any] = {"records": got, "seconds": round(dt, 3), "per_s": round(got / max(dt, 1e-9), 1)}
    if lat:
        out["batches"] = len(lat)
        out["batch_p50_ms"] = round(float(np.percentile(lat, 50)) * 1000, 2)
        out["batch_p99_ms"] = round(float(np.percentile(lat, 99)) * 1000, 2)
    return out


def _pipeline(s: Settings, items: Any, redis):
    from profiles.store import ProfileStore
    from streams.pipeline import EventPipeline
    from streams.validation import Validator

    return EventPipeline(ProfileStore(redis, s, items=items), Validator(items), _NullDeadLetters())


def _clear_redis(redis, prefix: str) -> None:
    keys = list(redis.scan_iter(match=f"{{{prefix}:*", count=5000))
    for k in range(0, len(keys), 5000):
        redis.delete(*keys[k : k + 5000])


def _delete_topics(s: Settings) -> None:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(s.kafka.librdkafka_config())
    names = [s.topics.events, s.topics.dead_letter, s.topics.results, s.topics.alerts]
    for fut in admin.delete_topics(names, operation_timeout=30).values():
        try:
            fut.result(30)
        except Exception:
            pass


async def _run_workload(base: Settings, tag: str, values: list[bytes], items: Any, reps: int) -> dict:
    from streamrec.kafka import ensure_topics
    from streams.validation import RawRecord

    s = _bench_settings(base, tag)
    redis = s.redis.client()
    ensure_topics(s)
    try:
        click.echo(f"[{tag}] producing {len(values):,} events to {s.topics.events}")
        _produce(s, values)
        raw, ing = [], []
        for r in range(reps):
            raw.append(await _consume(s, len(values)))
            click.echo(f"[{tag}] raw consume {r + 1}/{reps}: {raw[-1]['per_s']:,.0f} records/s")
            _clear_redis(redis, s.redis.prefix)
            pipe = _pipeline(s, items, redis)
            ing.append(await _consume(s, len(values), process=pipe.process))
            click.echo(
                f"[{tag}] ingest {r + 1}/{reps}: {ing[-1]['per_s']:,.0f} events/s, "
                f"batch p50 {ing[-1]['batch_p50_ms']} ms p99 {ing[-1]['batch_p99_ms']} ms"
            )
        raw_ps = statistics.median(x["per_s"] for x in raw)
        ing_ps = statistics.median(x["per_s"] for x in ing)
        # Naive baseline vs batched pipeline, without Kafka, on a slice of the stream.
        k = min(len(values), 2000 if reps == 1 else 10000)
        recs = [RawRecord(v, None, s.topics.events, 0, i) for i, v in enumerate(values[:k])]
        _clear_redis(redis, s.redis.prefix)
        pipe = _pipeline(s, items, redis)
        t0 = time.perf_counter()
        for i in range(0, k, s.stream.batch_max):
            await pipe.process(recs[i : i + s.stream.batch_max])
        batched = k / (time.perf_counter() - t0)
        _clear_redis(redis, s.redis.prefix)
        pipe = _pipeline(s, items, redis)
        t0 = time.perf_counter()
        for rec in recs:
            await pipe.process([rec])
        naive = k / (time.perf_counter() - t0)
        click.echo(
            f"[{tag}] pipeline batched {batched:,.0f}/s vs naive one-event-per-round-trip {naive:,.0f}/s"
        )
        return {
            "events": len(values),
            "raw_consume": raw,
            "ingest": ing,
            "median_raw_consume_per_s": raw_ps,
            "median_ingest_per_s": ing_ps,
            "median_batch_p50_ms": statistics.median(x["batch_p50_ms"] for x in ing),
            "median_batch_p99_ms": statistics.median(x["batch_p99_ms"] for x in ing),
            "ratio_ingest_vs_raw_consume": round(ing_ps / raw_ps, 3),
            "pipeline_slice_events": k,
            "pipeline_batched_per_s": round(batched, 1),
            "pipeline_naive_per_s": round(naive, 1),
            "ratio_pipeline_vs_naive": round(batched / naive, 2),
        }
    finally:
        _clear_redis(redis, s.redis.prefix)
        redis.close()
        _delete_topics(s)


@click.command()
@click.option("--quick", is_flag=True, help="Small streams, one repetition (CI smoke run).")
@click.option(
    "--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the JSON here."
)
@click.option(
    "--synthetic-events",
    type=int,
    default=None,
    help="Synthetic stream size (default 1,000,000; quick 20,000).",
)
@click.option(
    "--retail-events", type=int, default=None, help="Online Retail events (default all; quick 20,000)."
)
def ingest(quick: bool, output: Path | None, synthetic_events: int | None, retail_events: int | None) -> None:
    """Events/s from the events topic to profiles in Redis vs the raw consume rate of the topic."""
    import platform

    from devstack.produce import dataset_events
    from streamrec.datasets import load_dataset
    from streamrec.events import encode

    s = get_settings()
    reps = 1 if quick else 3
    n_syn = synthetic_events or (20_000 if quick else 1_000_000)
    n_ret = retail_events or (20_000 if quick else None)
    ds = load_dataset("online-retail", s.data_dir)
    items = random_items(ds.item_ids)
    retail = [encode(e) for e in dataset_events(ds, "all", settings=s, limit=n_ret)]
    synthetic = synthetic_retail(ds, n_syn)
    result: dict[str, Any] = {
        "bench": "ingest",
        "quick": quick,
        "repetitions": reps,
        "batch_max": s.stream.batch_max,
        "partitions": s.topics.partitions,
        "item_vector_dim": BENCH_DIM,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "workloads": {},
    }
    for tag, values in (("online_retail", retail), ("synthetic", synthetic)):
        result["workloads"][tag] = asyncio.run(_run_workload(s, tag, values, items, reps))
    w = result["workloads"]
    result["ratio_ingest_vs_raw_consume"] = min(x["ratio_ingest_vs_raw_consume"] for x in w.values())
    result["ratio_pipeline_vs_naive"] = min(x["ratio_pipeline_vs_naive"] for x in w.values())
    result["median_ingest_per_s"] = {k: x["median_ingest_per_s"] for k, x in w.items()}
    result["median_raw_consume_per_s"] = {k: x["median_raw_consume_per_s"] for k, x in w.items()}
    text = json.dumps(result, indent=2)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
    click.echo(text)


# ---------------------------------------------------------------------------------------------
# e2e: end-to-end latency benchmark (event → recommendation on the results topic); registered
# in streamrec/cli.py BENCH_COMMANDS as "benchmarks.stream:e2e".
# ---------------------------------------------------------------------------------------------


E2E_RATES = (100, 1000, 5000, 10000)
E2E_SECONDS = 15.0
# The warm-up's load (events/s, at most the highest level): on a broker just started with the full
# JIT, the first ~50,000 records run while C2 compiles; a long-running broker is past that.
WARMUP_RATE = 5_000.0
WARMUP_S = 30.0
# A load level counts as sustained when results stop within this long after the last event.
DRAIN_BOUND_S = 5.0
# How often the drain wait reads the worker's lag gauge, and the gauge's update interval in the
# bench's worker (drain_s is as precise as this).
LAG_POLL_S = 0.5


def _synthetic_catalog_dir(root: Path, n_items: int, dim: int = 384, seed: int = 0) -> Path:
    """A synthetic catalog shaped like a real one: items in 500 clusters ("categories")."""
    from inference.catalog import CatalogIndex

    folder = root / f"synthetic-{n_items}"
    if (folder / "catalog").exists():
        return folder
    rng = np.random.default_rng(seed)
    n_cat = 500
    centers = rng.normal(size=(n_cat, dim)).astype(np.float32)
    cats = rng.integers(0, n_cat, n_items)
    m = centers[cats] + 0.8 * rng.normal(size=(n_items, dim)).astype(np.float32)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    ids = [f"s{i}" for i in range(n_items)]
    CatalogIndex.from_arrays(ids, m, f"synthetic-{n_items}", categories=[f"c{c}" for c in cats]).save(
        folder / "catalog"
    )
    return folder


class _ResultsReader:
    """Consumes the results topic in a thread; records (arrival ms, message)."""

    def __init__(self, s: Settings) -> None:
        import threading

        from confluent_kafka import Consumer

        self.consumer = Consumer(timing_consumer_config(s, f"{s.kafka.consumer_group}-reader"))
        self.consumer.subscribe([s.topics.results])
        self.rows: list[tuple[float, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            for m in arrived(self.consumer):
                if m.error() is None:
                    now = time.time() * 1000.0
                    value = m.value()
                    assert value is not None  # result messages always carry a value
                    self.rows.append((now, orjson.loads(value)["source_event_id"]))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.consumer.close()


def _metric_families(metrics_port: int) -> list[Any]:
    """The parsed families of a worker's /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    return list(text_string_to_metric_families(text))


def _scrape_stages(metrics_port: int) -> dict[str, tuple[list[float], list[float], float]]:
    """``streamrec_stage_seconds`` of a worker's /metrics: stage → (upper bounds, cumulative counts, sum)."""
    out: dict[str, tuple[list[float], list[float], float]] = {}
    for fam in _metric_families(metrics_port):
        if fam.name != "streamrec_stage_seconds":
            continue
        for smp in fam.samples:
            stage = smp.labels.get("stage", "")
            bounds, counts, total = out.setdefault(stage, ([], [], 0.0))
            if smp.name.endswith("_bucket"):
                bounds.append(float(smp.labels["le"]))
                counts.append(float(smp.value))
            elif smp.name.endswith("_sum"):
                out[stage] = (bounds, counts, float(smp.value))
    return out


def _scrape_all_stages(metrics_ports: Sequence[int]) -> dict[str, tuple[list[float], list[float], float]]:
    """:func:`_scrape_stages` of several workers, their histograms added (same buckets)."""
    out: dict[str, tuple[list[float], list[float], float]] = {}
    for port in metrics_ports:
        for stage, (bounds, counts, total) in _scrape_stages(port).items():
            if stage not in out:
                out[stage] = (bounds, counts, total)
                continue
            b0, c0, t0 = out[stage]
            out[stage] = (b0, [a + b for a, b in zip(c0, counts, strict=True)], t0 + total)
    return out


def _scrape_lag(metrics_port: int) -> float | None:
    """A worker's total ``streamrec_consumer_lag`` (events not yet processed), None if it has none."""
    try:
        families = _metric_families(metrics_port)
    except OSError:
        return None
    values = [smp.value for fam in families if fam.name == "streamrec_consumer_lag" for smp in fam.samples]
    return float(sum(values)) if values else None


def _total_lag(metrics_ports: Sequence[int]) -> float | None:
    """The lag of all workers together; None while none of them reports one (a worker that owns
    no partition reports none)."""
    lags = [lag for lag in map(_scrape_lag, metrics_ports) if lag is not None]
    return float(sum(lags)) if lags else None


def _stage_breakdown(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """Per stage between two scrapes: observations, mean, p50 and p99 (ms, bucket-interpolated)."""
    res: dict[str, dict[str, float]] = {}
    for stage, (bounds, counts, total) in after.items():
        b0 = before.get(stage, (bounds, [0.0] * len(counts), 0.0))
        d = np.asarray(counts) - np.asarray(b0[1] if len(b0[1]) == len(counts) else [0.0] * len(counts))
        n = float(d[-1]) if d.size else 0.0
        if n <= 0:
            continue
        finite = np.asarray([x if np.isfinite(x) else bounds[-2] * 2 for x in bounds])

        def q(p: float, d=d, n=n, finite=finite) -> float:
            i = int(np.searchsorted(d, p * n))
            lo, hi = (finite[i - 1] if i else 0.0), finite[min(i, len(finite) - 1)]
            c_lo = d[i - 1] if i else 0.0
            frac = (p * n - c_lo) / max(d[min(i, len(d) - 1)] - c_lo, 1e-9)
            return 1000.0 * (lo + (hi - lo) * min(max(frac, 0.0), 1.0))

        res[stage] = {
            "n": n,
            "mean_ms": round(1000.0 * (total - b0[2]) / n, 2),
            "p50_ms": round(q(0.5), 2),
            "p99_ms": round(q(0.99), 2),
        }
    return res


def _kafka_floor(s: Settings, rate: float, seconds: float) -> dict[str, Any]:
    """The bare round trip on the same broker: produce (same client settings) → a consumer."""
    import threading

    from confluent_kafka import Consumer

    from streamrec.kafka import KafkaProducer, ensure_topics

    topic = f"{s.topics.events}.floor-{int(rate)}"  # a fresh topic per rate: nothing old is read
    ensure_topics(s, extra={topic: 1})
    consumer = Consumer(timing_consumer_config(s, f"{s.kafka.consumer_group}-floor"))
    consumer.subscribe([topic])
    lat: list[float] = []
    stop = threading.Event()
    warmup = max(10, int(rate * 0.5))

    def read() -> None:
        while not stop.is_set():
            for m in arrived(consumer):
                value = m.value() if m.error() is None else None
                if value:
                    k, sent = value.split(b" ")
                    if int(k) >= warmup:  # the first records also pay the producer's metadata fetch
                        lat.append(time.time() * 1000.0 - float(sent))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(3.0)  # let the consumer join and get its partition
    producer = KafkaProducer(s)
    n = int(rate * seconds)
    t0 = time.monotonic()
    for k in range(n):
        delay = t0 + k / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        producer.produce(topic, f"{k} {time.time() * 1000.0}".encode(), b"k")
        producer.poll(0)
    producer.flush(30)
    deadline = time.monotonic() + 10
    while len(lat) < n - warmup and time.monotonic() < deadline:
        time.sleep(0.1)
    stop.set()
    reader.join(5)
    consumer.close()
    if not lat:
        return {"rate_events_per_s": rate, "records": 0}
    p50, p99 = np.percentile(lat, [50, 99])
    return {
        "rate_events_per_s": rate,
        "records": len(lat),
        "p50_ms": round(float(p50), 2),
        "p99_ms": round(float(p99), 2),
    }


@dataclass(frozen=True)
class Workload:
    """Who and what the e2e levels' events are about, shaped after a real shop (see :func:`shaped_workload`)."""

    items: list[str]
    item_p: np.ndarray  # draw probability of each item
    user_p: np.ndarray  # draw probability of each shopper (by activity rank)
    burst_sizes: np.ndarray  # events a shopper sends at once (an order's lines), drawn uniformly

    def shoppers(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Shopper ranks of ``n`` events: bursts of one shopper's events, shoppers by activity."""
        sizes = rng.choice(self.burst_sizes, size=max(1, n))  # at least n events' worth
        who = rng.choice(self.user_p.size, size=sizes.size, p=self.user_p)
        return np.repeat(who, sizes)[:n]

    def describe(self) -> dict[str, Any]:
        top_i, top_u = np.sort(self.item_p)[::-1], np.sort(self.user_p)[::-1]
        return {
            "items": len(self.items),
            "top_item_shares": [round(float(x), 4) for x in top_i[:3]],
            "shoppers": int(self.user_p.size),
            "top_shopper_shares": [round(float(x), 4) for x in top_u[:3]],
            "mean_burst": round(float(self.burst_sizes.mean()), 2),
        }


def shaped_workload(ds, items: Sequence[str], bursts: bool = False) -> Workload:
    """The dataset's shopper activity (each of its shoppers' share of the events) and item
    popularity: each catalog item's own share when the catalog is the dataset's, else its
    rank-share curve (a power law fitted on its 2,000 best sellers) over the catalog in a random
    order. Online Retail: the busiest shopper 2 % of the events, the best seller 0.5 %.

    Without ``bursts`` each event is drawn on its own (a clickstream: a shopper's views and clicks
    come seconds apart, so nearly every event owes its own push); with them a shopper sends a
    burst of events at once, sized like the dataset's orders (its events at one time: Online
    Retail's invoices, 21 lines on average), and most of a burst coalesces into one push."""
    shop = shop_counts(ds)
    sizes = shop.order_sizes.astype(np.int64) if bursts else np.ones(1, np.int64)
    users = np.sort(shop.user_events.astype(np.float64))[::-1]  # by activity rank
    sold = shop.items != ""
    counts = pd.Series(shop.item_events[sold].astype(np.float64), index=shop.items[sold])
    known = counts.reindex(list(items)).to_numpy(np.float64)
    if np.isfinite(known).mean() >= 0.5:  # the dataset's own catalog: its items' shares
        item_w = np.where(np.isfinite(known), known, 0.5)  # never sold: half a sale
    else:
        top = np.sort(counts.to_numpy())[::-1][:2000]
        slope = -np.polyfit(np.log(np.arange(1, top.size + 1)), np.log(top), 1)[0]
        ranks = np.random.default_rng(1).permutation(len(items)) + 1.0
        item_w = ranks**-slope
    return Workload(list(items), item_w / item_w.sum(), users / users.sum(), sizes)


def _e2e_level(
    producer,
    reader: _ResultsReader,
    rate: float,
    seconds: float,
    load: Workload,
    rng: np.random.Generator,
    sent_ts: dict[str, float],
    metrics_ports: Sequence[int] = (),
    user_prefix: str = "bu",
) -> dict[str, Any]:
    from streamrec.events import Event, EventType, encode

    start_rows = len(reader.rows)
    before = _scrape_all_stages(metrics_ports) if metrics_ports else {}
    n = int(rate * seconds)
    users = [f"{user_prefix}{u}" for u in load.shoppers(n, rng).tolist()]
    pop = [load.items[i] for i in rng.choice(len(load.items), n, p=load.item_p).tolist()]
    kinds = [EventType(t) for t in ("view", "click", "add_to_cart", "purchase")]
    types = [kinds[t] for t in rng.choice(4, n, p=[0.6, 0.3, 0.07, 0.03]).tolist()]
    ids = [uuid.uuid4().hex for _ in range(n)]
    # Fields are drawn before the clock starts, so the load generator spends its share of the
    # shared cores on sending; due events go out together, then it sleeps until the next one.
    t0 = time.monotonic()
    k = 0
    while k < n:
        now = time.monotonic()
        due = min(n, int((now - t0) * rate) + 1)
        if due <= k:
            time.sleep(max(0.0005, t0 + k / rate - now))
            continue
        ts = time.time() * 1000.0
        for j in range(k, due):
            sent_ts[ids[j]] = ts
            ev = Event(event_id=ids[j], type=types[j], user_id=users[j], ts=int(ts), item_id=pop[j])
            producer.send_raw(encode(ev), users[j].encode())
        k = due
    producer.flush(60)
    sent_at = time.monotonic()
    # Drain: wait until the worker has processed every event sent (its consumer lag is 0) and
    # results stopped arriving for 2 s, 60 s at most. Quiet results alone are not enough: a worker
    # stuck in a long batch pushes nothing for seconds while its lag is still large.
    last, quiet_since, deadline = len(reader.rows), time.monotonic(), time.monotonic() + 60
    lag_read_at = 0.0
    caught_up = not metrics_ports
    caught_up_at = sent_at
    while time.monotonic() < deadline and not (caught_up and time.monotonic() - quiet_since >= 2.0):
        time.sleep(0.1)
        if len(reader.rows) != last:
            last, quiet_since = len(reader.rows), time.monotonic()
        # The lag gauge moves every STREAMREC_STREAM_LAG_INTERVAL_S (0.5 s here): reading the whole
        # exposition more often only took the worker's CPU (~6 % of its busy samples in a py-spy
        # profile of a 3,000 events/s level).
        if time.monotonic() - lag_read_at < LAG_POLL_S:
            continue
        lag_read_at = time.monotonic()
        if not caught_up and _total_lag(metrics_ports) == 0:
            caught_up, caught_up_at = True, time.monotonic()
    drain_s = max(0.0, max(quiet_since, caught_up_at) - sent_at) if caught_up else time.monotonic() - sent_at
    elapsed = time.monotonic() - t0
    rows = reader.rows[start_rows:]
    lat = np.array([arr - sent_ts[eid] for arr, eid in rows if eid in sent_ts], np.float64)
    out: dict[str, Any] = {
        "rate_events_per_s": rate,
        "events": n,
        "results": len(rows),
        "results_per_s": round(len(rows) / max(elapsed - 2.0, 1e-3), 1),
        "achieved_events_per_s": round(n / max(sent_at - t0, 1e-3), 1),
        "drain_s": round(drain_s, 2),
        "sustained": drain_s <= DRAIN_BOUND_S and len(rows) > 0,
    }
    if not caught_up:  # how far behind the worker still is (events), and the share of the level left
        lag_left = _total_lag(metrics_ports) or 0.0
        out["lag_left_events"] = int(lag_left)
        out["lag_left_share"] = round(lag_left / max(n, 1), 3)
    if metrics_ports:
        out["stages"] = _stage_breakdown(before, _scrape_all_stages(metrics_ports))
    if lat.size:
        p50, p95, p99 = np.percentile(lat, [50, 95, 99])
        out.update(p50_ms=round(float(p50), 1), p95_ms=round(float(p95), 1), p99_ms=round(float(p99), 1))
    return out


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux /proc), e.g. the worker and its scoring process."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """(CPU seconds of ``pid``, of its descendants) so far: user + system (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    own, kids = 0.0, 0.0
    for p in _process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        cpu = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        if p == pid:
            own = cpu
        else:
            kids += cpu
    return own, kids


def _rss_mb(pid: int) -> dict[str, float]:
    """Resident memory of a process and its children now and at their peaks (Linux /proc), MB."""
    out: dict[str, float] = {}
    for p in _process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key = "rss_mb" if line.startswith("VmRSS") else "peak_rss_mb"
                    out[key] = round(out.get(key, 0.0) + int(line.split()[1]) / 1024, 1)
        except OSError:
            pass
    return out


def _run_e2e_catalog(
    base: Settings,
    tag: str,
    model_dir: Path,
    rates,
    seconds: float,
    log_dir: Path,
    encoder: str,
    shop: Any,
    bursts: bool = False,
    overload_s: float = 0.0,
    workers: int = 1,
    warmup_s: float = 0.0,
) -> dict[str, Any]:
    """The levels on one catalog; ``shop`` (a dataset) shapes the events' shoppers and items."""
    import socket
    import subprocess
    import sys

    from devstack.demo import wait_until_ready
    from devstack.produce import EventProducer
    from devstack.stack import LocalStack, StackError
    from inference.catalog import CatalogIndex
    from streamrec.kafka import ensure_topics

    s = _bench_settings(base, f"e2e-{tag}")

    def port() -> int:
        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            return sk.getsockname()[1]

    ensure_topics(s)
    procs: list[subprocess.Popen] = []
    webs: list[str] = []
    logs: list[Path] = []
    metrics_ports: list[int] = []
    reader = None
    try:
        # One consumer group: the workers share the events topic's partitions.
        for w in range(workers):
            ws = s.override(web_port=port(), metrics_port=port())
            env = {
                **os.environ,
                "STREAMREC_MODEL_DIR": str(model_dir),
                "STREAMREC_KAFKA_CONSUMER_GROUP": s.kafka.consumer_group,
                "STREAMREC_TOPICS_EVENTS": s.topics.events,
                "STREAMREC_TOPICS_RESULTS": s.topics.results,
                "STREAMREC_TOPICS_DEAD_LETTER": s.topics.dead_letter,
                "STREAMREC_TOPICS_ALERTS": s.topics.alerts,
                "STREAMREC_REDIS_PREFIX": s.redis.prefix,
                "STREAMREC_WEB_PORT": str(ws.web_port),
                "STREAMREC_METRICS_PORT": str(ws.metrics_port),
                "STREAMREC_STATE_DIR": str(log_dir / tag / f"worker-{w}"),
                "STREAMREC_LOG_LEVEL": "WARNING",
                "STREAMREC_STREAM_LAG_INTERVAL_S": str(LAG_POLL_S),  # the drain wait reads the lag gauge
            }
            log = log_dir / f"worker-{tag}-{w}.log"
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "streamrec.cli", "worker", "--encoder", encoder],
                    env=env,
                    stdout=open(log, "wb"),
                    stderr=subprocess.STDOUT,
                )
            )
            webs.append(f"http://127.0.0.1:{ws.web_port}")
            metrics_ports.append(ws.metrics_port)
        for proc, web, log in zip(procs, webs, logs, strict=True):
            wait_until_ready(proc, web, log)
        _wait_assigned(webs, s.topics.partitions)
        items = CatalogIndex.load(model_dir / "catalog").ids
        load = shaped_workload(shop, items, bursts)
        reader = _ResultsReader(s)
        # the floor's producer settings (the worker's own linger), so that ours/floor compares like with like
        same_as_floor: dict[str, Any] = {"linger.ms": s.kafka.linger_ms}
        producer = EventProducer(s, **same_as_floor)
        rng = np.random.default_rng(7)
        sent: dict[str, float] = {}
        levels = []
        # The local stack's broker and Redis share the cores with the worker: their CPU is reported too.
        try:
            stack = LocalStack(s).pids()
        except StackError:  # Kafka and Redis are not the local stack's: only the worker is measured
            stack = {}
        pids = [p.pid for p in procs]
        warmup: dict[str, Any] | None = None
        if warmup_s > 0:  # not measured: the broker's JIT and the worker reach their steady state
            rate = min(WARMUP_RATE, max(rates))
            lv = _e2e_level(producer, reader, rate, warmup_s, load, rng, sent, metrics_ports, "wu")
            warmup = {k: lv.get(k) for k in ("rate_events_per_s", "events", "p50_ms", "p99_ms", "drain_s")}
            click.echo(f"[{tag}] warm-up {rate:.0f} events/s for {warmup_s:.0f} s (not measured): {warmup}")
        for rate in rates:
            cpu0, t0 = _cpu_of(pids), time.monotonic()
            side0, bench0 = {k: _cpu_seconds(pid)[0] for k, pid in stack.items()}, time.process_time()
            lv = _e2e_level(producer, reader, rate, seconds, load, rng, sent, metrics_ports)
            cpu1, dt = _cpu_of(pids), time.monotonic() - t0
            # cores used: the workers' event loop processes and their scoring processes; the broker
            # and Redis of the local stack; this process (load generator and results reader)
            lv["cpu_cores"] = {
                "worker": round((cpu1[0] - cpu0[0]) / dt, 2),
                "scoring_process": round((cpu1[1] - cpu0[1]) / dt, 2),
                **{k: round((_cpu_seconds(pid)[0] - side0[k]) / dt, 2) for k, pid in stack.items()},
                "bench_client": round((time.process_time() - bench0) / dt, 2),
            }
            stages = lv.get("stages", {})
            click.echo(
                f"[{tag}] {rate:>6.0f} events/s: p50 {lv.get('p50_ms')} ms, p99 {lv.get('p99_ms')} ms, "
                f"{lv['results_per_s']} results/s, drain {lv['drain_s']} s, cores {lv['cpu_cores']}"
            )
            for st, v in stages.items():
                click.echo(
                    f"      {st:<16} mean {v['mean_ms']:>8} ms  p50 {v['p50_ms']:>8}  p99 {v['p99_ms']:>8}"
                )
            if not lv["results"]:  # a broken push path: stop here and say where to look
                raise click.ClickException(_no_results(rate, logs))
            lv.update(_rss_of(pids))
            lv["batches_per_worker"] = _batches(webs)  # since start: how the group split the load
            levels.append(lv)
        result: dict[str, Any] = {"items": len(items), "workers": workers, "workload": load.describe()}
        result["levels"] = levels
        if warmup is not None:
            result["warmup"] = warmup
        if overload_s > 0:  # 3x the highest sustained rate: memory bounded, lag drains, pushes coalesce
            sustained = [lv["rate_events_per_s"] for lv in levels if lv.get("sustained")] or [rates[0]]
            rate = 3 * max(sustained)
            lv = _e2e_level(producer, reader, rate, overload_s, load, rng, sent, metrics_ports)
            lv.update(_rss_of(pids), worker_alive=all(p.poll() is None for p in procs))
            lv["results_per_event"] = round(lv["results"] / max(lv["events"], 1), 3)
            click.echo(f"[{tag}] overload {rate:.0f} events/s for {overload_s:.0f} s: {lv}")
            result["overload"] = lv
        return result
    finally:
        if reader is not None:
            reader.close()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        _delete_topics(s)
        _clear_redis(s.redis.client(), s.redis.prefix)


def _cpu_of(pids: Sequence[int]) -> tuple[float, float]:
    """:func:`_cpu_seconds` added over several workers."""
    both = [_cpu_seconds(pid) for pid in pids]
    return sum(b[0] for b in both), sum(b[1] for b in both)


def _rss_of(pids: Sequence[int]) -> dict[str, float]:
    """:func:`_rss_mb` added over several workers (the peak is the sum of each one's peak)."""
    out: dict[str, float] = {}
    for pid in pids:
        for k, v in _rss_mb(pid).items():
            out[k] = round(out.get(k, 0.0) + v, 1)
    return out


def _batches(webs: Sequence[str]) -> list[int]:
    """Each worker's count of event batches processed so far (its ``/readyz``); -1 if it does not answer."""
    from devstack.demo import _get

    out = []
    for web in webs:
        _, body = _get(f"{web}/readyz")
        out.append(int(orjson.loads(body).get("batches", -1)) if body else -1)
    return out


def _wait_assigned(webs: Sequence[str], partitions: int, timeout: float = 120.0) -> None:
    """Wait until the workers' group has settled: every partition of the events topic is owned by
    exactly one of them, each owns some (while there are enough partitions) and none is
    rebalancing. A worker is ready before its first assignment, and a second worker joining moves
    partitions away from the first one a heartbeat later: a load level started then would
    measure the rebalance."""
    from devstack.demo import _get

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        owned: list[list[int]] = []
        for web in webs:
            status, body = _get(f"{web}/readyz")
            if status != 200:
                break
            owned.append(orjson.loads(body)["assigned_partitions"])
        else:
            each = all(owned) or len(webs) > partitions
            if each and sorted(p for o in owned for p in o) == list(range(partitions)):
                return
        time.sleep(0.5)
    raise click.ClickException(
        f"the {len(webs)} workers did not share the {partitions} partitions within {timeout:.0f} s"
    )


def _no_results(rate: float, logs: Sequence[Path], lines: int = 12) -> str:
    """The error of a level whose events gave no pushed list: the workers' logs and their last lines."""
    parts = [
        f"no recommendation list reached the results topic at {rate:.0f} events/s: the push path is "
        "broken (the workers' last log lines follow; whole logs at the paths given)"
    ]
    for log in logs:
        try:
            tail = log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            tail = ["(log not readable)"]
        parts.append(f"--- {log}")
        parts.extend(tail or ["(empty)"])
    return "\n".join(parts)


def _plot_e2e(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for tag, w in result["catalogs"].items():
        lv = [x for x in w["levels"] if "p50_ms" in x]
        rates = [x["rate_events_per_s"] for x in lv]
        for q, style in (("p50_ms", "-o"), ("p99_ms", "--s")):
            ax.plot(rates, [x[q] for x in lv], style, label=f"{tag} {q[:3]}")
    ax.set_xlabel("load (events/s)")
    ax.set_ylabel("event → result latency (ms)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title("streamrec end to end: event in Kafka → recommendation at a results consumer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@click.command()
@click.option("--quick", is_flag=True, help="One low load level for a few seconds (CI smoke run).")
@click.option(
    "--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the JSON here."
)
@click.option(
    "--model-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Model folder for the Online Retail catalog (default: the settings' model dir, else the "
    "pretrained encoder exported into <state_dir>/model-pretrained).",
)
@click.option(
    "--synthetic-items", type=int, default=100_000, show_default=True, help="0: no synthetic catalog."
)
@click.option(
    "--rates", default=None, help="Comma-separated load levels (events/s); default 100,1000,5000,10000."
)
@click.option(
    "--overload-s", type=float, default=60.0, show_default=True, help="Overload run length; 0: none."
)
@click.option(
    "--warmup-s",
    type=click.FloatRange(0, 600),
    default=None,
    help=f"Seconds of unmeasured load (5,000 events/s at most, other shoppers) before the Online Retail "
    f"catalog's levels, so that they see a warm broker and worker [default: {WARMUP_S:.0f}; --quick: 0].",
)
@click.option(
    "--dataset",
    default="online-retail",
    show_default=True,
    help="Dataset (name or generic folder) whose shopper activity and item popularity shape the events.",
)
@click.option(
    "--bursts/--no-bursts",
    default=False,
    show_default=True,
    help="Shoppers send bursts of events sized like the dataset's orders (most of a burst coalesces "
    "into one push); default: a clickstream, each event drawn on its own (about one push per event).",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Worker processes in one consumer group (at most the events topic's partitions get work).",
)
def e2e(
    quick: bool,
    output: Path | None,
    model_dir: Path | None,
    synthetic_items: int,
    rates: str | None,
    overload_s: float,
    warmup_s: float | None,
    workers: int,
    dataset: str,
    bursts: bool,
) -> None:
    """Event → result latency (p50/p95/p99) and results/s at several loads, two catalogs."""
    import tempfile

    from evaluation.replay import ensure_pretrained
    from streamrec.datasets import load_dataset

    s = get_settings()
    levels = tuple(float(r) for r in rates.split(",")) if rates else ((50,) if quick else E2E_RATES)
    seconds = 4.0 if quick else E2E_SECONDS
    warmup_s = (0.0 if quick else WARMUP_S) if warmup_s is None else warmup_s
    shop = load_dataset(dataset, s.data_dir)
    if model_dir is None:
        model_dir = s.resolved_model_dir
        if not (model_dir / "catalog").exists():
            model_dir = s.state_dir / "model-pretrained"
            if not (model_dir / "catalog").exists():
                retail = shop if shop.name == "online-retail" else load_dataset("online-retail", s.data_dir)
                ensure_pretrained(model_dir, retail, s)
    work = Path(tempfile.mkdtemp(prefix="streamrec-e2e-"))
    syn_dir = _synthetic_catalog_dir(work, 5_000 if quick else synthetic_items) if synthetic_items else None
    result: dict[str, Any] = {
        "bench": "e2e",
        "quick": quick,
        "seconds_per_level": seconds,
        "warmup_s": warmup_s,
        "coalesce_ms": s.scoring.coalesce_ms,
        "top_k": s.scoring.top_k,
        "stream_shaped_after": shop.name,
        "bursts": bursts,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "gpu": _gpu_name()},
        "catalogs": {},
    }
    result["workers"] = workers

    def catalog(tag: str, folder: Path, **kw: Any) -> dict[str, Any]:
        return _run_e2e_catalog(
            s, tag, folder, levels, seconds, work, "none", shop, bursts, workers=workers, **kw
        )

    oload = 0.0 if quick else overload_s
    result["catalogs"]["online_retail"] = catalog(
        "online_retail", model_dir, overload_s=oload, warmup_s=warmup_s
    )
    if syn_dir is not None:
        # not warmed: the broker is warm from the first catalog, and on the earlier zipf stream
        # 150,000 warm-up events grew this catalog's co-visitation far beyond its levels' start
        result["catalogs"]["synthetic"] = catalog("synthetic", syn_dir)
        ann = _ann_recall(syn_dir, s)
        result["catalogs"]["synthetic"]["ann"] = ann
        result["catalogs"]["synthetic"]["ann_recall_at_20"] = ann.get("recall_at_20")
    bs = _bench_settings(s, "floor")
    result["kafka_floor"] = [_kafka_floor(bs, r, min(seconds, 5.0)) for r in levels]
    _delete_topics(bs)
    for w in result["catalogs"].values():
        for lv, fl in zip(w["levels"], result["kafka_floor"], strict=True):
            if "p99_ms" in lv and fl.get("p99_ms"):
                lv["ratio_p50_vs_floor"] = round(lv["p50_ms"] / max(fl["p50_ms"], 1e-3), 2)
                lv["ratio_p99_vs_floor"] = round(lv["p99_ms"] / max(fl["p99_ms"], 1e-3), 2)
        sustained = [lv["rate_events_per_s"] for lv in w["levels"] if lv.get("sustained")]
        w["saturation_events_per_s_at_least"] = max(sustained) if sustained else 0
    plot = output.with_suffix(".png") if output else work / "e2e.png"
    plot.parent.mkdir(parents=True, exist_ok=True)  # before the plot: a new --output folder
    _plot_e2e(result, plot)
    result["plot"] = str(plot)
    text = json.dumps(result, indent=2)
    if output:
        output.write_text(text)
    click.echo(text)


def _ann_recall(model_dir: Path, settings: Settings, n: int = 200, k: int = 20) -> dict[str, Any]:
    """How the worker's catalog ranks, loaded as the worker loads it: "ivf" or "exact", the IVF
    index's lists and probes, and its recall@k against the exact product on queries it was not
    calibrated on (other seed): catalog items with a little noise, and means of 2-5 random items."""
    from inference.catalog import CatalogIndex
    from inference.catalog import _unit_rows as unit_rows

    cat = CatalogIndex.load(
        model_dir / "catalog",
        ann_threshold=settings.scoring.ann_threshold,
        ann_recall_target=settings.scoring.ann_recall_target,
    )
    out: dict[str, Any] = {"index": "ivf" if cat.uses_ann else "exact", "items": len(cat.ids)}
    if not cat.uses_ann:
        return out
    cat.prepare()  # built as the scoring process builds it, so its calibration can be reported
    rng = np.random.default_rng(1)
    rows = rng.choice(len(cat.ids), n, replace=False)
    near = cat.matrix[rows] + 0.05 * rng.normal(size=(n, cat.dim)).astype(np.float32)
    picks = rng.integers(0, len(cat.ids), (n, 5))
    use = (np.arange(5)[None, :] < (2 + np.arange(n) % 4)[:, None]).astype(np.float32)
    mixed = (cat.matrix[picks] * use[..., None]).sum(1)
    out.update(cat.ann_calibration or {})
    out["recall_at_20_near_items"] = round(float(cat.ann_recall(unit_rows(near), k=k)), 4)
    out["recall_at_20_item_mixtures"] = round(float(cat.ann_recall(unit_rows(mixed), k=k)), 4)
    out["recall_at_20"] = min(out["recall_at_20_near_items"], out["recall_at_20_item_mixtures"])
    return out


def _gpu_name() -> str | None:
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None
