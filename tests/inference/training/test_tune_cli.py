"""`streamrec train-user --no-refit` → `streamrec tune` → the served folder ranks with the choice:
`eval loo`'s streamrec row on the same valid cases equals the tune report's figures for it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from inference.tuning import TUNED_FILE, with_model_scoring
from streamrec.cli import main
from streamrec.settings import Settings


def _invoke(args: list[str], env: dict[str, str]) -> str:
    res = CliRunner().invoke(main, args, env=env, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def test_tune_chooses_on_valid_and_what_it_chose_is_what_eval_ranks_with(
    generic_dataset_dir: Path, pretrained_dir: Path, tmp_path: Path, settings: Settings
) -> None:
    from streamrec.settings import get_settings

    get_settings.cache_clear()
    env = {"STREAMREC_STATE_DIR": str(tmp_path / "state"), "STREAMREC_REDIS_PREFIX": settings.redis.prefix}
    model = tmp_path / "model"
    shutil.copytree(pretrained_dir, model)
    data = str(generic_dataset_dir)
    try:
        _invoke(["index", "--dataset", data, "--model-dir", str(model)], env)
        _invoke(["train-user", "--dataset", data, "--model-dir", str(model), "--epochs", "2",
                 "--eval-users", "0", "--layers", "1", "--no-refit"], env)  # fmt: skip
        served = tmp_path / "served"
        served.mkdir()
        res_dir = tmp_path / "tune"
        _invoke(["tune", "--dataset", data, "--model-dir", str(model), "--grid", "covisit_weight=0,1.5",
                 "--write-to", str(model), "--write-to", str(served), "--results-dir", str(res_dir)], env)  # fmt: skip
        report = json.loads((res_dir / "tune-third-dataset-loo.json").read_text())
        assert (res_dir / "tune-third-dataset-loo.md").is_file() and (
            res_dir / "tune-third-dataset-loo.png"
        ).is_file()
        # the settings' own value first, then the grid; every point measured on the same cases
        points = report["points"]
        assert [p["values"]["covisit_weight"] for p in points] == [0.2, 0.0, 1.5]
        assert len({p["n"] for p in points}) == 1 and report["cases"] == points[0]["n"] > 0
        best = max(points, key=lambda p: p["ndcg@10"])
        assert report["best"] == best["values"]
        lo, _ = report["gain_vs_reference"]["interval"]
        assert report["chosen_point"] == (best["values"] if lo > 0 else points[0]["values"])
        # the folder sets the chosen values, or nothing when the settings' values stay
        assert report["chosen"] == (report["chosen_point"] if lo > 0 else {})
        for folder in (model, served):
            assert json.loads((folder / TUNED_FILE).read_text())["chosen"] == report["chosen"]
            tuned = with_model_scoring(Settings(), folder).scoring.covisit_weight
            assert tuned == report["chosen_point"]["covisit_weight"]
        # eval ranks a folder with the weights its file names: with each point's weights written
        # there, its streamrec row is that point's figures (the co-visitation weight changes them)
        assert len({(p["recall@10"], p["ndcg@10"], p["mrr"]) for p in points}) > 1, points
        for point in points:
            (model / TUNED_FILE).write_text(json.dumps({**report, "chosen": point["values"]}))
            out = tmp_path / "loo.json"
            _invoke(["eval", "loo", "--dataset", data, "--split", "valid", "--model-dir", str(model),
                     "--no-sasrec", "--results-dir", str(tmp_path / "res"), "--output", str(out)], env)  # fmt: skip
            row = json.loads(out.read_text())["streamrec"]
            keys = ("recall@10", "ndcg@10", "recall@50", "mrr", "n")
            assert {k: row[k] for k in keys} == {k: point[k] for k in keys}, point["values"]
        # the re-ordering shop's protocol: the valid period replayed, every point ranking each basket
        # from the same profiles before they learn it (as `eval replay`)
        _invoke(["tune", "--dataset", data, "--model-dir", str(model), "--protocol", "replay",
                 "--grid", "covisit_weight=0,1.5", "--results-dir", str(res_dir)], env)  # fmt: skip
        replay = json.loads((res_dir / "tune-third-dataset-replay.json").read_text())
        assert replay["metric"] == "hr@20" and [p["values"]["covisit_weight"] for p in replay["points"]] == [
            0.2,
            0.0,
            1.5,
        ]
        assert all(p["events"] == replay["cases"] >= replay["users"] > 0 for p in replay["points"])
        assert all(0 <= p["hr@10"] <= p["hr@20"] <= 1 for p in replay["points"])
        # here the successor is found at 0.2 and at 1.5 alike (HR@20 1.0): a tie keeps the settings' values
        assert replay["points"][0]["hr@20"] == max(p["hr@20"] for p in replay["points"])
        assert replay["chosen"] == {} and replay["chosen_point"] == replay["reference"]
        # `eval replay` on the same folder and period, with the ID-based sequential baseline
        # trained in the same job (on train; the valid period is evaluated)
        out = tmp_path / "replay.json"
        _invoke(["eval", "replay", "--dataset", data, "--model-dir", str(model), "--pretrained-dir", str(model),
                 "--split", "valid", "--results-dir", str(tmp_path / "rep"), "--output", str(out)], env)  # fmt: skip
        rows = json.loads(out.read_text())
        assert rows["sasrec"]["events"] == rows["streamrec"]["events"] == replay["cases"]
        assert (
            0 <= rows["sasrec"]["hr@10"] <= rows["sasrec"]["hr@20"] <= 1
            and "sasrec" in rows["streamrec"]["vs"]
        )
        assert "sasrec: ID-only sequential model" in (tmp_path / "rep" / "replay.md").read_text()
    finally:
        get_settings.cache_clear()
