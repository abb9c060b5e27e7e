"""Stream test helpers (a pytest plugin): a real `streamrec worker` subprocess, topic fixtures,
Kafka utilities. The worker subprocess loads the test plug-ins from ``support.profile_reference``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from devstack.private import worker_env as private_worker_env
from profiles.store import ProfileStore
from streamrec.settings import Settings
from support.profile_reference import HashingEncoder, RandomItems, assert_profile_matches, reference_profiles

TESTS = Path(__file__).resolve().parents[1]  # holds the `support` package the worker's plug-ins live in


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    """Poll until ``predicate()``; fail with ``what`` after ``timeout`` seconds (a deadline, not a speed check)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """:func:`devstack.private.worker_env` with the test plug-ins importable, a short session
    timeout (fast rebalances) and quiet logs."""
    test = {
        "STREAMREC_STREAM_CONSUMER_SESSION_TIMEOUT_S": "8",
        "STREAMREC_LOG_LEVEL": "WARNING",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    return private_worker_env(settings, **{**test, **extra})


class WorkerProcess:
    """`streamrec worker` with the test catalog/encoder plug-ins, as a real subprocess."""

    def __init__(
        self,
        settings: Settings,
        log_dir: Path,
        items: str = "support.profile_reference:make_items",
        encoder: str = "support.profile_reference:make_encoder",
        **env: str,
    ) -> None:
        self.settings = settings
        self.items = items
        self.encoder = encoder
        self.env = worker_env(settings, **env)
        self.log_dir = log_dir
        self.proc: subprocess.Popen | None = None
        self.runs = 0

    def start(self) -> WorkerProcess:
        self.runs += 1
        self.log = self.log_dir / f"worker-{self.runs}.log"
        cmd = [
            sys.executable,
            "-m",
            "streamrec.cli",
            "worker",
            "--items",
            self.items,
            "--encoder",
            self.encoder,
        ]
        self.proc = subprocess.Popen(
            cmd,
            env=self.env,
            stdout=open(self.log, "wb"),
            stderr=subprocess.STDOUT,
            cwd=str(TESTS.parent),
        )
        return self

    def url(self, path: str, port: int | None = None) -> str:
        return f"http://127.0.0.1:{port or self.settings.web_port}{path}"

    def get(self, path: str, port: int | None = None) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url(path, port), timeout=2) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except OSError:
            return 0, b""

    def wait_ready(self, timeout: float = 90.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.tail()}")
            return self.get("/readyz")[0] == 200

        wait_until(ready, timeout, "the worker's /readyz")

    def metrics(self) -> str:
        return self.get("/metrics", self.settings.metrics_port)[1].decode()

    def metric(self, name: str, labels: str = "") -> float:
        total = 0.0
        for line in self.metrics().splitlines():
            if line.startswith(name + (("{" + labels) if labels else "")) and not line.startswith("#"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (graceful: finish the batch, commit) and wait."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(
                f"worker did not stop within {timeout}s of SIGTERM:\n{self.tail()}"
            ) from None

    def kill(self) -> None:
        """SIGKILL: no shutdown, no commit."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def worker(settings: Settings, tmp_path: Path):
    """A factory of worker subprocesses; every one still running is killed at the end."""
    started: list[WorkerProcess] = []

    def make(**env: str) -> WorkerProcess:
        """The first worker uses the test's settings; each further one (several workers in one
        group) gets its own web and metrics ports, state dir and log folder."""
        s, logs = settings, tmp_path
        if started:
            n = len(started) + 1
            logs = tmp_path / f"w{n}"
            logs.mkdir(exist_ok=True)
            s = settings.override(web_port=_free_port(), metrics_port=_free_port(), state_dir=logs / "state")
        w = WorkerProcess(s, logs, **env)  # items=/encoder= pick the plug-ins
        started.append(w)
        return w

    yield make
    for w in started:
        w.kill()


@pytest.fixture
def topics(settings: Settings):
    """Create this test's topics; delete them (and faust's internal ones) afterwards."""
    from confluent_kafka.admin import AdminClient

    from streamrec.kafka import ensure_topics

    ensure_topics(settings)
    yield settings.topics
    admin = AdminClient(settings.kafka.librdkafka_config())
    uid = settings.redis.prefix[1:]
    names = [t for t in admin.list_topics(timeout=10).topics if uid in t]
    if names:
        for fut in admin.delete_topics(names, operation_timeout=10).values():
            try:
                fut.result(15)
            except Exception:
                pass


def committed_equals_end(settings: Settings) -> bool:
    """True when the consumer group has committed every record of the events topic."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({**settings.kafka.librdkafka_config(), "group.id": settings.kafka.consumer_group,
                  "enable.auto.commit": False})  # fmt: skip
    try:
        tps = [TopicPartition(settings.topics.events, p) for p in range(settings.topics.partitions)]
        committed = c.committed(tps, timeout=10)
        for tp in committed:
            _, high = c.get_watermark_offsets(tp, timeout=10)
            if high > 0 and tp.offset < high:
                return False
        return True
    finally:
        c.close()


def read_topic(settings: Settings, topic: str, expect: int, timeout: float = 30.0) -> list:
    """All records of ``topic`` from the beginning (waits until ``expect`` are there)."""
    import uuid

    from confluent_kafka import Consumer

    c = Consumer({**settings.kafka.librdkafka_config(), "group.id": f"read-{uuid.uuid4().hex[:8]}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})  # fmt: skip
    c.subscribe([topic])
    out = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < expect and time.monotonic() < deadline:
            for m in c.consume(500, timeout=0.5):
                if m.error() is None:
                    out.append(m)
        # Anything more than expected would also be returned by one more short poll.
        for m in c.consume(500, timeout=1.0):
            if m.error() is None:
                out.append(m)
    finally:
        c.close()
    return out


def total_applied(store: ProfileStore, users) -> int:
    """Events applied over these users' profiles (each event counts once)."""
    return sum(p.total_events for p in store.get_profiles(sorted(users)).values())


def check_reference(store: ProfileStore, events, settings) -> None:
    """The stored profiles equal the plain-numpy reference of ``events`` (test plug-ins' vectors)."""
    ref = reference_profiles(events, RandomItems(), HashingEncoder(), settings.profile)
    got = store.get_profiles(sorted(ref))
    assert set(got) == set(ref)
    for u, r in ref.items():
        assert_profile_matches(got[u], r)


def _free_port() -> int:
    import socket

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]
