"""`genq collect --follow`: write a job's results while it runs, and take them out of Redis.

:class:`Follower` holds the job's follow lease (one collector per job; renewed by a thread every
:data:`RENEW_SECONDS`, lapsing :data:`LEASE_SECONDS` after its collector dies; a collector of the
same machine whose process is gone is replaced at once) and pages out the job's results as they
land.  A page leaves Redis only when the consumer asks for the next one: by then the collector
(:func:`follow_collect`) has it fsynced in a spool segment (:mod:`producer.spool`).

Killed at any point, the same command resumes: the segments on disk are exactly what is durable;
the newest one is confirmed again (its results may still be in Redis: confirming is idempotent,
and a result replaced meanwhile by a retry is left for its turn), so no item is lost and none is
written twice.  At the job's end the segments are merged in input order into the output, the
same bytes as a plain `genq collect`.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from producer.spool import Spool, SpoolLine, render
from worker.core.counting import NOT_RUN_CODES
from worker.core.errors import FollowConflict, JobNotFound
from worker.core.jobstate import JobState
from worker.core.outputs import OutputFormat, dumps_row, result_row
from worker.core.schema import ItemResult
from worker.core.settings import get_settings
from worker.core.states import JobStatus
from worker.store.drain import result_digest
from worker.store.keys import PAGE

if TYPE_CHECKING:
    from producer.client import Job

LEASE_SECONDS = 10.0
RENEW_SECONDS = 2.0
PAGE_ROWS = 4000
"""Results per spool segment at most (a few MB of memory)."""

Page = list[tuple[int, str, ItemResult]]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Follower:
    """``with Follower(job) as f: for page in f.pages(): ...`` — pages of ``(index, stored json,
    result)``; each page is confirmed (drained from Redis) when the next one is asked for."""

    def __init__(self, job: Job, *, poll: float = 0.5, page_rows: int = PAGE_ROWS) -> None:
        self.job = job
        self.store = job.client.store
        self.poll = poll
        self.page_rows = page_rows
        self.holder = f"{socket.gethostname()}|{os.getpid()}|{time.time():.3f}"
        self._stop = threading.Event()
        self._lost: str | None = None
        self._thread: threading.Thread | None = None
        self.inc = ""
        """The incarnation followed: a drain of another one (the id deleted and submitted again
        meanwhile) is refused in the same atomic step."""

    def __enter__(self) -> Follower:
        self.inc = self.store.spec(self.job.id).incarnation
        self._take()
        self._thread = threading.Thread(target=self._renew, name="genq-follow-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._lost is None:
            self.store.follow_lease(self.job.id, "release", self.holder)

    def _take(self) -> None:
        ttl = int(LEASE_SECONDS * 1000)
        other = self.store.follow_lease(self.job.id, "take", self.holder, ttl)
        if other is None:
            return
        host, _, rest = other.partition("|")
        pid = rest.partition("|")[0]
        # a collector of this machine that was killed: its lease is ours without the wait
        dead = host == socket.gethostname() and pid.isdigit() and not _alive(int(pid))
        if dead and self.store.follow_lease(self.job.id, "take", self.holder, ttl, replace=other) is None:
            return
        raise FollowConflict(
            f"job {self.job.id} is already followed by another `genq collect --follow` (pid {pid} "
            f"on {host}); only one collector may drain a job.  Its lease lapses {LEASE_SECONDS:.0f} s "
            "after that process stops"
        )

    def _renew(self) -> None:
        ttl = int(LEASE_SECONDS * 1000)
        while not self._stop.wait(RENEW_SECONDS):
            try:
                other = self.store.follow_lease(self.job.id, "renew", self.holder, ttl)
            except Exception:  # Redis away for a moment: the next renewal tries again
                continue
            if other is not None:
                self._lost = other
                return

    def check(self) -> None:
        if self._lost is not None:
            raise FollowConflict(
                f"job {self.job.id}: this collector lost its follow lease to {self._lost} (it was "
                "paused longer than the lease); stopped before draining anything more"
            )

    def confirm(self, rows: list[tuple[int, str, bool]]) -> int:
        """``(index, digest, keep)`` are durable on the consumer's side: drain them."""
        self.check()
        return self.store.confirm_drained(self.job.id, rows, inc=self.inc)

    def pages(self, *, on_state: Callable[[JobState], None] | None = None) -> Iterator[Page]:
        """Pages of new results until the job has ended and every result is drained."""
        with self.store.events(self.job.id) as events:
            while True:
                self.check()
                found = self.store.undrained(self.job.id, self.page_rows)
                if found:
                    page = [(i, raw, ItemResult.model_validate_json(raw)) for i, raw in found]
                    yield page
                    self.confirm([(i, result_digest(raw), not r.ok) for i, raw, r in page])
                    continue
                state = self.job.status()  # settles a cancelling job whose workers are gone
                if on_state is not None:
                    on_state(state)
                if state.final:
                    # the script that ends a job records its last results in the same step
                    if not self.store.undrained(self.job.id, 1):
                        return
                    continue
                events.pause(self.poll)


def spool_lines(job: Job, page: Page, fmt: OutputFormat, created: int) -> list[SpoolLine]:
    """A page as spool lines: each result's output row, as `genq collect` writes it."""
    store = job.client.store
    spec = store.spec(job.id)
    items = {}
    if fmt == "openai":  # the row's shape depends on the item (chat or completion)
        items = {it.index: it for it in store.items(job.id, [i for i, _, _ in page])}
    lines = []
    for index, raw, result in page:
        kind = "o" if result.ok else ("n" if result.error_type in NOT_RUN_CODES else "e")
        row = dumps_row(result_row(result, items.get(index), fmt, model=spec.profile, created=created))
        lines.append(SpoolLine(index, kind, result_digest(raw), row))
    return lines


@dataclass
class FollowReport:
    written: int
    errored: int
    ended: int
    drained: int
    """Results drained from Redis by this run."""
    status: JobStatus
    spool_kept: Path | None
    """The spool, kept for a later retry's results (the job had errors), or None."""


def follow_collect(
    job: Job,
    output: Path,
    fmt: OutputFormat = "native",
    *,
    include_unfinished: bool = False,
    errors: Path | None = None,
    poll: float = 0.5,
    on_state: Callable[[JobState], None] | None = None,
) -> FollowReport:
    """Follow ``job`` into ``output`` until it ends (see the module's docstring)."""
    store = job.client.store
    spool = Spool(output, job.id, fmt)
    if not spool.exists and store.drained_total(job.id) > 0:
        # the items drained so far are in another spool (or a finished output) only
        where = store.output_files(job.id).get("output_file") or "another output"
        new = "new results landed since: they belong in that file"
        nothing = new if store.undrained(job.id, 1) else "nothing new landed since"
        raise FollowConflict(
            f"job {job.id} was already drained by `genq collect --follow` into {where}, and {output} "
            f"has no spool of it ({nothing}); follow into {where} to finish that file"
        )
    drained = 0
    with Follower(job, poll=poll) as follower:
        spool.open()
        store.record_files(
            job.id, output=str(output.resolve()), errors=str(errors.resolve()) if errors else None
        )
        # the newest segment may not have been confirmed before a kill: confirm it again
        last = spool.last()
        if last:
            follower.confirm([(ln.index, ln.digest, ln.kind != "o") for ln in last])
        kill_at = get_settings().fault_follow_kill_at  # test only: die in a window that matters
        for n, page in enumerate(follower.pages(on_state=on_state), start=1):
            if kill_at == f"{n}:read":
                os.kill(os.getpid(), signal.SIGKILL)  # read, not written
            drained += spool.write(spool_lines(job, page, fmt, spool.created))
            if kill_at == f"{n}:written":
                os.kill(os.getpid(), signal.SIGKILL)  # on disk, its results still in Redis
            spool.compact()
        state = job.status()
        if include_unfinished and state.status in (JobStatus.CANCELLED, JobStatus.EXPIRED):
            for lines in _never_ran(job, state.status, fmt, spool.created):
                spool.write(lines)
                spool.compact()
        spool.compact(everything=True)
        written, errored, ended = render(spool.lines(), output, errors, include_unfinished=include_unfinished)
        if not include_unfinished and state.status in (JobStatus.CANCELLED, JobStatus.EXPIRED):
            # every item the end left without a result, whether or not an earlier `--all` of this
            # spool wrote its row (render's count is those rows: a part of the same items)
            ended = state.counts.cancelled + state.counts.expired
        kept = spool.folder if state.counts.errored else None
        if kept is None:
            spool.remove()
    return FollowReport(written, errored, ended, drained, state.status, kept)


def _never_ran(job: Job, status: JobStatus, fmt: OutputFormat, created: int) -> Iterator[list[SpoolLine]]:
    """Pages of rows for the items a cancel or expiry left without a result (``--all``), found
    with the ``drained`` bitmap (a drained item has its row in the spool already)."""
    from producer.client import ended_result

    store = job.client.store
    spec = store.spec(job.id)
    bits = store.drained_bitmap(job.id)
    for start in range(0, spec.total, PAGE):
        idx = [
            i
            for i in range(start, min(start + PAGE, spec.total))
            if i // 8 >= len(bits) or not bits[i // 8] & (0x80 >> (i % 8))
        ]
        stored = store.stored_results(job.id, idx)
        missing = [i for i, raw in zip(idx, stored, strict=True) if raw is None]
        if not missing:
            continue
        try:
            items = store.items(job.id, missing)
        except JobNotFound:
            continue
        yield [
            SpoolLine(
                item.index,
                "n",
                "",
                dumps_row(
                    result_row(ended_result(item, status), item, fmt, model=spec.profile, created=created)
                ),
            )
            for item in items
        ]
