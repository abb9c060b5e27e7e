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
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np

from streamrec.settings import Settings, get_settings

BENCH_DIM = 384


class ArrayItems:
    """ItemVectors over seeded random unit vectors for a list of item ids."""

    def __init__(self, ids: Sequence[str], dim: int = BENCH_DIM, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        m = rng.standard_normal((len(ids), dim), dtype=np.float32)
        self.matrix = m / np.linalg.norm(m, axis=1, keepdims=True)
        self.ids = list(ids)
        self._pos = {x: k for k, x in enumerate(self.ids)}
        self.dim = dim
        self.model_version = f"bench-random-{dim}"

    def lookup(self, item_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        idx = np.fromiter((self._pos.get(i, -1) for i in item_ids), np.int64, len(item_ids))
        found = idx >= 0
        out = np.zeros((len(item_ids), self.dim), np.float32)
        out[found] = self.matrix[idx[found]]
        return out, found


class _NullDeadLetters:
    async def send(self, letters) -> None:  # the bench streams contain no malformed records
        if letters:
            raise RuntimeError(f"{len(letters)} unexpected dead letters in the bench stream")


def synthetic_retail(ds, n: int, seed: int = 0) -> list[bytes]:
    """``n`` purchase events shaped like Online Retail: its user activity, item popularity,
    invoice sizes (bursts of lines at one time) and event rate, with fresh ids."""
    from streamrec.events import Event, EventType, encode

    rng = np.random.default_rng(seed)
    inter = ds.interactions
    users, ucount = np.unique(inter["user_id"].to_numpy(), return_counts=True)
    items, icount = np.unique(inter["item_id"].to_numpy(), return_counts=True)
    inv = inter.groupby(["user_id", "ts"]).size().to_numpy()
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
                ev = Event(event_id=uuid.uuid4().hex, type=EventType.PURCHASE, user_id=str(u), ts=t,
                           session_id=f"{u}-{t // 3_600_000}", item_id=str(item), price=2.5,
                           quantity=int(qty[pos + j]), category=cat.get(item) or None)  # fmt: skip
                out.append(encode(ev))
            pos += int(s)
            if len(out) >= n:
                break
    return out[:n]


def _bench_settings(base: Settings, tag: str) -> Settings:
    s = base.model_copy(deep=True)
    run = uuid.uuid4().hex[:8]
    s.topics.events = f"bench-{run}-{tag}.events"
    s.topics.dead_letter = f"bench-{run}-{tag}.dlq"
    s.topics.results = f"bench-{run}-{tag}.results"
    s.topics.alerts = f"bench-{run}-{tag}.alerts"
    s.redis.prefix = f"bench{run}"
    return s


def _produce(s: Settings, values: Sequence[bytes]) -> None:
    from streams.producer import EventProducer

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


def _pipeline(s: Settings, items: ArrayItems, redis):
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


async def _run_workload(base: Settings, tag: str, values: list[bytes], items: ArrayItems, reps: int) -> dict:
    from streamrec.stack import ensure_topics
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
            click.echo(f"[{tag}] ingest {r + 1}/{reps}: {ing[-1]['per_s']:,.0f} events/s, "
                       f"batch p50 {ing[-1]['batch_p50_ms']} ms p99 {ing[-1]['batch_p99_ms']} ms")  # fmt: skip
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
        for r in recs:
            await pipe.process([r])
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

    from streamrec.datasets import load_dataset
    from streamrec.events import encode
    from streams.producer import dataset_events

    s = get_settings()
    reps = 1 if quick else 3
    n_syn = synthetic_events or (20_000 if quick else 1_000_000)
    n_ret = retail_events or (20_000 if quick else None)
    ds = load_dataset("online-retail", s.data_dir)
    items = ArrayItems(ds.item_ids)
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
# e2e: end-to-end latency benchmark (event → recommendation on the results topic). Written by
# the lead; registered in streamrec/cli.py BENCH_COMMANDS as "streams.bench:e2e".
# ---------------------------------------------------------------------------------------------
