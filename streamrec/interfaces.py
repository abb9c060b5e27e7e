"""The small typed interfaces through which the top-level packages talk.

``inference`` implements :class:`ItemVectors` (the catalog index) and :class:`TextEncoder`;
``profiles`` reads item vectors through :class:`ItemVectors` only; ``alerts`` implements
:class:`DemandAdjustments`, which the scorer applies. The packages never import each
other's internals: ``streams`` (the faust worker) wires the implementations together.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np


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
    """Time-limited multipliers from demand spikes (>1 boost) and drops (<1 damping)."""

    def factors(
        self, item_ids: Sequence[str], categories: Sequence[str]
    ) -> tuple[np.ndarray, list[str | None]]:
        """(multiplier per item, shape (n,), 1.0 when none; reason per item, e.g. 'trending_in:lantern')."""
        ...
