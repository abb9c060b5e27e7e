"""``streamrec demo``: the live pipeline on the local real stack, fed with real data.

Steps (each reused when already done, so a second run starts in seconds):

1. a model of the kind ``streamrec eval replay`` reports as ``streamrec``: the base encoder
   exported to ONNX, the catalog embedded with it and the user model trained over those vectors
   (``streamrec train-user``: epoch chosen on October 2011, refit on everything before the test
   period; a CPU budget, see ``_train_user``), all in ``<state_dir>/model``; ``--fine-tune``
   fine-tunes the item encoder on Online Retail first (a small CPU run);
2. ``streamrec worker`` as a subprocess, waiting for ``/readyz``;
3. the Online Retail test stream replayed into the events topic, re-timed to now, at
   ``--rate`` events/s (plus a few malformed records, which land in the dead-letter topic);
4. a live view every few seconds: events/s, consumer lag, results/s and event→result
   latency, a few users' fresh recommendations with reasons, demand alerts, the metrics URL;
5. a summary. The worker stops; Kafka and Redis stay up until ``streamrec down``
   (``--stop`` brings them down too).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter, deque
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import orjson

from streamrec.kafka import arrived, timing_consumer_config
from streamrec.settings import Settings, get_settings, reorder_shop_env


def _run(cmd: list[str], what: str) -> None:
    click.secho(f"==> {what}: {' '.join(cmd)}", fg="cyan")
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise click.ClickException(f"{what} failed (exit {proc.returncode}); see the output above")


def ensure_model(s: Settings, fine_tune: bool, quick: bool) -> Path:
    """A verified model folder with a catalog and a user model; what is missing is built."""
    from inference.user_model import load_user_model

    model = s.resolved_model_dir
    exe = [sys.executable, "-m", "streamrec.cli"]
    catalog = _loaded(lambda: _catalog(s, model))
    if catalog is None:
        _build_catalog(s, exe, model, fine_tune, quick)
    elif _loaded(lambda: load_user_model(model, catalog)) is not None:
        click.secho(f"==> reusing the model in {model}", fg="cyan")
        return model
    _train_user(exe, model, quick)
    return model


def _loaded(load: Callable[[], Any]) -> Any:
    """What ``load()`` returns, or None when it fails (missing or stale files are rebuilt)."""
    try:
        return load()
    except Exception:
        return None


def _catalog(s: Settings, model: Path) -> Any:
    from inference.catalog import CatalogIndex
    from inference.encoder import load_encoder

    load_encoder(s)
    return CatalogIndex.load(model / "catalog")


def _build_catalog(s: Settings, exe: list[str], model: Path, fine_tune: bool, quick: bool) -> None:
    """Export the encoder (fine-tuned first with ``fine_tune``) and embed the catalog with it."""
    if not fine_tune:
        from inference.training.export import export_pretrained

        click.secho("==> exporting the pretrained encoder (no fine-tuning)", fg="cyan")
        export_pretrained(model, max_len=s.encoder.max_len)
    else:
        ckpt = s.state_dir / "train" / "demo"
        if quick:  # a smoke run of the real training loop, not a useful model
            args = ["--max-steps", "8", "--batch-size", "16", "--max-users", "200", "--eval-users", "100"]
            args.append("--no-test-eval")
        else:  # a few CPU minutes, early stopping on valid NDCG@10
            args = ["--max-steps", "150", "--batch-size", "64", "--eval-every", "75", "--eval-users", "300"]
        _run(
            [*exe, "train", "--dataset", "online-retail", "--out", str(ckpt), *args],
            "fine-tuning the encoder",
        )
        export_args = ["--checkpoint", str(ckpt / "best"), "--out", str(model), "--variants", "fp32,int8"]
        _run([*exe, "export", *export_args], "exporting to ONNX")
    _run([*exe, "index", "--dataset", "online-retail", "--model-dir", str(model)], "embedding the catalog")


def _train_user(exe: list[str], model: Path, quick: bool) -> None:
    """The user model over the catalog's vectors, trained as ``eval replay``'s model is (the best
    epoch on October 2011, then refit on train + valid) on a CPU budget: up to 3 epochs of 50,000
    cases each (a few minutes on 2 cores; the replay's model has 4 epochs of all 108,000);
    ``quick``: one epoch of 3,000 cases."""
    args = ["--epochs", "1", "--max-examples", "3000", "--eval-users", "100"] if quick else [
        "--epochs", "3", "--max-examples", "50000"]  # fmt: skip
    _run([*exe, "train-user", "--dataset", "online-retail", "--model-dir", str(model), *args],
         "training the user model")  # fmt: skip


class LiveView:
    """Reads the results and alerts topics in a thread and keeps the figures the view shows."""

    def __init__(self, s: Settings) -> None:
        from confluent_kafka import Consumer

        self.s = s
        self.consumer = Consumer(
            timing_consumer_config(s, f"demo-view-{os.getpid()}", **{"auto.offset.reset": "latest"})
        )
        self.consumer.subscribe([s.topics.results, s.topics.alerts])
        self.results = 0
        self.latencies: deque[float] = deque(maxlen=5000)
        self.recent: deque[dict] = deque(maxlen=50)
        self.reasons: dict[str, int] = {}  # reason kind (buy_again, similar_to, ...) -> list slots
        self.alerts: list[dict] = []
        self.alert_times: list[float] = []  # monotonic arrival time of each alert
        # the injected surge: pushed lists of real shoppers that hold the item, before / after its alert
        self.watch_item: str | None = None
        self.watch_category: set[str] = set()  # the items of its category
        self.synthetic_prefix = s.alerts.synthetic_user_prefix
        self.watch_alerted_at: float | None = None
        self.lists = {"before": 0, "after": 0}  # lists that show its category
        self.lists_with_item = {"before": 0, "after": 0}
        self.trending_with_item = 0
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stop_flag.is_set():
            for m in arrived(self.consumer, 0.5):  # timed at arrival: not held for a batch
                if m.error() is not None:
                    continue
                now = time.time() * 1000
                value = m.value()
                assert value is not None  # streamrec writes no tombstones to these topics
                try:
                    msg = orjson.loads(value)
                except orjson.JSONDecodeError:
                    continue
                if m.topic() == self.s.topics.alerts:
                    self.alerts.append(msg)
                    self.alert_times.append(time.monotonic())
                    if (
                        self.watch_alerted_at is None
                        and msg.get("synthetic")
                        and msg.get("kind") == "surge"
                        and msg.get("state") == "raised"
                    ):
                        self.watch_alerted_at = time.monotonic()
                    continue
                self.results += 1
                if self.watch_item is not None and not str(msg.get("user_id", "")).startswith(
                    self.synthetic_prefix
                ):
                    phase = "before" if self.watch_alerted_at is None else "after"
                    shown = {x.get("item_id") for x in msg.get("items", [])}
                    if shown & self.watch_category:
                        self.lists[phase] += 1
                    hit = [x for x in msg.get("items", []) if x.get("item_id") == self.watch_item]
                    self.lists_with_item[phase] += bool(hit)
                    self.trending_with_item += any(
                        str(x.get("reason", "")).startswith("trending") for x in hit
                    )
                self.recent.append(msg)
                for x in msg.get("items", []):
                    kind = str(x.get("reason", "")).split(":")[0]
                    self.reasons[kind] = self.reasons.get(kind, 0) + 1
                ev = msg.get("event_to_result_ms")
                if ev is not None:  # arrival at this consumer minus the event's time
                    self.latencies.append(now - (msg["generated_at"] - ev))

    def start(self) -> LiveView:
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop_flag.set()
        self.thread.join(5)
        self.consumer.close()


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            try:
                total += float(line.rsplit(" ", 1)[1])
            except ValueError:
                pass
    return total


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def wait_until_ready(worker: subprocess.Popen, web: str, log: Path, timeout: float = 240.0) -> None:
    """Wait for a worker subprocess's ``/readyz``; a clear error if it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while _get(f"{web}/readyz")[0] != 200:
        if worker.poll() is not None:
            raise click.ClickException(f"the worker exited ({worker.returncode}); see {log}")
        if time.monotonic() > deadline:
            raise click.ClickException(f"the worker was not ready within {timeout:.0f} s; see {log}")
        time.sleep(0.5)


@click.command()
@click.option("--rate", type=float, default=200.0, show_default=True, help="Events per second into Kafka.")
@click.option("--duration", type=float, default=90.0, show_default=True, help="Seconds of live replay.")
@click.option("--quick", is_flag=True, help="Short run with a tiny model training (CI smoke test).")
@click.option(
    "--fine-tune", is_flag=True, help="Fine-tune the item encoder on the shop's clicks before the user model."
)
@click.option(
    "--pretrained", is_flag=True, hidden=True, help="The default now (the base encoder's item vectors)."
)
@click.option("--stop", "stop_stack", is_flag=True, help="Bring Kafka and Redis down at the end.")
@click.option("--json-summary", type=click.Path(path_type=Path), default=None, help="Write the summary here.")
@click.option(
    "--surge/--no-surge",
    default=True,
    show_default=True,
    help="Inject one synthetic demand surge (flagged synthetic in its alert) to show detection and boosting.",
)
def demo(
    rate: float,
    duration: float,
    quick: bool,
    fine_tune: bool,
    pretrained: bool,
    stop_stack: bool,
    json_summary: Path | None,
    surge: bool,
) -> None:
    """Run the live pipeline on real data and show it working."""
    from devstack.backfill import backfill_demand
    from devstack.produce import EventProducer, dataset_events
    from devstack.stack import LocalStack
    from streamrec.datasets import load_dataset
    from streamrec.kafka import ensure_topics

    s = get_settings()
    if quick:
        duration = min(duration, 25.0)
    t_start = time.time()
    LocalStack(s, redis_profile="demo").up()
    ensure_topics(s)
    model = ensure_model(s, fine_tune and not pretrained, quick)
    ds = load_dataset("online-retail", s.data_dir)
    # The detector learns each product's share of demand from the stream: give it the shop's
    # recent order history first, or it would stay silent for its first trading weeks.
    weeks = 3.0 if quick else 8.0
    warm = backfill_demand(s, ds, weeks=weeks)
    if "skipped" in warm:
        click.secho(f"==> demand detector: {warm['skipped']} (reused)", fg="cyan")
    else:
        click.secho(
            f"==> demand detector warmed from {weeks:g} weeks of order history: {warm['events']:,} purchases, "
            f"{warm['eligible_keys']:,} items and categories with a baseline",
            fg="cyan",
        )
    if surge:  # a product (and category) not alerting already: a second run within the hour picks another
        from alerts.monitor import DemandMonitor

        busy = {key for key, _ in DemandMonitor(s, s.redis.client()).state().active_keys()}
        plan = surge_plan(ds, weeks, rate, duration, busy)
    else:
        plan = None

    log_path = s.state_dir / "demo-worker.log"
    s.state_dir.mkdir(parents=True, exist_ok=True)
    # Online Retail is a wholesale shop whose customers re-order: the worker runs with the
    # re-ordering shop's scoring (bought items come back as `buy_again`, recent demand as a
    # prior; what `eval replay` measures) unless the user chose otherwise.
    # Sequential looks at the open 5-minute slot every 2 s of event time (10 s by default), so the
    # injected surge is flagged within seconds of its evidence.
    env = {
        **reorder_shop_env(),
        "STREAMREC_ALERTS_PEEK_S": "2",
        **os.environ,
        "STREAMREC_MODEL_DIR": str(model),
    }
    click.secho(f"==> starting the worker (log {log_path})", fg="cyan")
    worker = subprocess.Popen(
        [sys.executable, "-m", "streamrec.cli", "worker"],
        env=env,
        stdout=open(log_path, "ab"),
        stderr=subprocess.STDOUT,
    )
    web = f"http://127.0.0.1:{s.web_port}"
    metrics_url = f"http://127.0.0.1:{s.metrics_port}/metrics"
    view = None
    summary: dict = {}
    try:
        wait_until_ready(worker, web, log_path)
        click.secho(f"==> worker ready: {web}/readyz, metrics at {metrics_url}", fg="green")
        click.secho(f"==> live explorer: {web}/explorer (API: {web}/openapi.json)", fg="green")
        view = LiveView(s)
        if plan is not None:
            view.watch_item = plan.item
            view.watch_category = plan.category_items
        view.start()

        n_events = int(rate * duration)
        events = list(dataset_events(ds, "test", settings=s, limit=n_events))
        producer = EventProducer(s)
        # A few malformed records: they go to the dead-letter topic, the worker goes on.
        for bad in (b"not json", b'{"event_id": "x", "type": "teleport", "user_id": "u", "ts": 1}'):
            producer.send_raw(bad, key=b"demo")
        sent = 0
        surge_sent = 0
        t0 = time.monotonic()
        next_view = t0 + 5
        last_consumed = 0.0
        last_t = t0
        click.secho(
            f"==> replaying {len(events):,} Online Retail test events at {rate:.0f}/s, re-timed to now",
            fg="cyan",
        )
        while sent < len(events):
            due = int((time.monotonic() - t0) * rate) + 1
            while sent < min(due, len(events)):
                ev = events[sent]
                producer.send(type(ev)(**{**_fields(ev), "ts": int(time.time() * 1000)}))
                sent += 1
            if plan is not None:
                surge_sent = plan.emit(producer, time.monotonic() - t0, surge_sent, s)
            producer.poll(0)
            now = time.monotonic()
            if now >= next_view:
                text = _get(metrics_url)[1].decode(errors="replace")
                consumed = _metric(text, "streamrec_events_consumed_total")
                lag = _metric(text, "streamrec_consumer_lag")
                eps = (consumed - last_consumed) / (now - last_t)
                last_consumed, last_t = consumed, now
                lat = (
                    np.percentile(list(view.latencies), [50, 95, 99])
                    if view.latencies
                    else [float("nan")] * 3
                )
                click.echo(
                    f"[{now - t0:5.0f}s] sent {sent:,}  consumed {consumed:,.0f} ({eps:,.0f}/s)  lag {lag:,.0f}  "
                    f"results {view.results:,}  event→result p50 {lat[0]:.0f} ms p95 {lat[1]:.0f} ms  "
                    f"alerts {len(view.alerts)}  dead letters {_metric(text, 'streamrec_events_dead_lettered_total'):.0f}"
                )
                if plan is not None:
                    click.echo(plan.status(view, surge_sent, t0))
                for msg in [
                    m for m in view.recent if not str(m["user_id"]).startswith(view.synthetic_prefix)
                ][-2:]:
                    items = ", ".join(f"{x['item_id']} ({x['reason']})" for x in msg["items"][:4])
                    click.echo(f"      user {msg['user_id']}: {items}")
                next_view = now + 5
            time.sleep(0.01)
        producer.flush(30)
        time.sleep(3)
        deadline = time.monotonic() + 15
        while (
            plan is not None and surge_sent and view.watch_alerted_at is None and time.monotonic() < deadline
        ):
            time.sleep(0.2)  # the surge's alert may still be on its way (its look runs every 2 s)
        text = _get(metrics_url)[1].decode(errors="replace")
        pct: list[float | None] = (
            np.percentile(list(view.latencies), [50, 95, 99]).tolist() if view.latencies else [None] * 3
        )
        summary = {
            "events_sent": sent,
            "events_consumed": _metric(text, "streamrec_events_consumed_total"),
            "events_valid": _metric(text, "streamrec_events_valid_total"),
            "dead_lettered": _metric(text, "streamrec_events_dead_lettered_total"),
            "results_received": view.results,
            "event_to_result_ms": {"p50": pct[0], "p95": pct[1], "p99": pct[2]},
            "alerts": len(view.alerts),
            # what the dashboard's "Active demand alerts" panel plots (the worker's gauge)
            "dashboard_active_alerts": _metric(text, "streamrec_anomalies_active"),
            "surge": plan.summary(view, surge_sent, t0) if plan is not None else None,
            # share of the pushed list slots per reason: re-buys beside discoveries
            "reason_share": {
                k: round(v / max(1, sum(view.reasons.values())), 3)
                for k, v in sorted(view.reasons.items(), key=lambda kv: -kv[1])
            },
            "model_dir": str(model),
            "metrics_url": metrics_url,
            "explorer_url": f"{web}/explorer",
            "seconds": round(time.time() - t_start, 1),
        }
        real = [m for m in view.recent if not str(m["user_id"]).startswith(view.synthetic_prefix)]
        if real:
            sample = real[-1]
            items = sample["items"]
            shares = Counter(str(x["reason"]).split(":")[0] for x in items)
            mix = ", ".join(f"{n} {r}" for r, n in shares.most_common())
            click.secho(f"\nfresh recommendations for user {sample['user_id']} ({mix}):", bold=True)
            for x in items:  # the whole pushed list: re-buys first for a regular, then discoveries
                click.echo(f"  {x['item_id']:<10} {x['score']:.4f}  {x['reason']}")
        for a in view.alerts[:5]:
            click.echo(f"  alert: {a}")
        if plan is not None:
            click.secho("\n" + plan.explain(summary["surge"]), bold=True)
        click.secho("\nsummary: " + orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode(), fg="green")
        if json_summary:
            json_summary.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    finally:
        if view is not None:
            view.close()
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()
        if stop_stack:
            LocalStack(s).down()
            click.echo("stack stopped")
        else:
            click.echo("Kafka and Redis are still up (`streamrec status`); stop them with `streamrec down`.")
    if not summary.get("results_received"):
        raise click.ClickException("no recommendations reached the results topic; see " + str(log_path))


WEEK_MS = 7 * 24 * 3600 * 1000


@dataclass
class SurgePlan:
    """One synthetic demand surge: ``rate`` distinct new shoppers per second buy ``item`` from
    ``start_s`` to ``end_s`` of the replay (user ids with the synthetic prefix, so the alert says
    ``synthetic: true``)."""

    item: str
    category: str
    text: str
    start_s: float
    end_s: float
    rate: float
    baseline_buyers_per_week: float
    category_items: set[str]

    def emit(self, producer: Any, elapsed: float, sent: int, s: Settings) -> int:
        """Send the synthetic purchases due by ``elapsed`` seconds; the new total sent."""
        from streamrec.events import Event, EventType

        if elapsed < self.start_s:
            return sent
        due = int((min(elapsed, self.end_s) - self.start_s) * self.rate)
        while sent < due:
            user = f"{s.alerts.synthetic_user_prefix}demo-{uuid.uuid4().hex[:8]}"
            producer.send(
                Event(
                    event_id=uuid.uuid4().hex,
                    type=EventType.PURCHASE,
                    user_id=user,
                    ts=int(time.time() * 1000),
                    session_id=user,
                    item_id=self.item,
                )
            )
            sent += 1
        return sent

    def status(self, view: LiveView, sent: int, t0: float) -> str:
        if sent == 0:
            return f"      (a synthetic surge of item {self.item} starts at {self.start_s:.0f}s)"
        if view.watch_alerted_at is None:
            return f"      synthetic surge: {sent} buyers of item {self.item} so far, no alert yet"
        return (
            f"      synthetic surge of item {self.item}: alert {view.watch_alerted_at - t0 - self.start_s:.1f}s "
            f"after it began; real shoppers' lists showing its category that hold it: {self._share(view, 'before')} before, "
            f"{self._share(view, 'after')} since"
        )

    @staticmethod
    def _share(view: LiveView, phase: str) -> str:
        n = view.lists[phase]
        return f"{view.lists_with_item[phase] / n:.1%} of {n}" if n else "-"

    def summary(self, view: LiveView, sent: int, t0: float) -> dict[str, Any]:
        alerts = [
            a
            for a in view.alerts
            if a.get("synthetic") and a.get("kind") == "surge" and a.get("state") == "raised"
        ]
        return {
            "item": self.item,
            "category": self.category,
            "text": self.text,
            "buyers_injected": sent,
            "buyers_per_s": self.rate,
            "baseline_buyers_per_week": round(self.baseline_buyers_per_week, 2),
            "started_at_s": self.start_s,
            "alerts": alerts,
            "alert_after_s": None
            if view.watch_alerted_at is None
            else round(view.watch_alerted_at - t0 - self.start_s, 2),
            "lists_before": view.lists["before"],
            "lists_after": view.lists["after"],
            "share_with_item_before": round(view.lists_with_item["before"] / max(1, view.lists["before"]), 4),
            "share_with_item_after": round(view.lists_with_item["after"] / max(1, view.lists["after"]), 4),
            "trending_slots_with_item": view.trending_with_item,
        }

    def explain(self, d: dict[str, Any]) -> str:
        head = (
            f"synthetic surge: {d['buyers_injected']} shoppers bought item {self.item} ({self.text!r}, "
            f"category {self.category!r}; {self.baseline_buyers_per_week:.1f} buyers a week in the history) "
            f"in {self.end_s - self.start_s:.0f}s"
        )
        if d["alert_after_s"] is None:
            return head + ": no alert reached the alerts topic while the demo ran"
        a = d["alerts"][0]
        return (
            f"{head}\n  alert {d['alert_after_s']:.1f}s after the surge began: {a['level']} {a['key']!r} "
            f"{a['kind']}, {a['observed']:.0f} buyers vs {a['expected']:.2f} expected (score {a['score']:.0f}, "
            f"synthetic={a['synthetic']})\n  real shoppers' pushed lists that show its category and hold it: "
            f"{d['share_with_item_before']:.1%} of {d['lists_before']} before the alert, "
            f"{d['share_with_item_after']:.1%} of {d['lists_after']} after (boost x{get_settings().alerts.boost:g}; "
            f"{d['trending_slots_with_item']} slots with a trending reason)"
        )


def surge_plan(
    ds: Any, weeks: float, rate: float, duration: float, busy: AbstractSet[str] = frozenset()
) -> SurgePlan:
    """The demo's surge: a mid-popular product with a long enough history for a baseline (sold
    in the first week of the backfilled history), in the category the replayed shoppers buy
    most (so that lists that could show it exist), at ~4 % of the event rate for a fifth of the
    run, starting at 40 % of it. Items and categories in ``busy`` (demand keys alerting now) are
    left out: their alert is already raised."""
    test = ds.split("test")
    cut = int(test["ts"].min())
    hist = ds.interactions[
        (ds.interactions["ts"] < cut) & (ds.interactions["ts"] >= cut - int(weeks * WEEK_MS))
    ]
    cats = ds.item_category()
    first_week = set(hist.loc[hist["ts"] < int(hist["ts"].min()) + WEEK_MS, "item_id"])
    buyers = hist.drop_duplicates(["user_id", "item_id"])["item_id"].value_counts()
    pool = {
        i
        for i, n in buyers.items()
        if 8 <= n <= 40 and cats.get(i) and i in first_week and not {f"i:{i}", f"c:{cats[i]}"} & busy
    }
    replayed = test.iloc[: int(rate * duration)]
    liked = replayed["item_id"].map(cats).value_counts()
    for cat in liked.index:
        mine = sorted(i for i in pool if cats[i] == cat)
        if mine:
            item = mine[len(mine) // 2]
            break
    else:
        raise click.ClickException("no product in the history is suited for the demo's surge; use --no-surge")
    return SurgePlan(
        item=str(item),
        category=str(cats[item]),
        text=str(ds.item_text().get(item, ""))[:60],
        start_s=round(0.4 * duration, 1),
        end_s=round(0.4 * duration + max(3.0, 0.2 * duration), 1),
        rate=max(2.0, 0.04 * rate),
        baseline_buyers_per_week=float(buyers[item]) / weeks,
        category_items={str(i) for i, c in cats.items() if c == cats[item]},
    )


def _fields(ev) -> dict:
    return {f: getattr(ev, f) for f in ev.__struct_fields__}
