"""The small typed interfaces through which the top-level packages talk.

``inference`` implements :class:`ItemVectors` / :class:`Catalog` (the catalog index),
:class:`TextEncoder` and :class:`PopularitySource`; ``profiles`` reads item vectors through
:class:`ItemVectors` only; ``alerts`` implements :class:`DemandAdjustments`, which the scorer
applies, and a :class:`Hook`. The packages never import each other's internals: ``streams``
(the faust worker, ``streams/context.py``) wires the implementations together.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from streamrec.events import Event


@runtime_checkable
class ItemVectors(Protocol):
    """Item embeddings h_i: L2-normalised float32 rows, looked up by item id."""

    model_version: str
    dim: int

    def lookup(self, item_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(vectors of shape (n, dim), found mask of shape (n,)); rows of unknown ids are zero."""
        ...


@runtime_checkable
class TextEncoder(Protocol):
    """M(text): a batch of texts to L2-normalised float32 vectors."""

    model_version: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Shape (n, dim), float32, rows of unit norm."""
        ...


@runtime_checkable
class DemandAdjustments(Protocol):
    """Time-limited multipliers from demand spikes (>1 boost) and drops (<1 damping).

    An item's multiplier is its own factor times its category's (1.0 where none applies); its
    reason is ``trending`` when the item itself surges, else ``trending_in:<category>`` when its
    category does, else none (a damped item just ranks lower). The scorer reads the factors once
    per round and applies them to every candidate with array operations."""

    def active(self) -> tuple[Mapping[str, float], Mapping[str, float]]:
        """The factors in force now: ({item id: factor}, {category: factor}), both empty when none."""
        ...


@runtime_checkable
class Catalog(ItemVectors, Protocol):
    """The catalog index the scorer ranks: ids, vectors, categories, availability, top-k."""

    ids: list[str]
    matrix: np.ndarray
    categories: list[str]
    available: np.ndarray

    def index_of(self, item_ids: Sequence[str]) -> np.ndarray:
        """Row of each id, -1 for unknown ids."""
        ...

    def topk(
        self,
        queries: np.ndarray,
        k: int,
        exclude: list[np.ndarray] | None = None,
        available_only: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(rows (n, k), scores (n, k)) of the best items per query row, ``exclude[i]`` rows left
        out, and with ``available_only`` the unavailable items too."""
        ...


class PopularitySource(Protocol):
    """Popular / trending items for users without a profile vector."""

    def top(self, k: int, category: str | None = None) -> list[tuple[str, float]]: ...


class Hook(Protocol):
    """Run after each batch's profiles are applied, with the applied events and changed users.

    The applied events are the batch's valid events less replays and duplicates, so a hook
    that counts (the demand monitor) never counts an event twice.
    """

    async def __call__(self, events: Sequence[Event], changed_users: set[str]) -> None: ...


@runtime_checkable
class BlockingHook(Protocol):
    """A hook whose work is blocking I/O (Redis, a pipe to the scoring process): the pipeline
    runs all of a batch's blocking hooks one after the other in one worker thread, one thread
    hop per batch instead of one per hook. A failure of one is logged and the others still run."""

    def run_blocking(self, events: Sequence[Event], changed_users: set[str]) -> None: ...
