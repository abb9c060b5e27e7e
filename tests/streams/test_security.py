"""End to end over a secured stack: Kafka on SASL_SSL (SCRAM-SHA-512) and Redis on TLS with an
ACL user, both with certificates of a CA made at start (``devstack.tls``), random passwords.

Events go producer → worker → results topic over them; a worker given a wrong password or a
CA that did not sign the server's certificate stops within seconds with a message naming the
setting to fix; no password appears in any log (worker, broker, Redis).
"""

from __future__ import annotations

import time

import orjson
import pytest
from support.profile_reference import generate_events
from support.servers import PrivateStack
from support.worker import check_reference, read_topic

from devstack.produce import EventProducer
from devstack.tls import ensure_certs
from profiles.store import ProfileStore
from streamrec.settings import Settings

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def secure(stack: Settings, tmp_path_factory: pytest.TempPathFactory):
    p = PrivateStack(stack, tmp_path_factory.mktemp("secure"), secure=True).up()
    yield p
    p.down()


@pytest.fixture
def settings(settings: Settings, secure: PrivateStack) -> Settings:
    return secure.on_these(settings)


def _secrets(s: Settings) -> list[str]:
    assert s.kafka.sasl_password is not None and s.redis.password is not None
    return [s.kafka.sasl_password.get_secret_value(), s.redis.password.get_secret_value()]


def _server_logs(secure: PrivateStack) -> str:
    st = secure.stack
    paths = [st.kafka_log, st.kafka_stdout, st.redis_log]
    return "".join(p.read_text(errors="replace") for p in paths if p.exists())


def test_events_to_results_over_sasl_ssl_and_redis_tls(settings, secure, topics, worker, redis_client):
    assert settings.kafka.security_protocol.value == "SASL_SSL" and settings.redis.url.startswith("rediss://")
    events = [e for e in generate_events(10, 300, seed=41) if e.type.value != "search"]
    w = worker(items="support.profile_reference:make_catalog", STREAMREC_LOG_LEVEL="INFO").start()
    w.wait_ready()
    prod = EventProducer(settings)
    for e in events:
        prod.send(e)
    prod.flush()
    users = {e.user_id for e in events}
    msgs = read_topic(settings, settings.topics.results, expect=len(users), timeout=90)
    assert {orjson.loads(m.value())["user_id"] for m in msgs} >= users
    check_reference(ProfileStore(redis_client, settings), events, settings)
    logs = w.log.read_text(errors="replace") + _server_logs(secure)
    for secret in _secrets(settings):
        assert secret not in logs, "a password was logged"


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"STREAMREC_KAFKA_SASL_PASSWORD": "not-the-password"}, "STREAMREC_KAFKA_SASL_PASSWORD"),
        ({"STREAMREC_REDIS_PASSWORD": "not-the-password"}, "STREAMREC_REDIS_PASSWORD"),
        ({"STREAMREC_KAFKA_SSL_CAFILE": "OTHER_CA"}, "STREAMREC_KAFKA_SSL_CAFILE"),
        ({"STREAMREC_REDIS_SSL_CA_CERTS": "OTHER_CA"}, "STREAMREC_REDIS_SSL_CA_CERTS"),
    ],
    ids=["kafka-password", "redis-password", "kafka-untrusted-cert", "redis-untrusted-cert"],
)
def test_a_refused_connection_stops_the_worker_naming_the_setting(settings, worker, tmp_path, env, setting):
    other = str(ensure_certs(tmp_path / "other-ca").ca)  # a CA that signed nothing of the servers'
    env = {k: (other if v == "OTHER_CA" else v) for k, v in env.items()}
    t0 = time.monotonic()
    w = worker(**env).start()
    rc = w.proc.wait(60)
    took = time.monotonic() - t0
    log = w.log.read_text(errors="replace")
    assert rc != 0, log
    assert setting in log, log
    for secret in [*_secrets(settings), "not-the-password"]:
        assert secret not in log, "a password was logged"
    print(f"{setting}: stopped after {took:.1f}s")
