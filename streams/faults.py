"""What the worker waits for when Redis or Kafka fails, and how it waits.

Every failure on the critical path is infrastructure (input never raises: bad records are
dead-lettered). :func:`dependency_of` names the service an exception came from, so the log
and ``/readyz`` say *what* the worker waits for and which setting points at it, and
:class:`Backoff` spaces the retries (doubling, capped) and keeps the log to one line per
attempt plus one when the service is back.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from streamrec.settings import Settings

log = logging.getLogger(__name__)

REDIS = "redis"
KAFKA = "kafka"


class DependencyError(RuntimeError):
    """A failure reported from another process (the scoring process), tagged with the service it
    came from there (``"redis"``, ``"kafka"`` or None), since the original exception stays behind."""

    def __init__(self, message: str, dependency: str | None) -> None:
        super().__init__(message)
        self.dependency = dependency


def dependency_of(exc: BaseException) -> str | None:
    """``"redis"``, ``"kafka"`` or None (a bug, not an outage) for an exception."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:  # the cause chain: a wrapper may hide the origin
        seen.add(id(e))
        if isinstance(e, DependencyError):
            return e.dependency
        mod = type(e).__module__ or ""
        if mod.startswith("redis"):
            return REDIS
        # confluent-kafka's exceptions live in its C module ``cimpl``
        if (
            mod.startswith(("confluent_kafka", "cimpl", "aiokafka", "kafka"))
            or type(e).__name__ == "ProduceError"
        ):
            return KAFKA
        if isinstance(e, ConnectionError | TimeoutError):
            return REDIS if "redis" in str(e).lower() else None
        e = e.__cause__ or e.__context__
    return None


def describe(dependency: str | None, settings: Settings) -> str:
    """Where the dependency is and which setting points there, for logs and ``/readyz``."""
    if dependency == REDIS:
        return f"Redis at {settings.redis.host_port[0]}:{settings.redis.host_port[1]} (STREAMREC_REDIS_URL)"
    if dependency == KAFKA:
        return f"Kafka at {settings.kafka.bootstrap_servers} (STREAMREC_KAFKA_BOOTSTRAP_SERVERS)"
    return "an unexpected error (see the traceback)"


@dataclass
class Backoff:
    """Retry spacing for one kind of work: ``initial`` doubling to ``cap`` seconds.

    ``failed`` returns the next delay and logs one line (the traceback only on the first
    failure of an outage, or when the cause is not Redis/Kafka); ``succeeded`` logs how long
    the outage lasted and resets. ``waiting_for`` is what the work waits for now, or None.
    """

    what: str
    settings: Settings
    initial: float = 0.2
    cap: float = 2.0
    waiting_for: str | None = None
    since: float | None = None
    _delay: float = field(default=0.0, repr=False)

    def failed(self, exc: BaseException) -> float:
        dep = dependency_of(exc)
        where = describe(dep, self.settings)
        first = self.since is None
        if first:
            self.since = time.monotonic()
            self._delay = self.initial
        else:
            self._delay = min(self._delay * 2, self.cap)
        self.waiting_for = where
        waited = time.monotonic() - (self.since or time.monotonic())
        log.warning(
            "%s: waiting for %s (%s: %s); retry in %.1fs, down for %.0fs",
            self.what,
            where,
            type(exc).__name__,
            exc,
            self._delay,
            waited,
            exc_info=exc if first and dep is None else None,
        )
        return self._delay

    def succeeded(self) -> None:
        """After work that went through (a no-op unless the work was failing)."""
        if self.since is not None:
            log.warning("%s: %s answers again after %.1fs; resumed", self.what, self.waiting_for, self.down_s)
        self.since = None
        self.waiting_for = None

    @property
    def down_s(self) -> float:
        return 0.0 if self.since is None else time.monotonic() - self.since
