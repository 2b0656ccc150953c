"""Progress display for a running job: a live bar on a terminal, a line every few seconds otherwise.

Shows items done of total, errors, completion tokens/s, ETA and, per worker, items and tokens.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from worker.store import JobState


def fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def summary_line(state: JobState) -> str:
    c = state.counts
    return (
        f"{state.spec.job_id} {state.status}: {c.finished}/{c.total} items "
        f"(ok {c.succeeded}, errors {c.errored}, cancelled {c.cancelled}, expired {c.expired}, "
        f"pending {c.pending}) "
        f"{state.tokens_per_second:.1f} tok/s, ETA {fmt_eta(state.eta_seconds)}"
    )


def workers_table(state: JobState) -> Any:
    from rich.table import Table

    table = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
    table.add_column("worker")
    table.add_column("items", justify="right")
    table.add_column("tokens", justify="right")
    for name, stats in sorted(state.workers.items()):
        table.add_row(name, str(stats.get("items", 0)), str(stats.get("tokens", 0)))
    return table


def watch(
    get_state: Callable[[], JobState],
    *,
    poll: float = 1.0,
    timeout: float | None = None,
    pause: Callable[[float], object] = time.sleep,
) -> JobState:
    """Follow a job until it is final; returns the last state.  ``pause(poll)`` waits between
    reads (:meth:`worker.store.JobEvents.pause` returns early when the job ends)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    if not sys.stderr.isatty():
        return _watch_lines(get_state, poll=poll, deadline=deadline, pause=pause)
    from rich.console import Console, Group
    from rich.live import Live
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    console = Console(stderr=True)
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} tok/s  ETA {task.fields[eta]}  errors {task.fields[errors]}"),
        console=console,
    )
    state = get_state()
    task = bar.add_task(state.spec.job_id, total=state.counts.total, rate="0.0", eta="-", errors=0)
    with Live(Group(bar, workers_table(state)), console=console, refresh_per_second=4) as live:
        while True:
            bar.update(
                task,
                completed=state.counts.finished,
                rate=f"{state.tokens_per_second:.1f}",
                eta=fmt_eta(state.eta_seconds),
                errors=state.counts.errored,
                description=f"{state.spec.job_id} {state.status}",
            )
            live.update(Group(bar, workers_table(state)))
            if state.final:
                return state
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {state.spec.job_id} is still {state.status} after {timeout} s")
            pause(poll)
            state = get_state()


def _watch_lines(
    get_state: Callable[[], JobState],
    *,
    poll: float,
    deadline: float | None,
    pause: Callable[[float], object],
) -> JobState:
    last = 0.0
    while True:
        state = get_state()
        now = time.monotonic()
        if state.final or now - last >= 5:
            print(summary_line(state), file=sys.stderr, flush=True)
            last = now
        if state.final:
            return state
        if deadline is not None and now > deadline:
            raise TimeoutError(f"job {state.spec.job_id} is still {state.status}")
        pause(poll)
