"""``streamrec bench chaos``, small: the long fault drill's own checks pass on a short replay.

The CI versions of each fault live in tests/streams (test_scale_out, test_faults,
test_push_recovery); this keeps the one-command long version from rotting.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from benchmarks.chaos import chaos, chaos_items, fuzz_records
from streams.validation import RawRecord, Validator

pytestmark = pytest.mark.timeout(400)


def test_every_fuzzed_record_is_a_dead_letter(stack):
    bad = fuzz_records(60)
    assert len(set(bad)) == 60
    batch = Validator(chaos_items(stack)).validate(
        [RawRecord(v, b"fz", "t", 0, i) for i, v in enumerate(bad)]
    )
    assert batch.events == [] and len(batch.dead) == 60
    assert {d.reason for d in batch.dead} >= {"not_json", "unknown_item"}


def test_a_short_drill_finds_nothing_lost_or_repeated(stack, tmp_path):
    out = tmp_path / "chaos.json"
    res = CliRunner().invoke(
        chaos,
        ["--events", "3000", "--rate", "600", "--faults", "3", "--output", str(out)],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert r["worker_kills"] == 2 and r["graceful_leaves"] == 1
    assert r["mismatching_profiles"] == r["events_applied_twice"] == r["events_lost"] == 0
    assert r["dead_letters"] == r["dead_letters_unique"] == r["dead_letters_expected"] > 0
    assert r["users_without_fresh_push"] == r["users_still_owed"] == 0
