"""Scorer weights chosen for a model folder on its shop's valid split (``streamrec tune``).

A model folder may carry ``scoring.json``: the values of some scoring weights that
``streamrec tune`` chose for it on the valid split of the shop it was trained on, with the
figures they were chosen by::

    {"chosen": {"covisit_weight": 0.1}, "metric": "ndcg@10", "split": "valid", "dataset": "...",
     "points": [{"values": {...}, "ndcg@10": 0.0301, ...}, ...], ...}

:func:`with_model_scoring` gives the settings a scorer of that folder runs with: the folder's
chosen values for the fields that the settings leave at their defaults. A value set explicitly
(environment, ``.env``, :meth:`~streamrec.settings.Settings.override`) always wins, so an operator
can still pin any weight. The worker (``streams/context.py``, at start, for its scorer and hooks) and the served rows
of ``eval loo`` and ``eval replay`` all read it, so what is evaluated is what is served.
Only the scorer's own ranking weights (:data:`TUNABLE`) can be carried; nothing that changes the
stream's behaviour (list length, coalescing, batching) comes from a model folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from streamrec.settings import Settings

log = logging.getLogger(__name__)

TUNED_FILE = "scoring.json"

#: Scoring fields a model folder may set: weights of the ranking only.
TUNABLE = frozenset(
    {
        "alpha",
        "covisit_weight",
        "covisit_recency",
        "mmr_lambda",
        "popularity_weight",
        "repeat_share",
        "repeat_context",
        "repeat_popularity",
        "repeat_decay",
        "buy_again_share",
    }
)


def read_tuned(model_dir: Path) -> dict[str, Any]:
    """The chosen values in ``<model_dir>/scoring.json`` ({} when it has none). Raises
    ``ValueError`` naming the file when it is unreadable or names a field that cannot be tuned."""
    path = Path(model_dir) / TUNED_FILE
    if not path.is_file():
        return {}
    try:
        chosen = json.loads(path.read_text()).get("chosen", {})
    except (ValueError, AttributeError) as exc:
        raise ValueError(
            f"{path}: not a streamrec tuning file ({exc}); rerun `streamrec tune` or delete it"
        ) from exc
    if not isinstance(chosen, dict):
        raise ValueError(f"{path}: 'chosen' must be an object of scoring fields")
    unknown = sorted(set(chosen) - TUNABLE)
    if unknown:
        raise ValueError(
            f"{path}: {unknown} cannot come from a model folder (tunable: {', '.join(sorted(TUNABLE))})"
        )
    return dict(chosen)


def with_model_scoring(settings: Settings, model_dir: Path | None = None) -> Settings:
    """``settings`` with the model folder's chosen scoring values (``model_dir``, default the
    served folder) for every field the settings do not set explicitly. Out-of-bounds values
    raise, as a bad environment variable would."""
    folder = Path(model_dir) if model_dir is not None else settings.resolved_model_dir
    chosen = read_tuned(folder)
    explicit = settings.scoring.model_fields_set
    take = {k: v for k, v in chosen.items() if k not in explicit}
    if not take:
        return settings
    try:
        tuned = settings.override(scoring=take)
    except ValueError as exc:
        raise ValueError(f"{folder / TUNED_FILE}: {take} is not a valid scoring setting ({exc})") from exc
    pinned = sorted(set(chosen) - set(take))
    log.info(
        "scoring weights from %s: %s%s",
        folder / TUNED_FILE,
        ", ".join(f"{k}={v}" for k, v in sorted(take.items())),
        f" (set explicitly, kept: {', '.join(pinned)})" if pinned else "",
    )
    return tuned
