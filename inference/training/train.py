"""Fine-tuning the encoder M so that softmax(α·h_iᵀp) ranks first the item a shopper goes on to click.

Pairs (:mod:`inference.training.pairs`): (context of the user's last items -> next item) and (query ->
clicked item). One shared encoder embeds both sides (mean pooling + L2 norm); the loss is the
in-batch softmax (InfoNCE) over the batch's distinct target items, with a learned (or fixed)
temperature α. AdamW with linear warm-up and decay, gradient clipping, seeded shuffling.
Validation: full-ranking NDCG@10 on the valid split (history excluded) at every epoch end (and
every ``eval_every`` steps); the best checkpoint is kept, training stops after ``patience``
evaluations without improvement. Writes::

    <out>/best/       Hugging Face folder + tokenizer + streamrec_train.json (config, metrics)
    <out>/last/       the same for the last step
    <out>/metrics.json   one record per evaluation (step, epoch, loss, alpha, valid metrics)
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from evaluation.loo import VectorRanker, evaluate_methods
from inference.training.export import TRAIN_STATE, load_embedder, resolve_base_model, torch_encode
from inference.training.pairs import Pairs, eval_cases, training_pairs
from streamrec.datasets import Dataset, load_dataset
from streamrec.settings import Settings, TrainSettings, get_settings

log = logging.getLogger(__name__)


class TrainConfig(TrainSettings):
    """Everything a training run depends on (stored in each checkpoint).

    The hyperparameters are :class:`~streamrec.settings.TrainSettings` (``settings.train``,
    ``STREAMREC_TRAIN_*``), inherited rather than repeated; the fields below are per run.
    Build one from the settings with :meth:`from_settings`; a bare ``TrainConfig(...)`` uses the
    fields' defaults (those of an empty environment).
    """

    dataset: str = "online-retail"
    out: str = ".streamrec/train/online-retail"
    base_model: str = ""
    max_len: int = Field(64, ge=1, le=512)
    weight_decay: float = Field(0.01, ge=0)
    max_steps: int = Field(0, ge=0)  # 0 = epochs decide
    grad_clip: float = Field(1.0, gt=0)
    max_users: int = Field(0, ge=0)  # train on a seeded sample of users (0 = all)
    max_pairs: int = Field(0, ge=0)  # at most this many training pairs (seeded sample, 0 = all)
    max_pairs_per_user: int = Field(0, ge=0)
    eval_users: int = Field(1000, ge=0)  # valid users per evaluation (seeded sample, 0 = all)
    eval_every: int = Field(0, ge=0)  # also evaluate every N steps (0 = at epoch ends only)
    eval_start: bool = True  # evaluate the pretrained encoder first (step 0)
    test_eval: bool = True  # evaluate the best checkpoint on the test split at the end (report only)
    patience: int = Field(2, ge=1)
    device: str = "cpu"
    threads: int = Field(0, ge=0)  # torch CPU threads (0 = torch's default); 1 when sharing a small machine
    data_dir: str = ""
    extra: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **overrides: Any) -> TrainConfig:
        """``settings.train`` (plus ``encoder.base_model``, ``encoder.max_len`` and ``data_dir``),
        then ``overrides``; an override of None keeps the settings' value (an unset CLI flag)."""
        s = settings or get_settings()
        values: dict[str, Any] = {
            **dict(s.train),
            "base_model": s.encoder.base_model,
            "max_len": s.encoder.max_len,
            "data_dir": str(s.data_dir),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


class Trainer:
    """One fine-tuning run (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, ds: Dataset | None = None) -> None:
        self.cfg = cfg
        _seed_everything(cfg.seed)
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.base = resolve_base_model(cfg.base_model or None)
        full = (
            ds if ds is not None else load_dataset(cfg.dataset, Path(cfg.data_dir) if cfg.data_dir else None)
        )
        self.full = full
        self.ds = full.subset(cfg.max_users, cfg.seed) if cfg.max_users else full
        self.device = torch.device(cfg.device)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda requested but torch sees no CUDA device; use --device cpu")
        self.model, self.tok = load_embedder(self.base)
        self.model.to(self.device)
        if cfg.freeze_layers:
            _freeze(self.model.encoder, cfg.freeze_layers)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(cfg.alpha), device=self.device),
                                      requires_grad=not cfg.fixed_alpha)  # fmt: skip
        self.item_text = full.item_text()
        self.log_q: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []

    @property
    def alpha(self) -> float:
        return float(self.log_alpha.detach().exp())

    # -- data ----------------------------------------------------------------------------
    def pairs(self) -> Pairs:
        c = self.cfg
        return training_pairs(
            self.ds, ("train",), c.context_items, c.context_item_words, c.queries,
            max_pairs_per_user=c.max_pairs_per_user, max_pairs=c.max_pairs, seed=c.seed, basket=c.basket,
        )  # fmt: skip

    def _tokens(self, texts: list[str]) -> dict[str, torch.Tensor]:
        b = self.tok(texts, padding=True, truncation=True, max_length=self.cfg.max_len, return_tensors="pt")
        return {
            "input_ids": b["input_ids"].to(self.device),
            "attention_mask": b["attention_mask"].to(self.device),
        }

    # -- loss ----------------------------------------------------------------------------
    def loss(self, contexts: list[str], targets: list[str], users: list[str] | None = None) -> torch.Tensor:
        """InfoNCE over the batch's distinct targets.

        A repeated target is one column, not its own negative. With logQ correction the logits
        are α·pᵀh - log q(item), q the item's share of training targets, so that the in-batch
        softmax estimates the full softmax instead of demoting popular items. Another row's
        target of the *same user* is masked out of a row's negatives (it is a true positive
        of that user, e.g. another item of the same order).
        """
        uniq = list(dict.fromkeys(targets))
        col = {t: k for k, t in enumerate(uniq)}
        lab = np.array([col[t] for t in targets])
        labels = torch.from_numpy(lab).to(self.device)
        p = self.model(**self._tokens(contexts))
        h = self.model(**self._tokens([self.item_text[t] for t in uniq]))
        logits = self.log_alpha.exp() * p @ h.T
        if self.cfg.logq and self.log_q:
            logits = logits - torch.tensor([self.log_q[t] for t in uniq], device=self.device)
        if users is not None:
            # same[r, c]: column c is the target of some row of r's user; r's own label stays.
            u = np.asarray(users)
            same_user = (u[:, None] == u[None, :]).astype(np.float32)
            same = same_user @ np.eye(len(uniq), dtype=np.float32)[lab] > 0
            same[np.arange(len(targets)), lab] = False
            if same.any():
                logits = logits.masked_fill(torch.from_numpy(same).to(self.device), float("-inf"))
        return nn.functional.cross_entropy(logits.float(), labels)

    # -- evaluation ----------------------------------------------------------------------
    def encode(self, texts: list[str]) -> np.ndarray:
        return torch_encode(
            self.model, self.tok, texts, self.cfg.max_len, batch_size=128, device=str(self.device)
        )

    def evaluate(self, split: str = "valid", n_users: int | None = None) -> dict[str, float]:
        c = self.cfg
        cases = eval_cases(self.full, split, c.context_items, c.context_item_words)
        cases = cases.take(c.eval_users if n_users is None else n_users, c.seed)
        was_training = self.model.training
        self.model.eval()
        try:
            items = self.encode(self.full.items["text"].tolist())
            ctx = self.encode(cases.contexts)
        finally:
            self.model.train(was_training)
        res = evaluate_methods(self.full, cases, [VectorRanker("encoder", ctx, items)])["encoder"]
        return res

    # -- checkpoints ---------------------------------------------------------------------
    def save(self, name: str, metrics: dict[str, Any], step: int) -> Path:
        d = self.out / name
        d.mkdir(parents=True, exist_ok=True)
        self.model.encoder.save_pretrained(str(d))  # type: ignore[operator]  # a transformers model, typed as Module
        self.tok.save_pretrained(str(d))
        state = {
            "base_model": self.cfg.base_model or "sentence-transformers/all-MiniLM-L6-v2",
            "base_model_path": self.base,
            "max_len": self.cfg.max_len,
            "alpha": self.alpha,
            "step": step,
            "dataset": self.ds.name,
            "metrics": metrics,
            "config": {**self.cfg.model_dump(mode="json"), "dataset_name": self.ds.name},
        }
        (d / TRAIN_STATE).write_text(json.dumps(state, indent=2))
        return d

    def _record(self, rec: dict[str, Any]) -> None:
        self.history.append(rec)
        (self.out / "metrics.json").write_text(json.dumps(self.history, indent=2))

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        c = self.cfg
        t0 = time.time()
        pairs = self.pairs()
        if len(pairs) < 2:
            raise RuntimeError(f"only {len(pairs)} training pairs in {self.ds.name}: nothing to learn")
        self.log_q = {t: math.log(n / len(pairs)) for t, n in Counter(pairs.targets).items()}
        steps_per_epoch = max(1, len(pairs) // c.batch_size)
        total = c.max_steps if c.max_steps else c.epochs * steps_per_epoch
        log.info("training on %d pairs (%s), %d steps of %d", len(pairs), self.ds.name, total, c.batch_size)
        from transformers import get_linear_schedule_with_warmup

        decay: list[torch.nn.Parameter] = []
        no_decay: list[torch.nn.Parameter] = []
        for n, p in self.model.named_parameters():
            (no_decay if p.ndim < 2 or "LayerNorm" in n or n.endswith("bias") else decay).append(p)
        groups = [
            {"params": decay, "weight_decay": c.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        if not c.fixed_alpha:
            groups.append({"params": [self.log_alpha], "weight_decay": 0.0, "lr": max(c.lr * 100, 1e-3)})
        opt = torch.optim.AdamW(groups, lr=c.lr)
        sched = get_linear_schedule_with_warmup(opt, int(c.warmup_ratio * total), total)
        best, best_metrics, bad_evals = -1.0, {}, 0
        if c.eval_start:
            m0 = self.evaluate("valid")
            self._record(
                {"step": 0, "epoch": 0, "valid": m0, "alpha": c.alpha, "elapsed_s": time.time() - t0}
            )
            log.info("pretrained valid: %s", _fmt(m0))
            # The pretrained encoder is the checkpoint to beat (and the best one if nothing beats it).
            best, best_metrics = m0["ndcg@10"], m0
            self.save("best", {"valid": m0}, 0)
        rng = np.random.default_rng(c.seed)
        step, epoch, stop = 0, 0, False
        losses: list[float] = []
        self.model.train()
        bar = tqdm(total=total, desc=f"fine-tuning on {self.ds.name}", unit="step")
        while step < total and not stop:
            epoch += 1
            order = rng.permutation(len(pairs))
            for s in range(0, len(order) - c.batch_size + 1, c.batch_size):
                idx = order[s : s + c.batch_size]
                with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                                    enabled=self.device.type == "cuda"):  # fmt: skip
                    loss = self.loss([pairs.texts[i] for i in idx], [pairs.targets[i] for i in idx],
                                     [pairs.users[i] for i in idx])  # fmt: skip
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
                opt.step()
                sched.step()
                with torch.no_grad():
                    self.log_alpha.clamp_(math.log(1.0), math.log(100.0))
                step += 1
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", alpha=f"{self.alpha:.1f}")
                end_of_epoch = s + 2 * c.batch_size > len(order)
                if step >= total or end_of_epoch or (c.eval_every and step % c.eval_every == 0):
                    m = self.evaluate("valid")
                    rec = {"step": step, "epoch": epoch, "train_loss": float(np.mean(losses[-50:])),
                           "alpha": self.alpha, "valid": m, "elapsed_s": time.time() - t0}  # fmt: skip
                    self._record(rec)
                    tqdm.write(f"step {step} epoch {epoch}: valid {_fmt(m)}")
                    if m["ndcg@10"] > best:
                        best, best_metrics, bad_evals = m["ndcg@10"], m, 0
                        self.save("best", {"valid": m}, step)
                    else:
                        bad_evals += 1
                        if bad_evals >= c.patience:
                            tqdm.write(f"early stop: no valid NDCG@10 gain in {c.patience} evaluations")
                            stop = True
                if step >= total or stop:
                    break
        bar.close()
        self.save("last", {"valid": self.history[-1]["valid"]}, step)
        summary: dict[str, Any] = {"steps": step, "pairs": len(pairs), "best_valid": best_metrics,
                                   "elapsed_s": time.time() - t0}  # fmt: skip
        if c.test_eval:
            from transformers import AutoModel

            self.model.encoder = AutoModel.from_pretrained(str(self.out / "best")).to(self.device)
            summary["best_test"] = self.evaluate("test")
            state_path = self.out / "best" / TRAIN_STATE
            state = json.loads(state_path.read_text())
            state["metrics"]["test"] = summary["best_test"]
            state_path.write_text(json.dumps(state, indent=2))
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def _freeze(encoder: nn.Module, n_layers: int) -> None:
    """Freeze the embeddings and the lowest ``n_layers`` layers of a BERT-like encoder."""
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    emb = getattr(encoder, "embeddings", None)
    if layers is None or emb is None:
        raise ValueError(
            f"--freeze-layers needs a BERT-like encoder (embeddings + encoder.layer); "
            f"{type(encoder).__name__} is not one: use --freeze-layers 0"
        )
    if n_layers > len(layers):
        raise ValueError(f"--freeze-layers {n_layers}: the encoder has only {len(layers)} layers")
    for module in [emb, *list(layers)[:n_layers]]:
        for p in module.parameters():
            p.requires_grad_(False)


def _fmt(m: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in m.items() if k != "n") + f" (n={m.get('n')})"


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
