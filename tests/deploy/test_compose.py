"""deploy/docker-compose.yml, deploy/Dockerfile and the Grafana provisioning agree with each other.

`docker compose config` parses the file without an engine; it runs when the docker client with
the compose plugin is installed (skipped otherwise). The structural checks always run.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from test_k8s import IMAGE_REPO, field_default, project_version, settings_env_names

from devstack.stack import kafka_version
from streamrec.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
GRAFANA = DEPLOY / "grafana"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _compose_plugin() -> bool:
    if shutil.which("docker") is None:
        return False
    proc = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
    return proc.returncode == 0


@pytest.mark.skipif(not _compose_plugin(), reason="docker client with the compose plugin not installed")
def test_docker_compose_config_parses():
    proc = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 0, f"docker compose config failed:\n{proc.stderr}"
    resolved = json.loads(proc.stdout)
    assert {"kafka", "redis", "worker", "prometheus", "grafana"} <= set(resolved["services"])


def _volume(spec: str) -> tuple[str, str, str]:
    """(source, target, mode) of a short volume syntax ``src:/target[:ro]`` (src may hold ${A:-b})."""
    m = re.fullmatch(r"(.*):(/[^:]*)(?::(ro|rw))?", spec)
    assert m, f"cannot parse volume {spec!r}"
    return m.group(1), m.group(2), m.group(3) or "rw"


def test_services_and_images(compose):
    services = compose["services"]
    assert {"kafka", "redis", "worker", "prometheus", "grafana"} <= set(services)
    # The same Kafka release as the local stack (deploy/local/pom.xml).
    assert services["kafka"]["image"] == f"apache/kafka:{kafka_version(DEPLOY / 'local')}"
    env = services["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller", "single-node KRaft"
    assert services["worker"]["image"] == f"{IMAGE_REPO}:{project_version()}-cpu"
    assert services["worker"]["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (DEPLOY / services["worker"]["build"]["context"] / "pyproject.toml").is_file()


def test_worker_env_ports_and_model_volume(compose, monkeypatch):
    worker = compose["services"]["worker"]
    env = {k: str(v) for k, v in worker["environment"].items()}
    unknown = {k for k in env if k.startswith("STREAMREC_")} - settings_env_names()
    assert not unknown, f"not streamrec settings: {sorted(unknown)}"
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = Settings(_env_file=None)
    # Kafka and Redis are the compose services, on their in-network ports.
    host, port = s.kafka.first_host_port
    assert host == "kafka"
    assert (
        f"INTERNAL://kafka:{port}"
        in compose["services"]["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    )
    assert s.redis.host_port[0] == "redis"
    assert (s.web_port, s.metrics_port) == (field_default("web_port"), field_default("metrics_port"))
    published = {int(p.split(":")[1]) for p in worker["ports"]}
    assert published == {s.web_port, s.metrics_port}
    mounts = {_volume(v)[1]: _volume(v) for v in worker["volumes"]}
    assert mounts[str(s.model_dir)][2] == "ro", "the model is mounted read-only"
    assert "STREAMREC_MODEL_HOST_DIR" in mounts[str(s.model_dir)][0]


def test_prometheus_scrapes_the_worker(compose):
    prom = compose["services"]["prometheus"]
    assert "./prometheus:/etc/prometheus:ro" in prom["volumes"]
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert cfg["rule_files"] == ["rules.yml"] and (DEPLOY / "prometheus" / "rules.yml").is_file()
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    worker_targets = [t for sc in jobs["streamrec-worker"]["static_configs"] for t in sc["targets"]]
    assert worker_targets == [f"worker:{field_default('metrics_port')}"]
    assert jobs["streamrec-worker"]["static_configs"][0]["labels"]["gpu"] == "false"
    assert jobs["streamrec-worker-gpu"]["static_configs"][0]["labels"]["gpu"] == "true"


def test_grafana_provisioning(compose):
    graf = compose["services"]["grafana"]
    mounts = {_volume(v)[0]: _volume(v)[1] for v in graf["volumes"]}
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert "9090:9090" in compose["services"]["prometheus"]["ports"]
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "streamrec.yml").read_text())
    (provider,) = prov["providers"]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    # Every panel and variable uses the provisioned datasource.
    for path in (GRAFANA / "dashboards").glob("*.json"):
        dash = json.loads(path.read_text())
        uids = set(re.findall(r'"uid":\s*"([^"]+)"', json.dumps(dash["panels"] + dash["templating"]["list"])))
        assert uids == {source["uid"]}, f"{path.name} uses datasources {uids}"


def test_dashboard_panels(compose):
    dash = json.loads((GRAFANA / "dashboards" / "streamrec.json").read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in panels}
    required = {
        "throughput": "streamrec_events_valid_total",
        "lag": "streamrec_consumer_lag",
        "latency percentiles": "histogram_quantile(0.99, sum by (le) (rate(streamrec_event_to_result_seconds_bucket",
        "batch latency": "streamrec_batch_processing_seconds_bucket",
        "dead letters by reason": "sum by (reason) (rate(streamrec_events_dead_lettered_total",
        "anomalies raised": "streamrec_anomalies_raised_total",
        "anomalies active": "streamrec_anomalies_active",
        "provider": "streamrec_encoder_provider",
        "model version": "streamrec_model_info",
        "results published": "streamrec_results_published_total",
        "redis latency": "streamrec_redis_seconds_bucket",
        "encoder latency": "streamrec_encoder_seconds_bucket",
        "scoring latency": "streamrec_scoring_seconds_bucket",
    }
    missing = [what for what, needle in required.items() if not any(needle in e for e in exprs.values())]
    assert not missing, f"dashboard lacks panels for: {missing}"
    # No two panels overlap on the 24-column grid.
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine


def test_dockerfile():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^ARG STREAMREC_EXTRAS=cpu$", text, re.M)
    assert 'pip install ".[${STREAMREC_EXTRAS}]"' in text
    assert 'ENTRYPOINT ["streamrec"]' in text and 'CMD ["worker"]' in text  # runs `streamrec worker`
    assert 'VOLUME ["/models"]' in text and "STREAMREC_MODEL_DIR=/models" in text
    env_text = "\n".join(ln for ln in text.splitlines() if not ln.startswith(("ARG ", "#")))  # runtime only
    env_names = set(re.findall(r"\b(STREAMREC_[A-Z0-9_]+)=", env_text))
    assert env_names and env_names <= settings_env_names(), env_names - settings_env_names()
    assert f"EXPOSE {field_default('web_port')} {field_default('metrics_port')}" in text
    # Every package of pyproject's find-include is copied into the image.
    for pkg in ("streamrec", "streams", "profiles", "inference", "alerts"):
        assert f"COPY {pkg} ./{pkg}" in text
    lines = (REPO / ".dockerignore").read_text().splitlines()
    ignore = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    assert ".venv" in ignore and ".streamrec" in ignore and "README.md" not in ignore
