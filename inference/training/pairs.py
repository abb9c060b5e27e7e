"""Training pairs and evaluation cases from a dataset in the generic form (no torch).

* (context -> next item): for every position t of a user's sequence, the context is the texts
  of the user's last ``n`` items before t, most recent first, each cut to ``item_words`` words
  and joined with " ; " (the tokenizer then truncates to max_len tokens, dropping the oldest);
  the target is the item at t.
  With ``basket=True`` items sharing a timestamp form one basket (an order): the context of
  every item of a basket is the user's items of *earlier* baskets only, which is what a
  recommender knows before the order starts (and what the evaluation asks). On data without
  shared timestamps (leave-one-out sequences) the two modes give the same pairs.
* (query -> clicked item): an interaction row with both a query and an item, or a search row
  (query, no item) followed by the user's next item interaction.

Evaluation cases (:func:`eval_cases`): for each user with history before the evaluated split,
the first item of the split the user had not interacted with before is the target, the
history (all earlier splits) is the context and is excluded from the ranking. On a
leave-one-out dataset (Amazon Scientific) this is the one valid / test item per user.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import groupby
from operator import itemgetter

import numpy as np
import pandas as pd

from streamrec.datasets import SPLITS, Dataset

SEP = " ; "


def clip_words(text: str, words: int) -> str:
    """The first ``words`` words of ``text`` (all of it when ``words`` <= 0)."""
    if words <= 0:
        return text
    parts = text.split()
    return " ".join(parts[:words]) if len(parts) > words else text


def context_text(history_texts: Sequence[str], n: int, item_words: int) -> str:
    """The context of a chronological history: the last ``n`` texts, most recent first."""
    recent = list(history_texts)[-n:][::-1] if n > 0 else list(history_texts)[::-1]
    return SEP.join(clip_words(t, item_words) for t in recent)


@dataclass
class Pairs:
    """Parallel lists: context/query text, target item id, the user it came from, its kind."""

    texts: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    users: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)  # "context" or "query"

    def __len__(self) -> int:
        return len(self.texts)

    def add(self, text: str, target: str, user: str, kind: str) -> None:
        self.texts.append(text)
        self.targets.append(target)
        self.users.append(user)
        self.kinds.append(kind)

    def take(self, idx: Sequence[int] | np.ndarray) -> Pairs:
        return Pairs(
            [self.texts[i] for i in idx],
            [self.targets[i] for i in idx],
            [self.users[i] for i in idx],
            [self.kinds[i] for i in idx],
        )


def _dedupe_consecutive(seq: list[str]) -> list[str]:
    return [x for k, x in enumerate(seq) if k == 0 or x != seq[k - 1]]


def training_pairs(
    ds: Dataset,
    splits: Sequence[str] = ("train",),
    context_items: int = 10,
    item_words: int = 24,
    queries: bool = True,
    skip_repeats: bool = True,
    max_pairs_per_user: int = 0,
    max_pairs: int = 0,
    seed: int = 0,
    basket: bool = False,
) -> Pairs:
    """(context -> next item) pairs from each user's sequence in ``splits`` (plus query pairs).

    ``skip_repeats``: no pair whose target the user already had (the evaluation excludes history,
    so learning repeats would not help). ``basket``: contexts hold earlier baskets only (see the
    module doc). ``max_pairs_per_user``: keep a user's most recent pairs; ``max_pairs``: a seeded
    random sample overall (0 = all).
    """
    text = ds.item_text()
    inter = ds.interactions[ds.interactions["split"].isin(list(splits))]
    pairs = Pairs()
    rng = np.random.default_rng(seed)
    items = inter[inter["item_id"].ne("") & inter["item_id"].isin(text.keys())]
    for user, g in items.groupby("user_id", sort=False):
        ids = g["item_id"].tolist()
        if basket:  # basket number of each row: a new basket starts where the timestamp changes
            ts = g["ts"].to_numpy()
            bask = np.concatenate([[0], np.cumsum(ts[1:] != ts[:-1])])
        else:
            ids = _dedupe_consecutive(ids)
            bask = np.arange(len(ids))
        seq: list[str] = []  # the user's history so far, consecutive repeats collapsed
        seen: set[str] = set()
        user_pairs: list[tuple[str, str]] = []
        for _, rows in groupby(zip(bask, ids, strict=True), key=itemgetter(0)):
            basket_ids = [i for _, i in rows]
            if seq:
                ctx = context_text([text[i] for i in seq[-context_items:]], context_items, item_words)
                user_pairs += [
                    (ctx, t) for t in dict.fromkeys(basket_ids) if not (skip_repeats and t in seen)
                ]
            for i in basket_ids:
                if not seq or seq[-1] != i:
                    seq.append(i)
                seen.add(i)
        if max_pairs_per_user > 0:
            user_pairs = user_pairs[-max_pairs_per_user:]
        for c, tgt in user_pairs:
            pairs.add(c, tgt, str(user), "context")
    if queries and (inter["query"] != "").any():
        _query_pairs(inter, text, pairs)
    if max_pairs and len(pairs) > max_pairs:
        pairs = pairs.take(np.sort(rng.choice(len(pairs), size=max_pairs, replace=False)))
    return pairs


def _query_pairs(inter: pd.DataFrame, text: dict[str, str], pairs: Pairs) -> None:
    for user, g in inter.groupby("user_id", sort=False):
        pending: str | None = None
        for q, item in zip(g["query"].tolist(), g["item_id"].tolist(), strict=True):
            if q and item and item in text:
                pairs.add(q, item, str(user), "query")
                pending = None
            elif q and not item:
                pending = q
            elif pending and item in text:
                pairs.add(pending, item, str(user), "query")
                pending = None


@dataclass
class EvalCases:
    """Users to evaluate: context text, history item ids (excluded), target item id."""

    users: list[str]
    contexts: list[str]
    histories: list[list[str]]
    targets: list[str]
    skipped_repeat: int = 0  # users whose every split item was already in their history
    skipped_cold: int = 0  # users with no history before the split

    def __len__(self) -> int:
        return len(self.users)

    def take(self, n: int, seed: int = 0) -> EvalCases:
        """A seeded random sample of ``n`` cases (all when fewer)."""
        if n <= 0 or n >= len(self):
            return self
        idx = np.sort(np.random.default_rng(seed).choice(len(self), size=n, replace=False))
        return EvalCases(
            [self.users[i] for i in idx],
            [self.contexts[i] for i in idx],
            [self.histories[i] for i in idx],
            [self.targets[i] for i in idx],
            self.skipped_repeat,
            self.skipped_cold,
        )


def eval_cases(ds: Dataset, split: str = "test", context_items: int = 10, item_words: int = 24) -> EvalCases:
    """One case per user who has history before ``split`` and a new item in it (see module doc)."""
    if split not in SPLITS[1:]:
        raise ValueError(f"evaluate on 'valid' or 'test', not {split!r}")
    text = ds.item_text()
    before = SPLITS[: SPLITS.index(split)]
    inter = ds.interactions[ds.interactions["item_id"].isin(text.keys())]
    hist_df = inter[inter["split"].isin(list(before))]
    histories = {u: g["item_id"].tolist() for u, g in hist_df.groupby("user_id", sort=False)}
    cases = EvalCases([], [], [], [])
    for user, g in inter[inter["split"] == split].groupby("user_id", sort=False):
        hist = histories.get(user)
        if not hist:
            cases.skipped_cold += 1
            continue
        seen = set(hist)
        target = next((i for i in g["item_id"].tolist() if i not in seen), None)
        if target is None:
            cases.skipped_repeat += 1
            continue
        h = _dedupe_consecutive(hist)
        cases.users.append(str(user))
        cases.contexts.append(context_text([text[i] for i in h[-context_items:]], context_items, item_words))
        cases.histories.append(list(dict.fromkeys(hist)))
        cases.targets.append(target)
    return cases
