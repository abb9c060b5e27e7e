"""The ``streamrec`` console script.

Each subcommand lives in the package that owns its concern and is imported only
when it runs (``streamrec config`` does not load torch). The table below is the
whole command tree.
"""

from __future__ import annotations

import importlib
import json
import sys
import time

import click

from streamrec.settings import SettingsError, get_settings


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use ("module:attribute")."""

    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = lazy or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            module, attr = self.lazy[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


COMMANDS = {
    # encoder: fine-tune, export, embed the catalog, encode ad-hoc text (inference/)
    "train": "inference.training.cli:train",
    "export": "inference.training.cli:export",
    "index": "inference.training.cli:index",
    "encode": "inference.training.cli:encode",
    "train-user": "inference.training.cli:train_user",
    "tune": "evaluation.tune:tune",
    "fetch-encoder": "inference.training.encoders:fetch_encoder_cmd",
    # streaming: the faust worker (streams/)
    "worker": "streams.cli:worker",
    # local tooling: the dataset replayer and the live demo (devstack/)
    "produce": "devstack.produce:produce",
    "demo": "devstack.demo:demo",
    "backfill-demand": "devstack.backfill:backfill",
    "validate": "streamrec.validate:validate",
}

EVAL_COMMANDS = {
    "replay": "evaluation.replay:replay",
    "loo": "evaluation.loo:loo",
    "spikes": "evaluation.spikes:spikes",
}

BENCH_COMMANDS = {
    "all": "benchmarks.all:bench_all",
    "encoder": "benchmarks.encoder:encoder",
    "user-model": "benchmarks.user_model:user_model",
    "ingest": "benchmarks.stream:ingest",
    "e2e": "benchmarks.stream:e2e",
    "sizing": "benchmarks.sizing:sizing",
    "chaos": "benchmarks.chaos:chaos",
}


class SettingsClickError(click.ClickException):
    """Invalid settings: the message names each bad environment variable; exit status 2."""

    exit_code = 2

    def format_message(self) -> str:
        return self.message


class MainGroup(LazyGroup):
    """The top-level group: invalid settings end any subcommand with their message, no traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SettingsError as exc:
            raise SettingsClickError(str(exc)) from None


@click.group(cls=MainGroup, lazy=COMMANDS)
@click.version_option(package_name="streamrec")
def main() -> None:
    """streamrec: a streaming recommender for e-commerce."""


@main.group(cls=LazyGroup, lazy=EVAL_COMMANDS, name="eval")
def eval_group() -> None:
    """Offline and replay evaluations (Markdown + plots + JSON)."""


@main.group(cls=LazyGroup, lazy=BENCH_COMMANDS)
def bench() -> None:
    """Benchmarks (JSON output; --quick for CI smoke runs)."""


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option(
    "--describe/--no-describe",
    default=True,
    show_default=True,
    help="Print each variable's description (dimmed, under its value).",
)
@click.option(
    "--markdown",
    is_flag=True,
    help="Print the reference table of every variable (default, bounds, description) as Markdown, "
    "as in README.md (`python -m streamrec.settings --write-readme` rewrites it there).",
)
def config(as_json: bool, describe: bool, markdown: bool) -> None:
    """Print the effective settings, secrets masked: variable, value and description."""
    import shutil
    import textwrap

    from streamrec.settings import GROUPS, settings_fields, settings_table_markdown

    if markdown:
        click.echo(settings_table_markdown(), nl=False)
        return
    data = get_settings().masked()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    fields = list(settings_fields())
    width = max(len(f.env) for f in fields) + 2
    cols = min(shutil.get_terminal_size((110, 24)).columns, 110)
    group = None
    for f in fields:
        if describe and f.group != group:
            group = f.group
            title = f"[{group}]" if group else "[top level]"
            about = GROUPS[group].__doc__ if group else "Paths, ports and logging."
            click.echo(click.style(title, bold=True) + " " + click.style(about or "", dim=True))
        value = f.value(data)
        shown = (
            json.dumps(value) if isinstance(value, list | dict) else ("(not set)" if value is None else value)
        )
        click.echo(f"{f.env:<{width}}{shown}")
        if describe and f.description:
            for line in textwrap.wrap(f.description, width=cols - 4):
                click.echo(click.style(f"    {line}", dim=True))


def _print_status(rows) -> None:
    for r in rows:
        state = click.style("healthy", fg="green") if r.healthy else click.style("down", fg="red")
        who = f"pid {r.pid}" if r.pid else ("external" if r.healthy else "not running")
        log = f"  log {r.log}" if r.log else ""
        click.echo(f"{r.name:<6} {r.address:<28} {state:<18} {who}  {r.detail}{log}")


@main.command()
@click.option("--redis-profile", type=click.Choice(["test", "demo"]), default="test",
              help="test: no persistence; demo: append-only file.")  # fmt: skip
@click.option("--redis-cluster", is_flag=True,
              help="Start a Redis Cluster of STREAMREC_REDIS_CLUSTER_NODES masters (the same as "
                   "STREAMREC_REDIS_CLUSTER=true; set that for every other command too).")  # fmt: skip
def up(redis_profile: str, redis_cluster: bool) -> None:
    """Start the local Kafka (KRaft) and Redis, wait until both answer, create the topics."""
    from devstack.stack import LocalStack, StackError
    from streamrec.kafka import ensure_topics

    s = get_settings()
    if redis_cluster and not s.redis.cluster:
        s = s.override(redis={"cluster": True})
        click.echo("Redis Cluster: run the worker and the other commands with STREAMREC_REDIS_CLUSTER=true")
    t0 = time.monotonic()
    try:
        rows = LocalStack(s, redis_profile=redis_profile).up()
        created = ensure_topics(s)
    except StackError as exc:
        raise click.ClickException(str(exc)) from exc
    _print_status(rows)
    if created:
        click.echo(f"created topics: {', '.join(created)}")
    click.echo(f"stack up in {time.monotonic() - t0:.1f}s")


@main.command()
def down() -> None:
    """Stop the Kafka and Redis processes that `streamrec up` started (pid files)."""
    from devstack.stack import LocalStack

    stopped = LocalStack(get_settings()).down()
    for name, pid in stopped.items():
        click.echo(f"{name}: " + (f"stopped pid {pid}" if pid else "was not running (started by streamrec)"))


@main.command()
def status() -> None:
    """Show Kafka and Redis: address, health, pid, log."""
    from devstack.stack import LocalStack

    rows = LocalStack(get_settings()).status()
    _print_status(rows)
    sys.exit(0 if all(r.healthy for r in rows) else 1)


if __name__ == "__main__":  # pragma: no cover
    main()
