"""``streamrec worker`` (the faust stream worker) and ``streamrec produce`` (dataset replay)."""

from __future__ import annotations

from typing import Any

import click

from streamrec.settings import get_settings


@click.command()
@click.option(
    "--items",
    "items_factory",
    default=None,
    metavar="MODULE:CALLABLE",
    help="callable(settings) -> ItemVectors; default inference.catalog:load_catalog (the served catalog).",
)
@click.option(
    "--encoder",
    "encoder_factory",
    default=None,
    metavar="MODULE:CALLABLE|none",
    help="callable(settings) -> TextEncoder for search queries; default inference.encoder:load_encoder; "
    "'none' runs without one (searches keep their text, no query vector).",
)
@click.option("--loglevel", default=None, help="Log level (default: STREAMREC_LOG_LEVEL).")
def worker(items_factory: str | None, encoder_factory: str | None, loglevel: str | None) -> None:
    """Run the stream worker: events topic → validation → profiles in Redis → hooks.

    Stop it with Ctrl-C or SIGTERM: it finishes the batch in progress and commits. Health on
    http://<host>:STREAMREC_WEB_PORT/healthz and /readyz, Prometheus metrics on STREAMREC_METRICS_PORT.
    """
    from prometheus_client import start_http_server

    from streamrec.kafka import ensure_topics
    from streams.app import create_app
    from streams.context import DEFAULT_ENCODER, DEFAULT_ITEMS, load_factory

    s = get_settings()
    level = (loglevel or s.log_level).upper()
    enc = None if (encoder_factory or "").lower() == "none" else (encoder_factory or DEFAULT_ENCODER)
    items = items_factory or DEFAULT_ITEMS
    for spec in (items, enc):  # fail before connecting anything when a plug-in is not importable
        if spec:
            try:
                load_factory(spec)
            except ValueError as exc:
                raise click.ClickException(
                    f"{exc}. Did you build and export the model (`streamrec index`)?"
                ) from exc
    from streamrec.preflight import PreflightError, check_kafka, check_redis

    try:  # a wrong password or an untrusted certificate: seconds, and the setting to fix
        check_redis(s)
        check_kafka(s)
    except PreflightError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        created = ensure_topics(s)
    except Exception as exc:
        raise click.ClickException(
            f"cannot reach Kafka at {s.kafka.bootstrap_servers} to create the topics: {exc}; "
            "start the stack with `streamrec up`"
        ) from exc
    if created:
        click.echo(f"created topics: {', '.join(created)}")
    start_http_server(s.metrics_port)
    app = create_app(s, items_factory=items, encoder_factory=enc)
    faust_worker(app, level).execute_from_commandline()


def faust_worker(app: Any, level: str) -> Any:
    """The faust Worker that runs ``app``, logging at ``level`` and nothing below it.

    faust's terminal spinner, at WARNING and above, sets the root logger to DEBUG and spins on
    every record: each debug line of aiokafka and mode was built and handled on the hot path."""
    import faust

    w = faust.Worker(app, loglevel=level)
    w.spinner = None
    return w
