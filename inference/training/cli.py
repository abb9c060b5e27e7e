"""``streamrec train | export | index | encode``: the encoder's life cycle.

    streamrec train --dataset scientific --out .streamrec/train/scientific   # fine-tune (torch)
    streamrec export --checkpoint .streamrec/train/scientific/best          # ONNX + manifest
    streamrec index --dataset scientific                                     # embed the catalog
    streamrec encode "red heart lantern" --top 5                             # ad-hoc texts

The model folder defaults to ``settings.resolved_model_dir`` (STREAMREC_MODEL_DIR or
<state_dir>/model). torch is imported by train and export only.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import click
import numpy as np

from streamrec.settings import get_settings


def _logging() -> None:
    logging.basicConfig(
        level=get_settings().log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


@click.command()
@click.option(
    "--dataset",
    default="online-retail",
    show_default=True,
    help="scientific, online-retail, or a generic dataset folder.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Checkpoint folder (default <state_dir>/train/<dataset>); best/ and last/ go inside.",
)
@click.option(
    "--base-model", default=None, help="Hugging Face encoder folder (default: settings / all-MiniLM-L6-v2)."
)
@click.option(
    "--max-len", type=int, default=None, help="Token limit of contexts and items (default: settings)."
)
@click.option(
    "--epochs", type=int, default=None, help="Passes over the pairs (default: STREAMREC_TRAIN_EPOCHS)."
)
@click.option("--max-steps", type=int, default=0, help="Stop after this many steps (0 = epochs decide).")
@click.option(
    "--batch-size", type=int, default=None, help="Pairs per step (default: STREAMREC_TRAIN_BATCH_SIZE)."
)
@click.option("--lr", type=float, default=None, help="Peak learning rate (default: STREAMREC_TRAIN_LR).")
@click.option(
    "--warmup-ratio", type=float, default=None, help="Warm-up share (default: STREAMREC_TRAIN_WARMUP_RATIO)."
)
@click.option(
    "--alpha",
    type=float,
    default=None,
    help="Initial softmax temperature α (default: STREAMREC_TRAIN_ALPHA).",
)
@click.option(
    "--fixed-alpha/--learn-alpha",
    default=None,
    help="Keep α fixed or learn it (default: STREAMREC_TRAIN_FIXED_ALPHA).",
)
@click.option(
    "--context-items",
    type=int,
    default=None,
    help="Items in a context, most recent first (default: STREAMREC_TRAIN_CONTEXT_ITEMS).",
)
@click.option(
    "--context-item-words",
    type=int,
    default=None,
    help="Words kept of each context item (default: STREAMREC_TRAIN_CONTEXT_ITEM_WORDS).",
)
@click.option(
    "--queries/--no-queries",
    default=None,
    help="Also train on (query -> clicked item) pairs (default: STREAMREC_TRAIN_QUERIES).",
)
@click.option(
    "--logq/--no-logq",
    default=None,
    help="logQ correction of the in-batch softmax (default: STREAMREC_TRAIN_LOGQ).",
)
@click.option(
    "--basket/--no-basket",
    default=None,
    help="Contexts from earlier baskets (orders) only (default: STREAMREC_TRAIN_BASKET).",
)
@click.option(
    "--freeze-layers",
    type=int,
    default=None,
    help="Freeze the embeddings and the lowest N layers, faster on CPU (default: STREAMREC_TRAIN_FREEZE_LAYERS).",
)
@click.option("--max-users", type=int, default=0, help="Train on a seeded sample of users (0 = all).")
@click.option("--max-pairs", type=int, default=0, help="At most this many training pairs (0 = all).")
@click.option(
    "--eval-users", type=int, default=1000, show_default=True, help="Valid users per evaluation (0 = all)."
)
@click.option("--eval-every", type=int, default=0, help="Also evaluate every N steps.")
@click.option(
    "--patience", type=int, default=2, show_default=True, help="Evaluations without gain before stopping."
)
@click.option("--no-test-eval", is_flag=True, help="Skip the final test evaluation of the best checkpoint.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--seed", type=int, default=None, help="Seed (default: STREAMREC_TRAIN_SEED).")
@click.option(
    "--threads", type=int, default=0, help="torch CPU threads (0 = default; 1 on a shared machine)."
)
def train(dataset: str, out: Path | None, base_model: str | None, max_len: int | None, epochs: int | None,
          max_steps: int, batch_size: int | None, lr: float | None, warmup_ratio: float | None,
          alpha: float | None, fixed_alpha: bool | None, context_items: int | None,
          context_item_words: int | None, queries: bool | None, logq: bool | None, basket: bool | None,
          freeze_layers: int | None, max_users: int, max_pairs: int,
          eval_users: int, eval_every: int, patience: int, no_test_eval: bool, device: str,
          seed: int | None, threads: int) -> None:  # fmt: skip
    """Fine-tune the encoder (InfoNCE, early stopping on valid NDCG@10)."""
    from inference.training.train import TrainConfig, Trainer

    _logging()
    s = get_settings()
    key = Path(dataset).name if Path(dataset).is_dir() else dataset
    # Flags left unset (None) keep settings.train's value (STREAMREC_TRAIN_*), see TrainConfig.from_settings.
    cfg = TrainConfig.from_settings(
        s,
        dataset=dataset,
        out=str(out or s.state_dir / "train" / key),
        base_model=base_model,
        max_len=max_len,
        context_items=context_items,
        context_item_words=context_item_words,
        queries=queries,
        batch_size=batch_size,
        lr=lr,
        epochs=epochs,
        max_steps=max_steps,
        warmup_ratio=warmup_ratio,
        alpha=alpha,
        fixed_alpha=fixed_alpha,
        seed=seed,
        logq=logq,
        basket=basket,
        freeze_layers=freeze_layers,
        max_users=max_users,
        max_pairs=max_pairs,
        eval_users=eval_users,
        eval_every=eval_every,
        patience=patience,
        test_eval=not no_test_eval,
        device=device,
        threads=threads,
    )
    try:
        summary = Trainer(cfg).run()
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(summary, indent=2))
    click.echo(f"best checkpoint: {Path(cfg.out) / 'best'}  (next: streamrec export --checkpoint ...)")


@click.command()
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    default=None,
    help="A `streamrec train` checkpoint (<out>/best). Omit with --pretrained.",
)
@click.option("--pretrained", is_flag=True, help="Export the base encoder without fine-tuning.")
@click.option(
    "--out", type=click.Path(path_type=Path), default=None, help="Model folder (default: settings)."
)
@click.option(
    "--variants", default="fp32,int8,fp16", show_default=True, help="Comma-separated: fp32,int8,fp16."
)
@click.option(
    "--dataset", default=None, help="Real item texts for the parity checks (default: the checkpoint's)."
)
def export(
    checkpoint: Path | None, pretrained: bool, out: Path | None, variants: str, dataset: str | None
) -> None:
    """Export to ONNX (pooling + normalisation inside), int8/fp16 variants, parity checks, manifest."""
    from inference.manifest import ModelFolderError, read_manifest
    from inference.training.export import export_checkpoint, export_pretrained

    _logging()
    s = get_settings()
    out = out or s.resolved_model_dir
    vs = [v.strip() for v in variants.split(",") if v.strip()]
    try:
        if pretrained:
            folder = export_pretrained(out, s.encoder.base_model or None, s.encoder.max_len, vs)
        elif checkpoint is None:
            raise click.UsageError("give --checkpoint <train out>/best, or --pretrained")
        else:
            texts = _parity_texts(checkpoint, dataset)
            folder = export_checkpoint(checkpoint, out, vs, sample_texts=texts)
    except ModelFolderError as exc:
        raise click.ClickException(str(exc)) from exc
    m = read_manifest(folder)
    click.echo(
        f"exported {m.version} to {folder}: variants {', '.join(m.variants)}; parity {json.dumps(m.parity)}"
    )
    click.echo(f"next: streamrec index --model-dir {folder} --dataset <dataset>")


def _parity_texts(checkpoint: Path, dataset: str | None, n: int = 64) -> list[str] | None:
    """A seeded sample of real item texts of the checkpoint's dataset (None when unavailable)."""
    from streamrec.datasets import load_dataset

    name = dataset
    if name is None:
        try:
            name = json.loads((checkpoint / "streamrec_train.json").read_text())["config"]["dataset"]
        except (OSError, KeyError, ValueError):
            return None
    try:
        texts = load_dataset(name, get_settings().data_dir).items["text"].tolist()
    except FileNotFoundError:
        return None
    rng = np.random.default_rng(0)
    return [texts[i] for i in rng.choice(len(texts), size=min(n, len(texts)), replace=False)]


@click.command()
@click.option(
    "--dataset",
    default="online-retail",
    show_default=True,
    help="scientific, online-retail, or a generic dataset folder.",
)
@click.option(
    "--model-dir", type=click.Path(path_type=Path), default=None, help="Model folder (default: settings)."
)
@click.option("--variant", default=None, help="ONNX variant to embed with (default: settings, auto).")
@click.option("--batch-size", type=int, default=256, show_default=True)
def index(dataset: str, model_dir: Path | None, variant: str | None, batch_size: int) -> None:
    """Embed every catalog item into <model-dir>/catalog (float32 matrix + id map)."""
    from inference.encoder import OnnxEncoder
    from inference.manifest import ModelFolderError
    from inference.training.index import build_catalog
    from streamrec.datasets import load_dataset

    _logging()
    s = get_settings()
    folder = model_dir or s.resolved_model_dir
    try:
        enc = OnnxEncoder(folder, s.encoder, variant=variant)
    except ModelFolderError as exc:
        raise click.ClickException(str(exc)) from exc
    ds = load_dataset(dataset, s.data_dir)
    t0 = time.perf_counter()
    cat = build_catalog(
        enc,
        ds,
        folder / "catalog",
        batch_size=batch_size,
        ann_threshold=s.scoring.ann_threshold,
        ann_recall_target=s.scoring.ann_recall_target,
    )
    dt = time.perf_counter() - t0
    click.echo(f"embedded {len(cat)} items of {ds.name} with {enc.model_version} ({enc.variant}, {enc.provider}) "
               f"in {dt:.1f}s ({len(cat) / dt:.0f} items/s) -> {folder / 'catalog'}")  # fmt: skip
    if cat.uses_ann:
        rng = np.random.default_rng(0)
        q = cat.matrix[rng.choice(len(cat), size=min(500, len(cat)), replace=False)]
        cat.prepare()
        cal = cat.ann_calibration or {}
        click.echo(
            f"ANN index (faiss IVF, {cal.get('nlist')} lists, {cal.get('nprobe')} probed): "
            f"recall@10 vs exact = {cat.ann_recall(q, 10):.4f}"
        )
    else:
        click.echo(f"exact top-k (catalog <= {cat.ann_threshold} items)")


@click.command()
@click.argument("texts", nargs=-1)
@click.option(
    "--model-dir", type=click.Path(path_type=Path), default=None, help="Model folder (default: settings)."
)
@click.option("--variant", default=None, help="ONNX variant (default: settings, auto).")
@click.option("--file", "file_", type=click.File("r"), default=None, help="One text per line ('-' = stdin).")
@click.option("--top", type=int, default=0, help="Also show the nearest catalog items.")
def encode(texts: tuple[str, ...], model_dir: Path | None, variant: str | None, file_, top: int) -> None:
    """Encode ad-hoc texts: JSON lines {text, vector} (or the nearest catalog items with --top)."""
    from inference.catalog import CatalogIndex
    from inference.encoder import OnnxEncoder
    from inference.manifest import ModelFolderError

    s = get_settings()
    folder = model_dir or s.resolved_model_dir
    items = list(texts) + ([ln.rstrip("\n") for ln in file_ if ln.strip()] if file_ else [])
    if not items:
        raise click.UsageError("give texts as arguments or --file")
    try:
        enc = OnnxEncoder(folder, s.encoder, variant=variant)
    except ModelFolderError as exc:
        raise click.ClickException(str(exc)) from exc
    vecs = enc.encode(items)
    cat = CatalogIndex.load(folder / "catalog") if top else None
    if cat is not None:
        idx, sc = cat.topk(vecs, top)
    for r, t in enumerate(items):
        rec: dict = {"text": t, "model_version": enc.model_version}
        if cat is not None:
            rec["nearest"] = [{"item_id": cat.ids[i], "score": round(float(x), 4)}
                              for i, x in zip(idx[r], sc[r], strict=True) if i >= 0]  # fmt: skip
        else:
            rec["vector"] = [round(float(x), 6) for x in vecs[r]]
        sys.stdout.write(json.dumps(rec) + "\n")


@click.command("train-user")
@click.option(
    "--dataset",
    default="online-retail",
    show_default=True,
    help="scientific, online-retail, or a generic dataset folder.",
)
@click.option(
    "--model-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Model folder with a catalog (default: settings).",
)
@click.option(
    "--item-repr",
    type=click.Choice(["text+id", "text"]),
    default="text+id",
    show_default=True,
    help="Item vectors: text + a learned offset per warm item (collaborative), or text only.",
)
@click.option("--epochs", type=int, default=30, show_default=True)
@click.option(
    "--n-events",
    type=int,
    default=None,
    help="Events the model reads (default: STREAMREC_PROFILE_RECENT_EVENTS).",
)
@click.option("--layers", type=int, default=2, show_default=True)
@click.option(
    "--eval-users", type=int, default=2000, show_default=True, help="Valid cases per evaluation (0 = all)."
)
@click.option("--threads", type=int, default=0, help="torch CPU threads (0 = default).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--max-examples", type=int, default=0, help="Train on at most this many cases per epoch (0 = all)."
)
@click.option(
    "--refit/--no-refit",
    default=True,
    show_default=True,
    help="After choosing the epoch on valid, retrain on train + valid for that many epochs (the model "
    "served and evaluated on test). --no-refit for a model to tune on the valid split.",
)
@click.option(
    "--ema-epochs",
    type=float,
    default=1.0,
    show_default=True,
    help="Keep an exponential moving average of the weights over about this many epochs of steps and "
    "evaluate, keep and export the average (0 = the weights as trained).",
)
def train_user(dataset: str, model_dir: Path | None, item_repr: str, epochs: int, n_events: int | None, layers: int,
               eval_users: int, threads: int, seed: int, max_examples: int, refit: bool,
               ema_epochs: float) -> None:  # fmt: skip
    """Train the user model over the catalog's item vectors and export it to <model-dir>/user."""
    from inference.catalog import CatalogIndex
    from inference.training.user_model import (
        UserModelConfig,
        export_user_model,
        fit_covisit,
        train_user_model,
    )
    from streamrec.datasets import load_dataset

    _logging()
    s = get_settings()
    folder = model_dir or s.resolved_model_dir
    cat = CatalogIndex.load(folder / "catalog")
    ds = load_dataset(dataset, s.data_dir)
    cfg = UserModelConfig(
        n_events=n_events or s.profile.recent_events, layers=layers, item_repr=item_repr,  # type: ignore[arg-type]
        epochs=epochs, eval_users=eval_users, threads=threads, seed=seed, refit=refit, max_examples=max_examples,
        ema_epochs=ema_epochs,
    )  # fmt: skip
    t0 = time.perf_counter()
    model = train_user_model(ds, cat, cfg)
    window = s.scoring.covisit_window
    # The worker's co-visitation seed: the interactions the model was trained on.
    splits = (model.metrics.get("refit") or {}).get("splits", ["train"])
    out = export_user_model(model, cat, folder, covisit=(fit_covisit(ds, cat, window, splits), window))
    best = model.metrics["best"]
    ref = model.metrics.get("refit")
    refit_txt = f", then refit on {'+'.join(ref['splits'])} ({ref['examples']} examples)" if ref else ""
    click.echo(f"user model ({item_repr}) on {ds.name}: {model.metrics['examples']} examples, best epoch "
               f"{best['epoch']} valid NDCG@10 {best['ndcg@10']:.4f} Recall@10 {best['recall@10']:.4f}{refit_txt}; "
               f"{time.perf_counter() - t0:.0f}s -> {out}")  # fmt: skip
