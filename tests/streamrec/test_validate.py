"""`streamrec validate`: the worker's decoder (and catalog check) over a file of events."""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner
from support.profile_reference import RandomItems
from support.schemas import malformed_records

from inference.catalog import CatalogIndex
from streamrec.cli import main
from streams.validation import RawRecord, Validator

GOOD = {"v": 1, "event_id": "g", "type": "view", "user_id": "u1", "ts": 1_700_000_000_000, "item_id": "i3"}
LINE = re.compile(r"^line (\d+): (\w+): (.*)$")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A model folder whose catalog holds RandomItems' ids (i0 ..)."""
    items = RandomItems()
    folder = tmp_path_factory.mktemp("model")
    CatalogIndex(items.ids, items.matrix, items.model_version).save(folder / "catalog")
    return folder


def _mixed() -> list[bytes]:
    """Good lines around every malformed kind of tests/streams/test_validation.py that fits on a line."""
    lines: list[bytes] = []
    for k, (value, _) in enumerate(malformed_records()):
        if value is None or b"\n" in value:  # no value at all (empty) is not a line
            continue
        lines.append(orjson.dumps({**GOOD, "event_id": f"g{k}", "item_id": f"i{k}"}))
        lines.append(value)
    lines.append(orjson.dumps({**GOOD, "type": "search", "item_id": None, "query": "jar"}))
    return lines


def _run(args: list[str], data: bytes) -> tuple[int, list[tuple[int, str, str]], str]:
    res = CliRunner().invoke(main, ["validate", *args], input=data)
    out = res.output.splitlines()
    bad = [(int(m[1]), m[2], m[3]) for m in map(LINE.match, out) if m]
    return res.exit_code, bad, out[-1] if out else ""


def test_each_bad_line_gets_the_reason_of_the_workers_dead_letter(model_dir: Path, tmp_path: Path) -> None:
    lines = _mixed()
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    code, bad, summary = _run([str(path), "--catalog", str(model_dir)], b"")

    records = [RawRecord(v, offset=n) for n, v in enumerate(lines, 1)]
    dead = Validator(CatalogIndex.load(model_dir / "catalog")).validate(records).dead
    expected = sorted((d.record.offset, d.reason, d.detail) for d in dead)
    assert bad == expected
    listed = {r for v, r in malformed_records() if v is not None}
    assert {r for _, r, _ in bad} == listed  # every kind shows up, unknown_item included
    assert code == 1
    n_bad = len(expected)
    assert summary.startswith(f"{len(lines)} event(s): {len(lines) - n_bad} valid, {n_bad} invalid (")


def test_without_a_catalog_unknown_items_pass_and_stdin_is_read() -> None:
    lines = _mixed()
    code, bad, summary = _run(["-"], b"\n".join(lines))
    dead = Validator(None).validate([RawRecord(v, offset=n) for n, v in enumerate(lines, 1)]).dead
    assert bad == sorted((d.record.offset, d.reason, d.detail) for d in dead)
    assert "unknown_item" not in {r for _, r, _ in bad} and code == 1
    assert "no catalog check" in summary


def test_a_clean_file_exits_0_and_blank_lines_are_skipped(model_dir: Path) -> None:
    good = [orjson.dumps({**GOOD, "event_id": f"g{k}", "item_id": f"i{k}"}) for k in range(5)]
    data = b"\n".join(good[:2]) + b"\n\n  \r\n" + b"\r\n".join(good[2:]) + b"\r\n"
    code, bad, summary = _run(["-", "--catalog", str(model_dir)], data)
    assert (code, bad) == (0, [])
    assert summary.startswith("5 event(s): 5 valid, 0 invalid")
    code, bad, _ = _run(["-"], data + b"\n" + b"nope\n")
    assert code == 1 and bad[0][:2] == (9, "not_json")  # line numbers count the blank lines too
    code, bad, _ = _run(["-", "--quiet"], b"nope\n")
    assert code == 1 and bad == []


def test_a_folder_without_a_catalog_is_an_error(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["validate", "-", "--catalog", str(tmp_path)], input=b"{}\n")
    assert res.exit_code == 1 and "no catalog" in res.output and "Traceback" not in res.output
