"""The local real stack: Kafka and Redis over real connections."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

from devstack import stack as stack_mod
from devstack.stack import (
    LocalStack,
    StackError,
    _free_port_for_tests,
    _pid_alive,
    kafka_healthy,
)
from streamrec.kafka import ensure_topics
from streamrec.settings import Settings


def test_kafka_round_trip_on_admin_created_topic_with_4_partitions(settings: Settings):
    settings = settings.override(topics={"partitions": 4})
    created = ensure_topics(settings)
    assert settings.topics.events in created
    md = AdminClient(settings.kafka.librdkafka_config()).list_topics(settings.topics.events, timeout=10)
    assert len(md.topics[settings.topics.events].partitions) == 4
    # Creating again is harmless and creates nothing.
    assert ensure_topics(settings) == []

    delivered: dict[bytes, set[int]] = defaultdict(set)

    def on_delivery(err, msg):
        assert err is None, err
        delivered[msg.key()].add(msg.partition())

    producer = Producer(settings.kafka.librdkafka_config())
    keys = [f"user-{i}".encode() for i in range(40)]
    sent = []
    for round_ in range(3):
        for k in keys:
            value = f"{k.decode()}:{round_}".encode()
            producer.produce(settings.topics.events, key=k, value=value, on_delivery=on_delivery)
            sent.append((k, value))
    assert producer.flush(15) == 0

    # Every key landed on exactly one partition, and keys spread over all 4.
    assert all(len(p) == 1 for p in delivered.values())
    assert {next(iter(p)) for p in delivered.values()} == {0, 1, 2, 3}

    consumer = Consumer(
        {**settings.kafka.librdkafka_config(), "group.id": settings.kafka.consumer_group,
         "auto.offset.reset": "earliest", "enable.auto.commit": False}
    )  # fmt: skip
    consumer.subscribe([settings.topics.events])
    got: list = []
    try:
        while len(got) < len(sent):
            msgs = consumer.consume(num_messages=500, timeout=10)
            assert msgs, f"consumed {len(got)} of {len(sent)} before a 10 s silence"
            for m in msgs:
                assert m.error() is None
                got.append(m)
    finally:
        consumer.close()
    assert sorted((m.key(), m.value()) for m in got) == sorted(sent)
    for m in got:
        assert {m.partition()} == delivered[m.key()]
    # Per key, the order of production is kept (one partition, in-order).
    by_key = defaultdict(list)
    for m in got:
        by_key[m.key()].append(m.value())
    for k, vals in by_key.items():
        assert vals == [f"{k.decode()}:{r}".encode() for r in range(3)]


def test_redis_round_trip(settings: Settings, redis_client):
    key = f"{{{settings.redis.prefix}}}:probe"
    with redis_client.pipeline(transaction=False) as p:
        for i in range(100):
            p.hset(key, f"f{i}", i)
        p.hgetall(key)
        res = p.execute()
    assert {k.decode(): int(v) for k, v in res[-1].items()} == {f"f{i}": i for i in range(100)}


def _isolated_settings(tmp_path) -> Settings:
    return Settings().override(
        state_dir=tmp_path / "state",
        kafka={
            "bootstrap_servers": f"127.0.0.1:{_free_port_for_tests()}",
            "controller_port": _free_port_for_tests(),
            "heap": "256m",
            "full_jit": False,
        },
        redis={"url": f"redis://127.0.0.1:{_free_port_for_tests()}/0"},
    )


@pytest.mark.timeout(240)
def test_up_is_idempotent_and_down_leaves_no_process(tmp_path):
    """A second, private stack on free ports: up, up again (same pids), status, down."""
    s = _isolated_settings(tmp_path)
    st = LocalStack(s)
    try:
        first = {r.name: r for r in st.up()}
        assert all(r.healthy and r.managed for r in first.values())
        # the broker runs with the JVM options of its settings (here C1 only, 256 MB)
        argv = Path(f"/proc/{first['kafka'].pid}/cmdline").read_bytes().split(b"\0")
        assert b"-XX:TieredStopAtLevel=1" in argv and b"-Xmx256m" in argv
        second = {r.name: r for r in st.up()}
        assert {n: r.pid for n, r in second.items()} == {n: r.pid for n, r in first.items()}
        status = {r.name: r for r in st.status()}
        assert status["kafka"].healthy and status["redis"].healthy
        assert status["kafka"].pid == first["kafka"].pid
        # The application creates its topics on this broker too.
        assert set(ensure_topics(s)) == {
            s.topics.events,
            s.topics.results,
            s.topics.dead_letter,
            s.topics.alerts,
        }
    finally:
        stopped = st.down()
    assert stopped == {"kafka": first["kafka"].pid, "redis": first["redis"].pid}
    for pid in stopped.values():
        assert not _pid_alive(pid)
    assert not st.kafka_pidfile.exists() and not st.redis_pidfile.exists()
    after = {r.name: r for r in st.status()}
    assert not after["kafka"].healthy and not after["redis"].healthy
    # down again: nothing to stop, no error.
    assert st.down() == {"kafka": None, "redis": None}


def test_up_reuses_servers_that_already_run(stack: Settings, tmp_path):
    """Pointing the settings at running servers starts nothing."""
    s = stack.override(state_dir=tmp_path / "state")
    rows = {r.name: r for r in LocalStack(s).up()}
    assert rows["kafka"].healthy and not rows["kafka"].managed and rows["kafka"].pid is None
    assert rows["redis"].healthy and not rows["redis"].managed and rows["redis"].pid is None
    assert not (tmp_path / "state" / "kafka" / "kafka.pid").exists()


@pytest.mark.timeout(30)
def test_wrong_bootstrap_address_gives_a_clear_error_in_bounded_time(tmp_path):
    s = Settings().override(kafka={"bootstrap_servers": f"127.0.0.1:{_free_port_for_tests()}"})
    ok, detail = kafka_healthy(s, timeout=2.0)
    assert not ok
    assert "transport" in detail.lower() or "timed out" in detail.lower()
    # The CLI says the same, and exits non-zero.
    env = {**os.environ, "STREAMREC_KAFKA_BOOTSTRAP_SERVERS": s.kafka.bootstrap_servers,
           "STREAMREC_STATE_DIR": str(tmp_path)}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "streamrec.cli", "status"], env=env, capture_output=True, text=True, timeout=25
    )
    assert proc.returncode == 1
    assert "kafka" in proc.stdout and "down" in proc.stdout


def test_missing_redis_server_says_how_to_install(tmp_path, monkeypatch):
    s = _isolated_settings(tmp_path)
    real_which = stack_mod.shutil.which
    monkeypatch.setattr(
        stack_mod.shutil, "which", lambda name: None if name == "redis-server" else real_which(name)
    )
    with pytest.raises(StackError, match=r"apt-get install -y redis-server"):
        LocalStack(s).start_redis()


def test_kafka_start_timeout_names_the_log(tmp_path):
    """A broker that cannot come up in time: the error names its log file."""
    s = _isolated_settings(tmp_path)
    st = LocalStack(s)
    try:
        with pytest.raises(StackError, match=r"server\.log|stdout\.log"):
            st.start_kafka(timeout=0.5)
    finally:
        st.down()


def test_broker_jvm_runs_the_full_jit_unless_told_otherwise(tmp_path):
    """``kafka.full_jit`` (default on) leaves the JVM's tiered JIT whole; off, C1 alone."""
    full = LocalStack(Settings().override(state_dir=tmp_path, kafka={"heap": "1g"}))
    assert full.jvm_options() == ["-Xmx1g", "-Xms1g", "-XX:+UseG1GC"]
    c1 = LocalStack(Settings().override(state_dir=tmp_path, kafka={"heap": "1g", "full_jit": False}))
    assert c1.jvm_options()[-1] == "-XX:TieredStopAtLevel=1"
