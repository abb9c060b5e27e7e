"""``streamrec worker`` (the faust stream worker) and ``streamrec produce`` (dataset replay)."""

from __future__ import annotations

import logging
import time

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
    """  # fmt: skip
    import faust
    from prometheus_client import start_http_server

    from streamrec.kafka import ensure_topics
    from streams.app import DEFAULT_ENCODER, DEFAULT_ITEMS, create_app, load_factory

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
    faust.Worker(app, loglevel=level).execute_from_commandline()


@click.command()
@click.option(
    "--dataset",
    default="online-retail",
    show_default=True,
    help="online-retail, scientific, or a generic dataset folder.",
)
@click.option(
    "--split", type=click.Choice(["train", "valid", "test", "all"]), default="test", show_default=True
)
@click.option(
    "--rate", type=float, default=0.0, show_default=True, help="Events per second; 0 = as fast as possible."
)
@click.option("--limit", type=int, default=None, help="Send at most this many events.")
@click.option("--users", type=int, default=None, help="Only a random sample of this many users.")
@click.option(
    "--now",
    "retime",
    is_flag=True,
    help="Re-time events to the present (relative spacing / --speed); they are sent as their time comes.",
)
@click.option(
    "--speed",
    type=float,
    default=1.0,
    show_default=True,
    help="With --now: event-time speed-up (3600 = one hour of the dataset per second).",
)
@click.option("--topic", default=None, help="Topic (default: STREAMREC_TOPICS_EVENTS).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def produce(dataset: str, split: str, rate: float, limit: int | None, users: int | None, retime: bool,
            speed: float, topic: str | None, quiet: bool) -> None:  # fmt: skip
    """Replay a dataset into the events topic (keyed by user_id) at a rate, with a progress bar."""
    from streamrec.datasets import load_dataset
    from streamrec.kafka import ensure_topics
    from devstack.produce import EventProducer, ProduceError, dataset_events, replay

    logging.basicConfig(level=logging.WARNING)
    s = get_settings()
    if speed <= 0:
        raise click.BadParameter("must be > 0", param_hint="--speed")
    try:
        ds = load_dataset(dataset, s.data_dir).subset(users)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if topic:
        s = s.model_copy(deep=True)
        s.topics.events = topic
    try:
        ensure_topics(s)
    except Exception as exc:
        raise click.ClickException(
            f"cannot reach Kafka at {s.kafka.bootstrap_servers}: {exc}; start the stack with `streamrec up`"
        ) from exc
    n = len(ds.interactions) if split == "all" else int((ds.interactions["split"] == split).sum())
    total = min(n, limit) if limit is not None else n
    now_ms = int(time.time() * 1000) if retime else None
    events = dataset_events(ds, split, settings=s, limit=limit, now_ms=now_ms, speed=speed)
    producer = EventProducer(s)
    t0 = time.monotonic()
    try:
        sent = replay(
            producer, events, total=total, rate=rate, paced_by_event_time=retime, progress=not quiet
        )
    except ProduceError as exc:
        raise click.ClickException(str(exc)) from exc
    except KeyboardInterrupt:
        producer.flush(10)
        click.echo(f"interrupted after {producer.delivered} events", err=True)
        raise SystemExit(130) from None
    dt = time.monotonic() - t0
    click.echo(
        f"sent {sent} {ds.name}/{split} events to {s.topics.events} in {dt:.1f}s ({sent / max(dt, 1e-9):,.0f}/s)"
    )
