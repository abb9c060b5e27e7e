"""``streamrec validate FILE|-``: check a file of events (one JSON object per line) as the worker would.

Each line runs through the worker's own decoder, :func:`streamrec.events.decode` (schema,
version, timestamps, sizes, values); with ``--catalog MODEL_DIR`` the item ids are also checked
against the model's catalog (``MODEL_DIR/catalog``), as the worker does before it applies an
event. A bad line prints as ``line N: <reason>: <detail>``, with the same reason the worker would
give its dead letter. Blank lines are skipped. Exit status 1 when any line is bad, 0 otherwise.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, Protocol

import click
import numpy as np

from streamrec.events import Event, EventType, InvalidEvent, decode

__all__ = ["ItemIndex", "Problem", "check_lines", "validate"]

CHUNK_LINES = 4096  # lines decoded before one catalog lookup

Problem = tuple[int, str, str]  # (line number, reason, detail)


class ItemIndex(Protocol):
    """What the catalog check needs (inference.catalog.CatalogIndex)."""

    def index_of(self, item_ids: Sequence[str]) -> np.ndarray: ...


def _decode(raw: bytes, now_ms: int) -> Event | tuple[str, str]:
    """The event, or (reason, detail) exactly as streams.validation.Validator would dead-letter it."""
    try:
        return decode(raw, now_ms=now_ms)
    except InvalidEvent as exc:
        return (exc.reason, exc.detail)
    except Exception as exc:  # as the worker: an unexpected error is a dead letter, not a crash
        return ("invalid", f"{type(exc).__name__}: {exc}")


def _check_chunk(chunk: list[tuple[int, bytes]], catalog: ItemIndex | None, now_ms: int) -> list[Problem]:
    bad: list[Problem] = []
    good: list[tuple[int, Event]] = []
    for n, raw in chunk:
        out = _decode(raw, now_ms)
        if isinstance(out, Event):
            good.append((n, out))
        else:
            bad.append((n, *out))
    need = [(n, e) for n, e in good if e.type is not EventType.SEARCH]
    if catalog is not None and need:
        rows = catalog.index_of([e.item_id or "" for _, e in need])
        for (n, e), row in zip(need, rows.tolist(), strict=True):
            if row < 0:
                bad.append((n, "unknown_item", f"item_id {e.item_id!r} is not in the catalog"))
    return sorted(bad)


def check_lines(
    lines: Iterable[bytes], catalog: ItemIndex | None = None, now_ms: int | None = None
) -> Iterator[Problem]:
    """``(line number, reason, detail)`` of each bad line, in line order."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    chunk: list[tuple[int, bytes]] = []
    for n, line in enumerate(lines, 1):
        raw = line.rstrip(b"\n").rstrip(b"\r")
        if not raw.strip():
            continue
        chunk.append((n, raw))
        if len(chunk) >= CHUNK_LINES:
            yield from _check_chunk(chunk, catalog, now_ms)
            chunk = []
    if chunk:
        yield from _check_chunk(chunk, catalog, now_ms)


@click.command()
@click.argument("file", type=click.File("rb"))
@click.option(
    "--catalog",
    "model_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A model folder: also reject item ids not in its catalog (MODEL_DIR/catalog), as the worker does.",
)
@click.option("--quiet", "-q", is_flag=True, help="Print only the summary.")
def validate(file: BinaryIO, model_dir: Path | None, quiet: bool) -> None:
    """Check FILE (or - for stdin), one JSON event per line, with the worker's own decoder.

    Prints each bad line as `line N: <reason>: <detail>` (the worker's dead-letter reason), then a
    summary. Exit status 1 when any line is bad.
    """
    catalog: ItemIndex | None = None
    if model_dir is not None:
        from inference.catalog import CatalogError, CatalogIndex

        try:
            catalog = CatalogIndex.load(model_dir / "catalog")
        except CatalogError as exc:
            raise click.ClickException(str(exc)) from exc
    reasons: Counter[str] = Counter()
    lines = 0

    def counted(src: Iterable[bytes]) -> Iterator[bytes]:
        nonlocal lines
        for line in src:
            if line.strip():
                lines += 1
            yield line

    for n, reason, detail in check_lines(counted(file), catalog):
        reasons[reason] += 1
        if not quiet:
            click.echo(f"line {n}: {reason}: {detail}")
    bad = sum(reasons.values())
    by_reason = ", ".join(f"{r} {c}" for r, c in sorted(reasons.items(), key=lambda rc: (-rc[1], rc[0])))
    checks = "decoder + catalog" if catalog is not None else "decoder, no catalog check"
    click.echo(
        f"{lines} event(s): {lines - bad} valid, {bad} invalid"
        + (f" ({by_reason})" if bad else "")
        + f" [{checks}]"
    )
    raise SystemExit(1 if bad else 0)
