"""``streamrec demo``: the live pipeline on the local real stack, fed with real data.

Steps (each reused when already done, so a second run starts in seconds):

1. a model: fine-tune the encoder on Online Retail (a small CPU run, progress bar), export it
   to ONNX and embed the catalog into ``<state_dir>/model`` (``--pretrained`` skips the
   fine-tuning: the base encoder is exported as it is);
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
from collections import deque
from pathlib import Path

import click
import numpy as np
import orjson

from streamrec.settings import Settings, get_settings


def _run(cmd: list[str], what: str) -> None:
    click.secho(f"==> {what}: {' '.join(cmd)}", fg="cyan")
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise click.ClickException(f"{what} failed (exit {proc.returncode}); see the output above")


def ensure_model(s: Settings, pretrained: bool, quick: bool) -> Path:
    """A verified model folder with a catalog, built when missing."""
    from inference.catalog import CatalogIndex
    from inference.encoder import load_encoder

    model = s.resolved_model_dir
    try:
        load_encoder(s)
        CatalogIndex.load(model / "catalog")
        click.secho(f"==> reusing the model in {model}", fg="cyan")
        return model
    except Exception:
        pass
    exe = [sys.executable, "-m", "streamrec.cli"]
    if pretrained:
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
    return model


class LiveView:
    """Reads the results and alerts topics in a thread and keeps the figures the view shows."""

    def __init__(self, s: Settings) -> None:
        from confluent_kafka import Consumer

        self.s = s
        self.consumer = Consumer(
            {
                **s.kafka.librdkafka_config(),
                "group.id": f"demo-view-{os.getpid()}",
                "auto.offset.reset": "latest",
                "enable.auto.commit": False,
            }
        )
        self.consumer.subscribe([s.topics.results, s.topics.alerts])
        self.results = 0
        self.latencies: deque[float] = deque(maxlen=5000)
        self.recent: deque[dict] = deque(maxlen=50)
        self.reasons: dict[str, int] = {}  # reason kind (buy_again, similar_to, ...) -> list slots
        self.alerts: list[dict] = []
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stop_flag.is_set():
            for m in self.consumer.consume(num_messages=500, timeout=0.5):
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
                    continue
                self.results += 1
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
@click.option("--quick", is_flag=True, help="Short run with a tiny fine-tuning (CI smoke test).")
@click.option("--pretrained", is_flag=True, help="Skip fine-tuning: export the base encoder as it is.")
@click.option("--stop", "stop_stack", is_flag=True, help="Bring Kafka and Redis down at the end.")
@click.option("--json-summary", type=click.Path(path_type=Path), default=None, help="Write the summary here.")
def demo(
    rate: float, duration: float, quick: bool, pretrained: bool, stop_stack: bool, json_summary: Path | None
) -> None:
    """Run the live pipeline on real data and show it working."""
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
    model = ensure_model(s, pretrained, quick)

    log_path = s.state_dir / "demo-worker.log"
    s.state_dir.mkdir(parents=True, exist_ok=True)
    # Online Retail is a wholesale shop whose customers re-order: bought items come back as
    # `buy_again` (the setting that wins the replay evaluation) unless the user chose otherwise.
    env = {"STREAMREC_SCORING_EXCLUDE_PURCHASED": "false", **os.environ, "STREAMREC_MODEL_DIR": str(model)}
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
        view = LiveView(s).start()

        ds = load_dataset("online-retail", s.data_dir)
        n_events = int(rate * duration)
        events = list(dataset_events(ds, "test", settings=s, limit=n_events))
        producer = EventProducer(s)
        # A few malformed records: they go to the dead-letter topic, the worker goes on.
        for bad in (b"not json", b'{"event_id": "x", "type": "teleport", "user_id": "u", "ts": 1}'):
            producer.send_raw(bad, key=b"demo")
        sent = 0
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
                for msg in list(view.recent)[-2:]:
                    items = ", ".join(f"{x['item_id']} ({x['reason']})" for x in msg["items"][:4])
                    click.echo(f"      user {msg['user_id']}: {items}")
                next_view = now + 5
            time.sleep(0.01)
        producer.flush(30)
        time.sleep(3)
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
        if view.recent:
            sample = view.recent[-1]
            click.secho(f"\nfresh recommendations for user {sample['user_id']}:", bold=True)
            for x in sample["items"][:10]:
                click.echo(f"  {x['item_id']:<10} {x['score']:.4f}  {x['reason']}")
        for a in view.alerts[:5]:
            click.echo(f"  alert: {a}")
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


def _fields(ev) -> dict:
    return {f: getattr(ev, f) for f in ev.__struct_fields__}
