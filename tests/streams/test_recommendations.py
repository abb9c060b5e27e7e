"""Fresh recommendations end to end on the real stack: events → worker → results topic / pull.

One `streamrec worker` (real ONNX encoder + the Online Retail catalog) serves every test of
this module; each test uses its own users.
"""

from __future__ import annotations

import time
import urllib.parse
import uuid
from collections import Counter

import orjson
import pytest
from confluent_kafka import Consumer
from support.schemas import assert_valid
from support.worker import WorkerProcess, wait_until

from devstack.produce import EventProducer
from streamrec.datasets import load_dataset
from streamrec.events import make_event
from streamrec.kafka import ensure_topics

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def retail(data_dir):
    return load_dataset("online-retail", data_dir)


@pytest.fixture(scope="module")
def env(stack, retail_model_dir, tmp_path_factory):
    """(settings, worker, results reader, producer) shared by the module."""
    import socket

    def port() -> int:
        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            return sk.getsockname()[1]

    uid = uuid.uuid4().hex[:10]
    s = stack.override(
        topics={
            "events": f"r-{uid}.events",
            "results": f"r-{uid}.results",
            "dead_letter": f"r-{uid}.dlq",
            "alerts": f"r-{uid}.alerts",
        },
        redis={"prefix": f"r{uid}"},
        kafka={"consumer_group": f"rg-{uid}"},
        state_dir=tmp_path_factory.mktemp("rec-state"),
        web_port=port(),
        metrics_port=port(),
    )
    ensure_topics(s)
    w = WorkerProcess(
        s,
        tmp_path_factory.mktemp("rec-logs"),
        items="inference.catalog:load_catalog",
        encoder="inference.encoder:load_encoder",
        STREAMREC_MODEL_DIR=str(retail_model_dir),
        STREAMREC_SCORING_COALESCE_MS="400",
        # the co-visitation counts a worker learns online are folded on a timer, so an exact
        # comparison with the evaluation code (test below) runs without them
        STREAMREC_SCORING_COVISIT_WEIGHT="0",
        STREAMREC_ENCODER_PROVIDERS='["CPUExecutionProvider"]',
    ).start()
    consumer = Consumer({**s.kafka.librdkafka_config(), "group.id": f"reader-{uid}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})  # fmt: skip
    consumer.subscribe([s.topics.results])
    try:
        w.wait_ready(timeout=180)
        yield s, w, Results(consumer), EventProducer(s)
    finally:
        w.stop()
        consumer.close()
        redis = s.redis.client()
        keys = list(redis.scan_iter(match=f"*{s.redis.prefix}*", count=5000))
        if keys:
            redis.delete(*keys)


class Results:
    """Everything read from the results topic so far, by user."""

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        self.by_user: dict[str, list[dict]] = {}

    def poll(self) -> None:
        for m in self.consumer.consume(num_messages=500, timeout=0.5):
            if m.error() is None:
                msg = orjson.loads(m.value())
                assert_valid("results", msg)
                assert m.key().decode() == msg["user_id"]
                self.by_user.setdefault(msg["user_id"], []).append(msg)

    def wait_for(self, user: str, n: int = 1, timeout: float = 60.0) -> list[dict]:
        def enough() -> bool:
            self.poll()
            return len(self.by_user.get(user, [])) >= n

        wait_until(enough, timeout, f"{n} result message(s) for {user}")
        return self.by_user[user]

    def latest(self, user: str, event_id: str, timeout: float = 60.0) -> dict:
        """The result computed from the user's event ``event_id`` (the burst's newest)."""

        def arrived() -> bool:
            self.poll()
            return any(m["source_event_id"] == event_id for m in self.by_user.get(user, []))

        wait_until(arrived, timeout, f"a result for {user} from event {event_id}")
        return next(m for m in self.by_user[user] if m["source_event_id"] == event_id)


def _items_of(retail, category: str, n: int) -> list[str]:
    it = retail.items[retail.items["category"] == category]
    assert len(it) >= n, f"category {category} has only {len(it)} items"
    return it["item_id"].tolist()[:n]


def _send(producer: EventProducer, events) -> None:
    for e in events:
        producer.send(e)
    producer.flush(30)


def test_pushed_lists_equal_what_the_evaluation_code_computes(env, retail, retail_model_dir):
    """A short real stream (Online Retail test-period customers) through the real worker: each
    user's last pushed top-10 is what ``eval``'s served path (the same Scorer over the profiles
    the worker wrote) computes for them."""
    from dataclasses import replace

    from devstack.produce import dataset_events
    from evaluation.loo import LIST_K
    from inference.catalog import CatalogIndex
    from inference.scoring import Request, Scorer
    from inference.user_model import load_user_model
    from profiles.store import ProfileStore

    s, _, results, producer = env
    test = retail.split("test")
    users = test["user_id"].drop_duplicates().head(6).tolist()
    df = test[test["user_id"].isin(users)].groupby("user_id").head(8)
    uid = uuid.uuid4().hex[:6]
    now = int(time.time() * 1000)
    events = [
        make_event(
            e.type,
            f"eq{uid}-{e.user_id}",
            item_id=e.item_id,
            ts=e.ts,
            session_id=e.session_id,
            quantity=e.quantity,
            price=e.price,
        )  # fmt: skip
        for e in dataset_events(
            replace(retail, interactions=df), "all", settings=s, now_ms=now - 60_000, speed=1e6
        )
    ]
    _send(producer, events)
    last = {e.user_id: e for e in events}
    pushed = {u: results.latest(u, e.event_id)["items"] for u, e in last.items()}

    catalog = CatalogIndex.load(retail_model_dir / "catalog")
    scorer = Scorer(
        catalog, s.scoring.model_copy(update={"covisit_weight": 0.0}), s.profile,
        user_model=load_user_model(retail_model_dir, catalog),
    )  # fmt: skip
    profiles = ProfileStore(s.redis.client(), s, items=catalog).get_profiles(list(last))
    reqs = [Request(u, profiles[u], k=s.scoring.top_k, ref_ms=last[u].ts) for u in last]
    computed = scorer.recommend(reqs, now_ms=int(time.time() * 1000))
    assert LIST_K >= 10
    for req, lst in zip(reqs, computed, strict=True):
        got = [it["item_id"] for it in pushed[req.user_id]][:10]
        assert got == [it.item_id for it in lst][:10], req.user_id
        assert [it["score"] for it in pushed[req.user_id]][:10] == pytest.approx(
            [it.score for it in lst][:10], abs=1e-5
        )


def test_clicks_in_one_category_dominate_and_schema_is_complete(env, retail):
    s, _, results, producer = env
    cat = retail.item_category()
    user = f"clock-fan-{uuid.uuid4().hex[:6]}"
    clicks = _items_of(retail, "clock", 5)
    now = int(time.time() * 1000)
    evs = [make_event("click", user, item_id=i, ts=now + n) for n, i in enumerate(clicks)]
    _send(producer, evs)
    msg = results.latest(user, evs[-1].event_id)
    assert set(msg) == {
        "user_id",
        "items",
        "model_version",
        "generated_at",
        "source_event_id",
        "event_to_result_ms",
        "v",
    }
    assert len(msg["items"]) == s.scoring.top_k
    assert msg["event_to_result_ms"] >= 0 and msg["source_event_id"]
    share = sum(cat[x["item_id"]] == "clock" for x in msg["items"]) / len(msg["items"])
    assert share >= 0.5, [(x["item_id"], cat[x["item_id"]]) for x in msg["items"]]
    assert all(x["reason"].startswith("similar_to:") for x in msg["items"] if cat[x["item_id"]] == "clock")
    for x in msg["items"]:
        if x["reason"].startswith("similar_to:"):
            assert x["reason"].split(":", 1)[1] in clicks


def test_purchased_items_are_excluded(env, retail):
    _, _, results, producer = env
    user = f"buyer-{uuid.uuid4().hex[:6]}"
    bought = _items_of(retail, "clock", 4)
    now = int(time.time() * 1000)
    evs = [make_event("purchase", user, item_id=i, ts=now + n) for n, i in enumerate(bought)]
    _send(producer, evs)
    msg = results.latest(user, evs[-1].event_id)
    got = {x["item_id"] for x in msg["items"]}
    assert not got & set(bought)


def test_a_search_moves_results_toward_matching_items(env, retail):
    _, _, results, producer = env
    text = retail.item_text()
    user = f"searcher-{uuid.uuid4().hex[:6]}"
    now = int(time.time() * 1000)
    clicks = [
        make_event("click", user, item_id=i, ts=now + n) for n, i in enumerate(_items_of(retail, "clock", 4))
    ]
    _send(producer, clicks)
    before = results.latest(user, clicks[-1].event_id)
    search = make_event("search", user, query="christmas tree decoration", ts=now + 10_000)
    _send(producer, [search])
    after = results.latest(user, search.event_id)

    def christmas(msg) -> int:
        return sum("CHRISTMAS" in text[x["item_id"]].upper() for x in msg["items"][:10])

    assert christmas(after) >= 5 > christmas(before)
    assert Counter(x["reason"] for x in after["items"][:10])["matches_query"] >= 5


def test_a_burst_gives_a_few_pushes_not_one_per_event(env, retail):
    _, _, results, producer = env
    user = f"burst-{uuid.uuid4().hex[:6]}"
    items = _items_of(retail, "mug", 10)
    now = int(time.time() * 1000)
    evs = [make_event("view", user, item_id=i, ts=now + n) for n, i in enumerate(items)]
    _send(producer, evs)
    results.latest(user, evs[-1].event_id)  # the newest event is always pushed
    time.sleep(2.0)  # anything else would have arrived by now
    results.poll()
    msgs = results.by_user[user]
    assert 1 <= len(msgs) <= 3, [m["source_event_id"] for m in msgs]  # one per batch at most, not per event
    assert msgs[-1]["source_event_id"] == evs[-1].event_id


def test_pull_endpoint_cold_user_query_and_limits(env, retail):
    s, w, results, producer = env
    # Make one item clearly the most popular.
    star = _items_of(retail, "bag", 1)[0]
    now = int(time.time() * 1000)
    _send(
        producer,
        [make_event("purchase", f"fan-{n}-{uuid.uuid4().hex[:4]}", item_id=star, ts=now) for n in range(30)],
    )
    wait_until(lambda: w.get("/recommendations/nobody-at-all")[0] == 200, 30, "the pull endpoint")

    def top_cold() -> str:
        return orjson.loads(w.get("/recommendations/nobody-at-all?k=5")[1])["items"][0]["item_id"]

    wait_until(lambda: top_cold() == star, 30, "the popular item to lead the cold-start list")
    status, body = w.get("/recommendations/nobody-at-all?k=5")
    data = orjson.loads(body)
    assert status == 200 and len(data["items"]) == 5
    assert all(x["reason"] == "popular" for x in data["items"])
    assert data["source_event_id"] is None

    q = urllib.parse.quote("red alarm clock")
    status, body = w.get(f"/recommendations/nobody-at-all?k=10&q={q}")
    data = orjson.loads(body)
    assert status == 200
    assert sum("CLOCK" in retail.item_text()[x["item_id"]].upper() for x in data["items"]) >= 5
    assert all(x["reason"] == "matches_query" for x in data["items"])

    assert w.get("/recommendations/u?k=201")[0] == 400
    assert w.get("/recommendations/u?k=0")[0] == 400
    assert w.get("/recommendations/u?k=abc")[0] == 400
    long_q = urllib.parse.quote("x" * 513)
    status, body = w.get(f"/recommendations/u?q={long_q}")
    assert status == 400 and b"512" in body
