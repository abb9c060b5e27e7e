"""The published JSON Schemas (draft 2020-12) of every topic, generated from the code's own types.

``deploy/schemas/<name>.v<version>.schema.json`` for each entry of :data:`SCHEMAS`, where
``<version>`` is the message version (the default of the type's ``v`` field; 1 for a type
without one). The files are committed; a test fails when they differ from what the types
generate, so after changing a message type run::

    python -m streamrec.schemas --write     # rewrite deploy/schemas/
    python -m streamrec.schemas --check     # exit 1 when a file is stale (the default)

Beyond the types, the events schema carries the decoder's own rules that JSON Schema can say
(:func:`_event_rules`): ``ts`` ≥ 2000-01-01, ``price`` / ``quantity`` ≥ 0, ``v`` = 1,
``query`` required (non-blank, ≤ 512 chars) for ``search`` and ``item_id`` (non-empty) for every
other type. It cannot say the rest: the record's size (16 KiB), ``ts`` at most one day ahead of
the wall clock, valid UTF-8 bytes and the catalog check (``unknown_item``);
``streamrec validate`` runs the worker's own decoder for those.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from alerts.models import AnomalyAlert
from streamrec.events import MAX_EVENT_BYTES, MAX_QUERY_CHARS, MIN_TS_MS, Event
from streamrec.messages import DeadLetterHeaders, ResultMessage

__all__ = ["SCHEMAS", "SCHEMA_DIR", "check", "render", "schema", "schema_path", "version", "write"]

DRAFT = "https://json-schema.org/draft/2020-12/schema"
ID_BASE = "urn:streamrec:schema:"
SCHEMA_DIR = Path(__file__).resolve().parents[1] / "deploy" / "schemas"

SCHEMAS: dict[str, type[msgspec.Struct]] = {
    "events": Event,
    "results": ResultMessage,
    "dead-letter-headers": DeadLetterHeaders,
    "alerts": AnomalyAlert,
}

_ABOUT = {
    "events": "A record value of the events topic (STREAMREC_TOPICS_EVENTS): one shopper event, "
    "JSON, keyed by user_id. Unknown keys are ignored. Not expressible here, checked by the worker's "
    f"decoder (`streamrec validate`): at most {MAX_EVENT_BYTES} bytes, valid UTF-8, ts at most one day "
    "after the time it is read, item_id in the catalog.",
    "results": "A record value of the results topic (STREAMREC_TOPICS_RESULTS), keyed by user_id; "
    "also the body of GET /recommendations/{user_id} (source_event_id and event_to_result_ms null).",
    "dead-letter-headers": "The headers of a record of the dead-letter topic "
    "(STREAMREC_TOPICS_DEAD_LETTER), each `streamrec.dlq.<property>` with a UTF-8 string value; "
    "the record's value and key are the original record's bytes.",
    "alerts": "A record value of the alerts topic (STREAMREC_TOPICS_ALERTS), keyed by `<level>:<key>`.",
}


def version(name: str) -> int:
    """The message version of ``SCHEMAS[name]``: the default of its ``v`` field, else 1."""
    for f in msgspec.structs.fields(SCHEMAS[name]):
        if f.name == "v" and isinstance(f.default, int):
            return f.default
    return 1


def schema_path(name: str, folder: Path = SCHEMA_DIR) -> Path:
    return Path(folder) / f"{name}.v{version(name)}.schema.json"


def schema(name: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the messages ``name`` of :data:`SCHEMAS`."""
    tp = SCHEMAS[name]
    v = version(name)
    generated = msgspec.json.schema(tp)
    defs: dict[str, Any] = generated.get("$defs", {})
    root = defs[tp.__name__]
    if "v" in root.get("properties", {}):
        note = f"The message version: {v} for this schema; a consumer rejects other versions."
        root["properties"]["v"] = {**root["properties"]["v"], "const": v, "description": note}
        versioning = f"Message version {v}: the `v` property (default {v} when absent)."
    else:
        versioning = f"Message version {v} (the records carry no `v` property)."
    if tp is Event:
        _event_rules(root)
    return {
        "$schema": DRAFT,
        "$id": f"{ID_BASE}{name}:v{v}",
        "title": f"streamrec {name} v{v}",
        "description": f"{_ABOUT[name]} {versioning} Generated from {tp.__module__}.{tp.__qualname__} "
        "by `python -m streamrec.schemas --write`; do not edit.",
        "$ref": generated["$ref"],
        "$defs": defs,
    }


def _non_null(prop: dict[str, Any]) -> dict[str, Any]:
    """The non-null branch of an optional property (``anyOf: [{type: X}, {type: null}]``)."""
    for branch in prop.get("anyOf", []):
        if branch.get("type") != "null":
            return branch
    return prop


def _event_rules(root: dict[str, Any]) -> None:
    """Add the decoder's checks beyond types (``streamrec.events.validate``) to the Event schema.

    Kept here, not as msgspec Meta constraints on Event: those would make msgspec reject the
    values itself, under another dead-letter reason (bad_type instead of bad_timestamp/bad_value).
    """
    props = root["properties"]
    props["ts"] = {
        **props["ts"],
        "minimum": MIN_TS_MS,
        "description": "Event time, epoch ms: from 2000-01-01 to one day after the time it is read "
        "(the upper bound is relative to the wall clock, not expressible here).",
    }
    _non_null(props["price"])["minimum"] = 0
    _non_null(props["quantity"])["minimum"] = 0
    root["allOf"] = [
        {
            "if": {"properties": {"type": {"const": "search"}}, "required": ["type"]},
            "then": {
                "description": f"A search needs a non-blank query of at most {MAX_QUERY_CHARS} characters.",
                "required": ["query"],
                "properties": {"query": {"type": "string", "pattern": r"\S", "maxLength": MAX_QUERY_CHARS}},
            },
            "else": {
                "description": "Every other type needs a non-empty item_id.",
                "required": ["item_id"],
                "properties": {"item_id": {"type": "string", "minLength": 1}},
            },
        }
    ]


def render(name: str) -> str:
    """The file text of schema ``name`` (stable: the committed files are compared with it)."""
    return json.dumps(schema(name), indent=2, ensure_ascii=False) + "\n"


def write(folder: Path = SCHEMA_DIR) -> list[Path]:
    """(Re)write every schema file in ``folder``; returns the paths written."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    paths = []
    for name in SCHEMAS:
        path = schema_path(name, folder)
        path.write_text(render(name), encoding="utf-8")
        paths.append(path)
    return paths


def check(folder: Path = SCHEMA_DIR) -> list[Path]:
    """The schema files in ``folder`` that are missing or differ from the generated ones."""
    stale = []
    for name in SCHEMAS:
        path = schema_path(name, folder)
        if not path.exists() or path.read_text(encoding="utf-8") != render(name):
            stale.append(path)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamrec.schemas", description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the schema files")
    mode.add_argument("--check", action="store_true", help="exit 1 when a schema file is stale (default)")
    parser.add_argument("--dir", type=Path, default=SCHEMA_DIR, help="the schemas folder (deploy/schemas)")
    args = parser.parse_args(argv)
    if args.write:
        for path in write(args.dir):
            print(f"wrote {path}")
        return 0
    stale = check(args.dir)
    for path in stale:
        print(f"stale: {path} (run `python -m streamrec.schemas --write`)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
