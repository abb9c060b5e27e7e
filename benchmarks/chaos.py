"""``streamrec bench chaos``: the long fault drill, on private servers, against a clean reference.

A real replay (Online Retail, 100,000 events by default) with malformed records mixed in (2 %)
flows into a 12-partition topic while three ``streamrec worker`` processes in one group are
killed with SIGKILL and restarted, one leaves gracefully and comes back, the Kafka broker is
killed with SIGKILL and restarted, and Redis (AOF, fsync always) is killed and restarted from
its AOF. The servers are private (``devstack.private``): the user's stack is not touched. A
worker that stops by itself (one started while the broker or Redis is down stops at its
preflight check) is restarted, as its pod would be, and listed in ``worker_exits``.

Afterwards it compares with a clean single-process run of the same valid events through the
profile store (profiles are a function of the events whatever the batching) and reports:
profiles that differ (vectors beyond 1e-5, any count or list), events applied twice or lost,
dead letters lost or written twice, users whose newest pushed list predates their newest event
or who are still owed a push, the longest time from a fault to resumed processing, and bytes
per profile (``MEMORY USAGE``). Item vectors are seeded random unit vectors: the drill needs
no trained model. Output: JSON.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import click
import numpy as np
import orjson

from streamrec.settings import Settings, get_settings

PARTITIONS = 12
DATASET_ENV = "STREAMREC_CHAOS_DATASET"


def chaos_items(settings: Settings):
    """Worker plug-in: random unit vectors for the drill's dataset (``STREAMREC_CHAOS_DATASET``)."""
    from benchmarks.stream import random_items
    from streamrec.datasets import load_dataset

    return random_items(
        load_dataset(os.environ.get(DATASET_ENV, "online-retail"), settings.data_dir).item_ids
    )


def fuzz_records(n: int, seed: int = 0) -> list[bytes]:
    """``n`` distinct malformed records of the kinds producers send (each dead-lettered once)."""
    rng = random.Random(seed)
    ok = {"v": 1, "type": "view", "user_id": "fz", "ts": 1_291_000_000_000, "item_id": "85123A"}
    out = []
    for k in range(n):
        kind = k % 6
        if kind == 0:
            out.append(b"not json %d" % k)
        elif kind == 1:
            out.append(orjson.dumps({**ok, "event_id": f"fz{k}", "type": "teleport"}))
        elif kind == 2:
            out.append(orjson.dumps({**ok, "event_id": f"fz{k}", "item_id": f"no-such-item-{k}"}))
        elif kind == 3:  # stray non-UTF-8 bytes inside a key the schema does not know
            out.append(
                b'{"v":1,"type":"view","user_id":"fz","ts":1,"item_id":"85123A","sess\xb1on_%d":1}' % k
            )
        elif kind == 4:
            out.append(
                orjson.dumps({k2: v for k2, v in ok.items() if k2 != "user_id"} | {"event_id": f"fz{k}"})
            )
        else:
            out.append(orjson.dumps({**ok, "event_id": f"fz{k}", "ts": -rng.randint(1, 10**6)}))
    return out


class _Worker:
    def __init__(self, s: Settings, n: int, root: Path) -> None:
        from devstack.private import free_port

        self.s, self.n = s, n
        self.web, self.metrics_port = free_port(), free_port()
        self.state = root / f"w{n}"
        self.state.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def env(self) -> dict[str, str]:
        from devstack.private import worker_env

        s = self.s.override(web_port=self.web, metrics_port=self.metrics_port, state_dir=self.state)
        return worker_env(s, STREAMREC_STREAM_CONSUMER_SESSION_TIMEOUT_S="8", STREAMREC_STREAM_COMMIT_INTERVAL_S="1.0",
                          STREAMREC_LOG_LEVEL="WARNING")  # fmt: skip

    def start(self) -> None:
        self.starts += 1
        log = open(self.state / f"worker-{self.starts}.log", "wb")
        cmd = [sys.executable, "-m", "streamrec.cli", "worker", "--items", "benchmarks.chaos:chaos_items",
               "--encoder", "none"]  # fmt: skip
        self.proc = subprocess.Popen(cmd, env=self.env(), stdout=log, stderr=subprocess.STDOUT)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.web}/readyz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> int:
        if not self.alive():
            return 0
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


def _wait(pred, timeout: float, what: str, interval: float = 0.25) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(interval)
    raise click.ClickException(f"timed out after {timeout:.0f}s waiting for {what}")


def _read_all(s: Settings, topic: str, idle_s: float = 3.0) -> list:
    import uuid

    from confluent_kafka import Consumer

    from streamrec.kafka import consumer_config

    c = Consumer(consumer_config(s, f"chaos-read-{uuid.uuid4().hex[:8]}"))
    c.subscribe([topic])
    out, last = [], time.monotonic()
    try:
        while time.monotonic() - last < idle_s:
            msgs = c.consume(2000, timeout=0.5)
            for m in msgs:
                if m.error() is None:
                    out.append(m)
            if msgs:
                last = time.monotonic()
    finally:
        c.close()
    return out


def _same(a: Any, b: Any) -> list[str]:
    """Fields where two profiles of one user differ (vectors beyond 1e-5, anything else at all)."""
    diff = []
    for f in ("long_term", "session", "query"):
        x, y = getattr(a, f), getattr(b, f)
        if (x is None) != (y is None) or (x is not None and not np.allclose(x, y, atol=1e-5, rtol=0)):
            diff.append(f)
    for f in ("n_events", "recent_items", "recent_events", "purchased_items", "purchase_counts", "last_event_id",
              "last_ts", "session_id", "query_text", "query_ts"):  # fmt: skip
        if getattr(a, f) != getattr(b, f):
            diff.append(f)
    return diff


def _behind(events: list[str], event_id: str | None) -> int | None:
    """How many of the user's events came after ``event_id`` (0 = it is their newest)."""
    if event_id not in events:
        return None
    return len(events) - 1 - max(i for i, e in enumerate(events) if e == event_id)


@click.command()
@click.option("--dataset", default="online-retail", show_default=True, help="Dataset name or folder.")
@click.option(
    "--events", "n_events", type=int, default=100_000, show_default=True, help="Real events replayed."
)
@click.option("--rate", type=float, default=2000.0, show_default=True, help="Events/s produced.")
@click.option("--faults", type=int, default=10, show_default=True, help="Faults injected while events flow.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the JSON here."
)
def chaos(dataset: str, n_events: int, rate: float, faults: int, seed: int, output: Path | None) -> None:
    """Kill workers, the broker and Redis while a real replay flows; compare with a clean run."""
    from devstack.private import PrivateStack
    from devstack.produce import EventProducer, dataset_events
    from profiles.store import ProfileStore
    from streamrec.datasets import load_dataset
    from streamrec.events import encode
    from streamrec.kafka import ensure_topics
    from streams.validation import RawRecord, Validator, parse_dead_letter_headers

    base = get_settings()
    os.environ[DATASET_ENV] = dataset
    ds = load_dataset(dataset, base.data_dir)
    items = chaos_items(base)
    real = [encode(e) for e in dataset_events(ds, "all", settings=base, limit=n_events)]
    bad = fuzz_records(max(1, len(real) // 50), seed)
    rng = random.Random(seed)
    stream = real + bad
    order = sorted(range(len(stream)), key=lambda i: i if i < len(real) else rng.randrange(len(real)))
    records = [stream[i] for i in order]

    def key_of(v: bytes) -> bytes:
        try:
            return str(orjson.loads(v).get("user_id", "fz")).encode()
        except Exception:
            return b"fz"

    root = Path(tempfile.mkdtemp(prefix="streamrec-chaos-"))
    click.echo(f"private Kafka + Redis (AOF, fsync always) in {root}")
    stack = PrivateStack(base, root / "servers").up()
    run = f"chaos{seed}x{int(time.time()) % 100000}"
    s = stack.on_these(base).override(
        topics={"events": f"{run}.events", "results": f"{run}.results", "dead_letter": f"{run}.dlq",
                "alerts": f"{run}.alerts", "partitions": PARTITIONS},
        redis={"prefix": run}, kafka={"consumer_group": f"{run}-g"},
    )  # fmt: skip
    ensure_topics(s)
    redis = s.redis.client()
    store = ProfileStore(redis, s)
    # The clean reference: the same valid events, in order, through the profile store, one process.
    valid = Validator(items).validate([RawRecord(v, key_of(v), "ref", 0, i) for i, v in enumerate(records)])
    ref_store = ProfileStore(redis, s.override(redis={"prefix": run + "ref"}), items=items)
    for k in range(0, len(valid.events), 1000):
        ref_store.apply_batch(valid.events[k : k + 1000])
    ref_users = sorted({e.user_id for e in valid.events})
    ref = ref_store.get_profiles(ref_users)
    expected = sum(p.total_events for p in ref.values())
    click.echo(
        f"{len(real):,} real events + {len(bad):,} malformed; reference: {len(ref):,} users, {expected:,} applied"
    )

    def applied() -> int:
        """Events applied so far over every user: the profiles' counters (one pipeline)."""
        try:
            return sum(sum(p.n_events.values()) for p in store.get_profiles(ref_users).values())
        except Exception:  # Redis is down right now: nothing new seen
            return -1

    workers = [_Worker(s, n, root) for n in (1, 2, 3)]
    faults_done: list[dict[str, Any]] = []
    exits: list[dict[str, Any]] = []  # workers that stopped by themselves (restarted, as a pod would be)
    lock = threading.Lock()  # the supervisor and the fault injector never touch a worker at once
    stopping = threading.Event()
    t_start = time.monotonic()

    def supervise() -> None:
        while not stopping.wait(0.5):
            with lock:
                if stopping.is_set():
                    return
                for w in workers:
                    if w.proc is not None and not w.alive():
                        code = w.proc.returncode
                        exits.append(
                            {"at_s": round(time.monotonic() - t_start, 1), "worker": w.n, "exit_code": code}
                        )
                        click.echo(f"  worker {w.n} exited by itself (code {code}): restarted")
                        w.start()

    try:
        for w in workers:
            w.start()
        threading.Thread(target=supervise, daemon=True).start()
        _wait(lambda: all(w.ready() for w in workers), 120, "three workers ready")

        def feed() -> None:
            prod = EventProducer(s)
            t0 = time.monotonic()
            for i, v in enumerate(records):
                prod.send_raw(v, key_of(v))
                ahead = i / rate - (time.monotonic() - t0)
                if ahead > 0.005:
                    time.sleep(ahead)
            prod.flush(300)

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        plan = ["kill", "leave", "kill", "broker", "kill", "redis", "kill", "kill", "leave", "kill"]
        gap = len(records) / rate / (faults + 1)
        for f in range(faults):
            time.sleep(gap)
            kind = plan[f % len(plan)]
            before = applied()
            t0 = time.monotonic()
            if kind in ("kill", "leave"):
                w = rng.choice(workers)
                with lock:
                    if kind == "kill":
                        w.kill()
                    else:
                        w.stop()
                    w.start()
                what = f"worker {w.n}"
            else:
                stack.kill("kafka" if kind == "broker" else "redis")
                time.sleep(5)
                stack.start("kafka" if kind == "broker" else "redis")
                what = kind
            try:
                resumed = _wait(
                    lambda b=before: (n := applied()) > b or n >= expected, 180, f"processing after {kind}"
                )
            except click.ClickException:
                resumed = float("nan")
            faults_done.append({"at_s": round(t0 - t_start, 1), "fault": kind, "target": what,
                                "resumed_after_s": round(time.monotonic() - t0, 2) if resumed == resumed else None})  # fmt: skip
            click.echo(
                f"  fault {f + 1}/{faults}: {kind:<6} {what:<9} resumed after {faults_done[-1]['resumed_after_s']}s"
            )
        feeder.join()
        _wait(lambda: applied() >= expected, 600, "every valid event applied")
        time.sleep(5)  # the last pushes and commits
        _wait(lambda: not store.pending_pushes(), 120, "no push owed")
        got = store.get_profiles(ref_users)
        mismatched = {u: d for u in ref_users if (d := _same(got[u], ref[u]) if u in got else ["missing"])}
        twice = sum(max(0, got[u].total_events - ref[u].total_events) for u in ref_users if u in got)
        lost = sum(
            max(0, ref[u].total_events - got[u].total_events) if u in got else ref[u].total_events
            for u in ref_users
        )
        letters = _read_all(s, s.topics.dead_letter)
        sources = {
            (h["partition"], h["offset"]) for h in (parse_dead_letter_headers(m.headers()) for m in letters)
        }
        pushes = _read_all(s, s.topics.results)
        newest: dict[str, str] = {}
        history: dict[str, list[tuple[int, int, str | None, int]]] = {}
        for m in pushes:
            body = orjson.loads(m.value())
            newest[body["user_id"]] = body.get("source_event_id")
            history.setdefault(body["user_id"], []).append(
                (m.partition(), m.offset(), body.get("source_event_id"), body.get("generated_at", 0))
            )
        stale = [u for u in ref_users if newest.get(u) != ref[u].last_event_id]
        # What a stale user was sent, oldest first: which of their events each list followed
        # (1 = the newest), when it was generated (s after the drill began) and where it landed.
        by_user: dict[str, list[str]] = {}
        for e in valid.events:
            by_user.setdefault(e.user_id, []).append(e.event_id)
        wall0 = time.time() - (time.monotonic() - t_start)
        stale_detail = {
            u: [{"partition": p, "offset": o, "events_behind": _behind(by_user.get(u, []), eid),
                 "generated_at_s": round(g / 1000 - wall0, 2)} for p, o, eid, g in history.get(u, [])[-4:]]
            for u in stale[:5]
        }  # fmt: skip
        from benchmarks.sizing import _measure

        counts = {u: ref[u].total_events for u in ref_users}
        size = _measure(redis, store, ref_users, counts)
        resumes = [f["resumed_after_s"] for f in faults_done if f["resumed_after_s"] is not None]
        result = {
            "bench": "chaos",
            "dataset": ds.name,
            "workers": 3,
            "partitions": PARTITIONS,
            "events": len(real),
            "malformed": len(bad),
            "rate": rate,
            "faults": faults_done,
            "worker_kills": sum(f["fault"] == "kill" for f in faults_done),
            "graceful_leaves": sum(f["fault"] == "leave" for f in faults_done),
            "broker_restarts": sum(f["fault"] == "broker" for f in faults_done),
            "redis_restarts": sum(f["fault"] == "redis" for f in faults_done),
            "membership_changes": 3
            + 2 * sum(f["fault"] in ("kill", "leave") for f in faults_done)
            + 2 * len(exits),
            "worker_exits": exits,
            "users": len(ref_users),
            "mismatching_profiles": len(mismatched),
            "mismatch_fields": dict(list(mismatched.items())[:10]),
            "events_applied_twice": twice,
            "events_lost": lost,
            "dead_letters": len(letters),
            "dead_letters_unique": len(sources),
            "dead_letters_expected": len(bad),
            "users_without_fresh_push": len(stale),
            "users_still_owed": len(store.pending_pushes()),
            "stale_pushes": stale_detail,
            "longest_resume_s": max(resumes) if resumes else None,
            "median_resume_s": float(np.median(resumes)) if resumes else None,
            "bytes_per_profile": size["user_bytes"],
            "seconds": round(time.monotonic() - t_start, 1),
        }
    finally:
        stopping.set()
        with lock:
            for w in workers:
                w.kill()
        try:
            for pattern in (f"*{run}*",):
                keys = list(redis.scan_iter(match=pattern, count=5000))
                for k in range(0, len(keys), 5000):
                    redis.delete(*keys[k : k + 5000])
        except Exception:
            pass
        stack.down()
    text = json.dumps(result, indent=2)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
    click.echo(text)
    ok = (result["mismatching_profiles"] == 0 and result["events_applied_twice"] == 0 and result["events_lost"] == 0
          and result["dead_letters"] == result["dead_letters_unique"] == len(bad)
          and result["users_without_fresh_push"] == 0)  # fmt: skip
    if not ok:
        raise click.ClickException("the drill found lost, repeated or stale state; see the JSON above")
