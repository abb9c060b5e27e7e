"""``streamrec bench all``: the encoder, user-model, ingest and end-to-end benchmarks into one JSON.

Each benchmark runs in its own process (ONNX Runtime's spinning threads would otherwise
disturb the next one's timings) with its fixed seeds and sizes; ``--quick`` passes
``--quick`` to each (small sizes, for a CI smoke run: not a measurement). The merged JSON
has one key per benchmark and copies every ``ratio_*`` figure to the top level, prefixed
with the benchmark's name.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

BENCHES = ("encoder", "user-model", "ingest", "e2e")


@click.command("all")
@click.option("--quick", is_flag=True, help="Small sizes (CI smoke run).")
@click.option(
    "--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the JSON here."
)
@click.option("--only", multiple=True, type=click.Choice(BENCHES), help="Run only these benchmarks.")
def bench_all(quick: bool, output: Path | None, only: tuple[str, ...]) -> None:
    """Run every benchmark (separate processes) and merge their JSON."""
    names = only or BENCHES
    work = Path(tempfile.mkdtemp(prefix="streamrec-bench-"))
    merged: dict = {
        "bench": "all",
        "quick": quick,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    failed = []
    for name in names:
        out = work / f"{name}.json"
        cmd = [sys.executable, "-m", "streamrec.cli", "bench", name, "--output", str(out)]
        if quick:
            cmd.append("--quick")
        click.secho(f"==> streamrec bench {name}{' --quick' if quick else ''}", fg="cyan")
        t0 = time.monotonic()
        proc = subprocess.run(cmd)
        if proc.returncode != 0 or not out.exists():
            failed.append(name)
            merged[name] = {"error": f"exit {proc.returncode}"}
            continue
        data = json.loads(out.read_text())
        data["wall_s"] = round(time.monotonic() - t0, 1)
        merged[name] = data
        for key, value in data.items():
            if key.startswith("ratio_"):
                merged[f"ratio_{name}_{key[len('ratio_') :]}"] = value
    text = json.dumps(merged, indent=2)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
    click.echo(text)
    if failed:
        raise click.ClickException(f"benchmarks failed: {', '.join(failed)} (see their output above)")
