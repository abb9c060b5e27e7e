"""An array derived from a matrix that can change (the catalog's vectors), kept until it does."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np


class Derived:
    """``build(matrix)``, computed once and again only when ``matrix`` is another array, changes
    shape, or ``revision`` changes (pass the catalog's ``revision`` where its vectors change in
    place). The source is held while cached, so that its id cannot name another array meanwhile."""

    def __init__(self, build: Callable[[np.ndarray], np.ndarray]) -> None:
        self._build = build
        self._lock = threading.Lock()
        self._key: tuple[Any, ...] | None = None
        self._source: np.ndarray | None = None
        self.value: np.ndarray | None = None

    def get(self, matrix: np.ndarray, revision: int | None = None) -> np.ndarray:
        key = (id(matrix), matrix.shape, revision)
        with self._lock:
            if self.value is None or self._key != key:
                self.value, self._key, self._source = self._build(matrix), key, matrix
            return self.value
