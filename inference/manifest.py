"""The model folder and its manifest: what a served model is, verified at every load.

A model folder holds::

    manifest.json        version, base_model, dim, max_len, pooling, variants, tokenizer files,
                         sha256 of every other file, evaluation metrics, parity checks
    model.onnx           fp32 graph: (input_ids, attention_mask) -> sentence_embedding (unit rows)
    model.int8.onnx      dynamically quantised (per channel) for the CPU
    model.fp16.onnx      optional, for the GPU
    tokenizer.json, tokenizer_config.json, special_tokens_map.json, vocab.txt ...
    catalog/             the embedded catalog (inference.catalog), not covered by the manifest

This module needs neither torch nor onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
VARIANT_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx", "fp16": "model.fp16.onnx"}
OUTPUT_NAME = "sentence_embedding"
INPUT_NAMES = ("input_ids", "attention_mask")


class ModelFolderError(RuntimeError):
    """A model folder is missing, incomplete or tampered with."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Manifest:
    """The contents of ``manifest.json``."""

    version: str
    base_model: str
    dim: int
    max_len: int
    variants: list[str]
    tokenizer_files: list[str]
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    pooling: str = "mean"
    normalized: bool = True
    opset: int = 17
    output: str = OUTPUT_NAME
    inputs: list[str] = field(default_factory=lambda: list(INPUT_NAMES))
    metrics: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    format: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        known = set(cls.__dataclass_fields__)
        missing = [k for k in ("version", "base_model", "dim", "max_len", "variants", "files") if k not in d]
        if missing:
            raise ModelFolderError(f"manifest lacks required fields {missing}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def variant_file(self, variant: str) -> str:
        if variant not in self.variants:
            raise ModelFolderError(
                f"variant {variant!r} is not in this model folder (has {self.variants}); "
                "export it with `streamrec export --variants ...` or pick another variant"
            )
        return VARIANT_FILES[variant]


def write_manifest(folder: Path, manifest: Manifest) -> Manifest:
    """Hash every file of ``folder`` (except the manifest and ``catalog/``) into the manifest and write it."""
    folder = Path(folder)
    files: dict[str, str] = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel != MANIFEST and not rel.startswith("catalog/"):
            files[rel] = sha256_file(p)
    manifest.files = files
    for v in manifest.variants:
        if VARIANT_FILES[v] not in files:
            raise ModelFolderError(f"variant {v} listed but {VARIANT_FILES[v]} is missing in {folder}")
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(manifest.to_json())
    tmp.replace(folder / MANIFEST)
    return manifest


def read_manifest(folder: Path) -> Manifest:
    """The manifest of ``folder`` without checking the files (see :func:`verify_model_dir`)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ModelFolderError(
            f"{path} not found: {folder} is not a streamrec model folder; "
            "build one with `streamrec train` + `streamrec export` (or inference.training.export.export_pretrained)"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelFolderError(f"{path} is not valid JSON ({exc}); re-export the model") from exc
    return Manifest.from_dict(data)


def verify_model_dir(folder: Path, variants: list[str] | None = None) -> Manifest:
    """Read the manifest and check the sha256 of every listed file (all of them, or only the tokenizer
    files plus ``variants`` when given). Raises :class:`ModelFolderError` naming what is wrong."""
    folder = Path(folder)
    m = read_manifest(folder)
    if "tokenizer.json" not in m.tokenizer_files:
        raise ModelFolderError(f"{folder}: the manifest lists no tokenizer.json (fast tokenizer needed)")
    wanted = set(m.files)
    if variants is not None:
        wanted = {f for f in m.files if f in m.tokenizer_files or f in {m.variant_file(v) for v in variants}}
        wanted |= {m.variant_file(v) for v in variants}
    problems: list[str] = []
    for rel in sorted(wanted):
        p = folder / rel
        if rel not in m.files:
            problems.append(f"{rel}: not listed in the manifest")
        elif not p.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(p) != m.files[rel]:
            problems.append(f"{rel}: sha256 differs from the manifest (modified or corrupt)")
    if problems:
        raise ModelFolderError(
            f"model folder {folder} failed verification: " + "; ".join(problems) + ". Refusing to load it; "
            "re-export the model (`streamrec export`) or restore the folder."
        )
    return m
