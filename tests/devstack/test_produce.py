"""Dataset → events, and `streamrec produce` into the real Kafka."""

from __future__ import annotations

import time

import numpy as np
import pytest
from click.testing import CliRunner
from support.worker import read_topic, worker_env

from devstack.produce import _session_numbers, dataset_events
from streamrec.datasets import load_dataset
from streamrec.events import EventType, decode


@pytest.fixture(scope="module")
def retail(data_dir):
    return load_dataset("online-retail", data_dir)


def test_online_retail_purchases_become_purchase_events(retail, settings):
    evs = list(dataset_events(retail, "test", settings=settings, limit=500))
    rows = retail.split("test").iloc[:500]
    assert len(evs) == 500
    assert all(e.type is EventType.PURCHASE for e in evs)
    assert [e.item_id for e in evs] == rows["item_id"].tolist()
    assert [e.ts for e in evs] == rows["ts"].tolist()
    assert [e.quantity for e in evs] == rows["quantity"].tolist()
    assert np.allclose([e.price for e in evs], rows["price"].to_numpy())
    cat = retail.item_category()
    assert all(e.category == (cat[e.item_id] or None) for e in evs)
    assert len({e.event_id for e in evs}) == 500
    assert all(e.session_id.startswith(e.user_id + "-") for e in evs)


def test_scientific_interactions_become_clicks(data_dir, settings):
    ds = load_dataset("scientific", data_dir)
    evs = list(dataset_events(ds, "test", settings=settings, limit=50))
    assert evs and all(e.type is EventType.CLICK and e.item_id for e in evs)


def test_retiming_keeps_relative_spacing_scaled_by_speed(retail, settings):
    rows = retail.split("test").iloc[:300]
    now = 1_800_000_000_000
    evs = list(dataset_events(retail, "test", settings=settings, limit=300, now_ms=now, speed=60.0))
    assert evs[0].ts == now
    expected = now + ((rows["ts"].to_numpy() - rows["ts"].iloc[0]) / 60.0).astype(np.int64)
    assert [e.ts for e in evs] == expected.tolist()


def test_sessions_split_after_inactivity():
    users = np.array(["a", "a", "b", "a", "b", "a"])
    ts = np.array([0, 1000, 0, 1000 + 1_800_001, 5000, 1000 + 1_800_002], np.int64)
    assert _session_numbers(users, ts, 1_800_000).tolist() == [0, 0, 0, 1, 0, 1]


def test_produce_command_replays_the_dataset_at_a_rate(settings, topics, monkeypatch):
    from streamrec.cli import main
    from streamrec.settings import get_settings

    for k, v in worker_env(settings).items():
        if k.startswith("STREAMREC_"):
            monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    try:
        res = CliRunner().invoke(main, ["produce", "--dataset", "online-retail", "--split", "test",
                                        "--rate", "500", "--limit", "300", "--quiet"])  # fmt: skip
    finally:
        get_settings.cache_clear()
    assert res.exit_code == 0, res.output
    assert "sent 300 online-retail/test events" in res.output
    msgs = read_topic(settings, settings.topics.events, expect=300)
    assert len(msgs) == 300
    evs = [decode(m.value(), now_ms=int(time.time() * 1000)) for m in msgs]
    assert all(m.key().decode() == e.user_id for m, e in zip(msgs, evs, strict=True))
