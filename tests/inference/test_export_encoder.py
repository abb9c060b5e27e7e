"""Export, manifest verification and the ONNX Runtime encoder on real item texts."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from prometheus_client import REGISTRY

from inference.encoder import MicroBatcher, OnnxEncoder, choose_providers, choose_variant, load_encoder
from inference.manifest import ModelFolderError, read_manifest, verify_model_dir
from streamrec.interfaces import TextEncoder
from streamrec.settings import EncoderSettings, Settings


def test_fp32_matches_torch_and_int8_keeps_cosine(pretrained_dir: Path, real_texts: list[str]) -> None:
    from inference.training.export import load_embedder, resolve_base_model, torch_encode

    model, tok = load_embedder(resolve_base_model(None))
    ref = torch_encode(model, tok, real_texts, max_len=64)
    fp32 = OnnxEncoder(pretrained_dir, variant="fp32").encode(real_texts)
    int8 = OnnxEncoder(pretrained_dir, variant="int8").encode(real_texts)
    assert np.abs(fp32 - ref).max() <= 1e-4
    cos = (int8 * fp32).sum(1)
    assert cos.min() >= 0.98, f"int8 cosine to fp32 down to {cos.min():.4f}"
    m = read_manifest(pretrained_dir)
    assert m.parity["fp32_max_abs_diff_vs_torch"] <= 1e-4
    assert m.parity["int8_min_cosine_vs_fp32"] >= 0.98


def test_graph_has_pooling_inside_and_dynamic_axes(pretrained_dir: Path) -> None:
    g = onnx.load(str(pretrained_dir / "model.onnx"), load_external_data=False).graph
    assert [i.name for i in g.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in g.output] == ["sentence_embedding"]
    for inp in g.input:
        dims = inp.type.tensor_type.shape.dim
        assert dims[0].dim_param and dims[1].dim_param, "batch and sequence axes must be dynamic"
    out_dims = g.output[0].type.tensor_type.shape.dim
    assert len(out_dims) == 2 and out_dims[0].dim_param == "batch"  # pooled inside: (batch, dim)
    enc = OnnxEncoder(pretrained_dir, variant="fp32")
    for texts in (["a"], ["lantern", "a much longer description of a red heart hanging lantern"] * 3):
        v = enc.encode(texts)
        assert v.shape == (len(texts), 384)
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def test_manifest_lists_every_file_with_its_hash(pretrained_dir: Path) -> None:
    m = verify_model_dir(pretrained_dir)
    assert m.dim == 384 and m.max_len == 64
    assert m.version.startswith("minilm-pretrained-")
    assert set(m.variants) == {"fp32", "int8"}
    assert {"tokenizer.json", "vocab.txt"} <= set(m.tokenizer_files)
    on_disk = {p.relative_to(pretrained_dir).as_posix() for p in pretrained_dir.rglob("*") if p.is_file()}
    assert set(m.files) == on_disk - {"manifest.json"}
    assert all(len(h) == 64 for h in m.files.values())


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "tokenizer.json").write_text((d / "tokenizer.json").read_text().replace("lantern", "xantern")), "sha256"),
        (lambda d: (d / "model.int8.onnx").unlink(), "missing"),
        (lambda d: (d / "manifest.json").unlink(), "not a streamrec model folder"),
        (lambda d: (d / "manifest.json").write_text("{not json"), "not valid JSON"),
    ],
)  # fmt: skip
def test_damaged_folder_is_refused(pretrained_dir: Path, tmp_path: Path, damage, message: str) -> None:
    d = tmp_path / "m"
    shutil.copytree(pretrained_dir, d)
    OnnxEncoder(d)  # intact copy loads
    with open(d / "model.onnx", "rb") as f:
        assert f.read(4)
    damage(d)
    with pytest.raises(ModelFolderError, match=message):
        OnnxEncoder(d)


def test_tampered_weights_are_refused(pretrained_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "m"
    shutil.copytree(pretrained_dir, d)
    raw = bytearray((d / "model.onnx").read_bytes())
    raw[-100] ^= 0xFF
    (d / "model.onnx").write_bytes(bytes(raw))
    with pytest.raises(ModelFolderError, match=r"model\.onnx: sha256 differs"):
        OnnxEncoder(d)


def test_encoder_contract_order_provider_and_metrics(pretrained_dir: Path) -> None:
    enc = OnnxEncoder(pretrained_dir, EncoderSettings(variant="auto"))
    assert isinstance(enc, TextEncoder)
    assert enc.provider == "CPUExecutionProvider" and enc.variant == "int8"  # auto on the CPU
    texts = ["red heart lantern", "x", "set of 3 cake tins pantry design with a long description " * 3, ""]
    real = texts[:1] + texts[2:3] + ["JUMBO BAG RED RETROSPOT", "PACK OF 72 RETROSPOT CAKE CASES"]
    batch = enc.encode(real)
    one_by_one = np.stack([enc.encode([t])[0] for t in real])
    # int8 quantises activations per batch, so a text's vector moves a little with its batch-mates
    assert (batch * one_by_one).sum(1).min() >= 0.98
    assert enc.encode([]).shape == (0, 384)
    val = REGISTRY.get_sample_value
    assert val("streamrec_encoder_provider", {"provider": "CPUExecutionProvider"}) == 1.0
    assert val("streamrec_encoder_provider", {"provider": "CUDAExecutionProvider"}) == 0.0
    assert (
        val(
            "streamrec_model_info",
            {"version": enc.model_version, "base_model": enc.base_model, "variant": "int8"},
        )
        == 1.0
    )
    assert val("streamrec_encoder_batch_size_count") > 0
    exact = OnnxEncoder(pretrained_dir, variant="fp32")
    np.testing.assert_allclose(  # fp32: length sorting keeps the input order exactly
        exact.encode(texts), np.stack([exact.encode([t])[0] for t in texts]), atol=1e-5
    )


def test_provider_and_variant_choice(pretrained_dir: Path) -> None:
    m = read_manifest(pretrained_dir)
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(gpu, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert choose_providers(gpu, ["CUDAExecutionProvider", "CPUExecutionProvider"]) == gpu[1:]
    assert choose_variant("auto", ["CPUExecutionProvider"], m) == "int8"
    assert choose_variant("auto", ["TensorrtExecutionProvider"], m) == "fp32"  # TensorRT builds fp16 itself
    assert choose_variant("auto", ["CUDAExecutionProvider"], m) == "fp32"  # no fp16 exported here
    with pytest.raises(ModelFolderError, match="variant 'fp16' is not in this model folder"):
        choose_variant("fp16", ["CPUExecutionProvider"], m)


def test_load_encoder_without_model_says_what_to_do(tmp_path: Path) -> None:
    s = Settings(state_dir=tmp_path)
    with pytest.raises(ModelFolderError, match="streamrec train"):
        load_encoder(s)


def test_serving_modules_do_not_import_torch() -> None:
    code = (
        "import sys, inference.encoder, inference.catalog, inference.metrics; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


class _Recording:
    """Wraps an encoder and records each batch it is given."""

    def __init__(self, enc: OnnxEncoder) -> None:
        self.enc, self.dim, self.batches = enc, enc.dim, []

    def encode(self, texts):
        self.batches.append(list(texts))
        return self.enc.encode(texts)


def test_micro_batcher_gathers_sorts_and_matches(pretrained_dir: Path) -> None:
    enc = OnnxEncoder(pretrained_dir, variant="fp32")
    rec = _Recording(enc)
    texts = [f"{'very ' * (k % 7)}red lantern number {k}" for k in range(50)]

    async def main():
        async with MicroBatcher(rec, max_batch=16, max_wait_ms=50) as mb:
            return await asyncio.gather(*(mb.encode(t) for t in texts))

    vecs = np.stack(asyncio.run(main()))
    np.testing.assert_allclose(vecs, enc.encode(texts), atol=1e-5)
    sizes = [len(b) for b in rec.batches]
    assert sum(sizes) == 50 and max(sizes) <= 16 and len(sizes) <= 6  # gathered, not one by one
    assert all(b == sorted(b, key=len) for b in rec.batches)  # sorted by length


def test_micro_batcher_single_request_and_errors(pretrained_dir: Path) -> None:
    enc = OnnxEncoder(pretrained_dir, variant="fp32")

    class Broken:
        dim = 384

        def encode(self, texts):
            raise RuntimeError("encoder down")

    async def main():
        mb = MicroBatcher(enc, max_batch=64, max_wait_ms=1)
        v = await asyncio.wait_for(mb.encode("lantern"), 30)  # starts itself, returns after max_wait
        await mb.stop()
        assert not mb.running
        async with MicroBatcher(Broken(), max_batch=4, max_wait_ms=1) as bad:
            with pytest.raises(RuntimeError, match="encoder down"):
                await bad.encode("x")
            # the batcher survives a failed batch
            with pytest.raises(RuntimeError):
                await bad.encode("y")
        return v

    v = asyncio.run(main())
    np.testing.assert_allclose(v, enc.encode(["lantern"])[0], atol=1e-5)
