"""genq: submit, status, collect, cancel, retry, run, workers.

``GENQ_BROKER_URL`` names the Redis used as broker and job store.  Without it, ``genq run`` works
embedded, in one process.  Errors print one line naming what to fix and exit with status 2.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from worker.core.errors import GenqError
from worker.core.schema import GenParams
from worker.core.settings import get_settings


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except GenqError as exc:
            click.echo(f"genq: error: {exc.message}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
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

    from worker.core.errors import InputError

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


def client() -> Any:
    from producer.client import Client

    return Client()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """genq: bulk generation with a fine-tuned model over Celery workers on GPUs and CPUs."""


@cli.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--profile", required=True, help="Model profile (configs/NAME.yaml).")
@click.option("--job-id", default=None, help="Job id; the same id again resumes instead of duplicating.")
@click.option("--mode", default="any", show_default=True, help="any, nf4 or fp32: which workers may take it.")
@click.option("--chunk-size", type=int, default=16, show_default=True, help="Items per task message.")
@click.option("--expires-in", type=float, default=None, help="Seconds; items not done by then are expired.")
@click.option("--skip-invalid", is_flag=True, help="Record bad lines as errored items instead of refusing.")
@param_options
@handle_errors
def submit(
    file: Path,
    profile: str,
    job_id: str | None,
    mode: str,
    chunk_size: int,
    expires_in: float | None,
    skip_invalid: bool,
    **kw: Any,
) -> None:
    """Validate FILE, store it as a job and enqueue its chunks.  Prints the job id last."""
    system_prompt = kw.pop("system_prompt")
    params = job_params(kw)
    job = client().submit(
        file,
        profile=profile,
        job_id=job_id,
        mode=mode,
        chunk_size=chunk_size,
        params=params,
        system_prompt=system_prompt,
        expires_in=expires_in,
        skip_invalid=skip_invalid,
    )
    state = job.status()
    verb = "resumed" if job.resumed else "submitted"
    click.echo(
        f"{verb} {state.counts.total} items in {job.enqueued} chunks "
        f"({state.counts.pending} pending) to genq.{state.spec.profile}.{state.spec.mode}",
        err=True,
    )
    click.echo(job.id)


@cli.command()
@click.argument("job_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="One JSON object (a list with no JOB).")
@click.option("--watch", is_flag=True, help="Live progress until the job ends.")
@click.option("--limit", type=int, default=20, show_default=True, help="Jobs listed with no JOB.")
@handle_errors
def status(job_id: str | None, as_json: bool, watch: bool, limit: int) -> None:
    """Counts, tokens, throughput, ETA and workers of JOB; recent jobs with no JOB."""
    from producer.progress import summary_line
    from producer.progress import watch as watch_job

    c = client()
    if job_id is None:
        states = c.jobs(limit)
        if as_json:
            click.echo(json.dumps([s.as_dict() for s in states]))
        else:
            for s in states:
                click.echo(summary_line(s))
        return
    job = c.job(job_id)
    state = watch_job(job.status) if watch else job.status()
    if as_json:
        click.echo(json.dumps(state.as_dict()))
    else:
        click.echo(summary_line(state))
        for name, stats in sorted(state.workers.items()):
            click.echo(f"  {name}: {stats.get('items', 0)} items, {stats.get('tokens', 0)} tokens")


def write_collected(job: Any, output: Path, fmt: str, include_unfinished: bool) -> tuple[int, int]:
    from worker.core.outputs import write_results

    pending = 0
    spec = job.client.store.spec(job.id)

    def rows() -> Any:
        nonlocal pending
        for _index, result, item in job.pairs():
            if result is None:
                pending += 1
                continue
            if not include_unfinished and result.error_type in ("cancelled", "expired"):
                continue
            yield result, item

    written = write_results(rows(), output, fmt, model=spec.profile)  # type: ignore[arg-type]
    return written, pending


@cli.command()
@click.argument("job_id")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True)
@click.option("--format", "fmt", type=click.Choice(["native", "openai"]), default="native", show_default=True)
@click.option(
    "--all", "include_unfinished", is_flag=True, help="Also write cancelled and expired items as errors."
)
@handle_errors
def collect(job_id: str, output: Path, fmt: str, include_unfinished: bool) -> None:
    """Write JOB's results in input order, each item once (finished ones; says what is pending)."""
    job = client().job(job_id)
    written, pending = write_collected(job, output, fmt, include_unfinished)
    state = job.status()
    click.echo(f"wrote {written} results to {output}; {pending} pending; status {state.status}", err=True)


@cli.command()
@click.argument("job_id")
@handle_errors
def cancel(job_id: str) -> None:
    """Cancel JOB: pending chunks are skipped, running micro-batches finish."""
    state = client().job(job_id).cancel()
    click.echo(json.dumps({"job_id": job_id, "status": state.status, "counts": state.counts.as_dict()}))


@cli.command()
@click.argument("job_id")
@handle_errors
def retry(job_id: str) -> None:
    """Run JOB's errored items again."""
    n = client().job(job_id).retry()
    click.echo(f"re-enqueued {n} errored items of {job_id}", err=True)


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
    embedded, in this process; run it again to resume from what OUTPUT holds."""
    system_prompt = kw.pop("system_prompt")
    params = job_params(kw)
    if get_settings().broker:
        c = client()
        job = c.submit(
            file,
            profile=profile,
            job_id=job_id or _stable_job_id(file, profile),
            mode=mode or "any",
            chunk_size=chunk_size,
            params=params,
            system_prompt=system_prompt,
            skip_invalid=skip_invalid,
        )
        click.echo(f"job {job.id}", err=True)
        job.wait(progress=True)
        written, _pending = write_collected(job, output, fmt, include_unfinished=False)
        click.echo(f"wrote {written} results to {output}", err=True)
        return
    _run_embedded(file, output, profile, mode or "auto", chunk_size, fmt, skip_invalid, params, system_prompt)


def _stable_job_id(file: Path, profile: str) -> str:
    import hashlib

    digest = hashlib.sha256(f"{file.resolve()}|{profile}".encode()).hexdigest()[:10]
    return f"run-{file.stem[:40]}-{digest}"


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
    from producer.client import check_params, input_digest, read_source
    from worker.core.errors import InputError
    from worker.core.logs import configure
    from worker.core.profiles import load_profile
    from worker.core.schema import JobSpec
    from worker.embedded import run_embedded

    if mode not in ("auto", "nf4", "fp32"):
        raise InputError(f"unknown mode {mode!r} for an embedded run: choose auto, nf4 or fp32", field="mode")
    configure()
    prof = load_profile(profile)
    check_params(params, prof)
    read = read_source(file, prof, skip_invalid=skip_invalid)
    spec = JobSpec(
        job_id=_stable_job_id(file, prof.name),
        profile=prof.name,
        chunk_size=chunk_size,
        total=len(read.items),
        defaults=params,
        system_prompt=system_prompt,
        input_digest=input_digest(read.items, prof.name, params, system_prompt),
        source=str(file),
    )
    started = time.monotonic()
    bar = _EmbeddedBar(len(read.items))
    try:
        report = run_embedded(spec, read.items, output, fmt=fmt, mode=mode, on_progress=bar.update)  # type: ignore[arg-type]
    finally:
        bar.close()
    c = report.counts
    click.echo(
        f"done: {c.succeeded} ok, {c.errored} errors, {report.resumed} resumed from {output}; "
        f"{report.completion_tokens / max(time.monotonic() - started, 1e-9):.1f} tok/s ({report.mode})",
        err=True,
    )


class _EmbeddedBar:
    """A rich progress bar on a terminal; a line every few seconds otherwise."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.tty = sys.stderr.isatty()
        self.last = 0.0
        self.progress: Any = None
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]generating"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} tok/s"),
                TimeRemainingColumn(),
                transient=False,
            )
            self.task = self.progress.add_task("run", total=total, rate="0.0")
            self.progress.start()

    def update(self, p: Any) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=p.done, rate=f"{p.tokens_per_second:.1f}")
            return
        now = time.monotonic()
        if now - self.last >= 5 or p.done == p.total:
            self.last = now
            print(
                f"{p.done}/{p.total} items, {p.errored} errors, {p.tokens_per_second:.1f} tok/s",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
