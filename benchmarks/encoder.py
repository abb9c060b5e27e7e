"""``streamrec bench encoder``: sentences/s of the encoder engines.

On the CPU: torch eager (fp32) vs ONNX Runtime fp32 vs ONNX Runtime int8 (the served CPU
variant), at batch 1, 32 and 128 of texts of exactly ``--tokens`` tokens (32: real Online Retail
contexts, truncated), the model call only (tokenisation is the same for every engine and is
left out). Each engine runs in its own subprocess (ONNX Runtime's spinning threads would starve
torch in one process) with the same thread count; each figure is the median of ``--repeats``
timed repeats after a warm-up. Ratios come from one run: ``ratio_onnx_int8_vs_torch_bs32`` ...

On a machine with an NVIDIA GPU (torch.cuda or onnxruntime's CUDA provider present) also torch
CUDA fp16 vs ONNX Runtime CUDA fp16 vs TensorRT fp16 (``ratio_onnx_cuda_fp16_vs_torch_cuda_bs32``,
``ratio_onnx_trt_fp16_vs_torch_cuda_bs32``); without one that part is skipped and says so.
``--quick``: batch 1 and 32, 3 repeats (CI smoke run).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from streamrec.settings import get_settings

CPU_ENGINES = ("torch", "onnx_fp32", "onnx_int8")
GPU_ENGINES = ("torch_cuda_fp16", "onnx_cuda_fp16", "onnx_trt_fp16")


def bench_texts(n: int, tokens: int, tokenizer_file: Path, data_dir: Path | None = None) -> list[list[int]]:
    """``n`` token-id rows of exactly ``tokens`` tokens: Online Retail contexts (several item
    descriptions joined, as the encoder sees them), truncated."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.no_padding()
    tok.enable_truncation(max_length=tokens)
    try:
        from streamrec.datasets import load_dataset

        descr = load_dataset("online-retail", data_dir).items["text"].tolist()
    except FileNotFoundError:  # no data: fixed product-like sentences
        descr = [f"set of {k} vintage red heart lanterns with ribbon and glass holder" for k in range(50)]
    rng = np.random.default_rng(0)
    rows: list[list[int]] = []
    while len(rows) < n:
        text = " ; ".join(descr[i] for i in rng.choice(len(descr), size=8, replace=False))
        ids = tok.encode(text).ids
        if len(ids) == tokens:
            rows.append(ids)
    return rows


def _time_engine(
    run, ids: np.ndarray, batch_sizes: list[int], repeats: int, min_sentences: int
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    mask = np.ones_like(ids)
    for bs in batch_sizes:
        x, m = ids[:bs], mask[:bs]
        for _ in range(3):
            run(x, m)
        iters = max(2, min_sentences // bs)
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(iters):
                run(x, m)
            rates.append(iters * bs / (time.perf_counter() - t0))
        out[f"bs{bs}"] = {
            "sentences_per_s": statistics.median(rates),
            "repeats": [round(r, 1) for r in rates],
        }
    return out


def _worker(
    engine: str,
    model_dir: Path,
    batch_sizes: list[int],
    repeats: int,
    tokens: int,
    threads: int,
    min_sentences: int,
    tokenizer_file: Path,
) -> dict[str, Any]:
    """Time one engine in this process (called in a subprocess by the command). ``model_dir``: the
    Hugging Face folder for torch engines, the ONNX model folder for ONNX Runtime engines."""
    rows = bench_texts(max(batch_sizes), tokens, tokenizer_file)
    ids = np.asarray(rows, np.int64)
    if engine.startswith("torch"):
        import torch

        from inference.training.export import load_embedder

        torch.set_num_threads(threads)
        model, _ = load_embedder(model_dir)
        device = "cuda" if engine == "torch_cuda_fp16" else "cpu"
        if device == "cuda":
            model = model.half().to(device)

        def run(x, m):
            with torch.inference_mode():
                out = model(torch.from_numpy(x).to(device), torch.from_numpy(m).to(device))
                if device == "cuda":
                    torch.cuda.synchronize()
                return out

    else:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        file = {
            "onnx_fp32": "model.onnx",
            "onnx_int8": "model.int8.onnx",
            "onnx_cuda_fp16": "model.fp16.onnx",
            "onnx_trt_fp16": "model.onnx",
        }[engine]
        providers: list[Any] = ["CPUExecutionProvider"]
        if engine == "onnx_cuda_fp16":
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        elif engine == "onnx_trt_fp16":
            cache = str(model_dir / ".trt-cache")
            trt = {"trt_fp16_enable": True, "trt_engine_cache_enable": True, "trt_engine_cache_path": cache}
            providers = [("TensorrtExecutionProvider", trt), "CUDAExecutionProvider", "CPUExecutionProvider"]
        sess = ort.InferenceSession(str(model_dir / file), sess_options=so, providers=providers)
        used = sess.get_providers()[0]
        if engine != "onnx_fp32" and engine != "onnx_int8" and used == "CPUExecutionProvider":
            return {"skipped": f"{engine}: ONNX Runtime fell back to the CPU provider"}

        def run(x, m):
            return sess.run(None, {"input_ids": x, "attention_mask": m})

    res = _time_engine(run, ids, batch_sizes, repeats, min_sentences)
    return {"engine": engine, "threads": threads, **res}


def _gpu_available() -> str | None:
    """A reason to skip the GPU part, or None when there is an NVIDIA GPU to use."""
    try:
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu on a GPU machine)"
        import torch

        if not torch.cuda.is_available():
            return "torch sees no CUDA device"
    except Exception as exc:  # pragma: no cover - import problems
        return f"GPU check failed: {exc}"
    return None


def _pretrained_bench_dir(variants: tuple[str, ...]) -> Path:
    from inference.encoder import OnnxEncoder
    from inference.training.export import export_pretrained

    s = get_settings()
    folder = s.state_dir.resolve() / "cache" / f"bench-pretrained-{'-'.join(variants)}"
    try:
        OnnxEncoder(folder, s.encoder, variant="fp32")
    except Exception:
        export_pretrained(folder, max_len=s.encoder.max_len, variants=variants)
    return folder


@click.command("encoder")
@click.option("--quick", is_flag=True, help="Batch 1 and 32, 3 repeats (CI smoke run).")
@click.option("--output", type=click.Path(path_type=Path), default=None, help="Write the results as JSON.")
@click.option("--tokens", type=int, default=32, show_default=True, help="Tokens per sentence.")
@click.option("--repeats", type=int, default=None, help="Timed repeats per figure (default 7, quick 3).")
@click.option("--threads", type=int, default=None, help="Threads per engine (default: all cores).")
def encoder(quick: bool, output: Path | None, tokens: int, repeats: int | None, threads: int | None) -> None:
    """Encoder throughput: torch eager vs ONNX fp32 vs ONNX int8 (CPU), and GPU engines when present."""
    from inference.training.export import default_base_model

    s = get_settings()
    batch_sizes = [1, 32] if quick else [1, 32, 128]
    repeats = repeats or (3 if quick else 7)
    threads = threads or os.cpu_count() or 1
    min_sentences = 32 if quick else 512
    gpu_skip = _gpu_available()
    variants = ("fp32", "int8") if gpu_skip else ("fp32", "int8", "fp16")
    onnx_dir = _pretrained_bench_dir(variants)
    base_dir = Path(s.encoder.base_model or default_base_model())
    engines = list(CPU_ENGINES) + ([] if gpu_skip else list(GPU_ENGINES))
    results: dict[str, Any] = {
        "bench": "encoder",
        "quick": quick,
        "tokens": tokens,
        "batch_sizes": batch_sizes,
        "repeats": repeats,
        "threads": threads,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "what": "sentences/s of the model call (tokenisation excluded), median of repeats; "
        "one subprocess per engine",
        "engines": {},
    }
    for eng in engines:
        folder = base_dir if eng.startswith("torch") else onnx_dir
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.encoder",
            eng,
            str(folder),
            ",".join(map(str, batch_sizes)),
            str(repeats),
            str(tokens),
            str(threads),
            str(min_sentences),
            str(onnx_dir / "tokenizer.json"),
        ]
        click.echo(f"timing {eng} ...", err=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise click.ClickException(f"{eng} bench failed:\n{proc.stderr[-3000:]}")
        results["engines"][eng] = json.loads(proc.stdout.strip().splitlines()[-1])

    def rate(eng: str, bs: int) -> float | None:
        r = results["engines"].get(eng, {}).get(f"bs{bs}")
        return r["sentences_per_s"] if r else None

    for bs in batch_sizes:
        for a, b in (
            ("onnx_int8", "torch"),
            ("onnx_fp32", "torch"),
            ("onnx_int8", "onnx_fp32"),
            ("onnx_cuda_fp16", "torch_cuda_fp16"),
            ("onnx_trt_fp16", "torch_cuda_fp16"),
        ):
            ra, rb = rate(a, bs), rate(b, bs)
            if ra and rb:
                results[f"ratio_{a}_vs_{b}_bs{bs}"] = round(ra / rb, 3)
    results["gpu"] = {"skipped": gpu_skip} if gpu_skip else {"engines": list(GPU_ENGINES)}
    table = [
        "| engine | " + " | ".join(f"bs{b} sent/s" for b in batch_sizes) + " |",
        "|---|" + "---:|" * len(batch_sizes),
    ]
    for eng, r in results["engines"].items():
        cells = [f"{r[f'bs{b}']['sentences_per_s']:.1f}" if f"bs{b}" in r else "—" for b in batch_sizes]
        table.append(f"| {eng} | " + " | ".join(cells) + " |")
    click.echo("\n".join(table))
    click.echo(json.dumps({k: v for k, v in results.items() if k.startswith("ratio_")}, indent=2))
    if gpu_skip:
        click.echo(f"GPU part skipped: {gpu_skip}")
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=2))
        click.echo(f"wrote {output}")


def _main(argv: list[str]) -> None:
    """Subprocess entry: ``python -m benchmarks.encoder ENGINE FOLDER BATCHES REPEATS TOKENS THREADS MIN TOKENIZER``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    engine, folder, bss, repeats, tokens, threads, min_sentences, tok_file = argv
    res = _worker(
        engine,
        Path(folder),
        [int(b) for b in bss.split(",")],
        int(repeats),
        int(tokens),
        int(threads),
        int(min_sentences),
        Path(tok_file),
    )
    print(json.dumps(res))


if __name__ == "__main__":
    _main(sys.argv[1:])
