"""genq: submit, status, collect, cancel, retry, delete, prune, workers, run.

``GENQ_BROKER_URL`` names the Redis used as broker and job store.  Without it, ``genq run`` works
embedded, in one process (and imports neither Redis' job store nor Celery).  Errors print one
line naming what to fix and exit with status 2; an unreachable Redis is reported within seconds.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import click

from producer.admin import COMMANDS
from producer.cliutil import (
    WATCH_RETRY_SECONDS,
    announce,
    client,
    handle_errors,
    job_params,
    param_options,
    submitted,
    waiting,
)
from producer.metrics_cmd import metrics
from worker.core.errors import InputError
from worker.core.outputs import OUTPUT_FORMATS
from worker.core.schema import GenParams
from worker.core.settings import get_settings

FORMAT_HELP = (
    "auto: each line in the shape of the API it was written for (native, OpenAI chat/completions/"
    "Responses, Azure, Anthropic); native, openai or anthropic: every line in that shape."
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """genq: bulk generation with a fine-tuned model over Celery workers on GPUs and CPUs."""


@cli.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--profile", required=True, help="Model profile: a name (configs/NAME.yaml) or a path.")
@click.option(
    "--job-id", default=None, help="Job id (default: derived from FILE's content, profile and options)."
)
@click.option("--new", is_flag=True, help="A fresh job id even if this file was submitted before.")
@click.option("--mode", default="any", show_default=True, help="any, nf4 or fp32: which workers may take it.")
@click.option("--chunk-size", type=int, default=16, show_default=True, help="Items per task message.")
@click.option(
    "--priority",
    type=click.Choice(["high", "normal", "low"]),
    default="normal",
    show_default=True,
    help="Queue level: high jobs overtake normal ones, normal overtake low; one level shares round robin.",
)
@click.option("--expires-in", type=float, default=None, help="Seconds; items not done by then are expired.")
@click.option("--skip-invalid", is_flag=True, help="Record bad lines as errored items instead of refusing.")
@click.option("--adapter", default=None, help="One of the profile's adapters, for items that name none.")
@click.option(
    "--collect-to",
    type=click.Path(path_type=Path),
    default=None,
    help="Then follow the job into this file (`genq collect JOB -o FILE --follow`) until it ends.",
)
@param_options
@handle_errors
def submit(
    file: Path,
    profile: str,
    job_id: str | None,
    new: bool,
    mode: str,
    chunk_size: int,
    priority: str,
    expires_in: float | None,
    skip_invalid: bool,
    adapter: str | None,
    collect_to: Path | None,
    **kw: Any,
) -> None:
    """Validate FILE, store it as a job and enqueue its chunks.  Prints the job id last.  The same
    command again resumes an interrupted submit (or re-enqueues lost chunks), never duplicates.
    With --collect-to OUT it then follows the job into OUT (the same command resumes both)."""
    if collect_to is not None:
        from worker.core.outputs import check_output_path

        check_output_path(collect_to, inputs=[file])
    system_prompt = kw.pop("system_prompt")
    params = job_params(kw)
    c = client()
    job = c.submit(
        file,
        profile=profile,
        job_id=job_id,
        new=new,
        mode=mode,
        chunk_size=chunk_size,
        params=params,
        system_prompt=system_prompt,
        expires_in=expires_in,
        skip_invalid=skip_invalid,
        adapter=adapter,
        priority=priority,
        on_job_id=announce,
        on_wait=waiting,
    )
    from worker.queue.routing import queue_name  # names only (no Celery); a distributed submit

    state = job.status()
    verb = "resumed" if job.resumed else "submitted"
    spec = state.spec
    click.echo(
        f"{verb} {state.counts.total} items in {job.enqueued} chunks ({state.counts.pending} pending) "
        f"to {queue_name(spec.profile, spec.mode, spec.priority)}",
        err=True,
    )
    click.echo(job.id)
    if collect_to is not None:
        submitted()
        _collect(c, job.id, collect_to, "native", False, None, follow=True)


@cli.command()
@click.argument("job_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="One JSON object (a list with no JOB).")
@click.option("--watch", is_flag=True, help="Live progress until the job ends.")
@click.option("--limit", type=int, default=20, show_default=True, help="Jobs listed with no JOB.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["native", "openai"]),
    default="native",
    show_default=True,
    help="openai: JOB as OpenAI's Batch object (JSON).",
)
@handle_errors
def status(job_id: str | None, as_json: bool, watch: bool, limit: int, fmt: str) -> None:
    """Counts, tokens, throughput, ETA and workers of JOB.  With no JOB: recent jobs, partial,
    stale and finished, with what each takes in Redis."""
    from producer.progress import follow, summary_line

    c = client(WATCH_RETRY_SECONDS)
    if fmt == "openai":
        if job_id is None:
            raise InputError(
                "--format openai needs a JOB (it prints that job's Batch object)", field="format"
            )
        click.echo(json.dumps(c.job(job_id).batch_object()))
        return
    if job_id is None:
        states = c.jobs(limit, sizes=True)
        if as_json:
            click.echo(json.dumps([s.as_dict() for s in states]))
            return
        for s in states:
            size = f"{(s.redis_bytes or 0) / 1e6:.1f} MB"
            click.echo(f"{summary_line(s)}  [{size} in Redis]")
        return
    job = c.job(job_id)
    if watch:
        with c.store.events(job_id) as events:
            state = follow(job.status, pause=events.pause)
    else:
        state = job.status()
    full = None if state.final else _redis_full(c)
    if as_json:
        click.echo(json.dumps({**state.as_dict(), **({"redis_full": full} if full else {})}))
    else:
        click.echo(summary_line(state))
        for name, stats in sorted(state.workers.items()):
            click.echo(f"  {name}: {stats.get('items', 0)} items, {stats.get('tokens', 0)} tokens")
        if full:
            click.echo(f"  {full}")


def _redis_full(c: Any) -> str | None:
    """Why an unfinished job makes no progress when Redis is at its maxmemory (None: it is not)."""
    from worker.store.connection import guarded
    from worker.store.memory import ADVICE, redis_memory

    memory = guarded(c.store.url_display, redis_memory, c.store.r)
    if not memory.full:
        return None
    return (
        f"Redis is at its maxmemory ({memory.describe()}): workers can neither take chunks nor "
        f"record results until it has room; {ADVICE}"
    )


@cli.command()
@click.argument("job_id")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True)
@click.option(
    "--format", "fmt", type=click.Choice(OUTPUT_FORMATS), default="auto", show_default=True, help=FORMAT_HELP
)
@click.option(
    "--all", "include_unfinished", is_flag=True, help="Also write cancelled and expired items as errors."
)
@click.option(
    "--errors-file",
    type=click.Path(path_type=Path),
    default=None,
    help="Write errored items here instead of OUTPUT (OpenAI's error file).",
)
@click.option(
    "--follow",
    is_flag=True,
    help="Run until JOB ends, writing results as they land and taking them out of Redis; "
    "run it again after a stop and it resumes.",
)
@handle_errors
def collect(
    job_id: str, output: Path, fmt: str, include_unfinished: bool, errors_file: Path | None, follow: bool
) -> None:
    """Write JOB's results in input order, each item once (finished ones; says what is pending).
    With --follow: while JOB runs, each result durably spooled next to OUTPUT and then removed
    from Redis (one follower per job); OUTPUT is written when JOB ends."""
    from worker.core.errors import OutputPathError
    from worker.core.outputs import check_output_path

    check_output_path(output)
    if errors_file is not None:
        check_output_path(errors_file, inputs=[output])
        if errors_file.resolve() == output.resolve():
            raise OutputPathError(f"--errors-file {errors_file} is the output file; choose another")
    _collect(client(), job_id, output, fmt, include_unfinished, errors_file, follow)


def _collect(
    c: Any,
    job_id: str,
    output: Path,
    fmt: str,
    include_unfinished: bool,
    errors_file: Path | None,
    follow: bool,
) -> None:
    from producer.progress import summary_line

    last = [0.0]

    def progress(state: Any) -> None:  # a line a minute while following
        if time.monotonic() - last[0] >= 60:
            last[0] = time.monotonic()
            click.echo(f"following: {summary_line(state)}", err=True)

    got = c.collect(
        job_id,
        output,
        fmt=fmt,
        follow=follow,
        include_unfinished=include_unfinished,
        errors_file=errors_file,
        on_state=progress if follow else None,
    )
    ended = got.ended
    left_out = "" if include_unfinished or not ended else f"{ended} cancelled/expired left out (--all); "
    to_errors = f"{got.errored} errors to {errors_file}; " if errors_file is not None else ""
    kept = (
        f"; kept {got.spool_kept} so that `genq retry` results merge in (the same command again)"
        if got.spool_kept
        else ""
    )
    click.echo(
        f"wrote {got.written} results to {output}; {to_errors}{left_out}{got.pending} pending; "
        f"status {got.status}{kept}",
        err=True,
    )


@cli.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True)
@click.option("--profile", required=True, help="Model profile: a name (configs/NAME.yaml) or a path.")
@click.option(
    "--job-id", default=None, help="The job id (default: derived from FILE, as `genq submit` does)."
)
@click.option("--mode", default=None, help="Embedded: auto, nf4 or fp32.  With a broker: any, nf4 or fp32.")
@click.option("--chunk-size", type=int, default=16, show_default=True)
@click.option(
    "--format", "fmt", type=click.Choice(OUTPUT_FORMATS), default="auto", show_default=True, help=FORMAT_HELP
)
@click.option("--skip-invalid", is_flag=True)
@click.option("--adapter", default=None, help="One of the profile's adapters, for items that name none.")
@param_options
@handle_errors
def run(
    file: Path,
    output: Path,
    profile: str,
    job_id: str | None,
    mode: str | None,
    chunk_size: int,
    fmt: str,
    skip_invalid: bool,
    adapter: str | None,
    **kw: Any,
) -> None:
    """Submit FILE, follow it with a progress bar and write OUTPUT.  Without GENQ_BROKER_URL it runs
    embedded, in this process; run it again to resume: rows of OUTPUT that answer FILE's requests
    are kept, items whose request changed are generated again."""
    from worker.core.outputs import check_output_path

    check_output_path(output, inputs=[file])
    system_prompt = kw.pop("system_prompt")
    params = job_params(kw)
    if not get_settings().broker:
        embedded = (
            file,
            output,
            profile,
            mode or "auto",
            chunk_size,
            fmt,
            skip_invalid,
            params,
            system_prompt,
        )
        _run_embedded(*embedded, adapter=adapter, job_id=job_id)
        return
    c = client()
    job = c.submit(
        file,
        profile=profile,
        job_id=job_id,
        mode=mode or "any",
        chunk_size=chunk_size,
        params=params,
        system_prompt=system_prompt,
        skip_invalid=skip_invalid,
        adapter=adapter,
        on_job_id=announce,
        on_wait=waiting,
    )
    job.wait(progress=True)
    from producer.collect import write_collected

    written, _pending, _ended, _errored = write_collected(job, output, fmt, include_unfinished=False)
    click.echo(f"wrote {written} results to {output}", err=True)


def _run_embedded(
    file: Path,
    output: Path,
    profile: str,
    mode: str,
    chunk_size: int,
    fmt: str,
    skip_invalid: bool,
    params: GenParams,
    system_prompt: str | None,
    adapter: str | None = None,
    job_id: str | None = None,
) -> None:
    from producer.build import EmbeddedJob, JobBuilder, job_options
    from producer.progress import ProgressBar
    from worker.core.logs import configure
    from worker.core.states import LoadMode
    from worker.local import run_embedded

    if mode not in tuple(LoadMode):
        raise InputError(f"unknown mode {mode!r} for an embedded run: choose auto, nf4 or fp32", field="mode")
    settings = get_settings()
    if "GENQ_LOG_LEVEL" not in os.environ:
        # a terminal run: the progress bar and the summary say what matters; per-chunk events are
        # a worker's log (GENQ_LOG_LEVEL=INFO shows them here too)
        settings = settings.model_copy(update={"log_level": "WARNING"})
    configure(settings)
    options = job_options(  # the profile is loaded here, once: the run and the model load use it
        profile,
        chunk_size=chunk_size,
        params=params,
        system_prompt=system_prompt,
        skip_invalid=skip_invalid,
        adapter=adapter,
    )
    build = JobBuilder(file, options)  # as `genq submit` builds it: the same id and spec
    job = EmbeddedJob(build, build.job_id(job_id), fmt)  # type: ignore[arg-type]
    started = time.monotonic()
    bar = ProgressBar()
    try:
        report = run_embedded(job, output, profile=options.profile, mode=mode, on_progress=bar.update)
    finally:
        bar.close()
    c = report.counts
    changed = f", {report.changed} regenerated because their request changed" if report.changed else ""
    click.echo(
        f"done: {c.succeeded} ok, {c.errored} errors, {report.resumed} resumed from {output}{changed}; "
        f"{report.completion_tokens / max(time.monotonic() - started, 1e-9):.1f} tok/s ({report.mode}); "
        f"job {job.job_id}",
        err=True,
    )


for _command in COMMANDS:
    cli.add_command(_command)


cli.add_command(metrics)  # `genq metrics`: producer/metrics_cmd.py


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
