"""Several workers in one consumer group on a 12-partition topic, while events flow: workers
join, one leaves gracefully, one is killed with SIGKILL and comes back. Rebalances are where
stream processors lose or repeat data (faust-streaming #502 processed twice after a rebalance,
#216 offsets skipped, #318 not committed after two rebalances); afterwards the profiles must
equal the reference of the events (nothing lost, nothing applied twice), every malformed
record must be in the dead-letter topic exactly once, and the group must have committed all.
It runs twice: on one Redis, and on a real 3-master Redis Cluster (``support.servers``).
"""

from __future__ import annotations

import threading

import pytest
from support.profile_reference import generate_events
from support.worker import check_reference, committed_equals_end, read_topic, total_applied, wait_until

from benchmarks.chaos import fuzz_records
from devstack.produce import EventProducer, replay
from profiles.store import ProfileStore
from streams.validation import parse_dead_letter_headers

pytestmark = pytest.mark.timeout(600)

PARTITIONS = 12


@pytest.fixture(params=["redis", "redis-cluster"])
def settings(settings, request):
    """This module's topics have 12 partitions; the test runs on one Redis and on a 3-master
    Redis Cluster (each user's compare-and-set stays in its hash-tagged slot)."""
    s = settings.override(topics={"partitions": PARTITIONS})
    if request.param == "redis-cluster":
        s = request.getfixturevalue("redis_cluster").on_these(s)
    return s


def test_three_workers_with_joins_a_graceful_leave_and_a_kill(settings, topics, redis_client, worker):
    events = generate_events(60, 6000, seed=21)
    bad = fuzz_records(60)  # every kind a producer sends: not JSON, bad type, unknown item, non-UTF-8, ...
    store = ProfileStore(redis_client, settings)
    users = {e.user_id for e in events}
    env = {"STREAMREC_STREAM_BATCH_MAX": "100", "STREAMREC_STREAM_COMMIT_INTERVAL_S": "1.0"}

    def feed() -> None:
        prod = EventProducer(settings)
        for k in range(0, len(events), 500):  # malformed records interleaved, keyed like users
            replay(prod, events[k : k + 500], total=500, rate=1500, progress=False)
            for value in bad[k // 100 : k // 100 + 5]:
                prod.send_raw(value, b"mx")
        prod.flush()

    feeder = threading.Thread(target=feed)
    feeder.start()
    w1 = worker(**env).start()
    w1.wait_ready()
    w2 = worker(**env).start()  # joins: partitions move
    w2.wait_ready()
    w3 = worker(**env).start()  # joins
    w3.wait_ready()
    wait_until(lambda: total_applied(store, users) > len(events) // 4, 120, "a quarter applied")
    assert w2.stop() == 0  # leaves gracefully mid-stream
    wait_until(lambda: total_applied(store, users) > len(events) // 2, 120, "half applied")
    w3.kill()  # SIGKILL mid-stream: its partitions' uncommitted batches are redelivered
    w4 = worker(**env).start()  # and comes back
    w4.wait_ready()
    feeder.join()
    wait_until(lambda: total_applied(store, users) == len(events), 240, "every event applied once")
    wait_until(lambda: committed_equals_end(settings), 120, "the group committed every record")
    check_reference(store, events, settings)

    letters = read_topic(settings, settings.topics.dead_letter, expect=len(bad), timeout=30)
    sources = [
        (h["partition"], h["offset"]) for h in (parse_dead_letter_headers(m.headers()) for m in letters)
    ]
    assert len(sources) == len(set(sources)) == len(bad), "each malformed record dead-lettered exactly once"
    assert sorted(m.value() for m in letters) == sorted(bad)
    for w in (w1, w4):
        assert w.stop() == 0
    if settings.redis.cluster:  # the users really are spread over the masters
        sizes = [redis_client.get_redis_connection(n).dbsize() for n in redis_client.get_primaries()]
        assert len(sizes) == 3 and min(sizes) > 0, sizes
