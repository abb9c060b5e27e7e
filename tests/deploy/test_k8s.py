"""deploy/k8s: the manifests parse and agree with the settings, the image and each other.

Structural checks in Python (no cluster, no kubectl needed): images, STREAMREC_* env names
(each must be a field of streamrec.settings.Settings) and values (they must validate), probes on
faust's web port, container ports equal to the settings defaults, the GPU request, the
PodMonitor selecting every worker pod, replicas bounded by partitions, and the PrometheusRule
equal to deploy/prometheus/rules.yml.

``python tests/deploy/test_k8s.py --write-prometheusrule`` regenerates deploy/k8s/prometheusrule.yaml.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from streamrec.settings import Settings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
PROMETHEUS_RULE = K8S / "prometheusrule.yaml"
SECRET_EXAMPLE = "secret.example.yaml"
IMAGE_REPO = "streamrec/streamrec"


def settings_env_names(model: type[BaseModel] = Settings) -> set[str]:
    """Every environment variable Settings reads: STREAMREC_<FIELD> and STREAMREC_<GROUP>_<FIELD>."""
    prefix = Settings.model_config.get("env_prefix", "STREAMREC_")
    names: set[str] = set()
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            names |= {f"{prefix}{name}_{sub}".upper() for sub in ann.model_fields}
        else:
            names.add(f"{prefix}{name}".upper())
    return names


def field_default(name: str) -> Any:
    return Settings.model_fields[name].default


def project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def load_docs() -> dict[str, list[dict]]:
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        out[path.name] = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return out


@pytest.fixture(scope="module")
def docs() -> dict[str, list[dict]]:
    return load_docs()


def by_kind(docs: dict[str, list[dict]], kind: str) -> list[dict]:
    return [d for ds in docs.values() for d in ds if d["kind"] == kind]


def deployments(docs) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in by_kind(docs, "Deployment")}


def containers(deployment: dict) -> list[dict]:
    return deployment["spec"]["template"]["spec"]["containers"]


def configmap(docs) -> dict[str, str]:
    (cm,) = by_kind(docs, "ConfigMap")
    return cm["data"]


def pod_env(docs, container: dict) -> dict[str, str]:
    """The container's STREAMREC_* environment: the ConfigMap (envFrom), then env (literal or secret)."""
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        assert src["configMapRef"]["name"] == "streamrec-config"
        env.update(configmap(docs))
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", "<from-secret>")
    return env


# -- tests ------------------------------------------------------------------------------------------


def test_every_manifest_parses_and_is_listed(docs):
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    resources = set(kust["resources"])
    for name, ds in docs.items():
        if name == "kustomization.yaml":
            continue
        for d in ds:
            assert {"apiVersion", "kind", "metadata"} <= set(d), f"{name}: not a Kubernetes object"
            assert d["metadata"].get("name"), f"{name}: object without a name"
        if name != SECRET_EXAMPLE:
            assert name in resources, f"{name} is not listed in kustomization.yaml"
    assert SECRET_EXAMPLE not in resources, "the example Secret (placeholders) must not be applied"
    assert all((K8S / r).is_file() for r in resources), "kustomization.yaml lists a missing file"
    assert kust["namespace"] == "streamrec"
    assert {d["metadata"]["name"] for d in by_kind(docs, "Namespace")} == {"streamrec"}


def test_settings_env_name_mapping():
    names = settings_env_names()
    assert {"STREAMREC_KAFKA_BOOTSTRAP_SERVERS", "STREAMREC_REDIS_PASSWORD", "STREAMREC_WEB_PORT"} <= names
    assert "STREAMREC_KAFKA" not in names  # groups are not variables themselves


def test_env_names_are_settings_and_values_validate(docs, monkeypatch):
    known = settings_env_names()
    envs = {}
    for dep in deployments(docs).values():
        for c in containers(dep):
            env = pod_env(docs, c)
            unknown = {k for k in env if k.startswith("STREAMREC_")} - known
            assert not unknown, f"{dep['metadata']['name']}: not streamrec settings: {sorted(unknown)}"
            envs[dep["metadata"]["name"]] = env
    assert set(configmap(docs)) <= known
    for name, env in envs.items():
        for k in [k for k in os.environ if k.startswith("STREAMREC_")]:
            monkeypatch.delenv(k)
        for k, v in env.items():
            monkeypatch.setenv(k, "placeholder" if v == "<from-secret>" else v)
        s = Settings(_env_file=None)  # the values must validate (enums, ints, JSON lists)
        assert s.kafka.uses_sasl and s.kafka.sasl_username == "placeholder", name
        assert s.redis.password is not None, name
        assert s.web_port == field_default("web_port") and s.metrics_port == field_default("metrics_port")
        assert str(s.model_dir) == "/models"
        if name.endswith("-gpu"):
            assert s.encoder.providers[0] == "CUDAExecutionProvider", "GPU pods must try CUDA first"
            assert s.encoder.providers[-1] == "CPUExecutionProvider"


def test_secrets_come_from_the_secret(docs):
    (secret,) = [d for d in load_docs()[SECRET_EXAMPLE] if d["kind"] == "Secret"]
    keys = set(secret["stringData"])
    assert all("CHANGE-ME" in v for v in secret["stringData"].values()), "the example must hold placeholders"
    for dep in deployments(docs).values():
        c = containers(dep)[0]
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c.get("env", []) if "valueFrom" in e}
        assert set(refs) == {
            "STREAMREC_KAFKA_SASL_USERNAME",
            "STREAMREC_KAFKA_SASL_PASSWORD",
            "STREAMREC_REDIS_PASSWORD",
        }
        for ref in refs.values():
            assert ref["name"] == secret["metadata"]["name"] and ref["key"] in keys
        assert not any(k.endswith(("PASSWORD", "USERNAME")) for k in configmap(docs)), "secret in ConfigMap"


def test_images_ports_and_probes(docs):
    version = project_version()
    deps = deployments(docs)
    assert set(deps) == {"streamrec-worker", "streamrec-worker-gpu"}
    web, metrics = field_default("web_port"), field_default("metrics_port")
    assert (web, metrics) == (6066, 9464)
    for name, dep in deps.items():
        (c,) = containers(dep)
        flavour = "gpu" if name.endswith("-gpu") else "cpu"
        assert c["image"] == f"{IMAGE_REPO}:{version}-{flavour}", f"{name}: image"
        assert c["args"] == ["worker"], f"{name}: must run `streamrec worker`"
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"web": web, "metrics": metrics}, f"{name}: ports"
        for probe, path in (
            ("livenessProbe", "/healthz"),
            ("readinessProbe", "/readyz"),
            ("startupProbe", "/healthz"),
        ):
            http = c[probe]["httpGet"]
            assert http["path"] == path, f"{name}: {probe} path"
            port = ports.get(http["port"], http["port"])
            assert port == web, f"{name}: {probe} must hit the faust web port {web}"
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        assert mounts["/models"]["readOnly"] is True
        assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 30


def test_gpu_deployment_requests_a_gpu(docs):
    deps = deployments(docs)
    gpu = containers(deps["streamrec-worker-gpu"])[0]["resources"]
    assert int(gpu["limits"]["nvidia.com/gpu"]) == 1
    cpu = containers(deps["streamrec-worker"])[0]["resources"]
    assert "nvidia.com/gpu" not in {**cpu.get("limits", {}), **cpu.get("requests", {})}
    labels = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in deps.items()}
    assert labels["streamrec-worker-gpu"]["streamrec.io/gpu"] == "true"
    assert labels["streamrec-worker"]["streamrec.io/gpu"] == "false"


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_selectors_services_and_podmonitor(docs):
    deps = deployments(docs)
    pods = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in deps.items()}
    for name, dep in deps.items():
        sel = dep["spec"]["selector"]["matchLabels"]
        owned = [p for p, labels in pods.items() if _matches(sel, labels)]
        assert owned == [name], f"{name}'s selector matches the pods of {owned}"
    (svc,) = by_kind(docs, "Service")
    assert all(_matches(svc["spec"]["selector"], labels) for labels in pods.values())
    assert svc["spec"]["ports"][0]["targetPort"] == "web"

    (pm,) = by_kind(docs, "PodMonitor")
    assert all(_matches(pm["spec"]["selector"]["matchLabels"], labels) for labels in pods.values())
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    assert ep["port"] == "metrics" and ep["path"] == "/metrics"
    relabel = {r["targetLabel"]: r for r in ep["relabelings"]}
    assert relabel["gpu"]["sourceLabels"] == ["__meta_kubernetes_pod_label_streamrec_io_gpu"]
    jobs = {r.get("replacement") for r in ep["relabelings"] if r["targetLabel"] == "job"}
    assert jobs == {"streamrec-worker", "streamrec-worker-gpu"}
    # The alert rules' job matcher covers both jobs.
    assert all(re.fullmatch("streamrec.*", j) for j in jobs)


def test_replicas_bounded_by_partitions(docs):
    partitions = int(configmap(docs)["STREAMREC_TOPICS_PARTITIONS"])
    deps = deployments(docs)
    total = sum(d["spec"]["replicas"] for d in deps.values())
    surge = max(int(d["spec"]["strategy"]["rollingUpdate"]["maxSurge"]) for d in deps.values())
    assert total + surge <= partitions, f"{total} replicas (+{surge} surge) > {partitions} partitions"


def prometheus_rule_doc() -> dict:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "streamrec",
            "labels": {"app.kubernetes.io/name": "streamrec", "release": "prometheus"},
        },
        "spec": {"groups": yaml.safe_load(RULES.read_text())["groups"]},
    }


def write_prometheus_rule() -> None:
    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
        style = "|" if "\n" in data else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)

    Dumper.add_representer(str, text)
    head = (
        "# The alert rules of deploy/prometheus/rules.yml for the Prometheus Operator.\n"
        "# GENERATED by `python tests/deploy/test_k8s.py --write-prometheusrule` from rules.yml\n"
        "# (tests/deploy/test_k8s.py checks they are equal): edit rules.yml, then regenerate.\n"
    )
    body = yaml.dump(prometheus_rule_doc(), Dumper=Dumper, sort_keys=False, width=10_000, allow_unicode=True)
    PROMETHEUS_RULE.write_text(head + body)


def test_prometheusrule_equals_rules_yml():
    got = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert got == prometheus_rule_doc(), (
        "deploy/k8s/prometheusrule.yaml differs from deploy/prometheus/rules.yml; regenerate it with "
        "`python tests/deploy/test_k8s.py --write-prometheusrule`"
    )


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed (structural checks above)")
def test_kustomize_builds():
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    kinds = {d["kind"] for d in yaml.safe_load_all(out.stdout) if d}
    assert {"Deployment", "Service", "ConfigMap", "PodMonitor", "PrometheusRule"} <= kinds


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-prometheusrule"]:
        write_prometheus_rule()
        print(f"wrote {PROMETHEUS_RULE}")
    else:
        sys.exit("usage: python tests/deploy/test_k8s.py --write-prometheusrule")
