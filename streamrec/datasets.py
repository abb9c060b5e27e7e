"""Datasets: one generic in-memory form and adapters for the real data in ``../shared/data``.

Generic on-disk format (any third dataset written this way works with no code change)
-----------------------------------------------------------------------------------
A folder with two files (CSV, Parquet or JSON lines, by extension):

``items.{csv,parquet,jsonl}``
    ``item_id`` (string, required), ``text`` (string) *or* any number of text columns
    (``title``, ``description``, ``brand``, ``categories`` ... all non-reserved string columns
    are joined with ". " in column order), optional ``category`` (used for demand counts and
    ``trending_in:<category>`` reasons) and optional ``available`` (bool, default true).

``interactions.{csv,parquet,jsonl}``
    ``user_id``, ``item_id`` (strings; ``item_id`` may be empty for a search), ``ts`` (epoch ms)
    *or* ``order`` (an integer position per user, when there are no timestamps), optional
    ``type`` (view, click, add_to_cart, purchase, search; default click), optional ``query``,
    optional ``split`` (train, valid, test). Without a ``split`` column the last interaction of
    each user is test, the one before valid, the rest train (leave-one-out).

Load it with ``load_dataset("path/to/folder")``. The two real datasets have names:
``load_dataset("scientific")`` and ``load_dataset("online-retail")``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

RESERVED_ITEM_COLUMNS = {"item_id", "category", "available"}
SPLITS = ("train", "valid", "test")

# UCI Online Retail: stock codes that are not products.
NON_PRODUCT_CODES = {
    "POST",
    "M",
    "D",
    "DOT",
    "BANK CHARGES",
    "AMAZONFEE",
    "C2",
    "CRUK",
    "PADS",
    "S",
    "B",
    "GIFT_0001_10",
    "GIFT_0001_20",
    "GIFT_0001_30",
    "GIFT_0001_40",
    "GIFT_0001_50",
}
RETAIL_TRAIN_END = pd.Timestamp("2011-10-01")  # train: up to 2011-09-30
RETAIL_TEST_START = pd.Timestamp("2011-11-01")  # valid: October 2011; test: from 2011-11-01

# Words that describe rather than name a product; skipped when deriving a retail category.
_DESCRIPTIVE = set(
    """
    DESIGN RETROSPOT PINK RED BLUE GREEN WHITE BLACK IVORY LARGE SMALL MINI JUMBO SET OF POLKADOT
    VINTAGE CHRISTMAS HEART ASSORTED COLOUR COLOURS 3 6 12 2 4 SPOT SPOTS FLOWER FLORAL GLASS WOODEN
    METAL PAISLEY SKULL SKULLS STRAWBERRY LOVE HEARTS STAR DOLLY GIRL GIRLS BOY CHARLOTTE REGENCY
    LOLITA + & - DES DESIGNS
    """.split()
)


@dataclass
class Dataset:
    """Items and time-ordered interactions in the generic form.

    ``items``: item_id, text, category (may be empty), available.
    ``interactions``: user_id, item_id, ts (epoch ms, synthetic when ``has_time`` is false),
    type, query, split; sorted by (ts, user order).
    """

    name: str
    items: pd.DataFrame
    interactions: pd.DataFrame
    has_time: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def item_ids(self) -> list[str]:
        return self.items["item_id"].tolist()

    def item_text(self) -> dict[str, str]:
        return dict(zip(self.items["item_id"], self.items["text"], strict=True))

    def item_category(self) -> dict[str, str]:
        return dict(zip(self.items["item_id"], self.items["category"].fillna(""), strict=True))

    def split(self, name: str) -> pd.DataFrame:
        return self.interactions[self.interactions["split"] == name]

    def sequences(self, upto: str = "test") -> dict[str, list[str]]:
        """Each user's item sequence in time order, including splits up to ``upto``."""
        keep = SPLITS[: SPLITS.index(upto) + 1]
        df = self.interactions[self.interactions["split"].isin(keep) & self.interactions["item_id"].ne("")]
        return {u: g["item_id"].tolist() for u, g in df.groupby("user_id", sort=False)}

    def subset(self, max_users: int | None = None, seed: int = 0) -> Dataset:
        """A smaller dataset with a random sample of users (all items kept)."""
        if not max_users:
            return self
        users = self.interactions["user_id"].unique()
        if len(users) <= max_users:
            return self
        rng = np.random.default_rng(seed)
        keep = set(rng.choice(users, size=max_users, replace=False))
        inter = self.interactions[self.interactions["user_id"].isin(keep)].reset_index(drop=True)
        return Dataset(
            self.name, self.items, inter, self.has_time, [*self.notes, f"subset of {max_users} users"]
        )


def _read_table(path_without_ext: Path) -> pd.DataFrame:
    for ext in (".parquet", ".csv", ".jsonl"):
        p = path_without_ext.with_suffix(ext)
        if p.exists():
            if ext == ".jsonl":
                return pd.read_json(p, lines=True, dtype=False)
            if ext == ".csv":
                return pd.read_csv(p, dtype=str, keep_default_na=False)
            return pd.read_parquet(p)
    raise FileNotFoundError(
        f"{path_without_ext.name}.parquet/.csv/.jsonl not found in {path_without_ext.parent}: "
        "a generic dataset folder needs items and interactions files (see streamrec/datasets.py)"
    )


def _finish(name: str, items: pd.DataFrame, inter: pd.DataFrame, has_time: bool, notes: list[str]) -> Dataset:
    items = items.copy()
    items["item_id"] = items["item_id"].astype(str)
    if "category" not in items:
        items["category"] = ""
    items["category"] = items["category"].fillna("").astype(str)
    if "available" not in items:
        items["available"] = True
    items["available"] = items["available"].astype(bool)
    items["text"] = items["text"].fillna("").astype(str)
    items = (
        items[["item_id", "text", "category", "available"]].drop_duplicates("item_id").reset_index(drop=True)
    )
    inter = inter.copy()
    for col, default in (("type", "click"), ("query", ""), ("split", "")):
        if col not in inter:
            inter[col] = default
        inter[col] = inter[col].fillna(default).astype(str)
    inter["user_id"] = inter["user_id"].astype(str)
    inter["item_id"] = inter["item_id"].fillna("").astype(str)
    inter["ts"] = inter["ts"].astype("int64")
    inter = inter.sort_values(["ts"], kind="stable").reset_index(drop=True)
    if (inter["split"] == "").all():
        inter["split"] = _leave_one_out(inter)
    extra = [c for c in ("quantity", "price") if c in inter]
    cols = ["user_id", "item_id", "ts", "type", "query", "split", *extra]
    return Dataset(name, items, inter[cols], has_time, notes)


def _leave_one_out(inter: pd.DataFrame) -> np.ndarray:
    rank_from_end = inter.groupby("user_id", sort=False).cumcount(ascending=False).to_numpy()
    return np.where(rank_from_end == 0, "test", np.where(rank_from_end == 1, "valid", "train"))


def load_generic(folder: Path) -> Dataset:
    folder = Path(folder)
    items = _read_table(folder / "items")
    inter = _read_table(folder / "interactions")
    if "item_id" not in items:
        raise ValueError(f"{folder}/items has no item_id column")
    if "text" not in items:
        # is_string_dtype: pandas 3 reads text columns as "str", not object.
        text_cols = [
            c
            for c in items.columns
            if c not in RESERVED_ITEM_COLUMNS and pd.api.types.is_string_dtype(items[c])
        ]
        if not text_cols:
            raise ValueError(f"{folder}/items has no text column (text, title, description, ...)")
        items["text"] = items[text_cols].fillna("").astype(str).agg(". ".join, axis=1)
    has_time = "ts" in inter
    if not has_time:
        if "order" not in inter:
            raise ValueError(f"{folder}/interactions needs a ts (epoch ms) or an order column")
        inter["ts"] = _synthetic_ts(inter["order"].astype(int).to_numpy())
    return _finish(folder.name, items, inter, has_time, [])


def _synthetic_ts(order: np.ndarray) -> np.ndarray:
    # Datasets without time: position k of a sequence becomes 2020-01-01 + k minutes.
    return 1_577_836_800_000 + order.astype(np.int64) * 60_000


def load_scientific(folder: Path) -> Dataset:
    """Amazon Industrial & Scientific, UniSRec preprocessing (order only, no timestamps)."""
    folder = Path(folder)
    text = pd.read_csv(folder / "Scientific.text", sep="\t", dtype=str, keep_default_na=False)
    text.columns = ["asin", "text"]
    idx = pd.read_csv(
        folder / "Scientific.item2index", sep="\t", header=None, names=["asin", "iid"], dtype=str
    )
    asin_of = dict(zip(idx["iid"], idx["asin"], strict=True))
    items = pd.DataFrame({"item_id": text["asin"], "text": text["text"].str.strip()})

    def read_inter(split: str) -> pd.DataFrame:
        df = pd.read_csv(folder / f"Scientific.{split}.inter", sep="\t", dtype=str, keep_default_na=False)
        df.columns = ["user_id", "history", "item_id"]
        return df

    train, valid, test = read_inter("train"), read_inter("valid"), read_inter("test")
    # Rebuild full sequences (README of the data): reversed train rows per user, the shortest
    # row's first history item, then every train target, then valid, then test.
    rows: list[tuple[str, str, int, str]] = []
    for user, g in train.iloc[::-1].groupby("user_id", sort=False):
        first_hist = g["history"].iloc[0].split()[0]
        seq = [first_hist, *g["item_id"].tolist()]
        rows.extend((user, asin_of[i], k, "train") for k, i in enumerate(seq))
    n_train = {}
    for user, _, k, _ in rows:
        n_train[user] = k + 1
    for split, df in (("valid", valid), ("test", test)):
        for user, hist, target in df.itertuples(index=False):
            if user not in n_train:  # user with no train row: history is all they had
                h = hist.split()
                rows.extend((user, asin_of[i], k, "train") for k, i in enumerate(h))
                n_train[user] = len(h)
            pos = n_train[user] + (0 if split == "valid" else 1)
            rows.append((user, asin_of[target], pos, split))
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "order", "split"])
    inter["ts"] = _synthetic_ts(inter["order"].to_numpy())
    inter["type"] = "purchase"
    inter = inter.sort_values(["user_id", "order"], kind="stable")
    notes = [
        "no timestamps: ts is synthetic (sequence position in minutes); leave-one-out splits from UniSRec"
    ]
    return _finish("scientific", items, inter.drop(columns="order"), False, notes)


def retail_category(description: str) -> str:
    """A coarse product category from a retail description: its last naming word ("LANTERN")."""
    words = [w.strip(".,'\"()") for w in str(description).upper().split()]
    for w in reversed(words):
        if w and w.isalpha() and w not in _DESCRIPTIVE and len(w) > 2:
            return w.lower()
    return "other"


def load_online_retail(folder: Path) -> Dataset:
    """UCI Online Retail: clean purchases, split by time (train ..2011-09, valid 2011-10, test 2011-11..)."""
    folder = Path(folder)
    raw = pd.read_parquet(folder / "customer_raw.parquet")
    df = raw[
        raw["CustomerID"].notna()
        & ~raw["InvoiceNo"].astype(str).str.startswith("C")
        & (raw["Quantity"] > 0)
        & ~raw["StockCode"].astype(str).str.upper().isin(NON_PRODUCT_CODES)
        & raw["Description"].notna()
        & (raw["Description"].astype(str) != "nan")
    ].copy()
    df["StockCode"] = df["StockCode"].astype(str).str.upper()
    # The most frequent description of a stock code is its text.
    desc = df.groupby("StockCode")["Description"].agg(lambda s: s.value_counts().index[0]).str.strip()
    items = pd.DataFrame({"item_id": desc.index, "text": desc.to_numpy()})
    items["category"] = items["text"].map(retail_category)
    ts = df["InvoiceDate"].astype("datetime64[ms]").astype("int64")
    split = np.where(
        df["InvoiceDate"] < RETAIL_TRAIN_END,
        "train",
        np.where(df["InvoiceDate"] < RETAIL_TEST_START, "valid", "test"),
    )
    inter = pd.DataFrame(
        {
            "user_id": df["CustomerID"].astype(int).astype(str).to_numpy(),
            "item_id": df["StockCode"].to_numpy(),
            "ts": ts.to_numpy(),
            "type": "purchase",
            "split": split,
            "quantity": df["Quantity"].to_numpy(),
            "price": df["UnitPrice"].to_numpy(),
        }
    )
    notes = ["clean purchases: customer present, not cancelled, quantity > 0, non-product codes dropped"]
    ds = _finish("online-retail", items, inter, True, notes)
    return ds


DATASETS = {
    "scientific": ("amazon-scientific-unisrec", load_scientific),
    "online-retail": ("uci-online-retail", load_online_retail),
}


def load_dataset(name_or_path: str | Path, data_dir: Path | None = None) -> Dataset:
    """Load a named real dataset (from ``data_dir``) or a generic dataset folder."""
    key = str(name_or_path)
    if key in DATASETS:
        if data_dir is None:
            from streamrec.settings import get_settings

            data_dir = get_settings().data_dir
        sub, loader = DATASETS[key]
        folder = Path(data_dir) / sub
        if not folder.exists():
            raise FileNotFoundError(
                f"dataset {key!r} not found at {folder}: set STREAMREC_DATA_DIR to the folder that holds {sub}/"
            )
        return loader(folder)
    path = Path(key)
    if path.is_dir():
        return load_generic(path)
    raise FileNotFoundError(
        f"{key!r} is neither a known dataset ({', '.join(DATASETS)}) nor a dataset folder"
    )
