"""Settings: env parsing and the one mapping per client library."""

from __future__ import annotations

import json

from click.testing import CliRunner

from streamrec.cli import main
from streamrec.settings import SecurityProtocol, Settings


def test_env_prefix_and_nested_groups(monkeypatch):
    monkeypatch.setenv("STREAMREC_KAFKA_BOOTSTRAP_SERVERS", "k1:9093,k2:9093")
    monkeypatch.setenv("STREAMREC_REDIS_URL", "rediss://cache:6380/2")
    monkeypatch.setenv("STREAMREC_TOPICS_PARTITIONS", "12")
    monkeypatch.setenv("STREAMREC_STATE_DIR", "/var/lib/streamrec")
    monkeypatch.setenv("STREAMREC_METRICS_PORT", "9999")
    s = Settings()
    assert s.kafka.bootstrap_servers == "k1:9093,k2:9093"
    assert s.kafka.first_host_port == ("k1", 9093)
    assert s.redis.uses_tls and s.redis.host_port == ("cache", 6380)
    assert s.topics.partitions == 12
    assert str(s.state_dir) == "/var/lib/streamrec"
    assert s.metrics_port == 9999


def test_sasl_ssl_maps_into_librdkafka_aiokafka_and_faust(monkeypatch, tmp_path):
    import ssl

    import certifi  # noqa: F401  (shipped with requests/httpx: a real CA bundle to load)

    ca = tmp_path / "ca.pem"
    ca.write_text(open(certifi.where()).read())
    monkeypatch.setenv("STREAMREC_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("STREAMREC_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("STREAMREC_KAFKA_SASL_USERNAME", "svc-streamrec")
    monkeypatch.setenv("STREAMREC_KAFKA_SASL_PASSWORD", "s3cret")
    monkeypatch.setenv("STREAMREC_KAFKA_SSL_CAFILE", str(ca))
    s = Settings()
    assert s.kafka.security_protocol is SecurityProtocol.SASL_SSL

    rd = s.kafka.librdkafka_config()
    assert rd["security.protocol"] == "SASL_SSL"
    assert rd["sasl.mechanism"] == "SCRAM-SHA-512"
    assert rd["sasl.username"] == "svc-streamrec" and rd["sasl.password"] == "s3cret"
    assert rd["ssl.ca.location"] == str(ca)

    ak = s.kafka.aiokafka_kwargs()
    assert ak["security_protocol"] == "SASL_SSL"
    assert ak["sasl_mechanism"] == "SCRAM-SHA-512"
    assert ak["sasl_plain_username"] == "svc-streamrec" and ak["sasl_plain_password"] == "s3cret"
    assert isinstance(ak["ssl_context"], ssl.SSLContext)

    creds = s.kafka.faust_broker_credentials()
    assert creds.username == "svc-streamrec" and creds.password == "s3cret"
    assert creds.mechanism.value == "SCRAM-SHA-512"

    # The librdkafka mapping is accepted by a real client (no connection is needed to build one).
    from confluent_kafka import Producer

    Producer(rd).flush(0)


def test_plaintext_has_no_security_keys():
    s = Settings()
    rd = s.kafka.librdkafka_config()
    assert rd["security.protocol"] == "PLAINTEXT"
    assert not any(k.startswith(("sasl.", "ssl.")) for k in rd)
    assert "ssl_context" not in s.kafka.aiokafka_kwargs()
    assert s.kafka.faust_broker_credentials() is None
    assert s.kafka.faust_broker_url() == "kafka://127.0.0.1:9092"


def test_redis_auth_and_tls_mapping(monkeypatch):
    monkeypatch.setenv("STREAMREC_REDIS_URL", "rediss://cache.internal:6380/0")
    monkeypatch.setenv("STREAMREC_REDIS_PASSWORD", "pw")
    monkeypatch.setenv("STREAMREC_REDIS_USERNAME", "streamrec")
    monkeypatch.setenv("STREAMREC_REDIS_SSL_CA_CERTS", "/etc/ssl/certs/ca-certificates.crt")
    s = Settings()
    kw = s.redis.client_kwargs()
    assert kw["password"] == "pw" and kw["username"] == "streamrec"
    assert kw["ssl_ca_certs"] == "/etc/ssl/certs/ca-certificates.crt"
    client = s.redis.client()  # builds a TLS connection pool without connecting
    conn_kwargs = client.connection_pool.connection_kwargs
    assert conn_kwargs["password"] == "pw" and conn_kwargs["host"] == "cache.internal"
    assert client.connection_pool.connection_class.__name__ == "SSLConnection"


def test_config_command_masks_secrets(monkeypatch):
    monkeypatch.setenv("STREAMREC_KAFKA_SASL_PASSWORD", "hunter2")
    monkeypatch.setenv("STREAMREC_REDIS_PASSWORD", "hunter3")
    from streamrec.settings import get_settings

    get_settings.cache_clear()
    try:
        out = CliRunner().invoke(main, ["config"])
        assert out.exit_code == 0, out.output
        assert "hunter2" not in out.output and "hunter3" not in out.output
        assert "STREAMREC_KAFKA_SASL_PASSWORD" in out.output and "**********" in out.output
        js = CliRunner().invoke(main, ["config", "--json"])
        data = json.loads(js.output)
        assert data["kafka"]["sasl_password"] == "**********"
        assert data["redis"]["password"] == "**********"
    finally:
        get_settings.cache_clear()
