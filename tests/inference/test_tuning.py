"""A model folder's tuned scoring weights (inference/tuning.py): what the worker and eval read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inference.tuning import TUNED_FILE, read_tuned, with_model_scoring
from streamrec.settings import Settings


def _write(folder: Path, chosen: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / TUNED_FILE).write_text(json.dumps({"chosen": chosen, "metric": "ndcg@10", "split": "valid"}))
    return folder


def test_a_folder_without_a_tuning_file_leaves_the_settings_as_they_are(tmp_path: Path) -> None:
    s = Settings().override(model_dir=tmp_path)
    assert read_tuned(tmp_path) == {}
    assert with_model_scoring(s) is s


def test_the_folders_values_fill_the_defaults_and_explicit_settings_win(tmp_path: Path) -> None:
    folder = _write(tmp_path / "m", {"covisit_weight": 0.35, "mmr_lambda": 0.9})
    s = Settings().override(model_dir=folder)
    tuned = with_model_scoring(s)
    assert tuned.scoring.covisit_weight == 0.35 and tuned.scoring.mmr_lambda == 0.9
    assert tuned.scoring.alpha == s.scoring.alpha  # not in the file: the setting's value
    # an operator's explicit value (environment, .env or override) is kept over the folder's
    pinned = Settings().override(model_dir=folder, scoring={"covisit_weight": 0.05})
    both = with_model_scoring(pinned)
    assert both.scoring.covisit_weight == 0.05 and both.scoring.mmr_lambda == 0.9
    # another folder named explicitly (eval's served rows) is read instead of the settings' own
    other = _write(tmp_path / "other", {"covisit_weight": 0.4})
    assert with_model_scoring(s, other).scoring.covisit_weight == 0.4
    assert with_model_scoring(tuned).scoring == tuned.scoring  # applying twice changes nothing


def test_a_field_that_is_not_a_ranking_weight_or_out_of_bounds_is_refused(tmp_path: Path) -> None:
    bad = _write(tmp_path / "bad", {"top_k": 5})
    with pytest.raises(ValueError, match="top_k.*cannot come from a model folder"):
        read_tuned(bad)
    out = _write(tmp_path / "out", {"mmr_lambda": 3.0})
    with pytest.raises(ValueError, match="mmr_lambda"):
        with_model_scoring(Settings().override(model_dir=out))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / TUNED_FILE).write_text("not json")
    with pytest.raises(ValueError, match="not a streamrec tuning file"):
        read_tuned(tmp_path / "junk")
