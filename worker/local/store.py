"""The job store of an embedded run: one window of the input in memory at a time, each result
appended to the output in input order as soon as every earlier item of the window has one.  It
implements all of :class:`worker.chunks.ChunkStore`; an embedded run has no
:class:`~worker.chunks.JobControl` (nobody else can cancel it).

What it holds never grows with the input: the window's items, the rows that wait for an earlier
item of the window, and the window's chunk attempts.  The positions of the rows it wrote go to
disk (:class:`~worker.local.manifest.Positions`), for the final reordering of a resumed run."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import IO

from worker.core.counting import count_field
from worker.core.jobstate import JobState
from worker.core.lifecycle import Event
from worker.core.outputs import OutputFormat, dumps_row, result_row
from worker.core.schema import Counts, Item, ItemResult, JobSpec
from worker.core.states import JobStatus
from worker.local.manifest import Positions

WORKER = "embedded"


class LocalStore:
    def __init__(self, spec: JobSpec, out: IO[str], fmt: OutputFormat, counts: Counts) -> None:
        self._spec = spec
        self._out = out
        self._fmt = fmt
        self.counts = counts.model_copy()
        """Every item of the job: the rows kept from an earlier run, and what this run recorded."""
        self.completion_tokens = 0
        self.prompt_tokens = 0
        self.started_at = time.time()
        self.on_record: Callable[[], None] | None = None
        self.written = Positions()
        """The input positions of the rows this run wrote, in order."""
        self.peak_held = 0
        """The most items held at once (a window's)."""
        self._window: dict[int, Item] = {}
        self._done: set[int] = set()
        self._order: deque[int] = deque()  # the window's items to write, in input order
        self._ready: dict[int, str] = {}  # rows waiting for an earlier item of the window
        self.attempts: dict[str, int] = {}
        self.chunks: dict[str, list[int]] = {}

    # --- windows ---------------------------------------------------------------------------------

    def open_window(self, items: Iterable[Item], done: Iterable[int]) -> None:
        """Hold ``items`` (the next window of the input); ``done``: those the output answers."""
        self._window = {item.index: item for item in items}
        self._done = set(done)
        self._order = deque(i for i in self._window if i not in self._done)
        self.peak_held = max(self.peak_held, len(self._window))

    def close_window(self) -> None:
        """Write what the window left waiting (nothing, unless an item got no result) and let go."""
        rows: list[str] = []
        for i in self._order:
            if i in self._ready:
                rows.append(self._ready.pop(i))
                self.written.add(i)
        self._write(rows)
        self._window, self._done, self._order, self._ready = {}, set(), deque(), {}
        self.attempts.clear()
        self.chunks.clear()

    def _write(self, rows: list[str]) -> None:
        if rows:
            self._out.write("".join(rows))
            self._out.flush()

    # --- ChunkStore ------------------------------------------------------------------------------

    def spec(self, job_id: str, inc: str | None = None) -> JobSpec:
        return self._spec

    def pending_indices(self, job_id: str, indices: Sequence[int]) -> list[int]:
        return [i for i in indices if i not in self._done]

    def items(self, job_id: str, indices: Sequence[int]) -> list[Item]:
        return [self._window[i] for i in indices]

    def record(
        self, job_id: str, results: Sequence[ItemResult], worker: str | None = None, *, inc: str = ""
    ) -> int:
        return len(self.record_indices(job_id, results, worker))

    def record_indices(
        self, job_id: str, results: Sequence[ItemResult], worker: str | None = None, *, inc: str = ""
    ) -> list[int]:
        written = [r for r in results if r.index not in self._done]
        for r in written:
            self._done.add(r.index)
            row = result_row(r, self._window[r.index], self._fmt, model=self._spec.profile)
            self._ready[r.index] = dumps_row(row)
            field = count_field(r)
            setattr(self.counts, field, getattr(self.counts, field) + 1)
            self.completion_tokens += r.usage.completion_tokens
            self.prompt_tokens += r.usage.prompt_tokens
        rows: list[str] = []
        while self._order and self._order[0] in self._ready:  # input order: the next ones are here
            i = self._order.popleft()
            rows.append(self._ready.pop(i))
            self.written.add(i)
        self._write(rows)
        if written and self.on_record:
            self.on_record()
        return [r.index for r in written]

    def start_attempt(self, job_id: str, cid: str, worker: str, *, inc: str = "") -> int:
        self.attempts[cid] = self.attempts.get(cid, 0) + 1
        return self.attempts[cid]

    def undo_attempt(self, job_id: str, cid: str, *, inc: str = "") -> None:
        self.attempts[cid] = self.attempts.get(cid, 1) - 1

    def add_chunks(
        self,
        job_id: str,
        chunks: dict[str, list[int]],
        *,
        split_parent: str | None = None,
        inc: str = "",
        event: Event = Event.PUBLISH,
    ) -> dict[str, list[int]]:
        new = {cid: idx for cid, idx in chunks.items() if cid not in self.chunks}
        self.chunks.update(new)
        return new

    def state(self) -> JobState:
        """The run as a job state: what the progress bar shows for both kinds of run."""
        finished = self.counts.finished >= self.counts.total
        return JobState(
            spec=self._spec,
            status=JobStatus.COMPLETED if finished else JobStatus.IN_PROGRESS,
            counts=self.counts.model_copy(),
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            started_at=self.started_at,
            finished_at=time.time() if finished else None,
            updated_at=time.time(),
            workers={WORKER: {"items": self.counts.succeeded, "tokens": self.completion_tokens}},
            inputs_written=self.counts.total,
        )
