"""The job store of an embedded run: in memory, appending each result to the output file the
moment its micro-batch finishes.  It implements all of :class:`worker.chunks.ChunkStore`; an
embedded run has no :class:`~worker.chunks.JobControl` (nobody else can cancel it)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import IO

from worker.core.counting import count_field
from worker.core.jobstate import JobState
from worker.core.lifecycle import Event
from worker.core.outputs import OutputFormat, append_row, result_row
from worker.core.schema import Counts, Item, ItemResult, JobSpec
from worker.core.states import CountField, JobStatus

WORKER = "embedded"


class LocalStore:
    def __init__(
        self, spec: JobSpec, items: list[Item], out: IO[str], fmt: OutputFormat, done: dict[int, CountField]
    ) -> None:
        self._spec = spec
        self._items = items
        self._out = out
        self._fmt = fmt
        self.done: set[int] = set(done)
        self.counts = Counts(total=len(items))
        for field in done.values():
            setattr(self.counts, field, getattr(self.counts, field) + 1)
        self.completion_tokens = 0
        self.prompt_tokens = 0
        self.attempts: dict[str, int] = {}
        self.chunks: dict[str, list[int]] = {}
        self.started_at = time.time()
        self.on_record: Callable[[], None] | None = None

    def spec(self, job_id: str, inc: str | None = None) -> JobSpec:
        return self._spec

    def pending_indices(self, job_id: str, indices: Sequence[int]) -> list[int]:
        return [i for i in indices if i not in self.done]

    def items(self, job_id: str, indices: Sequence[int]) -> list[Item]:
        return [self._items[i] for i in indices]

    def record(
        self, job_id: str, results: Sequence[ItemResult], worker: str | None = None, *, inc: str = ""
    ) -> int:
        return len(self.record_indices(job_id, results, worker))

    def record_indices(
        self, job_id: str, results: Sequence[ItemResult], worker: str | None = None, *, inc: str = ""
    ) -> list[int]:
        written = [r for r in results if r.index not in self.done]
        for r in written:
            self.done.add(r.index)
            append_row(self._out, result_row(r, self._items[r.index], self._fmt, model=self._spec.profile))
            field = count_field(r)
            setattr(self.counts, field, getattr(self.counts, field) + 1)
            self.completion_tokens += r.usage.completion_tokens
            self.prompt_tokens += r.usage.prompt_tokens
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
