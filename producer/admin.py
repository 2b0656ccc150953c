"""genq cancel, retry, delete, prune, workers and estimate: the commands around a job's run."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click

from producer.cliutil import client, handle_errors, job_params, param_options
from worker.core.errors import InputError
from worker.core.settings import get_settings


@click.command()
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


@click.command()
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


@click.command()
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


@click.command()
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


@click.command()
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


@click.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--profile", required=True, help="Model profile: a name (configs/NAME.yaml) or a path.")
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
    chosen = load_profile(profile, settings)  # a name or a path: the fleet knows it by its name
    measured, live = [], []
    if settings.broker:
        c = client()
        measured, live = c.store.throughputs(chosen.name), c.workers()
    report = estimate_file(
        file,
        chosen,
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


COMMANDS = (cancel, retry, delete, prune, workers, estimate)
"""Registered on the ``genq`` group by :mod:`producer.cli`."""
