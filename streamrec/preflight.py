"""Connection checks before a worker starts: fail in seconds, say which setting to fix.

A wrong SASL password, an untrusted certificate or a wrong address otherwise shows up as
clients retrying forever (librdkafka logs the cause and keeps trying; aiokafka and faust retry
too). :func:`check_kafka` and :func:`check_redis` make one real connection each with a short
timeout, read the cause from the client's own log and errors, and raise
:class:`PreflightError` with a message that names the setting. Secrets never enter a message.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from streamrec.settings import Settings

__all__ = ["PreflightError", "check_kafka", "check_redis"]


class PreflightError(RuntimeError):
    """A service refused the worker's connection; the message says which setting to fix."""


class _Capture(logging.Handler):
    """Collects librdkafka's log lines (its connection errors arrive only there)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock:
            self.lines.append(record.getMessage())


def _kafka_cause(lines: list[str], s: Settings) -> str:
    text = "\n".join(lines)
    k = s.kafka
    if "SASL authentication error" in text or "Authentication failed" in text:
        return (
            f"Kafka refused the SASL credentials of user {k.sasl_username!r} ({k.sasl_mechanism.value}): "
            "fix STREAMREC_KAFKA_SASL_USERNAME / STREAMREC_KAFKA_SASL_PASSWORD (or STREAMREC_KAFKA_SASL_MECHANISM)"
        )
    if "certificate verify failed" in text or "certificate could not be verified" in text:
        return (
            "the Kafka broker's TLS certificate is not trusted: set STREAMREC_KAFKA_SSL_CAFILE to the CA "
            f"that signed it (now: {k.ssl_cafile or 'the system CAs'})"
        )
    if "SSL handshake failed" in text or "Disconnected while requesting ApiVersion" in text:
        return (
            f"the broker at {k.bootstrap_servers} does not speak {k.security_protocol.value}: "
            "fix STREAMREC_KAFKA_SECURITY_PROTOCOL (or the port in STREAMREC_KAFKA_BOOTSTRAP_SERVERS)"
        )
    return (
        f"no Kafka broker answered at {k.bootstrap_servers}: fix STREAMREC_KAFKA_BOOTSTRAP_SERVERS, "
        "or start the broker (`streamrec up` locally)"
    )


def check_kafka(settings: Settings, timeout: float = 10.0) -> None:
    """One metadata request with the worker's client settings; PreflightError naming the setting."""
    from confluent_kafka.admin import AdminClient

    log = logging.getLogger(f"streamrec.preflight.kafka.{id(settings)}")
    log.propagate = False
    capture = _Capture()
    log.addHandler(capture)
    conf: dict[str, Any] = {
        **settings.kafka.librdkafka_config(),
        "logger": log,
        "socket.connection.setup.timeout.ms": int(timeout * 1000),
    }
    admin = AdminClient(conf)
    deadline = time.monotonic() + timeout
    try:
        while True:  # short tries: a refused login or certificate shows in the log at once
            try:
                admin.list_topics(timeout=0.5)
                return
            except Exception as exc:
                admin.poll(0.1)  # serves librdkafka's log queue into ``capture``
                refused = any(
                    m in line
                    for line in capture.lines
                    for m in (
                        "Authentication failed",
                        "SASL authentication error",
                        "certificate verify failed",
                    )
                )
                if refused or time.monotonic() >= deadline:
                    raise PreflightError(_kafka_cause(capture.lines, settings)) from exc
    finally:
        log.removeHandler(capture)


def check_redis(settings: Settings, timeout: float = 5.0) -> None:
    """PING with the worker's client settings; PreflightError naming the setting."""
    from redis.exceptions import AuthenticationError, AuthorizationError, RedisError, ResponseError

    r = settings.redis
    try:
        client = r.client(socket_timeout=timeout, socket_connect_timeout=timeout)
        client.ping()
    except (AuthenticationError, AuthorizationError) as exc:
        raise PreflightError(
            f"Redis refused the credentials (user {r.username or 'default'!r}): fix STREAMREC_REDIS_USERNAME / "
            "STREAMREC_REDIS_PASSWORD"
        ) from exc
    except RedisError as exc:
        text = str(exc)
        if "certificate verify failed" in text:
            msg = (
                "the Redis server's TLS certificate is not trusted: set STREAMREC_REDIS_SSL_CA_CERTS to the CA "
                f"that signed it (now: {r.ssl_ca_certs or 'the system CAs'})"
            )
        elif isinstance(exc, ResponseError) and ("NOAUTH" in text or "WRONGPASS" in text):
            msg = "Redis requires other credentials: fix STREAMREC_REDIS_USERNAME / STREAMREC_REDIS_PASSWORD"
        elif r.uses_tls and ("wrong version number" in text or "EOF" in text or "Connection reset" in text):
            msg = f"Redis at {r.host_port[0]}:{r.host_port[1]} does not speak TLS: use redis:// in STREAMREC_REDIS_URL"
        else:
            msg = (
                f"Redis at {r.host_port[0]}:{r.host_port[1]} did not answer ({type(exc).__name__}): "
                "fix STREAMREC_REDIS_URL, or start Redis (`streamrec up` locally)"
            )
        raise PreflightError(msg) from exc
