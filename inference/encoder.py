"""Serving the encoder: ONNX Runtime + the ``tokenizers`` fast tokenizer, no torch.

:class:`OnnxEncoder` loads a verified model folder (:mod:`inference.manifest`), picks the
execution providers from settings (TensorRT -> CUDA -> CPU, those this onnxruntime build has)
and the variant (``auto``: fp16 on CUDA, fp32 with TensorRT's own fp16 on TensorRT, int8 on the
CPU), logs the provider actually in use and exports it as ``streamrec_encoder_provider``
(onnxruntime-gpu silently falls back to the CPU when CUDA fails to load). Texts are tokenised
once, sorted by length and run in batches padded to the longest text of each batch; on a GPU
the inputs and output go through IO binding.

:class:`MicroBatcher` gathers concurrent single-text requests (asyncio) into batches of up to
``max_batch`` texts or ``max_wait_ms`` of waiting, and runs each batch in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import Tokenizer

from inference import metrics
from inference.manifest import Manifest, ModelFolderError, verify_model_dir
from streamrec.settings import EncoderSettings, Settings

if TYPE_CHECKING:
    import onnxruntime as ort


def _ort() -> Any:
    """onnxruntime, imported on first use: a worker without a query encoder does not need it."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError(
            "onnxruntime is not installed: install streamrec with the `cpu` extra (onnxruntime) or the "
            "`gpu` extra (onnxruntime-gpu), or run the worker with `--encoder none`"
        ) from exc
    return onnxruntime


log = logging.getLogger(__name__)

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
VARIANTS = ("auto", "fp32", "int8", "fp16")


def choose_providers(requested: Sequence[str], available: Sequence[str] | None = None) -> list[str]:
    """The requested providers this onnxruntime build offers, in the requested order; CPU last always."""
    available = list(_ort().get_available_providers() if available is None else available)
    chosen = [p for p in requested if p in available and p != "CPUExecutionProvider"]
    return [*chosen, "CPUExecutionProvider"]


def choose_variant(requested: str, providers: Sequence[str], manifest: Manifest) -> str:
    """``auto``: TensorRT -> fp32 graph (TensorRT builds its own fp16 engine); CUDA -> fp16 when
    exported; CPU -> int8 when exported; fp32 otherwise. An explicit variant must exist."""
    if requested not in VARIANTS:
        raise ValueError(f"encoder variant {requested!r} unknown; use one of {VARIANTS}")
    if requested != "auto":
        manifest.variant_file(requested)  # raises a clear error when absent
        return requested
    first = providers[0]
    if first == "TensorrtExecutionProvider":
        return "fp32"
    if first == "CUDAExecutionProvider" and "fp16" in manifest.variants:
        return "fp16"
    if first == "CPUExecutionProvider" and "int8" in manifest.variants:
        return "int8"
    return "fp32"


class OnnxEncoder:
    """M(text) -> unit float32 vectors with ONNX Runtime (implements streamrec.interfaces.TextEncoder).

    ``folder`` is a model folder (verified against its manifest at load; a folder that fails is
    refused with :class:`~inference.manifest.ModelFolderError`). ``variant`` overrides
    ``settings.variant``; ``providers`` overrides ``settings.providers``.
    """

    def __init__(
        self,
        folder: Path | str,
        settings: EncoderSettings | None = None,
        variant: str | None = None,
        providers: Sequence[str] | None = None,
        batch_size: int = 64,
    ) -> None:
        self.folder = Path(folder)
        self.settings = settings or EncoderSettings()
        requested_variant = variant or self.settings.variant
        manifest = verify_model_dir(self.folder, variants=None)
        self.manifest = manifest
        self.model_version: str = manifest.version
        self.base_model: str = manifest.base_model
        self.dim: int = int(manifest.dim)
        self.max_len: int = int(manifest.max_len)
        self.batch_size = batch_size
        wanted = choose_providers(providers or self.settings.providers)
        self.variant = choose_variant(requested_variant, wanted, manifest)
        self.session = self._session(wanted)
        self.provider: str = self.session.get_providers()[0]
        if requested_variant == "auto" and self.provider != wanted[0]:
            # The GPU provider did not load (onnxruntime falls back silently): serve the CPU variant.
            log.warning("encoder: %s requested but ONNX Runtime uses %s", wanted[0], self.provider)
            cpu_variant = choose_variant("auto", ["CPUExecutionProvider"], manifest)
            if cpu_variant != self.variant:
                self.variant = cpu_variant
                self.session = self._session(["CPUExecutionProvider"])
                self.provider = self.session.get_providers()[0]
        self.on_gpu = self.provider in GPU_PROVIDERS
        self.output_name = manifest.output
        self.tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=self.max_len)
        self.pad_id = self._pad_id()
        log.info(
            "encoder %s (%s, dim %d, max_len %d) on %s",
            self.model_version,
            self.variant,
            self.dim,
            self.max_len,
            self.provider,
        )
        metrics.set_provider(self.provider)
        metrics.set_model(self.model_version, self.base_model, self.variant)

    # -- setup ---------------------------------------------------------------------------
    def _session(self, providers: list[str]) -> ort.InferenceSession:
        so = _ort().SessionOptions()
        so.graph_optimization_level = _ort().GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = _ort().ExecutionMode.ORT_SEQUENTIAL
        if self.settings.intra_op_threads > 0:
            so.intra_op_num_threads = self.settings.intra_op_threads
        so.inter_op_num_threads = 1
        if not self.settings.allow_spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts: list[tuple[str, dict[str, Any]]] = []
        for p in providers:
            if p == "TensorrtExecutionProvider":
                cache = str(self.folder / ".trt-cache")
                trt = {
                    "trt_fp16_enable": True,
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": cache,
                }
                opts.append((p, trt))
            else:
                opts.append((p, {}))
        path = self.folder / self.manifest.variant_file(self.variant)
        try:
            return _ort().InferenceSession(str(path), sess_options=so, providers=opts)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelFolderError(f"ONNX Runtime could not load {path}: {exc}") from exc

    def _pad_id(self) -> int:
        cfg = self.tokenizer.padding
        if cfg and "pad_id" in cfg:
            return int(cfg["pad_id"])
        for tok in ("[PAD]", "<pad>"):
            tid = self.tokenizer.token_to_id(tok)
            if tid is not None:
                return int(tid)
        return 0

    # -- encoding ------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, truncated to ``max_len`` (with the special tokens)."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def encode(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """(n, dim) float32 unit rows. Texts are sorted by token length and run in batches padded
        to the longest of each batch; the result is in the input order."""
        texts = [t if isinstance(t, str) else str(t) for t in texts]
        out = np.zeros((len(texts), self.dim), np.float32)
        if not texts:
            return out
        ids = self.tokenize(texts)
        lengths = np.fromiter((len(x) for x in ids), np.int64, len(ids))
        order = np.argsort(lengths, kind="stable")
        bs = batch_size or self.batch_size
        for start in range(0, len(order), bs):
            rows = order[start : start + bs]
            out[rows] = self._run_ids([ids[r] for r in rows])
        return out

    def _run_ids(self, ids: list[list[int]]) -> np.ndarray:
        t0 = time.perf_counter()
        width = max(len(x) for x in ids)
        input_ids = np.full((len(ids), width), self.pad_id, np.int64)
        mask = np.zeros((len(ids), width), np.int64)
        for r, x in enumerate(ids):
            input_ids[r, : len(x)] = x
            mask[r, : len(x)] = 1
        if self.on_gpu:
            emb = self._run_io_binding(input_ids, mask)
        else:
            emb = self.session.run([self.output_name], {"input_ids": input_ids, "attention_mask": mask})[0]
        emb = np.asarray(emb, np.float32)
        # The graph normalises already; renormalise after fp16/int8 rounding.
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        metrics.encoder_seconds.observe(time.perf_counter() - t0)
        metrics.encoder_batch_size.observe(len(ids))
        return emb

    def _run_io_binding(self, input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """GPU path: inputs copied once to the device, output allocated there, one copy back."""
        binding = self.session.io_binding()
        for name, arr in (("input_ids", input_ids), ("attention_mask", mask)):
            binding.bind_ortvalue_input(name, _ort().OrtValue.ortvalue_from_numpy(arr, "cuda", 0))
        binding.bind_output(self.output_name, "cuda", 0)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def __repr__(self) -> str:
        return f"OnnxEncoder({self.model_version!r}, variant={self.variant}, provider={self.provider})"


def load_encoder(settings: Settings) -> OnnxEncoder:
    """The served encoder: ``settings.resolved_model_dir``, verified, variant from settings."""
    folder = settings.resolved_model_dir
    if not (folder / "manifest.json").exists():
        raise ModelFolderError(
            f"no model in {folder}: run `streamrec train`, `streamrec export --out {folder}` and "
            f"`streamrec index --model-dir {folder}` (or set STREAMREC_MODEL_DIR)"
        )
    return OnnxEncoder(folder, settings.encoder)


class MicroBatcher:
    """Gathers concurrent ``await encode(text)`` calls into encoder batches.

    A batch closes when it holds ``max_batch`` texts or ``max_wait_ms`` after its first text
    arrived; it runs in a worker thread (the event loop keeps serving) and the encoder sorts its
    texts by length to cut padding. Starts on first use or with :meth:`start`; :meth:`stop`
    finishes what is queued. Also an async context manager.
    """

    def __init__(self, encoder: Any, max_batch: int = 64, max_wait_ms: float = 5.0) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.encoder = encoder
        self.max_batch = max_batch
        self.max_wait_s = max(max_wait_ms, 0.0) / 1000.0
        # (text, future of its vector); a None future is the stop sentinel.
        self._queue: asyncio.Queue[tuple[str, asyncio.Future[np.ndarray] | None]] | None = None
        self._task: asyncio.Task[None] | None = None
        self.batches = 0  # batches run (for tests and logs)

    async def __aenter__(self) -> MicroBatcher:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the gathering task on the running event loop (idempotent)."""
        if self.running:
            return
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="encoder-microbatcher")

    async def stop(self) -> None:
        """Encode what is queued, then stop the task."""
        if not self.running or self._queue is None:
            return
        assert self._task is not None  # running
        await self._queue.put(("", None))  # sentinel
        await self._task
        self._task = None

    async def encode(self, text: str) -> np.ndarray:
        """The (dim,) unit vector of ``text``."""
        if not self.running:
            self.start()
        fut: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        assert self._queue is not None  # started above
        await self._queue.put((text, fut))
        return await fut

    async def encode_many(self, texts: Sequence[str]) -> np.ndarray:
        """(n, dim) for several texts, through the same batches."""
        vecs = await asyncio.gather(*(self.encode(t) for t in texts))
        return np.stack(vecs) if vecs else np.zeros((0, self.encoder.dim), np.float32)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue
        assert queue is not None
        stopping = False
        while not stopping:
            text, fut = await queue.get()
            if fut is None:
                break
            batch = [(text, fut)]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                timeout = deadline - loop.time()
                try:
                    item = (
                        queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(queue.get(), timeout)
                    )
                except (TimeoutError, asyncio.QueueEmpty):
                    break
                next_text, next_fut = item
                if next_fut is None:
                    stopping = True
                    break
                batch.append((next_text, next_fut))
            live = [(t, f) for t, f in batch if not f.done()]
            if not live:
                continue
            # Sorted by length here too, so one batch's texts are padded to similar lengths.
            live.sort(key=lambda tf: len(tf[0]))
            try:
                vecs = await loop.run_in_executor(None, self.encoder.encode, [t for t, _ in live])
            except Exception as exc:  # delivered to every waiting caller
                for _, f in live:
                    if not f.done():
                        f.set_exception(exc)
                continue
            self.batches += 1
            for (_, f), v in zip(live, vecs, strict=True):
                if not f.done():
                    f.set_result(v)
