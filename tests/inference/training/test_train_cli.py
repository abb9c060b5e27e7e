"""`streamrec train -> export -> index -> encode` on a third dataset in the generic format (no code
change), `streamrec eval loo` and `streamrec bench encoder --quick`. CI trains a few steps only;
the full runs are documented in inference/README.md."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from inference.manifest import verify_model_dir
from streamrec.cli import main


def _invoke(args: list[str], env: dict[str, str]) -> str:
    res = CliRunner().invoke(main, args, env=env, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def test_train_export_index_encode_on_a_generic_dataset(generic_dataset_dir: Path, tmp_path: Path) -> None:
    from streamrec.settings import get_settings

    get_settings.cache_clear()
    env = {"STREAMREC_STATE_DIR": str(tmp_path / "state"), "STREAMREC_ENCODER_MAX_LEN": "32"}
    out = tmp_path / "train"
    try:
        _invoke(["train", "--dataset", str(generic_dataset_dir), "--out", str(out), "--max-steps", "24",
                 "--batch-size", "16", "--lr", "2e-4", "--eval-every", "12", "--eval-users", "0",
                 "--patience", "5"], env)  # fmt: skip
        history = json.loads((out / "metrics.json").read_text())
        assert history[0]["step"] == 0 and history[-1]["step"] == 24
        assert {"recall@10", "ndcg@10", "recall@50", "ndcg@50", "mrr"} <= set(history[-1]["valid"])
        pretrained, best = history[0]["valid"]["ndcg@10"], max(h["valid"]["ndcg@10"] for h in history)
        # the successor of an item is not guessable from its words: only fine-tuning learns it
        assert best > pretrained + 0.1, history
        state = json.loads((out / "best" / "streamrec_train.json").read_text())
        assert state["metrics"]["valid"]["ndcg@10"] == best and "test" in state["metrics"]

        model = tmp_path / "model"
        _invoke(
            ["export", "--checkpoint", str(out / "best"), "--out", str(model), "--variants", "fp32,int8"], env
        )
        m = verify_model_dir(model)
        assert (
            m.version.startswith("minilm-ft-") and m.max_len == 32 and m.metrics["valid"]["ndcg@10"] == best
        )
        assert m.parity["fp32_max_abs_diff_vs_torch"] <= 1e-4 and m.parity["int8_min_cosine_vs_fp32"] >= 0.98
        assert m.training["context_items"] == 10

        _invoke(["index", "--dataset", str(generic_dataset_dir), "--model-dir", str(model)], env)
        meta = json.loads((model / "catalog" / "meta.json").read_text())
        assert meta["n"] == 24 and meta["model_version"] == m.version

        text = _invoke(["encode", "amber quartz gadget", "--model-dir", str(model)], env)
        rec = json.loads(text.strip().splitlines()[-1])
        assert rec["model_version"] == m.version
        assert abs(np.linalg.norm(rec["vector"]) - 1.0) < 1e-3 and len(rec["vector"]) == 384
        near = json.loads(
            _invoke(["encode", "amber quartz gadget", "--model-dir", str(model), "--top", "3"], env)
        )
        assert len(near["nearest"]) == 3

        # stage two: the user model over the cached item vectors, exported beside the encoder
        _invoke(["train-user", "--dataset", str(generic_dataset_dir), "--model-dir", str(model), "--epochs", "3",
                 "--eval-users", "0", "--layers", "1"], env)  # fmt: skip
        um = json.loads((model / "user" / "manifest.json").read_text())
        assert um["text_model_version"] == m.version and set(um["variants"]) == {"fp32", "int8"}
        assert um["metrics"]["parity"]["fp32_max_abs_diff"] <= 1e-4
        assert um["metrics"]["parity"]["int8_min_cosine"] >= 0.95
        assert set(um["files"]) == {
            "user_items.onnx",
            "user_model.onnx",
            "user_model.int8.onnx",
            "residuals.npz",
            "covisit.npz",
            "tower.safetensors",  # the torch weights the graphs came from (bench's torch engine)
        }
        # the served model is refit on train + valid for the epochs chosen on valid (no selection on test)
        refit = um["metrics"]["refit"]
        assert refit["splits"] == ["train", "valid"] and refit["epochs"] == um["metrics"]["best"]["epoch"]
        assert refit["examples"] > um["metrics"]["examples"]
        # the co-visitation seed: the train split counted on the catalog's rows
        from inference.catalog import CatalogIndex
        from inference.covisit import load_covisit

        cat = CatalogIndex.load(model / "catalog")
        seed = load_covisit(model, cat.ids, cat.index_of)
        assert seed is not None and seed[0].nnz > 0 and seed[1] == 20

        # and the served path evaluates it, beside the baselines and the ID-only sequential model
        out_json = tmp_path / "loo.json"
        _invoke(["eval", "loo", "--dataset", str(generic_dataset_dir), "--model-dir", str(model),
                 "--results-dir", str(tmp_path / "res"), "--output", str(out_json)], env)  # fmt: skip
        res = json.loads(out_json.read_text())
        assert set(res) == {
            "most_popular",
            "item_knn",
            "sasrec (ID-only)",
            "text only (profile blend)",
            "text + user model",
            "text + co-visitation",
            "streamrec",
        }
        assert all(
            0 <= r["recall@10"] <= r["recall@50"] <= 1 and r["n"] == res["item_knn"]["n"]
            for r in res.values()
        )
        # a model that saw the valid split is refused there, with the command that makes one to tune on it
        bad = CliRunner().invoke(main, ["eval", "loo", "--dataset", str(generic_dataset_dir), "--split", "valid",
                                        "--model-dir", str(model), "--no-sasrec"], env=env)  # fmt: skip
        assert bad.exit_code == 2 and "train-user --no-refit" in bad.output
    finally:
        get_settings.cache_clear()


def test_eval_loo_writes_markdown_plot_and_json(retail_model_dir: Path, tmp_path: Path) -> None:
    from streamrec.settings import get_settings

    get_settings.cache_clear()
    env = {"STREAMREC_STATE_DIR": str(retail_model_dir.parents[1])}  # reuse the cached pretrained export
    out = tmp_path / "loo.json"
    try:
        text = _invoke(["eval", "loo", "--dataset", "online-retail", "--model-dir", str(retail_model_dir),
                        "--max-users", "150", "--no-sasrec", "--results-dir", str(tmp_path / "res"),
                        "--output", str(out)], env)  # fmt: skip
    finally:
        get_settings.cache_clear()
    res = json.loads(out.read_text())
    assert set(res) == {
        "most_popular",
        "item_knn",
        "text only (profile blend)",
        "text + user model",
        "text + co-visitation",
        "streamrec",
    }
    assert (
        res["streamrec"]["n"] == 150
        and 0 <= res["streamrec"]["recall@10"] <= res["streamrec"]["recall@50"] <= 1
    )
    # streamrec's gains over every other row, paired on the same users: the reported differences
    gains = res["streamrec"].pop("gain_vs")
    assert set(gains) == set(res) - {"streamrec"}
    for name, g in gains.items():
        for metric in ("ndcg@10", "recall@10"):
            mean, lo, hi = g[metric]
            assert mean == pytest.approx(res["streamrec"][metric] - res[name][metric])
            assert lo <= mean <= hi
    # the cached retail model has no user model: the served row is the profile blend + co-visitation
    assert res["streamrec"] == res["text + co-visitation"]
    assert gains["text + co-visitation"]["ndcg@10"] == [0.0, 0.0, 0.0]  # the same lists: no gain, no doubt
    assert res["text + user model"] == res["text only (profile blend)"]
    assert res["streamrec"]["ndcg@10"] != res["text only (profile blend)"]["ndcg@10"]
    assert (tmp_path / "res" / "loo-online-retail-test.png").stat().st_size > 1000
    md = (tmp_path / "res" / "loo-online-retail-test.md").read_text()
    assert "history items are excluded" in md and "| item_knn |" in md
    assert "| streamrec against | ndcg@10 gain (90 % interval) |" in md
    assert "history items are excluded" in text


def test_bench_encoder_quick_json(tmp_path: Path, retail_model_dir: Path) -> None:
    from streamrec.settings import get_settings

    get_settings.cache_clear()
    out = tmp_path / "bench.json"
    env = {"STREAMREC_STATE_DIR": str(retail_model_dir.parents[1])}  # the bench's export is cached there
    try:
        _invoke(["bench", "encoder", "--quick", "--output", str(out), "--repeats", "2"], env)
    finally:
        get_settings.cache_clear()
    res = json.loads(out.read_text())
    assert set(res["engines"]) >= {"torch", "onnx_fp32", "onnx_int8"}
    for key in (
        "ratio_onnx_int8_vs_torch_bs32",
        "ratio_onnx_fp32_vs_torch_bs32",
        "ratio_onnx_int8_vs_torch_bs1",
    ):
        assert res[key] > 0
    assert res["engines"]["onnx_int8"]["bs32"]["sentences_per_s"] > 0
    assert len(res["engines"]["torch"]["bs1"]["repeats"]) == 2
    assert "skipped" in res["gpu"] or "engines" in res["gpu"]
