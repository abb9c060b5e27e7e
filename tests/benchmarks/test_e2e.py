"""`streamrec bench e2e --quick` on the real stack: the JSON a speed claim is read from."""

from __future__ import annotations

import json

from click.testing import CliRunner

from streamrec.cli import main


def test_bench_e2e_quick_reports_latency_stages_floor_and_a_drained_lag(retail_model_dir, tmp_path) -> None:
    out = tmp_path / "e2e.json"
    args = ["bench", "e2e", "--quick", "--synthetic-items", "0", "--model-dir", str(retail_model_dir),
            "--output", str(out)]  # fmt: skip
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    (level,) = res["catalogs"]["online_retail"]["levels"]
    assert level["results"] > 0 and 0 < level["p50_ms"] <= level["p99_ms"]
    # drained: the worker's consumer lag (its metrics) reached 0 before the bench's 60 s deadline
    assert level["drain_s"] < 60.0, level
    assert {"kafka_to_batch", "profiles", "score", "score_read", "score_compute", "publish"} <= set(
        level["stages"]
    )
    # the scoring process's own read and scorer are parts of the round trip the worker measures
    st = level["stages"]
    assert st["score_compute"]["n"] == st["score"]["n"] > 0, st
    assert st["score_read"]["mean_ms"] + st["score_compute"]["mean_ms"] <= st["score"]["mean_ms"], st
    # the CPU beside the worker on the same cores: the stack's broker and Redis, the bench itself
    cores = level["cpu_cores"]
    assert {"worker", "scoring_process", "kafka", "redis", "bench_client"} <= set(cores), cores
    assert cores["worker"] > 0 and cores["kafka"] > 0 and cores["bench_client"] > 0
    assert res["kafka_floor"][0]["p50_ms"] > 0 and level["ratio_p50_vs_floor"] > 1
    assert (tmp_path / "e2e.png").is_file()
    # the events follow Online Retail's shoppers and sales (its busiest shopper ~2 % of the events)
    work = res["catalogs"]["online_retail"]["workload"]
    assert res["stream_shaped_after"] == "online-retail" and work["shoppers"] > 4000, work
    assert 0.01 < work["top_shopper_shares"][0] < 0.05 and work["top_item_shares"][0] < 0.02, work


def test_bench_e2e_runs_a_group_of_workers_that_share_the_partitions(retail_model_dir, tmp_path) -> None:
    out = tmp_path / "e2e.json"
    args = ["bench", "e2e", "--quick", "--synthetic-items", "0", "--model-dir", str(retail_model_dir),
            "--workers", "2", "--warmup-s", "2", "--output", str(out)]  # fmt: skip
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["workers"] == 2 and res["catalogs"]["online_retail"]["workers"] == 2
    (level,) = res["catalogs"]["online_retail"]["levels"]
    # the unmeasured warm-up ran first (the quick level's 50 events/s for 2 s), apart from the level
    warm = res["catalogs"]["online_retail"]["warmup"]
    assert res["warmup_s"] == 2.0 and warm["rate_events_per_s"] == 50 and warm["events"] == 100, warm
    assert level["events"] == 200 and level["results"] <= level["events"], level
    assert level["results"] > 0 and level["drain_s"] < 60.0, level  # the lag summed over both reached 0
    # both workers consumed: the group split the events topic's partitions between them
    assert len(level["batches_per_worker"]) == 2 and min(level["batches_per_worker"]) > 0, level


def test_a_level_without_pushed_lists_fails_with_the_workers_last_log_lines(tmp_path) -> None:
    from benchmarks.stream import _no_results

    log = tmp_path / "worker-0.log"
    log.write_text("\n".join(f"line {i}" for i in range(40)) + "\nValueError: the push failed\n")
    msg = _no_results(1000, [log, tmp_path / "missing.log"])
    assert "no recommendation list reached the results topic at 1000 events/s" in msg
    assert str(log) in msg and "ValueError: the push failed" in msg and "line 29" in msg
    assert "line 20" not in msg  # only the last lines
    assert "(log not readable)" in msg
