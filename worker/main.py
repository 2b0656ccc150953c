"""genq-worker: detect the hardware, load the model once, consume the right queues, heartbeat.

Commands:

* ``genq-worker start --profile P [--mode auto|nf4|fp32] [--concurrency N]``
* ``genq-worker check --profile P [--mode ...]`` — load, generate one sample, print one JSON line
* ``genq-worker prefetch --profile P`` — download only what the profile needs; print sizes
* ``genq-worker queues --profile P --mode M`` — the queue names, for ``celery -A worker.queue.app worker -Q``
* ``genq-worker facts`` — what this machine can do
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

import click

from worker.core.errors import GenqError
from worker.core.settings import get_settings, reset_settings
from worker.core.states import Mode

if TYPE_CHECKING:
    from worker.core.settings import Settings
    from worker.runtime import Runtime

MODE_CHOICE = click.Choice(["auto", "nf4", "fp32"])
REDIS_WAIT_REPEAT = 30.0
"""Seconds between reminders while a starting worker waits for Redis."""


def _fail(exc: GenqError) -> None:
    click.echo(f"genq-worker: error: {exc.message}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """genq worker: runs next to the model."""


@cli.command()
def facts() -> None:
    """Print what this machine can do (GPUs, bitsandbytes, RAM) as JSON."""
    from worker.model.capability import probe

    click.echo(json.dumps(probe().describe()))


@cli.command()
@click.option("--profile", required=True, help="Profile name (configs/NAME.yaml) or path.")
@click.option("--mode", type=MODE_CHOICE, default="auto", show_default=True)
def queues(profile: str, mode: str) -> None:
    """Print the queues a worker of this profile and mode consumes (comma-separated)."""
    from worker.core.profiles import load_profile
    from worker.queue.routing import worker_queues

    try:
        name = load_profile(profile).name
    except GenqError as exc:
        _fail(exc)
    if mode == "auto":
        raise click.UsageError("give --mode nf4 or fp32: queue names depend on the mode")
    click.echo(",".join(worker_queues(name, Mode(mode))))


@cli.command()
@click.option("--profile", required=True, help="Profile name (configs/NAME.yaml) or path.")
@click.option("--mode", type=MODE_CHOICE, default="auto", show_default=True)
@click.option("--prompt", default="What is the usual adult dose of paracetamol?", show_default=True)
@click.option("--max-new-tokens", type=int, default=16, show_default=True)
def check(profile: str, mode: str, prompt: str, max_new_tokens: int) -> None:
    """Load the model, generate one short sample and print one JSON line."""
    from worker.core.logs import configure
    from worker.core.profiles import load_profile
    from worker.core.schema import GenParams, Item, Message
    from worker.engine import build_engine
    from worker.model.loading import load_model

    configure()
    try:
        prof = load_profile(profile)
        loaded = load_model(prof, mode)
        engine = build_engine(loaded, worker=socket.gethostname(), autotune=False)
        t0 = time.perf_counter()
        result = engine.generate(
            [
                Item(
                    index=0,
                    id="check",
                    messages=[Message(role="user", content=prompt)],
                    params=GenParams(max_new_tokens=max_new_tokens),
                )
            ]
        )[0]
    except GenqError as exc:
        _fail(exc)
    if not result.ok:
        click.echo(f"genq-worker: error: sample failed: {result.error}", err=True)
        sys.exit(1)
    report: dict[str, Any] = {
        **loaded.summary(),
        "estimate": loaded.estimate.as_dict(),
        "reason": loaded.decision.reason,
        "sample": {
            "text": result.text,
            "completion_tokens": result.usage.completion_tokens,
            "seconds": round(time.perf_counter() - t0, 3),
        },
    }
    click.echo(json.dumps(report))


@cli.command()
@click.option("--profile", required=True, help="Profile name (configs/NAME.yaml) or path.")
@click.option("--dry-run", is_flag=True, help="Only print what would be downloaded.")
def prefetch(profile: str, dry_run: bool) -> None:
    """Download only the files the profile needs; print download size, cache and runtime memory."""
    from worker.model.prefetch import prefetch as run_prefetch

    try:
        report = run_prefetch(profile, dry_run=dry_run)
    except GenqError as exc:
        _fail(exc)
    for line in report:
        click.echo(json.dumps(line))


@cli.command()
@click.option("--profile", required=True, help="Profile name (configs/NAME.yaml) or path.")
@click.option(
    "--mode",
    type=MODE_CHOICE,
    default=None,
    help="auto: nf4 on a CUDA GPU with bitsandbytes, else fp32 (nf4 on CPU if fp32 does not fit). "
    "Default: GENQ_MODE, else auto.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes, each with its own copy of the model (1 = one process, solo pool).",
)
@click.option("--name", default=None, help="Worker name (default: host-pid).")
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Serve Prometheus metrics on http://0.0.0.0:PORT/metrics (needs --concurrency 1). "
    "Default: GENQ_METRICS_PORT, else none.",
)
@click.option(
    "--loglevel",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default=None,
    help="Default: GENQ_LOG_LEVEL, else INFO.",
)
def start(
    profile: str,
    mode: str | None,
    concurrency: int,
    name: str | None,
    metrics_port: int | None,
    loglevel: str | None,
) -> None:
    """Detect, load the model once, consume this mode's queue and the profile's 'any' queue."""
    os.environ["GENQ_PROFILE"] = profile
    if loglevel:
        os.environ["GENQ_LOG_LEVEL"] = loglevel.upper()
    reset_settings()
    try:
        settings = get_settings()
    except GenqError as exc:
        _fail(exc)
    mode = mode or settings.mode
    loglevel = settings.log_level
    if not settings.broker:
        raise click.UsageError("GENQ_BROKER_URL is not set (e.g. redis://127.0.0.1:6379/0)")
    metrics_port = metrics_port or settings.metrics_port
    if metrics_port and concurrency > 1:
        raise click.UsageError(
            "--metrics-port (or GENQ_METRICS_PORT) needs --concurrency 1: run one worker process "
            "per metrics port (e.g. `docker compose up --scale worker-cpu=N`) instead of a prefork pool"
        )

    from worker.core.logs import configure, get_logger, route_stdlib_logging

    configure()
    route_stdlib_logging()  # Celery's lines and Python warnings as genq events, from the start
    node = name or f"{socket.gethostname()}-{os.getpid()}"
    log = get_logger(worker=node)
    try:
        _wait_for_redis(settings.broker, log)
        chosen, runtime = _prepare(profile, mode, concurrency, node, metrics_port, settings, log)
    except GenqError as exc:
        _fail(exc)
    pool = "solo" if runtime is not None else "prefork"

    from worker.core.profiles import load_profile
    from worker.queue.app import get_app
    from worker.queue.routing import worker_queues

    prof_name = load_profile(profile).name
    queue_list = worker_queues(prof_name, Mode(str(chosen)))
    log.info(
        "worker_starting",
        profile=prof_name,
        mode=chosen,
        queues=queue_list,
        pool=pool,
        concurrency=concurrency,
        broker=settings.broker_display,
    )
    if runtime is not None:
        from worker.queue.task import serve

        serve(runtime, queue_list)
        runtime.start_heartbeat()
    get_app().worker_main(_celery_argv(pool, concurrency, queue_list, node, loglevel))


def _prepare(
    profile: str,
    mode: str,
    concurrency: int,
    node: str,
    metrics_port: int | None,
    settings: Settings,
    log: Any,
) -> tuple[str, Runtime | None]:
    """The mode chosen, and the runtime with the model loaded when this process runs the tasks
    (one process, solo pool); None when a prefork pool's children each load their own."""
    from worker.runtime import Runtime, set_runtime

    if concurrency == 1:
        runtime = Runtime(settings, name=node)
        set_runtime(runtime)
        if metrics_port:
            _serve_metrics(metrics_port, runtime, log)
        runtime.load(profile, mode)
        if metrics_port:
            from worker.queue.metrics import loaded

            loaded(runtime)
        return str(runtime.mode), runtime
    # several processes: decide the mode in a spawned process (this one forks the pool, so it must
    # run no torch op: neither CUDA nor OpenMP survives a fork); children load
    chosen = _decide_mode_isolated(profile, mode)
    os.environ["GENQ_MODE"] = str(chosen)
    cores = os.cpu_count() or 1
    os.environ.setdefault("GENQ_THREADS", str(max(1, cores // concurrency)))
    reset_settings()
    # no model here: the children inherit the name and each loads its own copy
    set_runtime(Runtime(get_settings(), name=node))
    return chosen, None


def _celery_argv(pool: str, concurrency: int, queues: list[str], node: str, loglevel: str) -> list[str]:
    return [
        "--quiet",  # no banner: the worker_starting event says what it would
        "worker",
        "--pool",
        pool,
        "--concurrency",
        str(concurrency),
        "--queues",
        ",".join(queues),
        "--hostname",
        f"{node}@%h",
        "--loglevel",
        loglevel.upper(),
        "--without-mingle",
        "--without-gossip",
        "--task-events",
    ]


def _serve_metrics(port: int, runtime: Any, log: Any) -> None:
    from worker.queue.metrics import serve

    try:
        serve(port, runtime)
    except OSError as exc:
        reason = exc.strerror or exc
        click.echo(f"genq-worker: error: cannot serve metrics on port {port}: {reason}", err=True)
        sys.exit(2)
    log.info("metrics_serving", port=port, path="/metrics")


def _wait_for_redis(url: str, log: Any) -> None:
    """Before loading the model: stop at once when Redis refuses the credentials or the URL is
    malformed (Celery would retry those forever); when Redis cannot be reached, say so now and
    wait for it (it may be starting), saying so again every ``REDIS_WAIT_REPEAT`` seconds."""
    from worker.core.errors import StoreUnavailable
    from worker.store import check_reachable

    said = 0.0
    while True:
        try:
            check_reachable(url)
            return
        except StoreUnavailable as exc:
            if time.monotonic() - said >= REDIS_WAIT_REPEAT:
                log.error(
                    "redis_unreachable",
                    error=exc.message,
                    action="waiting; the model loads once Redis answers",
                )
                click.echo(f"genq-worker: {exc.message}; waiting for it (Ctrl-C to stop)", err=True)
                said = time.monotonic()
            time.sleep(2)


def _decide_mode_isolated(profile: str, mode: str) -> str:
    """:func:`_decide_mode` in a fresh (spawned) process.  Probing runs torch ops (bitsandbytes'
    CPU check), which start libgomp's thread pool; a pool forked after that hangs in its first
    parallel op, so the prefork parent must never run one itself."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return str(pool.apply(_decide_mode, (profile, mode)))


def _decide_mode(profile: str, mode: str) -> str:
    from worker.core.profiles import load_profile
    from worker.model.capability import choose_mode, estimate, probe
    from worker.model.loading import resolve_sources

    prof = load_profile(profile)
    sources = resolve_sources(prof)
    decision = choose_mode(
        probe(),
        estimate(sources.base, sources.adapter),
        mode,
        headroom=prof.nf4.kv_cache_headroom,
    )
    return decision.mode


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
