"""The user model at serving time: a user's recent events (+ fresh query) → context vector p.

p enters u_i = softmax(α·h_iᵀp) exactly as the profile blend does; the scorer calls
:meth:`OnnxUserModel.contexts` once per batch of users (one ONNX Runtime call, micro-batched by
the push path). What the model reads is the profile's ``recent_events`` (item id, type, time;
newest first), turned into arrays by :func:`event_arrays`, the one feature definition shared with
training (``inference/training/user_model.py``).

The model is two graphs. The item projection (``user_items.onnx``: catalog vectors (V, dim) →
(V, d)) runs once per catalog, and again when the catalog's vectors change
(``CatalogIndex.revision``); each call then gathers the events' rows from it, so the per-user
graph does no 384 → d product (a fifth of its work). The encoder (``user_model.onnx``) takes
(:func:`encode_feeds`):

    x      (B, N, d)   float32  projected vectors of the events' items (the projection's bias where padded)
    mean   (B, dim)    float32  mean of the events' catalog vectors
    types  (B, N)      int64    index in ``profiles.model.EVENT_TYPES``
    age    (B, N)      float32  log1p(minutes from the event to the reference time)
    mask   (B, N)      float32  1 for a real event
    query  (B, dim)    float32  the fresh search query vector (0 without one)
    qmask  (B, 1)      float32  1 when there is a fresh query
    → p    (B, dim)    float32  unit rows

Folders exported before the split hold one graph that takes the gathered item vectors
(``items`` (B, N, dim)) instead of ``x`` and ``mean``; they are served as they are.

On disk, ``<model dir>/user/``::

    manifest.json        version, n_events, dim, text model version, sha256 of every file, metrics
    user_items.onnx      the item projection (fp32)
    user_model.onnx      fp32 encoder; user_model.int8.onnx dynamically quantised for the CPU
    residuals.npz        item_ids, vectors: learned per-item offsets (the collaborative part) added
                         to the warm items' text vectors before normalising; new items have none
    covisit.npz          the co-visitation seed (counts fitted on the training events, the window)
    tower.safetensors    the torch weights the graphs were exported from (``bench user-model``'s
                         torch engine, re-exports); never read by the worker

No torch here.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from inference.derived import Derived
from inference.manifest import ModelFolderError, sha256_file
from streamrec.events import EventType

log = logging.getLogger(__name__)

USER_DIR = "user"
MANIFEST = "manifest.json"
VARIANT_FILES = {"fp32": "user_model.onnx", "int8": "user_model.int8.onnx"}
PROJECTION_FILE = "user_items.onnx"
RESIDUALS = "residuals.npz"
# the torch weights (benchmarks, re-export); the worker reads the ONNX graphs
TOWER_FILE = "tower.safetensors"
INPUTS = ("items", "types", "age", "mask", "query", "qmask")  # the torch tower; folders before the split
ENCODE_INPUTS = ("x", "mean", "types", "age", "mask", "query", "qmask")
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

    def rows(self, sel: Any) -> EventArrays:
        """The users ``sel`` (an index array, mask or slice) of these arrays."""
        return EventArrays(self.idx[sel], self.types[sel], self.age[sel], self.mask[sel])


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


def encode_feeds(
    table: np.ndarray, matrix: np.ndarray, arrays: EventArrays, query: np.ndarray, has_query: np.ndarray
) -> dict[str, np.ndarray]:
    """The encoder's inputs for a batch: ``table`` is the catalog's projection with the
    projection's bias appended as its last row (what padded slots read), ``matrix`` the catalog
    vectors (for the mean). Two gathers, no product over the item dimension."""
    b, n = arrays.idx.shape
    mask = np.asarray(arrays.mask, np.float32)
    rows = np.where(mask > 0, arrays.idx, table.shape[0] - 1)
    weights = mask / np.maximum(mask.sum(1, keepdims=True), 1.0)
    if b * n <= 2048:  # small batches (the live path at low load): a sparse product costs more
        mean = np.einsum("bn,bnd->bd", weights, matrix[np.maximum(arrays.idx, 0)])
    else:  # large ones: no (B, N, dim) intermediate
        rows_of = np.arange(0, b * n + 1, n)
        weighted = sp.csr_matrix(
            (weights.ravel(), np.maximum(arrays.idx, 0).ravel(), rows_of), shape=(b, matrix.shape[0])
        )
        mean = weighted @ matrix
    return {
        "x": table[rows],
        "mean": np.asarray(mean, np.float32),
        "types": arrays.types,
        "age": arrays.age,
        "mask": mask,
        "query": np.asarray(query, np.float32),
        "qmask": np.asarray(has_query, np.float32).reshape(-1, 1),
    }


def project_catalog(projection: Any, matrix: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """The item projection's ONNX Runtime ``session`` over the catalog vectors, plus its output
    for a zero vector (the bias) as the last row: the ``table`` of :func:`encode_feeds`."""
    rows = np.vstack([matrix, np.zeros((1, matrix.shape[1]), matrix.dtype)]).astype(np.float32, copy=False)
    parts = [projection.run(None, {"items": rows[s : s + chunk]})[0] for s in range(0, rows.shape[0], chunk)]
    return np.concatenate(parts).astype(np.float32, copy=False)


def graphs_version(files: Mapping[str, str]) -> str:
    """``user-<12 hex>`` from the sha256 of the graphs a folder serves (fp32 encoder + projection)."""
    digest = files[VARIANT_FILES["fp32"]]
    if PROJECTION_FILE in files:
        digest = hashlib.sha256((digest + files[PROJECTION_FILE]).encode()).hexdigest()
    return "user-" + digest[:12]


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
        names = {i.name for i in self.session.get_inputs()}
        # The item projection (split layout), or None: a folder whose graph takes item vectors.
        self.projection = (
            ort.InferenceSession(str(self.folder / PROJECTION_FILE), so, providers=wanted)
            if "x" in names
            else None
        )
        self._projected = Derived(lambda m: project_catalog(self.projection, m))
        log.info("user model %s (%s, %d events) on %s", self.version, variant, self.n_events, self.provider)

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Raw call of the encoder graph (inputs of the module doc) → (B, dim) unit rows."""
        return np.asarray(self.session.run(None, feeds)[0], np.float32)

    def table(self, matrix: np.ndarray, revision: int | None = None) -> np.ndarray:
        """The catalog's projection (+ the bias row for padding), computed once per catalog:
        again when ``matrix`` is another array, changes shape, or ``revision`` changes (pass the
        catalog's ``revision`` where its vectors change in place)."""
        assert self.projection is not None
        return self._projected.get(matrix, revision)

    def contexts(
        self,
        matrix: np.ndarray,
        arrays: EventArrays,
        query: np.ndarray,
        has_query: np.ndarray,
        max_batch: int = 1024,
        revision: int | None = None,
    ) -> np.ndarray:
        """p for a batch of users whose events index the catalog ``matrix`` (``revision``: see
        :meth:`table`)."""
        b = arrays.idx.shape[0]
        out = np.zeros((b, self.dim), np.float32)
        table = self.table(matrix, revision) if self.projection is not None else None
        for s in range(0, b, max_batch):
            sl = slice(s, min(b, s + max_batch))
            part = arrays.rows(sl)
            if table is not None:
                out[sl] = self.run(encode_feeds(table, matrix, part, query[sl], has_query[sl]))
                continue
            items = matrix[np.maximum(part.idx, 0)] * part.mask[..., None]  # a folder before the split
            out[sl] = self.run(
                {
                    "items": items.astype(np.float32, copy=False),
                    "types": part.types,
                    "age": part.age,
                    "mask": part.mask,
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
