"""Settings: env parsing and the one mapping per client library."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import annotated_types as at
import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from streamrec.cli import main
from streamrec.settings import (
    GROUPS,
    README_END,
    README_START,
    REPO_ROOT,
    SecurityProtocol,
    Settings,
    SettingsError,
    TrainSettings,
    get_settings,
    load_settings,
    readme_with_table,
    settings_fields,
    settings_table_markdown,
)


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


# -- validation, descriptions, frozen settings, the generated reference --------------------

BOUNDS = (at.Ge, at.Gt, at.Le, at.Lt)


@pytest.fixture
def fresh_settings():
    """get_settings() re-reads the environment inside the test, and the cache is clean after it."""
    get_settings.cache_clear()
    yield get_settings
    get_settings.cache_clear()


def test_every_field_of_every_group_has_a_description():
    missing = [f.env for f in settings_fields() if not (f.description or "").strip()]
    missing += [
        f"Settings.{n}" for n, i in Settings.model_fields.items() if not (i.description or "").strip()
    ]
    assert not missing, f"fields without a description: {missing}"
    assert set(GROUPS) <= set(Settings.model_fields)  # every group is reachable from Settings


def test_every_number_has_a_bound():
    unbounded = []
    for f in settings_fields():
        ann = f.info.annotation
        if ann in (int, float) and not any(isinstance(m, BOUNDS) for m in f.info.metadata):
            unbounded.append(f.env)
        if typing.get_origin(ann) is list:
            (item,) = typing.get_args(ann)
            base = typing.get_args(item)[0] if typing.get_origin(item) is typing.Annotated else item
            if base in (int, float):
                inner = [m for a in typing.get_args(item)[1:] for m in getattr(a, "metadata", [a])]
                if not any(isinstance(m, BOUNDS) for m in inner):
                    unbounded.append(f"{f.env} (items)")
    assert not unbounded, f"numeric fields without ge/gt/le/lt: {unbounded}"


def test_literals_and_case_insensitive_log_level(monkeypatch):
    monkeypatch.setenv("STREAMREC_LOG_LEVEL", "debug")
    monkeypatch.setenv("STREAMREC_ENCODER_VARIANT", "int8")
    s = load_settings()
    assert s.log_level == "DEBUG" and s.encoder.variant == "int8"


def test_invalid_value_fails_naming_the_environment_variable(monkeypatch, fresh_settings):
    monkeypatch.setenv("STREAMREC_STREAM_BATCH_MAX", "0")
    with pytest.raises(SettingsError) as info:
        fresh_settings()
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "invalid setting STREAMREC_STREAM_BATCH_MAX=0" in msg
    assert "greater than or equal to 1" in msg
    assert info.value.problems == [
        ("STREAMREC_STREAM_BATCH_MAX", "0", "Input should be greater than or equal to 1")
    ]


def test_every_bad_field_is_listed_and_secrets_stay_masked(monkeypatch):
    monkeypatch.setenv("STREAMREC_ENCODER_VARIANT", "gpu")
    monkeypatch.setenv("STREAMREC_WEB_PORT", "70000")
    monkeypatch.setenv("STREAMREC_ALERTS_SURGE_HORIZONS", "[0, 3]")
    monkeypatch.setenv("STREAMREC_ALERTS_P_RAISE", "1.5")
    with pytest.raises(SettingsError) as info:
        load_settings()
    names = [p[0] for p in info.value.problems]
    assert names == [
        "STREAMREC_ENCODER_VARIANT",
        "STREAMREC_ALERTS_SURGE_HORIZONS",
        "STREAMREC_ALERTS_P_RAISE",
        "STREAMREC_WEB_PORT",
    ]
    assert "STREAMREC_ALERTS_SURGE_HORIZONS=[0, 3]" in str(info.value)
    assert "'auto', 'fp32', 'int8' or 'fp16'" in str(info.value)


def test_unparsable_json_list_names_the_variable(monkeypatch):
    monkeypatch.setenv("STREAMREC_ENCODER_PROVIDERS", '["CPUExecutionProvider"')
    with pytest.raises(SettingsError, match="STREAMREC_ENCODER_PROVIDERS=.*not valid JSON"):
        load_settings()


def test_renamed_variables_fail_instead_of_being_ignored(monkeypatch):
    monkeypatch.setenv("STREAMREC_STREAM_SESSION_TIMEOUT_S", "10")
    monkeypatch.setenv("STREAMREC_ENCODER_TRAIN_BATCH_SIZE", "32")
    with pytest.raises(SettingsError) as info:
        load_settings()
    msg = str(info.value)
    assert "set STREAMREC_STREAM_CONSUMER_SESSION_TIMEOUT_S instead" in msg
    assert "set STREAMREC_TRAIN_BATCH_SIZE instead" in msg


def test_cli_turns_invalid_settings_into_an_error_without_traceback(monkeypatch, fresh_settings):
    monkeypatch.setenv("STREAMREC_STREAM_BATCH_MAX", "0")
    for args in (["config"], ["status"]):  # status would talk to Kafka: it must stop before
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2, res.output
        assert "invalid setting STREAMREC_STREAM_BATCH_MAX=0" in res.output
        assert "Traceback" not in res.output
        get_settings.cache_clear()


def test_streamrec_config_subprocess_exits_non_zero_naming_the_variable():
    exe = Path(sys.executable).parent / "streamrec"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
    env["STREAMREC_STREAM_BATCH_MAX"] = "0"
    res = subprocess.run([str(exe), "config"], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "STREAMREC_STREAM_BATCH_MAX" in res.stderr and "greater than or equal to 1" in res.stderr
    assert "Traceback" not in res.stderr


def test_settings_are_frozen():
    s = Settings()
    with pytest.raises(ValidationError, match="frozen"):
        s.topics.events = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        s.web_port = 1234  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        s.train.lr = 1e-3  # type: ignore[misc]


def test_override_is_a_validated_model_copy():
    s = Settings()
    t = s.override(topics={"events": "t-1.events"}, redis={"prefix": "t1"}, web_port="7070")
    assert (t.topics.events, t.redis.prefix, t.web_port) == ("t-1.events", "t1", 7070)
    assert t.topics.results == s.topics.results  # the rest of the group is kept
    assert s.topics.events == "streamrec.events" and s.redis.prefix == "sr"  # the original is untouched
    assert t.kafka is s.kafka  # groups not named are shared (they are frozen)
    with pytest.raises(ValidationError):
        s.override(stream={"batch_max": 0})
    with pytest.raises(ValidationError):
        s.override(metrics_port=0)
    with pytest.raises(TypeError, match="no field"):
        s.override(stream={"batch_maxx": 5})
    # the plain pydantic way works as well
    u = s.model_copy(update={"scoring": s.scoring.model_copy(update={"top_k": 5})})
    assert u.scoring.top_k == 5 and s.scoring.top_k == 20


def test_train_group_reads_its_own_variables(monkeypatch):
    monkeypatch.setenv("STREAMREC_TRAIN_BATCH_SIZE", "16")
    monkeypatch.setenv("STREAMREC_TRAIN_LOGQ", "false")
    monkeypatch.setenv("STREAMREC_TRAIN_CONTEXT_ITEMS", "5")
    s = load_settings()
    assert (s.train.batch_size, s.train.logq, s.train.context_items) == (16, False, 5)
    assert not any(n.startswith("train_") or n.startswith("context_") for n in s.encoder.model_fields)


def test_train_config_defaults_to_settings_train(monkeypatch):
    pytest.importorskip("torch")
    from inference.training.train import TrainConfig

    monkeypatch.setenv("STREAMREC_TRAIN_BATCH_SIZE", "16")
    s = load_settings()
    cfg = TrainConfig.from_settings(s, epochs=3, lr=None, dataset="scientific")
    assert (cfg.batch_size, cfg.epochs, cfg.lr, cfg.dataset) == (16, 3, s.train.lr, "scientific")
    assert cfg.max_len == s.encoder.max_len and cfg.data_dir == str(s.data_dir)
    # the hyperparameters are declared once, in TrainSettings
    assert set(TrainSettings.model_fields) <= set(TrainConfig.model_fields)
    assert TrainConfig().batch_size == TrainSettings().batch_size


def test_config_prints_descriptions_and_markdown(fresh_settings):
    out = CliRunner().invoke(main, ["config"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    i = next(k for k, ln in enumerate(lines) if ln.startswith("STREAMREC_STREAM_BATCH_MAX "))
    assert lines[i].split() == ["STREAMREC_STREAM_BATCH_MAX", "1000"]
    assert lines[i + 1].startswith("    One batch holds at most")
    assert max(len(ln) for ln in lines if ln.startswith("    ")) <= 110
    plain = CliRunner().invoke(main, ["config", "--no-describe"])
    assert all(ln.startswith("STREAMREC_") for ln in plain.output.splitlines())
    md = CliRunner().invoke(main, ["config", "--markdown"])
    assert md.exit_code == 0 and md.output == settings_table_markdown()


def test_settings_table_covers_every_field_without_machine_paths():
    table = settings_table_markdown()
    rows = [ln for ln in table.splitlines() if ln.startswith("| `STREAMREC_")]
    assert len(rows) == len(list(settings_fields()))
    assert "| `STREAMREC_STREAM_BATCH_MAX` | `1000` | ≥ 1 |" in table
    assert "| `STREAMREC_ALERTS_P_RAISE` | `1e-07` | 0 < x < 1 |" in table
    assert str(REPO_ROOT) not in table  # defaults under the checkout are shown as <repo>/...


def test_readme_settings_table_is_up_to_date():
    readme = (REPO_ROOT / "README.md").read_text()
    assert README_START in readme and README_END in readme
    assert readme_with_table(readme) == readme, (
        "README.md's settings table is stale: run `python -m streamrec.settings --write-readme` "
        "(or paste the output of `streamrec config --markdown` between the settings-table markers)"
    )
