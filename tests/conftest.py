"""Fixtures shared by every test package.

Tests run against the real local stack that `make test` starts (`streamrec up`):
Kafka at STREAMREC_KAFKA_BOOTSTRAP_SERVERS, Redis at STREAMREC_REDIS_URL. Each test
gets its own topic names and Redis key prefix, so tests never see each other's data.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from devstack.stack import kafka_healthy, redis_healthy
from streamrec.settings import Settings

REPO = Path(__file__).resolve().parents[1]

# Shared helpers and fixtures (tests/support/), importable as `support.*` (pytest `pythonpath`).
pytest_plugins = ["support.worker", "support.demand", "support.servers"]


@pytest.fixture(scope="session")
def base_settings() -> Settings:
    return Settings()


@pytest.fixture(scope="session")
def stack(base_settings: Settings) -> Settings:
    """The live stack; fails (not skips) when it is down: the tests need real servers."""
    kok, kdetail = kafka_healthy(base_settings, timeout=5)
    rok, rdetail = redis_healthy(base_settings, timeout=2)
    if not (kok and rok):
        pytest.fail(
            f"the local stack is not up (kafka: {kdetail}; redis: {rdetail}); run `streamrec up` or `make test`"
        )
    return base_settings


@pytest.fixture
def uid() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def settings(stack: Settings, uid: str, tmp_path: Path) -> Settings:
    """Settings with per-test topics, Redis prefix, state dir and consumer group.

    Settings are frozen: a test that needs other values derives them with
    ``settings.override(group={...}, field=value)`` (see ``Settings.override``)."""
    return stack.override(
        topics={
            "events": f"t-{uid}.events",
            "results": f"t-{uid}.results",
            "dead_letter": f"t-{uid}.dlq",
            "alerts": f"t-{uid}.alerts",
        },
        redis={"prefix": f"t{uid}"},
        kafka={"consumer_group": f"g-{uid}"},
        state_dir=tmp_path / "state",
        web_port=_free_port(),
        metrics_port=_free_port(),
    )


@pytest.fixture
def redis_client(settings: Settings):
    client = settings.redis.client()
    yield client
    # Remove this test's keys.
    keys = list(client.scan_iter(match=f"*{settings.redis.prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = Path(os.environ.get("STREAMREC_DATA_DIR", REPO.parent / "shared" / "data"))
    if not d.exists():
        pytest.fail(f"real data not found at {d}; set STREAMREC_DATA_DIR")
    return d


@pytest.fixture(scope="session")
def retail_model_dir(data_dir: Path) -> Path:
    """A real model folder: the base encoder exported to ONNX (no fine-tuning) + the Online
    Retail catalog embedded with it. Built once and cached in the state dir (the manifest is
    verified at every load, so a stale or broken cache is rebuilt)."""
    from inference.catalog import CatalogIndex
    from inference.encoder import OnnxEncoder
    from inference.training.export import export_pretrained
    from inference.training.index import build_catalog
    from streamrec.datasets import load_dataset

    s = Settings()
    folder = s.state_dir.resolve() / "test-cache" / "pretrained-online-retail"
    try:
        OnnxEncoder(folder, s.encoder)
        CatalogIndex.load(folder / "catalog")
        return folder
    except Exception:
        pass
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    export_pretrained(folder, max_len=s.encoder.max_len, variants=("fp32",))
    enc = OnnxEncoder(folder, s.encoder)
    build_catalog(enc, load_dataset("online-retail", data_dir), folder / "catalog")
    return folder
