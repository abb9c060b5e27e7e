"""Embedding the catalog: every item text of a dataset through the encoder into a CatalogIndex."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from inference.catalog import CatalogIndex

__all__ = ["build_catalog"]


def build_catalog(
    encoder: Any,
    dataset: Any,
    out_dir: Path | str | None = None,
    batch_size: int = 256,
    ann_threshold: int | None = None,
    ann_recall_target: float | None = None,
) -> CatalogIndex:
    """Embed every item text of ``dataset`` (a streamrec Dataset) with ``encoder`` (batched, progress
    bar) into a CatalogIndex tagged with the encoder's model version; saved to ``out_dir`` if given."""
    items = dataset.items
    texts = items["text"].tolist()
    # Sort by length once so each batch pads little (the encoder sorts within a batch as well).
    order = np.argsort([len(t) for t in texts], kind="stable")
    matrix = np.zeros((len(texts), encoder.dim), np.float32)
    with tqdm(total=len(texts), desc=f"embedding {dataset.name} catalog", unit="item") as bar:
        for s in range(0, len(order), batch_size):
            rows = order[s : s + batch_size]
            matrix[rows] = encoder.encode([texts[r] for r in rows])
            bar.update(len(rows))
    cat = CatalogIndex.from_arrays(
        items["item_id"].tolist(),
        matrix,
        encoder.model_version,
        categories=items["category"].tolist(),
        available=items["available"].to_numpy(bool),
        ann_threshold=ann_threshold,
        ann_recall_target=ann_recall_target,
    )
    if out_dir is not None:
        cat.save(out_dir)
    return cat
