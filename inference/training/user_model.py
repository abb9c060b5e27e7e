"""Training the user model: recent events (+ query) → p, over frozen item vectors.

Stage two of the CPU schedule: the item encoder is fine-tuned first (``streamrec train``), its
catalog vectors are cached (``streamrec index``), and this module trains, on them,

* a small pre-norm Transformer over the user's last N events (item vector, event type, log age,
  position) and a query token (the fresh search, or a learned "no query" token), whose first
  output, projected back to the item space and added to the mean of the input item vectors, is p;
* optionally (``item_repr = "text+id"``) a learned offset per warm item (the collaborative part),
  added to its text vector before normalising; items first seen later keep their text vector.

Examples are next-item cases of the train split, as the worker would see them: the context is
the events *before* the target's basket (items sharing a timestamp), newest first, built with
the serving feature code (:func:`inference.user_model.event_arrays`); items the user already had
are masked out of the softmax (the evaluation excludes them too) and are never targets. The
catalog is small enough for the full softmax over every item (exact, so no logQ correction is
needed); validation is full-ranking NDCG@10 on the valid split, best epoch kept.

``item_repr = "id"`` trains the same architecture over ID embeddings only: the SASRec-style
baseline of ``eval loo``. Export writes ``<model dir>/user/`` (see ``inference.user_model``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from inference.covisit import FILE as COVISIT_FILE
from inference.covisit import CoVisitation
from inference.manifest import sha256_file
from inference.user_model import (
    ENCODE_INPUTS,
    MANIFEST,
    N_TYPES,
    PROJECTION_FILE,
    RESIDUALS,
    TOWER_FILE,
    USER_DIR,
    VARIANT_FILES,
    EventArrays,
    encode_feeds,
    event_arrays,
    graphs_version,
    project_catalog,
)
from streamrec.datasets import SPLITS, Dataset

log = logging.getLogger(__name__)

ItemRepr = Literal["text", "text+id", "id"]


@dataclass
class UserModelConfig:
    n_events: int = 20
    d_model: int = 128
    layers: int = 2
    heads: int = 4
    dropout: float = 0.1
    item_repr: ItemRepr = "text+id"
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 3
    alpha: float = 20.0
    max_examples: int = 0  # 0 = all
    eval_users: int = 2000
    seed: int = 0
    threads: int = 0
    refit: bool = False  # retrain on train + valid for the chosen number of epochs
    # Regularising the per-item offsets (Scientific valid, all users, model alone: NDCG@10 0.0907 at
    # the defaults, best epoch 3; 0.0918 with the offsets' lr x0.3, best epoch 6, a flatter peak;
    # 0.0918 with their weight decay 1.0): within noise, so the defaults stay.
    offset_lr_scale: float = 1.0  # learning rate of the per-item offsets, relative to lr
    offset_weight_decay: float = 0.0  # AdamW decay of the offsets (pulls items back to their text)
    # Exponential moving average of the weights over the optimiser's steps (torch's swa_utils), in
    # epochs of steps (0 = off): what is evaluated on valid, kept and exported is the average, so
    # the model depends less on where an epoch ends (without it, refitting for epoch 4 or 5 moved
    # Online Retail's test Recall@10 between 0.0497 and 0.0428). Chosen on valid: best NDCG@10
    # Online Retail 0.0307 vs 0.0282 (both epoch 5), Scientific 0.0902 (epoch 4) vs 0.0903 (epoch 3),
    # with a flatter peak on both.
    ema_epochs: float = 1.0


# -- the module ----------------------------------------------------------------------------
_MASKED = -1e4  # the attention logit of a padded slot (also ONNX Runtime's Attention default)


def _self_attention(
    h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, keep: torch.Tensor, heads: int, scale: float
) -> torch.Tensor:
    """Multi-head self-attention of the normalised tokens ``h`` (B, T, d) with the packed
    q/k/v weight ``w`` (3d, d) and bias ``b``; ``keep`` (B, T) is 1 for real tokens."""
    bsz, t, d = h.shape
    qkv = nn.functional.linear(h, w, b).reshape(bsz, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    bias = ((1.0 - keep) * _MASKED)[:, None, None, :]
    a = torch.softmax(q @ k.transpose(-1, -2) * scale + bias, dim=-1)
    return (a @ v).transpose(1, 2).reshape(bsz, t, d)


class _FusedAttention(torch.autograd.Function):
    """:func:`_self_attention` in torch, exported as ONNX Runtime's fused ``com.microsoft``
    ``Attention`` operator (its q/k/v product, per-head softmax and output in one kernel; the
    int8 export makes it ``QAttention``). Export only: the graph's parity with the plain torch
    module is checked on every export."""

    @staticmethod
    def forward(ctx, h, w, b, keep, heads, scale):  # noqa: ANN001, ANN205
        return _self_attention(h, w, b, keep, heads, scale)

    @staticmethod
    def symbolic(g, h, w, b, keep, heads, scale):  # noqa: ANN001, ANN205
        mask = g.op("Cast", keep, to_i=6)  # int32: 1 = attend, 0 = padded
        weight = g.op("Transpose", w, perm_i=[1, 0])  # (d, 3d), folded into a constant at export
        out = g.op(
            "com.microsoft::Attention", h, weight, b, mask,
            num_heads_i=heads, scale_f=scale, mask_filter_value_f=_MASKED,
        )  # fmt: skip
        out.setType(h.type())
        return out


class _Block(nn.Module):
    """Pre-norm self-attention + feed-forward in plain torch ops; the ONNX export writes the full
    block's attention as ONNX Runtime's fused operator (``fused``, :class:`_FusedAttention`)."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.h, self.d = heads, d  # Python ints: weight slices stay constants in the ONNX graph
        self.scale = 1.0 / math.sqrt(d // heads)
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, keep: torch.Tensor, first_only: bool = False, fused: bool = False
    ) -> torch.Tensor:
        """The block over every token, or (``first_only``) only the first token's output: the
        same numbers for that token, with its query, projection and feed-forward alone (the
        last block of the tower, whose other outputs nobody reads: 30 % of its work).
        ``keep`` (B, T) is 1 for real tokens; ``fused``: the ONNX export's attention operator."""
        b, t, _ = x.shape
        d = self.d  # not x.shape: a slice bound traced from a shape keeps the slice (and its
        hd = d // self.h  # un-quantised fp32 matmul) in the exported graph
        h = self.n1(x)
        w, bias_qkv = self.qkv.weight, self.qkv.bias
        if first_only:
            # One query: products and sums over (B, T, H, hd) without transposes. Batched
            # matmuls of 1-row matrices behind a transpose were 16 % of the int8 graph's time.
            q = nn.functional.linear(h[:, 0], w[:d], bias_qkv[:d]).reshape(b, 1, self.h, hd)
            kv = nn.functional.linear(h, w[d:], bias_qkv[d:]).reshape(b, t, 2, self.h, hd)
            k, v = kv[:, :, 0], kv[:, :, 1]
            s = (k * q).sum(-1) * self.scale + ((1.0 - keep) * _MASKED).unsqueeze(-1)  # (B, T, H)
            a = torch.softmax(s, dim=1).unsqueeze(-1)  # over the keys
            x = x[:, :1] + self.drop(self.proj((a * v).sum(1).reshape(b, 1, d)))
        else:
            attend = _FusedAttention.apply if fused else _self_attention
            x = x + self.drop(self.proj(attend(h, w, bias_qkv, keep, self.h, self.scale)))
        return x + self.drop(self.ff(self.n2(x)))


class UserTower(nn.Module):
    """(items, types, age, mask, query, qmask) → unit p; see ``inference.user_model``."""

    def __init__(self, dim: int, cfg: UserModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.inp = nn.Linear(dim, d)
        self.q_in = nn.Linear(dim, d)
        self.type_emb = nn.Embedding(N_TYPES, d)
        self.no_query = nn.Parameter(torch.zeros(d))
        self.pos = nn.Parameter(torch.zeros(cfg.n_events, d))
        self.age = nn.Linear(1, d)
        self.blocks = nn.ModuleList(_Block(d, cfg.heads, cfg.dropout) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, dim)
        nn.init.normal_(self.out.weight, std=1e-3)  # start as the mean of the items (the text baseline)
        nn.init.zeros_(self.out.bias)
        self.w_mean = nn.Parameter(torch.tensor(1.0))
        self.w_query = nn.Parameter(torch.tensor(1.0))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, items, types, age, mask, query, qmask):  # noqa: ANN001
        mean = (items * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
        return self.encode(self.inp(items), mean, types, age, mask, query, qmask)

    def encode(self, x, mean, types, age, mask, query, qmask, fused: bool = False):  # noqa: ANN001 (traced by ONNX export)
        """The tower after its item projection: ``x`` = inp(item vectors) (inp's bias where
        padded), ``mean`` = the masked mean of the item vectors. The exported graph starts here:
        serving projects the whole catalog once and gathers rows (``inference.user_model``).
        ``fused``: the full blocks' attention as ONNX Runtime's operator (the export)."""
        n = x.shape[1]
        x = x + self.type_emb(types) + self.pos[:n] + self.age(age.unsqueeze(-1))
        q = self.q_in(query) * qmask + self.no_query * (1.0 - qmask)
        tok = self.drop(torch.cat([q.unsqueeze(1), x], 1))
        keep = torch.cat([torch.ones_like(qmask), mask], 1)
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):  # only the query token's output is read
            tok = blk(tok, keep, first_only=i == last, fused=fused)
        p = self.out(self.norm(tok[:, 0])) + self.w_mean * mean + self.w_query * query * qmask
        return p / p.norm(dim=-1, keepdim=True).clamp(min=1e-6)


class ItemTable(nn.Module):
    """Item vectors used on both sides: unit(text + warm offset), or ID embeddings only."""

    text: torch.Tensor
    warm: torch.Tensor

    def __init__(self, text: np.ndarray, warm: np.ndarray, repr_: ItemRepr, seed: int) -> None:
        super().__init__()
        n, dim = text.shape
        self.repr = repr_
        self.register_buffer("text", torch.as_tensor(text, dtype=torch.float32))
        self.register_buffer("warm", torch.as_tensor(warm, dtype=torch.float32).unsqueeze(1))
        g = torch.Generator().manual_seed(seed)
        init = torch.randn(n, dim, generator=g) * (0.1 if repr_ == "id" else 0.0)
        self.offset = nn.Parameter(init, requires_grad=repr_ != "text")

    def forward(self) -> torch.Tensor:
        v = self.offset if self.repr == "id" else self.text + self.offset * self.warm
        return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-6)


# -- examples ------------------------------------------------------------------------------
@dataclass
class Examples:
    arrays: EventArrays
    targets: np.ndarray  # (E,) catalog rows
    history: list[np.ndarray]  # catalog rows to mask (the user's items before the target)
    query: np.ndarray  # (E, dim)
    qmask: np.ndarray  # (E,)

    def __len__(self) -> int:
        return int(self.targets.shape[0])


def event_types(ds: Dataset) -> np.ndarray:
    """The event type of every interaction row, as the replayer maps it (``devstack.produce``)."""
    from devstack.produce import DATASET_EVENT_TYPE

    forced = DATASET_EVENT_TYPE.get(ds.name)
    if forced:
        return np.full(len(ds.interactions), forced, object)
    return ds.interactions["type"].astype(str).to_numpy()


def training_examples(ds: Dataset, index_of: Any, n_events: int, dim: int, splits=("train",)) -> Examples:
    """Next-item cases of ``splits`` with basket contexts (see the module doc)."""
    inter = ds.interactions
    types = event_types(ds)
    keep = (
        inter["split"].isin(list(splits)).to_numpy()
        & (types != "search")
        & inter["item_id"].ne("").to_numpy()
    )
    df = inter[keep]
    rows = index_of(df["item_id"].astype(str).tolist())
    ok = rows >= 0
    users, item_ids, ts, typ = (
        df["user_id"].to_numpy()[ok], df["item_id"].astype(str).to_numpy()[ok],
        df["ts"].to_numpy(np.int64)[ok], types[keep][ok],
    )  # fmt: skip
    rows = rows[ok]
    order = np.lexsort((np.arange(len(users)), ts, users))
    ctx: list[list[list[Any]]] = []
    refs: list[int] = []
    targets: list[int] = []
    hist: list[np.ndarray] = []
    start = 0
    n = len(order)
    while start < n:
        end = start
        u = users[order[start]]
        while end < n and users[order[end]] == u:
            end += 1
        _user_examples(order[start:end], item_ids, ts, typ, rows, n_events, ctx, refs, targets, hist)
        start = end
    arr = event_arrays(ctx, refs, index_of, n_events)
    m = len(targets)
    return Examples(
        arr, np.asarray(targets, np.int64), hist, np.zeros((m, dim), np.float32), np.zeros(m, np.float32)
    )


def _user_examples(idx, item_ids, ts, typ, rows, n_events, ctx, refs, targets, hist) -> None:  # noqa: ANN001
    events: list[list[Any]] = []  # oldest first
    seen: set[int] = set()
    k = 0
    while k < len(idx):
        j = k
        while j < len(idx) and ts[idx[j]] == ts[idx[k]]:
            j += 1
        basket = idx[k:j]
        if events:
            recent = events[::-1][:n_events]
            h = np.fromiter(seen, np.int64, len(seen))
            for b in dict.fromkeys(int(rows[x]) for x in basket):
                if b not in seen:
                    ctx.append(recent)
                    refs.append(int(recent[0][2]))
                    targets.append(b)
                    hist.append(h)
        for x in basket:
            events.append([item_ids[x], typ[x], int(ts[x])])
            seen.add(int(rows[x]))
        k = j


def eval_examples(
    ds: Dataset, split: str, index_of: Any, n_events: int, dim: int, cases: Any = None
) -> Examples:
    """One case per user of ``split``: context = everything before it, target = the first new
    item (the evaluation cases of ``inference.training.pairs.eval_cases``, or ``cases``)."""
    from inference.training.pairs import eval_cases

    cases = cases if cases is not None else eval_cases(ds, split)
    before = set(SPLITS[: SPLITS.index(split)])
    inter = ds.interactions
    types = event_types(ds)
    mask = inter["split"].isin(before).to_numpy() & (types != "search")
    sub = inter[mask]
    by_user: dict[str, list[list[Any]]] = {}
    for u, i, t, e in zip(
        sub["user_id"].astype(str), sub["item_id"].astype(str), sub["ts"], types[mask], strict=True
    ):
        by_user.setdefault(u, []).append([i, e, int(t)])
    ctx = [sorted(by_user.get(u, []), key=lambda e: -e[2]) for u in cases.users]
    refs = [c[0][2] if c else 0 for c in ctx]
    arr = event_arrays(ctx, refs, index_of, n_events)
    hist = [index_of(h) for h in cases.histories]
    m = len(cases)
    return Examples(
        arr,
        index_of(cases.targets),
        [h[h >= 0] for h in hist],
        np.zeros((m, dim), np.float32),
        np.zeros(m, np.float32),
    )


# -- training ------------------------------------------------------------------------------
@dataclass
class TrainedUserModel:
    tower: UserTower
    table: ItemTable
    cfg: UserModelConfig
    alpha: float
    metrics: dict[str, Any] = field(default_factory=dict)

    @torch.no_grad()
    def contexts(
        self, arrays: EventArrays, query: np.ndarray, qmask: np.ndarray, batch: int = 1024
    ) -> np.ndarray:
        self.tower.eval()
        T = self.table()
        out = []
        for s in range(0, arrays.idx.shape[0], batch):
            sl = slice(s, s + batch)
            out.append(self.tower(*_feeds(T, arrays, sl, query, qmask)).numpy())
        return np.concatenate(out) if out else np.zeros((0, T.shape[1]), np.float32)

    @torch.no_grad()
    def item_matrix(self) -> np.ndarray:
        return self.table().numpy()


def _feeds(T: torch.Tensor, a: EventArrays, sl, query: np.ndarray, qmask: np.ndarray):  # noqa: ANN001
    idx = torch.as_tensor(a.idx[sl])
    mask = torch.as_tensor(a.mask[sl])
    items = T[idx.clamp(min=0)] * mask.unsqueeze(-1)
    return (
        items,
        torch.as_tensor(a.types[sl]),
        torch.as_tensor(a.age[sl]),
        mask,
        torch.as_tensor(query[sl]),
        torch.as_tensor(qmask[sl]).reshape(-1, 1),
    )


def _masked_logits(logits: torch.Tensor, hist: list[np.ndarray]) -> torch.Tensor:
    rows = np.repeat(np.arange(len(hist)), [len(h) for h in hist])
    cols = np.concatenate(hist) if hist else np.empty(0, np.int64)
    if cols.size:
        logits = logits.index_put((torch.as_tensor(rows), torch.as_tensor(cols)), torch.tensor(-1e9))
    return logits


@torch.no_grad()
def ndcg_recall(model: TrainedUserModel, ex: Examples, k: int = 10) -> dict[str, float]:
    """Full-ranking Recall@k / NDCG@k, history excluded, ties counted half (the protocol of
    ``eval loo``, which imports this module, so it is not imported back here)."""
    P = model.contexts(ex.arrays, ex.query, ex.qmask)
    S = torch.as_tensor(P) @ torch.as_tensor(model.item_matrix()).T
    S = _masked_logits(S, ex.history)
    rows = torch.arange(S.shape[0])
    tgt = torch.as_tensor(ex.targets)
    t = S[rows, tgt].clone()
    S[rows, tgt] = -1e9
    rank = 1.0 + (S > t[:, None]).sum(1) + 0.5 * (S == t[:, None]).sum(1)
    r = rank.numpy().astype(np.float64)
    inside = r <= k
    return {
        f"recall@{k}": float(inside.mean()),
        f"ndcg@{k}": float(np.where(inside, 1.0 / np.log2(1.0 + r), 0.0).mean()),
    }


def train_user_model(
    ds: Dataset, catalog: Any, cfg: UserModelConfig, valid_split: str = "valid", progress: bool = True
) -> TrainedUserModel:
    """Train on the train split over ``catalog``'s vectors; the epoch best on ``valid_split`` is kept.

    With ``cfg.refit``, a second model is then trained from the same seed on the train *and*
    ``valid_split`` cases for that many epochs, with no further selection: the model served (and
    evaluated on the test split) has seen everything before the test period, as a deployed
    model would, while every choice was still made on the valid split alone. Its metrics record
    the selection run's history and ``refit``: {"splits", "epochs", "examples"}.
    """
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dim = catalog.dim
    train = training_examples(ds, catalog.index_of, cfg.n_events, dim)
    if not len(train):
        raise ValueError(
            f"no training examples in {ds.name}: users need two or more baskets in the train split"
        )
    rng = np.random.default_rng(cfg.seed)
    valid = eval_examples(ds, valid_split, catalog.index_of, cfg.n_events, dim)
    if cfg.eval_users and len(valid) > cfg.eval_users:
        pick = np.sort(rng.choice(len(valid), cfg.eval_users, replace=False))
        valid = _take(valid, pick)
    model, best, history = _fit(catalog, train, cfg, cfg.epochs, valid, progress, rng)
    model.metrics = {"best": best, "history": history, "examples": len(train), "valid_cases": len(valid)}
    if not cfg.refit:
        return model
    return refit_user_model(ds, catalog, model, valid_split, progress)


def refit_user_model(
    ds: Dataset, catalog: Any, selected: TrainedUserModel, valid_split: str = "valid", progress: bool = True
) -> TrainedUserModel:
    """A fresh model of ``selected``'s configuration, trained from the same seed on the train and
    ``valid_split`` cases for the number of epochs the selection kept (see :func:`train_user_model`)."""
    cfg = selected.cfg
    dim = catalog.dim
    best = selected.metrics["best"]
    splits = ("train", valid_split)
    full = training_examples(ds, catalog.index_of, cfg.n_events, dim, splits=splits)
    torch.manual_seed(cfg.seed)
    refit, _, _ = _fit(
        catalog, full, cfg, int(best["epoch"]), None, progress, np.random.default_rng(cfg.seed)
    )
    refit.metrics = {
        **selected.metrics,
        "refit": {"splits": list(splits), "epochs": int(best["epoch"]), "examples": len(full)},
    }
    log.info("user model %s: refit on %s for %d epochs (%d examples)", cfg.item_repr, "+".join(splits),
             int(best["epoch"]), len(full))  # fmt: skip
    return refit


def _fit(
    catalog: Any,
    train: Examples,
    cfg: UserModelConfig,
    epochs: int,
    valid: Examples | None,
    progress: bool,
    rng: np.random.Generator,
) -> tuple[TrainedUserModel, dict[str, Any], list[dict[str, Any]]]:
    """Train a fresh model on ``train`` for up to ``epochs`` epochs; with ``valid``, keep the epoch
    best on its NDCG@10 (early stopping after ``cfg.patience`` worse epochs), else the last one.
    Returns (model, the kept epoch's record, every epoch's record)."""
    warm = np.zeros(len(catalog.ids), np.float32)
    warm[np.unique(np.concatenate([train.targets, train.arrays.idx[train.arrays.idx >= 0]]))] = 1.0
    model = TrainedUserModel(
        UserTower(catalog.dim, cfg), ItemTable(catalog.matrix, warm, cfg.item_repr, cfg.seed), cfg, cfg.alpha
    )
    log_alpha = nn.Parameter(torch.tensor(math.log(cfg.alpha)))
    tower = [*model.tower.parameters(), log_alpha]
    groups: list[dict[str, Any]] = [{"params": tower, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    if cfg.item_repr != "text":
        groups.append({"params": [model.table.offset], "lr": cfg.lr * cfg.offset_lr_scale,
                       "weight_decay": cfg.offset_weight_decay})  # fmt: skip
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups)
    n_ex = len(train) if not cfg.max_examples else min(len(train), cfg.max_examples)
    live, avg, kept = _averaging(model, cfg, n_ex)
    best: tuple[float, dict[str, Any], dict[str, Any]] = (-1.0, {}, {})
    history: list[dict[str, Any]] = []
    bad = 0
    t0 = time.time()
    for epoch in range(epochs):
        model.tower.train()
        perm = rng.permutation(len(train))[:n_ex]
        bar = tqdm(range(0, n_ex, cfg.batch_size), desc=f"user model {cfg.item_repr} epoch {epoch + 1}",
                   unit="batch", leave=False, disable=not progress)  # fmt: skip
        losses = []
        for s in bar:
            sel = perm[s : s + cfg.batch_size]
            T = model.table()
            p = model.tower(*_feeds(T, train.arrays, sel, train.query, train.qmask))
            logits = _masked_logits(log_alpha.exp() * p @ T.T, [train.history[i] for i in sel])
            loss = nn.functional.cross_entropy(logits, torch.as_tensor(train.targets[sel]))
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if avg is not None:
                avg.update_parameters(live)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        model.alpha = kept.alpha = log_alpha.exp().item()
        met = ndcg_recall(kept, valid) if valid is not None else {}
        rec = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "alpha": model.alpha, **met,
               "seconds": round(time.time() - t0, 1)}  # fmt: skip
        history.append(rec)
        log.info("user model %s: %s", cfg.item_repr, rec)
        if valid is None:
            best = (0.0, {}, rec)
            continue
        if met["ndcg@10"] > best[0]:
            best = (met["ndcg@10"], _state(kept), rec)
            bad = 0
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    if best[1]:
        model.tower.load_state_dict(best[1]["tower"])
        model.table.load_state_dict(best[1]["table"])
        model.alpha = best[1]["alpha"]
    elif kept is not model:  # no selection (a refit): the average after the last epoch
        model.tower.load_state_dict(kept.tower.state_dict())
        model.table.load_state_dict(kept.table.state_dict())
    return model, best[2], history


def _averaging(
    model: TrainedUserModel, cfg: UserModelConfig, n_ex: int
) -> tuple[nn.Module, Any, TrainedUserModel]:
    """With ``cfg.ema_epochs``: (the live modules, their exponential moving average, a model that
    reads the averaged weights); without: (modules, None, ``model`` itself)."""
    live = nn.ModuleDict({"tower": model.tower, "table": model.table})
    if cfg.ema_epochs <= 0:
        return live, None, model
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    steps = max(1.0, cfg.ema_epochs * math.ceil(n_ex / cfg.batch_size))
    avg = AveragedModel(live, multi_avg_fn=get_ema_multi_avg_fn(1.0 - 1.0 / steps), use_buffers=False)
    copy = avg.module  # the ModuleDict's averaged copy
    assert isinstance(copy, nn.ModuleDict)
    kept = TrainedUserModel(copy["tower"], copy["table"], cfg, model.alpha)  # type: ignore[arg-type]
    return live, avg, kept


def _state(model: TrainedUserModel) -> dict[str, Any]:
    return {
        "tower": {k: v.detach().clone() for k, v in model.tower.state_dict().items()},
        "table": {k: v.detach().clone() for k, v in model.table.state_dict().items()},
        "alpha": model.alpha,
    }


def _take(ex: Examples, idx: np.ndarray) -> Examples:
    a = ex.arrays
    return Examples(
        a.rows(idx),
        ex.targets[idx],
        [ex.history[i] for i in idx],
        ex.query[idx],
        ex.qmask[idx],
    )


# -- export --------------------------------------------------------------------------------
def fit_covisit(ds: Dataset, catalog: Any, window: int, splits: Sequence[str] = ("train",)) -> CoVisitation:
    """The co-visitation seed: the ``splits`` interactions, each user's in time order, counted by
    the same rule as the worker's :class:`inference.covisit.CoVisitRecorder`."""
    df = ds.interactions[ds.interactions["split"].isin(list(splits))]
    df = df.sort_values("ts", kind="stable")
    rows = catalog.index_of(df["item_id"].astype(str).tolist())
    users = df["user_id"].astype(str).to_numpy()
    keep = rows >= 0
    seqs: dict[str, list[int]] = {}
    for u, r in zip(users[keep].tolist(), rows[keep].tolist(), strict=True):
        seqs.setdefault(u, []).append(r)
    return CoVisitation.fit(len(catalog.ids), seqs.values(), window)


class _EncodeGraph(nn.Module):
    """The exported user model: :meth:`UserTower.encode` (inputs ``ENCODE_INPUTS``)."""

    def __init__(self, tower: UserTower) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, x, mean, types, age, mask, query, qmask):  # noqa: ANN001
        return self.tower.encode(x, mean, types, age, mask, query, qmask, fused=True)


class _ProjectGraph(nn.Module):
    """The exported item projection: catalog vectors (V, dim) → the tower's inputs (V, d)."""

    def __init__(self, tower: UserTower) -> None:
        super().__init__()
        self.inp = tower.inp

    def forward(self, items):  # noqa: ANN001
        return self.inp(items)


def export_graphs(tower: UserTower, out: Path, dim: int, n_events: int, variants=("fp32", "int8")) -> dict:
    """Write the tower as ONNX into ``out``: the item projection (fp32) and the encoder (fp32,
    and int8 dynamically quantised). Returns the parity of the served path
    (:class:`inference.user_model.OnnxUserModel` feeds, built from a random catalog) against
    the torch tower; raises when fp32 differs."""
    import onnxruntime as ort

    tower = tower.eval()
    g = np.random.default_rng(0)
    v, b = 50, 6
    catalog = g.standard_normal((v, dim)).astype(np.float32) / math.sqrt(dim)
    idx = g.integers(0, v, (b, n_events))
    idx[g.random((b, n_events)) > 0.7] = -1
    idx[:, 0] = g.integers(0, v, b)
    idx[1] = -1  # a user with only a query
    arrays = EventArrays(
        idx, g.integers(0, N_TYPES, (b, n_events)), (g.random((b, n_events)) * 5).astype(np.float32),
        (idx >= 0).astype(np.float32),
    )  # fmt: skip
    query = g.standard_normal((b, dim)).astype(np.float32) / math.sqrt(dim)
    qmask = np.array([1, 1, 0, 1, 0, 0], np.float32)[:b].reshape(-1, 1)
    with torch.no_grad():
        ref = tower(*_feeds(torch.as_tensor(catalog), arrays, slice(None), query, qmask)).numpy()
    opts: dict[str, Any] = {"opset_version": 17, "dynamo": False}
    proj = out / PROJECTION_FILE
    torch.onnx.export(_ProjectGraph(tower), (torch.as_tensor(catalog),), str(proj), input_names=["items"],
                      output_names=["x"], dynamic_axes={"items": {0: "items"}, "x": {0: "items"}}, **opts)  # fmt: skip
    fp32 = out / VARIANT_FILES["fp32"]
    table = project_catalog(ort.InferenceSession(str(proj), providers=["CPUExecutionProvider"]), catalog)
    feeds = encode_feeds(table, catalog, arrays, query, qmask)
    args = tuple(torch.as_tensor(feeds[k]) for k in ENCODE_INPUTS)
    dyn = {k: {0: "batch"} for k in ENCODE_INPUTS} | {"p": {0: "batch"}}
    torch.onnx.export(_EncodeGraph(tower), args, str(fp32), input_names=list(ENCODE_INPUTS), output_names=["p"],
                      dynamic_axes=dyn, custom_opsets={"com.microsoft": 1}, **opts)  # fmt: skip
    parity: dict[str, float] = {}
    for variant in variants:
        if variant == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(
                str(fp32), str(out / VARIANT_FILES["int8"]), per_channel=True, weight_type=QuantType.QInt8
            )
        session = ort.InferenceSession(str(out / VARIANT_FILES[variant]), providers=["CPUExecutionProvider"])
        got = session.run(None, feeds)[0]
        parity[f"{variant}_max_abs_diff"] = float(np.abs(got - ref).max())
        parity[f"{variant}_min_cosine"] = float((got * ref).sum(1).min())
    if parity["fp32_max_abs_diff"] > 1e-4:
        raise RuntimeError(f"ONNX export of the user model differs from torch: {parity}")
    save_tower(tower, out / TOWER_FILE)
    return parity


def save_tower(tower: UserTower, path: Path) -> None:
    """The tower's torch weights (safetensors: no pickle), beside the graphs exported from them."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in tower.state_dict().items()}, str(path))


def load_tower(folder: Path) -> UserTower:
    """The torch tower of an exported user-model folder (``user/``), in eval mode."""
    from safetensors.torch import load_file

    from inference.user_model import read_user_manifest

    manifest = read_user_manifest(folder)
    if not (folder / TOWER_FILE).is_file():
        raise FileNotFoundError(
            f"{folder} has no {TOWER_FILE} (exported before the torch weights were kept): re-run "
            "`streamrec train-user` to write one"
        )
    fields = UserModelConfig.__dataclass_fields__
    cfg = UserModelConfig(**{k: v for k, v in manifest.config.items() if k in fields})
    tower = UserTower(int(manifest.dim), cfg)
    tower.load_state_dict(load_file(str(folder / TOWER_FILE)))
    return tower.eval()


def export_user_model(
    model: TrainedUserModel,
    catalog: Any,
    model_dir: Path,
    variants=("fp32", "int8"),
    covisit: tuple[CoVisitation, int] | None = None,
) -> Path:
    """``<model_dir>/user/``: ONNX item projection + encoder fp32 (+ int8), residuals, the
    co-visitation seed (counts, window), manifest with sha256 and parity."""
    if model.cfg.item_repr == "id":
        raise ValueError("the ID-only model is a baseline: it has no text vectors to serve")
    out = Path(model_dir) / USER_DIR
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.onnx"):
        old.unlink()
    n, dim = model.cfg.n_events, catalog.dim
    parity = export_graphs(model.tower, out, dim, n, variants)
    warm = model.table.warm.squeeze(1).numpy() > 0
    offsets = model.table.offset.detach().numpy()
    ids = np.asarray(catalog.ids, dtype=str)
    np.savez(out / RESIDUALS, item_ids=ids[warm], vectors=offsets[warm].astype(np.float32))
    (out / COVISIT_FILE).unlink(missing_ok=True)
    if covisit is not None:
        covisit[0].save(out / COVISIT_FILE, catalog.ids, covisit[1])
    files = {f.name: sha256_file(f) for f in sorted(out.iterdir()) if f.name != MANIFEST}
    version = graphs_version(files)
    manifest = {
        "version": version,
        "dim": dim,
        "n_events": n,
        "text_model_version": catalog.model_version,
        "variants": list(variants),
        "files": files,
        "config": {**model.cfg.__dict__, "alpha_learned": model.alpha},
        "metrics": {**model.metrics, "parity": parity},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=float))
    return out
