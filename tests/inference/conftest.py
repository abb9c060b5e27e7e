"""Fixtures of the inference tests: a real exported model folder, a small generic dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest


@pytest.fixture(scope="session")
def pretrained_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pretrained base encoder exported with its fp32 and int8 variants and a manifest."""
    from inference.training.export import export_pretrained

    return export_pretrained(
        tmp_path_factory.mktemp("model") / "pretrained", max_len=64, variants=("fp32", "int8")
    )


@pytest.fixture(scope="session")
def real_texts(data_dir: Path) -> list[str]:
    """Real item texts: 150 Online Retail descriptions and 50 Amazon Scientific texts (seeded)."""
    from streamrec.datasets import load_dataset

    rng = np.random.default_rng(0)
    out: list[str] = []
    for name, n in (("online-retail", 150), ("scientific", 50)):
        texts = load_dataset(name, data_dir).items["text"].tolist()
        out += [texts[i] for i in rng.choice(len(texts), size=n, replace=False)]
    return out


WORDS = (
    "amber basil cedar delta ember fjord garnet harbor indigo juniper kelp lilac maple nectar onyx "
    "pepper quartz raven saffron tundra umber violet willow xenon yarrow zephyr"
).split()


def write_generic_dataset(folder: Path, n_items: int = 24, n_users: int = 120, seed: int = 0) -> Path:
    """A third dataset in the generic format (CSV, ``order`` instead of timestamps, a query column):
    item k is "<word> <word> gadget"; every user walks a fixed cycle item k -> item succ(k), so the
    next item is predictable from the context but not from text similarity."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"{WORDS[k % len(WORDS)]} {WORDS[(7 * k + 3) % len(WORDS)]} gadget" for k in range(n_items)]
    items = pd.DataFrame(
        {"item_id": [f"i{k}" for k in range(n_items)], "title": names, "brand": ["acme"] * n_items,
         "category": [f"c{k % 4}" for k in range(n_items)]}
    )  # fmt: skip
    succ = rng.permutation(n_items)
    rows = []
    for u in range(n_users):
        k = int(rng.integers(n_items))
        for t in range(6):
            q = names[k].split()[0] if t == 2 else ""
            rows.append({"user_id": f"u{u}", "item_id": f"i{k}", "order": t, "type": "click", "query": q})
            k = int(succ[k])
    items.to_csv(folder / "items.csv", index=False)
    pd.DataFrame(rows).to_csv(folder / "interactions.csv", index=False)
    return folder


@pytest.fixture
def generic_dataset_dir(tmp_path: Path) -> Path:
    return write_generic_dataset(tmp_path / "third-dataset")
