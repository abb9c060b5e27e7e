"""Private servers: a Redis (or Redis Cluster) and a Kafka broker of one job only.

:class:`PrivateStack` starts them with :class:`devstack.stack.LocalStack` (the code behind
`streamrec up`) in a folder of its own and on free loopback ports, so a test or a fault drill
(`streamrec bench chaos`) can kill and restart them without disturbing anything else. With
``secure`` Kafka listens on SASL_SSL (SCRAM-SHA-512) and Redis on TLS with an ACL user, both
with certificates of a CA made for the job and random passwords.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from devstack.stack import LocalStack
from streamrec.settings import Settings


def free_port() -> int:
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


def _bindable(port: int) -> bool:
    with socket.socket() as sk:
        try:
            sk.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_run(n: int, *, cluster_bus: bool = False) -> int:
    """The first of ``n`` consecutive free loopback ports. ``cluster_bus``: Redis Cluster nodes,
    whose bus listens on port + 10000, so the run must end at 55535 and those be free too."""
    import random

    top = 55535 if cluster_bus else 65535
    rng = random.Random()
    for _ in range(500):
        base = rng.randrange(20000, top - n)
        ports = list(range(base, base + n))
        if cluster_bus:
            ports += [p + 10000 for p in ports]
        if all(_bindable(p) for p in ports):
            return base
    raise RuntimeError(f"no run of {n} free ports found")


class PrivateStack:
    """A Redis and a Kafka broker of this test only, in its own folder and ports."""

    def __init__(
        self, base: Settings, root: Path, *, kafka: bool = True, cluster: bool = False, secure: bool = False
    ) -> None:
        """``secure``: Kafka on SASL_SSL (SCRAM-SHA-512) and Redis on TLS with an ACL user, both
        with certificates of a CA made for the test, and random passwords."""
        import secrets

        root.mkdir(parents=True, exist_ok=True)
        port = free_port_run(base.redis.cluster_nodes, cluster_bus=True) if cluster else free_port()
        self.kafka = kafka
        k: dict = {}
        if kafka:
            ctl = free_port_run(2)  # the controller, and the secure broker's internal listener
            # short-lived: C1 alone starts on less CPU (the full JIT pays off on a long-running broker)
            k = {"bootstrap_servers": f"127.0.0.1:{free_port()}", "controller_port": ctl, "full_jit": False}
        r: dict = {"url": f"redis://127.0.0.1:{port}/0", "cluster": cluster}
        if secure:
            ca = root / "tls" / "ca.crt"
            k |= {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "streamrec",
                  "sasl_password": secrets.token_urlsafe(16), "ssl_cafile": ca}  # fmt: skip
            r |= {"url": f"rediss://127.0.0.1:{port}/0", "username": "streamrec",
                  "password": secrets.token_urlsafe(16), "ssl_ca_certs": ca}  # fmt: skip
        self.settings = base.override(kafka=k, redis=r, state_dir=root)
        self.stack = LocalStack(self.settings, redis_profile="demo")
        shared = base.state_dir.resolve() / self.stack.libs_dir.name  # the jars `streamrec up` resolved
        if kafka and shared.is_dir() and not self.stack.libs_dir.exists():
            self.stack.libs_dir.symlink_to(shared, target_is_directory=True)

    def up(self) -> PrivateStack:
        self.stack.start_redis()
        if self.kafka:
            self.stack.start_kafka()
        return self

    def kill(self, service: str) -> None:
        self.stack.kill(service)

    def start(self, service: str) -> None:
        (self.stack.start_kafka if service == "kafka" else self.stack.start_redis)()

    def down(self) -> None:
        self.stack.down()

    def on_these(self, s: Settings) -> Settings:
        """``s`` (its topics, prefix, group) pointed at these servers."""
        kafka = self.settings.kafka if self.kafka else s.kafka
        return s.override(
            kafka=kafka.model_copy(update={"consumer_group": s.kafka.consumer_group}),
            redis=self.settings.redis.model_copy(update={"prefix": s.redis.prefix}),
        )


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a ``streamrec worker`` subprocess that runs with ``settings``: the
    connection (security included), topics, prefix, state folder and ports, then ``extra``."""
    s, k, r = settings, settings.kafka, settings.redis
    values = {
        "STREAMREC_KAFKA_BOOTSTRAP_SERVERS": k.bootstrap_servers,
        "STREAMREC_KAFKA_CONSUMER_GROUP": k.consumer_group,
        "STREAMREC_KAFKA_SECURITY_PROTOCOL": k.security_protocol.value,
        "STREAMREC_KAFKA_SASL_MECHANISM": k.sasl_mechanism.value,
        "STREAMREC_KAFKA_SASL_USERNAME": k.sasl_username,
        "STREAMREC_KAFKA_SASL_PASSWORD": k.sasl_password.get_secret_value() if k.sasl_password else None,
        "STREAMREC_KAFKA_SSL_CAFILE": str(k.ssl_cafile) if k.ssl_cafile else None,
        "STREAMREC_TOPICS_EVENTS": s.topics.events,
        "STREAMREC_TOPICS_DEAD_LETTER": s.topics.dead_letter,
        "STREAMREC_TOPICS_RESULTS": s.topics.results,
        "STREAMREC_TOPICS_ALERTS": s.topics.alerts,
        "STREAMREC_TOPICS_PARTITIONS": str(s.topics.partitions),
        "STREAMREC_REDIS_URL": r.url,
        "STREAMREC_REDIS_CLUSTER": "true" if r.cluster else "false",
        "STREAMREC_REDIS_PREFIX": r.prefix,
        "STREAMREC_REDIS_USERNAME": r.username,
        "STREAMREC_REDIS_PASSWORD": r.password.get_secret_value() if r.password else None,
        "STREAMREC_REDIS_SSL_CA_CERTS": str(r.ssl_ca_certs) if r.ssl_ca_certs else None,
        "STREAMREC_STATE_DIR": str(s.state_dir),
        "STREAMREC_WEB_PORT": str(s.web_port),
        "STREAMREC_METRICS_PORT": str(s.metrics_port),
        "STREAMREC_STREAM_WEB_BIND": "127.0.0.1",
    }
    return {**os.environ, **{name: v for name, v in values.items() if v}, **extra}
