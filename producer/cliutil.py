"""What the genq commands share: one-line errors instead of tracebacks, the job-wide generation
options, the client, and the messages about the job being worked on."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from producer import interrupts
from worker.core.errors import GenqError, InputError
from worker.core.schema import GenParams

if TYPE_CHECKING:
    from producer.client import Client

_current_job: list[str] = []
"""The id of the job this command works on, once known (for the interrupt message)."""


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with interrupts.catching():
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


def submitted() -> None:
    """The submit is complete: an interrupt from now on (a follow) leaves no partial job."""
    _current_job.clear()


def waiting() -> None:
    click.echo(
        "another genq submit of this job is running: waiting for it to finish, then resuming", err=True
    )
