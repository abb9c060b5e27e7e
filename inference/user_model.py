"""The user model at serving time: a user's recent events (+ fresh query) → context vector p.

p enters u_i = softmax(α·h_iᵀp) exactly as the profile blend does; the scorer calls
:meth:`OnnxUserModel.contexts` once per batch of users (one ONNX Runtime call, micro-batched by
the push path). What the model reads is the profile's ``recent_events`` (item id, type, time;
newest first), turned into arrays by :func:`event_arrays`, the one feature definition shared with
training (``inference/training/user_model.py``):

    items  (B, N, dim) float32  catalog vectors of the events' items (0 where padded)
    types  (B, N)      int64    index in ``profiles.model.EVENT_TYPES``
    age    (B, N)      float32  log1p(minutes from the event to the reference time)
    mask   (B, N)      float32  1 for a real event
    query  (B, dim)    float32  the fresh search query vector (0 without one)
    qmask  (B, 1)      float32  1 when there is a fresh query
    → p    (B, dim)    float32  unit rows

On disk, ``<model dir>/user/``::

    manifest.json        version, n_events, dim, text model version, sha256 of every file, metrics
    user_model.onnx      fp32 graph; user_model.int8.onnx dynamically quantised for the CPU
    residuals.npz        item_ids, vectors: learned per-item offsets (the collaborative part) added
                         to the warm items' text vectors before normalising; new items have none

No torch here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inference.manifest import ModelFolderError, sha256_file
from streamrec.events import EventType

log = logging.getLogger(__name__)

USER_DIR = "user"
MANIFEST = "manifest.json"
VARIANT_FILES = {"fp32": "user_model.onnx", "int8": "user_model.int8.onnx"}
RESIDUALS = "residuals.npz"
INPUTS = ("items", "types", "age", "mask", "query", "qmask")
TYPE_CODES = {t.value: k for k, t in enumerate(EventType)}  # profiles.model.EVENT_TYPES order
N_TYPES = len(TYPE_CODES)


@dataclass
class UserModelManifest:
    version: str
    dim: int
    n_events: int
    text_model_version: str  # the item encoder whose vectors it was trained on
    variants: list[str]
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


def read_user_manifest(folder: Path, verify: bool = True) -> UserModelManifest:
    """The manifest of a user-model folder; ``verify`` checks every file's sha256."""
    path = folder / MANIFEST
    if not path.is_file():
        raise ModelFolderError(f"no user model in {folder}: train one with `streamrec train-user`")
    m = UserModelManifest(**json.loads(path.read_text()))
    if verify:
        for rel, digest in m.files.items():
            f = folder / rel
            if not f.is_file() or sha256_file(f) != digest:
                raise ModelFolderError(
                    f"{f} is missing or does not match {path}; re-run `streamrec train-user`"
                )
    return m


@dataclass
class EventArrays:
    """:func:`event_arrays` output; ``idx`` holds catalog rows (-1 = padding or unknown item)."""

    idx: np.ndarray  # (B, N) int64
    types: np.ndarray  # (B, N) int64
    age: np.ndarray  # (B, N) float32
    mask: np.ndarray  # (B, N) float32


def event_arrays(
    events: Sequence[Sequence[Sequence[Any]]],
    ref_ms: Sequence[int] | np.ndarray,
    index_of: Any,
    n: int,
) -> EventArrays:
    """Ragged ``[item_id, type, ts]`` lists (newest first) → padded arrays of their first ``n``
    known items. ``index_of`` maps item ids to catalog rows (-1 unknown). Vectorised: one id
    lookup for the whole batch."""
    b = len(events)
    cut = [list(e)[:n] for e in events]
    lens = np.fromiter((len(e) for e in cut), np.int64, b)
    flat = [x for e in cut for x in e]
    rows = np.repeat(np.arange(b), lens)
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(lens) - lens, lens)
    idx = np.full((b, n), -1, np.int64)
    types = np.zeros((b, n), np.int64)
    age = np.zeros((b, n), np.float32)
    if flat:
        idx[rows, cols] = index_of([str(x[0]) for x in flat])
        types[rows, cols] = [TYPE_CODES.get(str(x[1]), 0) for x in flat]
        ts = np.fromiter((int(x[2]) for x in flat), np.int64, len(flat))
        ref = np.asarray(ref_ms, np.int64)[rows]
        age[rows, cols] = np.log1p(np.maximum(ref - ts, 0) / 60_000.0)
    mask = (idx >= 0).astype(np.float32)
    types[idx < 0] = 0
    age[idx < 0] = 0.0
    return EventArrays(idx, types, age, mask)


def apply_residuals(catalog: Any, folder: Path) -> int:
    """Add the user model's per-item residuals to the catalog's vectors (re-normalised); returns
    how many items got one. Items without one (new since training) keep their text vector."""
    path = folder / RESIDUALS
    if not path.is_file():
        return 0
    with np.load(path, allow_pickle=False) as z:
        ids = [str(x) for x in z["item_ids"]]
        vecs = np.asarray(z["vectors"], np.float32)
    rows = catalog.index_of(ids)
    ok = rows >= 0
    m = catalog.matrix.copy()
    m[rows[ok]] += vecs[ok]
    catalog.replace_vectors(m)
    return int(ok.sum())


class OnnxUserModel:
    """The exported user model on ONNX Runtime (CPU, or the GPU providers when available)."""

    def __init__(
        self,
        folder: Path | str,
        variant: str = "auto",
        providers: Sequence[str] | None = None,
        threads: int = 0,
    ) -> None:
        from inference.encoder import _ort, choose_providers

        self.folder = Path(folder)
        self.manifest = read_user_manifest(self.folder)
        self.n_events = int(self.manifest.n_events)
        self.dim = int(self.manifest.dim)
        self.version = self.manifest.version
        ort = _ort()
        wanted = choose_providers(providers or ["CPUExecutionProvider"])
        on_gpu = wanted[0] != "CPUExecutionProvider"
        if variant == "auto":
            variant = "fp32" if on_gpu or "int8" not in self.manifest.variants else "int8"
        if variant not in self.manifest.variants:
            raise ModelFolderError(f"user model variant {variant!r} not in {self.manifest.variants}")
        self.variant = variant
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(self.folder / VARIANT_FILES[variant]), so, providers=wanted)
        self.provider = self.session.get_providers()[0]
        log.info("user model %s (%s, %d events) on %s", self.version, variant, self.n_events, self.provider)

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Raw call: the six inputs of the module doc → (B, dim) unit rows."""
        return np.asarray(self.session.run(None, feeds)[0], np.float32)

    def contexts(
        self,
        matrix: np.ndarray,
        arrays: EventArrays,
        query: np.ndarray,
        has_query: np.ndarray,
        max_batch: int = 1024,
    ) -> np.ndarray:
        """p for a batch of users: item vectors gathered from the catalog ``matrix``."""
        b = arrays.idx.shape[0]
        out = np.zeros((b, self.dim), np.float32)
        for s in range(0, b, max_batch):
            sl = slice(s, min(b, s + max_batch))
            idx = arrays.idx[sl]
            items = matrix[np.maximum(idx, 0)] * arrays.mask[sl][..., None]
            out[sl] = self.run(
                {
                    "items": items.astype(np.float32, copy=False),
                    "types": arrays.types[sl],
                    "age": arrays.age[sl],
                    "mask": arrays.mask[sl],
                    "query": np.asarray(query[sl], np.float32),
                    "qmask": np.asarray(has_query[sl], np.float32).reshape(-1, 1),
                }
            )
        return out


def load_user_model(
    model_dir: Path,
    catalog: Any,
    variant: str = "auto",
    providers: Sequence[str] | None = None,
    residuals: bool = True,
    threads: int = 0,
) -> OnnxUserModel | None:
    """The user model of a model folder (None when it has none), its residuals applied to
    ``catalog`` (unless ``residuals`` is false: ``inference.catalog.load_catalog`` did it).
    ``threads``: ONNX Runtime intra-op threads (0 = its default, one per core).

    Refused when it was trained on other item vectors than the catalog's."""
    folder = Path(model_dir) / USER_DIR
    if not (folder / MANIFEST).is_file():
        return None
    um = OnnxUserModel(folder, variant=variant, providers=providers, threads=threads)
    if um.manifest.text_model_version != catalog.model_version:
        raise ModelFolderError(
            f"user model in {folder} was trained on {um.manifest.text_model_version} item vectors, the catalog is "
            f"{catalog.model_version}: re-run `streamrec train-user --model-dir {model_dir}`"
        )
    if residuals:
        log.info("user model: residuals for %d items", apply_residuals(catalog, folder))
    return um
