"""``genq metrics --port PORT``: serve queue depths, job counts, per-job progress and ETA, and live
workers as Prometheus metrics, read from Redis at each scrape (:mod:`worker.queue.exporter`).

Workers serve their own metrics (``genq-worker start --metrics-port``): what they generate.  This
command serves what is in Redis, which no single worker owns; run one per Redis.
"""

from __future__ import annotations

import time

import click

from producer.cliutil import handle_errors

SCRAPE_RETRY_SECONDS = 2.0
"""How long one scrape waits for a Redis that does not answer before reporting genq_store_up 0."""


@click.command("metrics")
@click.option("--port", type=click.IntRange(1, 65535), default=9410, show_default=True)
@click.option("--addr", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option(
    "--max-jobs",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="Newest jobs given per-job series (items, tokens/s, ETA).",
)
@handle_errors
def metrics(port: int, addr: str, max_jobs: int) -> None:
    """Serve queue depth, jobs by status, per-job items and ETA, and live workers on /metrics."""
    from worker.core.logs import configure, get_logger
    from worker.core.settings import get_settings
    from worker.queue.exporter import serve
    from worker.store import RedisStore

    configure()
    settings = get_settings()
    if not settings.broker:
        raise click.UsageError("GENQ_BROKER_URL is not set (e.g. redis://127.0.0.1:6379/0)")
    try:
        store = RedisStore(settings=settings, retry_seconds=SCRAPE_RETRY_SECONDS)
        serve(store, port, addr, max_jobs=max_jobs)
    except OSError as exc:
        click.echo(f"genq: error: cannot serve metrics on {addr}:{port}: {exc.strerror or exc}", err=True)
        raise SystemExit(2) from None
    get_logger().info("metrics_serving", port=port, path="/metrics", redis=settings.broker_display)
    click.echo(f"serving genq metrics on http://{addr}:{port}/metrics (Ctrl-C to stop)", err=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
