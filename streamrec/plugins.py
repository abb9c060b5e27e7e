"""The worker's plug-in points: ``"module:callable"`` names of ``callable(settings)`` factories
(the catalog and the text encoder), resolved in the worker and in its scoring process."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from streamrec.settings import Settings


def load_factory(spec: str) -> Callable[[Settings], Any]:
    """``"module:attribute"`` → the callable it names (the worker's plug-in points)."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"expected 'module:callable', got {spec!r}")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load {spec!r}: {exc}") from exc
