"""Progress display, the same for a job in Redis and an embedded run: a live bar on a terminal,
a line every few seconds otherwise.  Both render a :class:`~worker.core.jobstate.JobState`.

Shows items done of total, errors, completion tokens/s, ETA and, per worker, items and tokens.
While following a job in Redis, a lost connection is shown with a countdown to the next try.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from worker.core.errors import StoreUnavailable
from worker.core.jobstate import JobState

LINE_EVERY = 5.0
"""Seconds between progress lines when stderr is not a terminal."""
RECONNECT_EVERY = 5.0
"""Seconds between reads while Redis cannot be reached."""


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
        f"{state.spec.job_id} {state.label}: {c.finished}/{c.total} items "
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


class ProgressBar:
    """Renders job states: ``bar.update(state)`` as often as wanted, ``bar.close()`` at the end."""

    def __init__(self, *, tty: bool | None = None) -> None:
        self.tty = sys.stderr.isatty() if tty is None else tty
        self._last = 0.0
        self._live: Any = None
        self._bar: Any = None
        self._task: Any = None

    def update(self, state: JobState, note: str = "") -> None:
        if not self.tty:
            now = time.monotonic()
            if state.final or note or now - self._last >= LINE_EVERY:
                print(note or summary_line(state), file=sys.stderr, flush=True)
                self._last = now
            return
        if self._live is None:
            self._start(state)
        self._bar.update(
            self._task,
            total=state.counts.total,
            completed=state.counts.finished,
            rate=f"{state.tokens_per_second:.1f}",
            eta=fmt_eta(state.eta_seconds),
            errors=state.counts.errored,
            description=f"{state.spec.job_id} {note or state.label}",
        )
        from rich.console import Group

        self._live.update(Group(self._bar, workers_table(state)))

    def _start(self, state: JobState) -> None:
        from rich.console import Console, Group
        from rich.live import Live
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        console = Console(stderr=True)
        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} tok/s  ETA {task.fields[eta]}  errors {task.fields[errors]}"),
            console=console,
        )
        self._task = self._bar.add_task(
            state.spec.job_id, total=state.counts.total, rate="0.0", eta="-", errors=0
        )
        self._live = Live(Group(self._bar, workers_table(state)), console=console, refresh_per_second=4)
        self._live.start()

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


def follow(
    get_state: Callable[[], JobState],
    *,
    poll: float = 1.0,
    timeout: float | None = None,
    pause: Callable[[float], object] = time.sleep,
    bar: bool = True,
    on_update: Callable[[JobState], None] | None = None,
) -> JobState:
    """Read the job's state every ``poll`` seconds until it is final; returns the last state.
    ``pause(poll)`` waits between reads (:meth:`worker.store.JobEvents.pause` returns early when
    the job ends).  With ``bar`` the state is shown (:class:`ProgressBar`); a lost connection is
    shown with a countdown and retried."""
    deadline = None if timeout is None else time.monotonic() + timeout
    shown = ProgressBar() if bar else None
    state: JobState | None = None
    try:
        while True:
            try:
                state = get_state()
            except StoreUnavailable as exc:
                if state is None:
                    raise
                _countdown(shown, state, exc)
                continue
            if on_update:
                on_update(state)
            if shown:
                shown.update(state)
            if state.final:
                return state
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {state.spec.job_id} is still {state.status} after {timeout} s")
            pause(poll)
    finally:
        if shown:
            shown.close()


def _countdown(shown: ProgressBar | None, state: JobState, exc: StoreUnavailable) -> None:
    """Say the connection is lost and count down to the next try."""
    for left in range(int(RECONNECT_EVERY), 0, -1):
        note = f"connection lost ({exc.message.split(':')[0]}); retrying in {left} s"
        if shown:
            shown.update(state, note)
        else:
            print(note, file=sys.stderr, flush=True)
        time.sleep(1)
