"""genq: submit, status, collect, cancel, retry, delete, prune, workers, run.

``GENQ_BROKER_URL`` names the Redis used as broker and job store.  Without it, ``genq run`` works
embedded, in one process (and imports neither Redis' job store nor Celery).  Errors print one
line naming what to fix and exit with status 2; an unreachable Redis is reported within seconds.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from worker.core.errors import GenqError, InputError
from worker.core.schema import GenParams
from worker.core.settings import get_settings

if TYPE_CHECKING:
    from producer.client import Client

_current_job: list[str] = []
"""The id of the job this command works on, once known (for the interrupt message)."""


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except GenqError as exc:
            click.echo(f"genq: error: {exc.message}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            if _current_job and fn.__name__ == "submit":
                job = _current_job[-1]
                click.echo(
                    f"genq: interrupted: job {job} is partial; run the same command to resume it, "
                    f"or `genq delete {job}`",
                    err=True,
                )
            else:
                click.echo(
                    "genq: interrupted (finished results are kept; run the same command to resume)", err=True
                )
            sys.exit(130)

    return wrapper


def param_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Job-wide generation defaults; items override them."""
    options = [
        click.option("--max-new-tokens", type=int, default=None, help="Default max_new_tokens for items."),
        click.option("--temperature", type=float, default=None, help="0 = greedy (the default)."),
        click.option("--top-p", type=float, default=None),
        click.option("--top-k", type=int, default=None),
        click.option("--seed", type=int, default=None, help="Seed for sampled items that set none."),
        click.option("--stop", multiple=True, help="Stop string (repeatable)."),
        click.option("--system-prompt", default=None, help="System message for items without one."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def job_params(kw: dict[str, Any]) -> GenParams:
    from pydantic import ValidationError

    values = {k: kw.pop(k) for k in ("max_new_tokens", "temperature", "top_p", "top_k", "seed")}
    stop = kw.pop("stop")
    values["stop"] = list(stop) if stop else None
    try:
        return GenParams(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        from producer.inputs import translate

        problem = translate(exc)
        name = (problem.field or "?").split("[")[0]
        raise InputError(f"--{name.replace('_', '-')}: {problem.detail}", field=name) from None


WATCH_RETRY_SECONDS = 3.0
"""How long `genq status` retries a lost connection before saying so (and counting down)."""


def client(retry_seconds: float = 60.0) -> Client:
    from producer.client import Client

    return Client(retry_seconds=retry_seconds)


def announce(job_id: str) -> None:
    """Say the job id (stderr) before anything is written."""
    _current_job.append(job_id)
    click.echo(f"job {job_id}", err=True)


def waiting() -> None:
    click.echo(
        "another genq submit of this job is running: waiting for it to finish, then resuming", err=True
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """genq: bulk generation with a fine-tuned model over Celery workers on GPUs and CPUs."""


@cli.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--profile", required=True, help="Model profile (configs/NAME.yaml).")
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
    **kw: Any,
) -> None:
    """Validate FILE, store it as a job and enqueue its chunks.  Prints the job id last.  The same
    command again resumes an interrupted submit (or re-enqueues lost chunks), never duplicates."""
    system_prompt = kw.pop("system_prompt")
    params = job_params(kw)
    job = client().submit(
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
        priority=priority,
        on_job_id=announce,
        on_wait=waiting,
    )
    state = job.status()
    verb = "resumed" if job.resumed else "submitted"
    click.echo(
        f"{verb} {state.counts.total} items in {job.enqueued} chunks ({state.counts.pending} pending) "
        f"to genq.{state.spec.profile}.{state.spec.mode}",
        err=True,
    )
    click.echo(job.id)


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
    if as_json:
        click.echo(json.dumps(state.as_dict()))
    else:
        click.echo(summary_line(state))
        for name, stats in sorted(state.workers.items()):
            click.echo(f"  {name}: {stats.get('items', 0)} items, {stats.get('tokens', 0)} tokens")


@cli.command()
@click.argument("job_id")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True)
@click.option("--format", "fmt", type=click.Choice(["native", "openai"]), default="native", show_default=True)
@click.option(
    "--all", "include_unfinished", is_flag=True, help="Also write cancelled and expired items as errors."
)
@click.option(
    "--errors-file",
    type=click.Path(path_type=Path),
    default=None,
    help="Write errored items here instead of OUTPUT (OpenAI's error file).",
)
@handle_errors
def collect(job_id: str, output: Path, fmt: str, include_unfinished: bool, errors_file: Path | None) -> None:
    """Write JOB's results in input order, each item once (finished ones; says what is pending)."""
    from worker.core.errors import OutputPathError
    from worker.core.outputs import check_output_path

    check_output_path(output)
    if errors_file is not None:
        check_output_path(errors_file, inputs=[output])
        if errors_file.resolve() == output.resolve():
            raise OutputPathError(f"--errors-file {errors_file} is the output file; choose another")
    job = client().job(job_id)
    from producer.collect import write_collected

    written, pending, ended, errored = write_collected(job, output, fmt, include_unfinished, errors_file)
    state = job.status()
    left_out = "" if include_unfinished or not ended else f"{ended} cancelled/expired left out (--all); "
    to_errors = f"{errored} errors to {errors_file}; " if errors_file is not None else ""
    click.echo(
        f"wrote {written} results to {output}; {to_errors}{left_out}{pending} pending; status {state.status}",
        err=True,
    )


@cli.command()
@click.argument("job_id")
@handle_errors
def cancel(job_id: str) -> None:
    """Cancel JOB: pending chunks are skipped, running micro-batches finish."""
    state = client().job(job_id).cancel()
    # while chunks in flight finish, the items they will not reach are counted at the job's end
    to_cancel = state.counts.pending if state.status == "cancelling" else state.counts.cancelled
    reply = {
        "job_id": job_id,
        "status": str(state.status),
        "counts": state.counts.as_dict(),
        "cancelling": to_cancel,
    }
    click.echo(json.dumps(reply))


@cli.command()
@click.argument("job_id")
@click.option(
    "--all-errors", is_flag=True, help="Also items whose error is permanent (invalid input, too long)."
)
@handle_errors
def retry(job_id: str, all_errors: bool) -> None:
    """Run JOB's errored items again: those whose error may pass next time (worker_lost,
    out_of_memory, generation_error); invalid_input and context_length_exceeded only with
    --all-errors."""
    n = client().job(job_id).retry(all_errors=all_errors)
    click.echo(f"re-enqueued {n} errored items of {job_id}", err=True)


@cli.command()
@click.argument("job_ids", nargs=-1, required=True)
@handle_errors
def delete(job_ids: tuple[str, ...]) -> None:
    """Remove every key of each JOB from Redis and its waiting messages from the queues."""
    c = client()
    for job_id in job_ids:
        gone = c.delete(job_id)
        click.echo(f"deleted {job_id}: {gone.keys} keys, {gone.messages} waiting messages", err=True)


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw]?)$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    m = _DURATION.match(text.strip())
    if not m:
        raise InputError(
            f"--older-than {text!r}: give a number with s, m, h, d or w (e.g. 7d)", field="older_than"
        )
    return float(m.group(1)) * _UNIT[m.group(2)]


@cli.command()
@click.option("--older-than", default="7d", show_default=True, help="Age: 30m, 12h, 7d, 2w ...")
@click.option("--dry-run", is_flag=True, help="Only list what would be deleted.")
@handle_errors
def prune(older_than: str, dry_run: bool) -> None:
    """Delete finished jobs that ended, and partial submits last touched, before --older-than."""
    found = client().prune(parse_duration(older_than), dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    for state in found:
        click.echo(f"{verb} {state.spec.job_id} ({state.label})", err=True)
    click.echo(f"{verb} {len(found)} jobs", err=True)


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def workers(as_json: bool) -> None:
    """Live workers: profile, mode, device, items and tokens done, tokens/s."""
    found = client().workers()
    if as_json:
        click.echo(json.dumps(found))
        return
    if not found:
        click.echo("no live workers")
    for w in found:
        click.echo(
            f"{w['name']}: {w['profile']} {w['mode']} on {w['device']}, {w['items']} items, "
            f"{w['tokens']} tokens, {w['tokens_per_second']} tok/s"
            + (f", on {w['current']}" if w.get("current") else "")
        )


@cli.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True)
@click.option("--profile", required=True)
@click.option("--job-id", default=None, help="With a broker: the job id (default: derived from FILE).")
@click.option("--mode", default=None, help="Embedded: auto, nf4 or fp32.  With a broker: any, nf4 or fp32.")
@click.option("--chunk-size", type=int, default=16, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["native", "openai"]), default="native", show_default=True)
@click.option("--skip-invalid", is_flag=True)
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
        _run_embedded(
            file, output, profile, mode or "auto", chunk_size, fmt, skip_invalid, params, system_prompt
        )
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
) -> None:
    from producer.inputs import read_items
    from producer.options import SubmitOptions, derived_job_id, input_limits
    from producer.progress import ProgressBar
    from worker.core.logs import configure
    from worker.core.profiles import load_profile
    from worker.core.schema import JobSpec
    from worker.core.states import LoadMode
    from worker.local import run_embedded

    if mode not in tuple(LoadMode):
        raise InputError(f"unknown mode {mode!r} for an embedded run: choose auto, nf4 or fp32", field="mode")
    configure()
    options = SubmitOptions(
        profile=load_profile(profile),
        chunk_size=chunk_size,
        params=params,
        system_prompt=system_prompt,
        skip_invalid=skip_invalid,
    )
    options.check()
    read = read_items(
        file,
        skip_invalid=skip_invalid,
        limits=input_limits(options.profile),
    )
    spec = JobSpec(
        job_id=derived_job_id(file, options),
        profile=options.profile.name,
        chunk_size=chunk_size,
        total=len(read.items),
        defaults=params,
        system_prompt=system_prompt,
        source=str(file),
    )
    started = time.monotonic()
    bar = ProgressBar()
    try:
        report = run_embedded(spec, read.items, output, fmt=fmt, mode=mode, on_progress=bar.update)  # type: ignore[arg-type]
    finally:
        bar.close()
    c = report.counts
    changed = f", {report.changed} regenerated because their request changed" if report.changed else ""
    click.echo(
        f"done: {c.succeeded} ok, {c.errored} errors, {report.resumed} resumed from {output}{changed}; "
        f"{report.completion_tokens / max(time.monotonic() - started, 1e-9):.1f} tok/s ({report.mode})",
        err=True,
    )


@cli.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--profile", required=True, help="Model profile (configs/NAME.yaml).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.option("--skip-invalid", is_flag=True, help="Count bad lines as errored items instead of refusing.")
@param_options
@handle_errors
def estimate(file: Path, profile: str, as_json: bool, skip_invalid: bool, **kw: Any) -> None:
    """Tokens in (the profile's tokenizer and chat template), a bound on tokens out, memory per
    mode and time per worker class (from the speed workers measured) for FILE, before running."""
    from producer.estimate import estimate_file, render
    from worker.core.profiles import load_profile

    system_prompt = kw.pop("system_prompt")
    params = job_params(kw)
    settings = get_settings()
    measured, live = [], []
    if settings.broker:
        c = client()
        measured, live = c.store.throughputs(profile), c.workers()
    report = estimate_file(
        file,
        load_profile(profile, settings),
        settings,
        params=params,
        system_prompt=system_prompt,
        skip_invalid=skip_invalid,
        measured=measured,
        live=live,
    )
    if as_json:
        click.echo(json.dumps(report.as_dict()))
    else:
        for line in render(report):
            click.echo(line)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
