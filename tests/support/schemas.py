"""``assert_valid(kind, obj)``: a message checked against its published JSON Schema (deploy/schemas/).

``kind`` is a key of ``streamrec.schemas.SCHEMAS`` ("events", "results", "dead-letter-headers",
"alerts"); ``obj`` the decoded JSON, its bytes, or a msgspec Struct. The committed file is what
is checked (``tests/streamrec/test_schemas.py`` keeps it equal to the generated one).
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from typing import Any

import msgspec
import orjson
from jsonschema import Draft202012Validator

from streamrec.schemas import schema_path


@functools.cache
def validator(kind: str) -> Draft202012Validator:
    return Draft202012Validator(json.loads(schema_path(kind).read_text(encoding="utf-8")))


def as_json(obj: Any) -> Any:
    """The JSON value of ``obj`` (bytes are parsed, Structs turned into builtins)."""
    if isinstance(obj, bytes | bytearray | memoryview):
        return orjson.loads(bytes(obj))  # strict JSON: no NaN, UTF-8 only
    if isinstance(obj, msgspec.Struct):
        return msgspec.to_builtins(obj)
    return obj


def errors(kind: str, obj: Any) -> list[str]:
    """The schema violations of ``obj`` (empty when valid)."""
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
        for e in validator(kind).iter_errors(as_json(obj))
    ]


def assert_valid(kind: str, obj: Any) -> None:
    bad = errors(kind, obj)
    assert not bad, f"not a valid {kind} message ({schema_path(kind).name}): {bad}; {as_json(obj)!r}"


def malformed_records() -> list[tuple[bytes | None, str]]:
    """The ``(value, reason)`` records of tests/streams/test_validation.py's parametrize list:
    every kind of malformed record with the dead-letter reason the worker gives it."""
    path = Path(__file__).resolve().parents[1] / "streams" / "test_validation.py"
    spec = importlib.util.spec_from_file_location("_streams_test_validation_cases", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    test = module.test_malformed_records_become_dead_letters_with_reason
    (mark,) = [m for m in test.pytestmark if m.name == "parametrize"]
    return [(value, reason) for value, reason in mark.args[1]]
