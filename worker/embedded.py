"""Embedded runs: ``genq run`` with no broker — one process, the same chunk code, no Redis.

:class:`LocalStore` is an in-memory job store with the methods :func:`worker.tasks.process_chunk`
uses.  Every result is appended to the output file the moment its micro-batch finishes; a second
run of the same command reads that file back and only generates what is missing.  When the job
is complete the file is rewritten once in input order (atomically).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from worker.core.outputs import OutputFormat, append_row, read_done, result_row, trim_partial_line
from worker.core.schema import ChunkRef, Counts, ErrorInfo, Item, ItemResult, JobSpec, error_result
from worker.store import result_kind


@dataclass
class Progress:
    total: int
    done: int
    succeeded: int
    errored: int
    completion_tokens: int
    started: float

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / max(time.monotonic() - self.started, 1e-9)


class LocalStore:
    """A job store in memory, writing each result to an open output file as it arrives."""

    def __init__(
        self, spec: JobSpec, items: list[Item], out: IO[str], fmt: OutputFormat, done: set[int]
    ) -> None:
        self._spec = spec
        self._items = items
        self._out = out
        self._fmt = fmt
        self.done_indices: set[int] = set(done)
        self.counts = Counts(total=len(items))
        self.completion_tokens = 0
        self.attempts: dict[str, int] = {}
        self.chunks: dict[str, list[int]] = {}
        self.on_record: Callable[[list[ItemResult]], None] | None = None

    def spec(self, job_id: str) -> JobSpec:
        return self._spec

    def status(self, job_id: str) -> str:
        return "in_progress"

    def expire_if_due(self, job_id: str, now: float | None = None) -> bool:
        return False

    def pending_indices(self, job_id: str, indices: Sequence[int]) -> list[int]:
        return [i for i in indices if i not in self.done_indices]

    def items(self, job_id: str, indices: Sequence[int]) -> list[Item]:
        return [self._items[i] for i in indices]

    def record(self, job_id: str, results: Sequence[ItemResult], worker: str | None = None) -> int:
        written = [r for r in results if r.index not in self.done_indices]
        for r in written:
            self.done_indices.add(r.index)
            append_row(self._out, result_row(r, self._items[r.index], self._fmt, model=self._spec.profile))
            kind = result_kind(r)
            setattr(self.counts, kind, getattr(self.counts, kind) + 1)
            self.completion_tokens += r.usage.completion_tokens
        if written and self.on_record:
            self.on_record(written)
        return len(written)

    def close_items(self, job_id: str, indices: Sequence[int], kind: str, message: str) -> int:
        todo = self.items(job_id, self.pending_indices(job_id, indices))
        return self.record(job_id, [error_result(it, ErrorInfo(type=kind, message=message)) for it in todo])

    def start_attempt(self, job_id: str, chunk_id: str) -> int:
        self.attempts[chunk_id] = self.attempts.get(chunk_id, 0) + 1
        return self.attempts[chunk_id]

    def undo_attempt(self, job_id: str, chunk_id: str) -> None:
        self.attempts[chunk_id] = self.attempts.get(chunk_id, 1) - 1

    def add_chunks(
        self, job_id: str, chunks: dict[str, list[int]], *, split_parent: str | None = None
    ) -> None:
        self.chunks.update(chunks)

    def mark_running(self, job_id: str, chunk_id: str, worker: str) -> None:
        pass

    def clear_running(self, job_id: str, chunk_id: str) -> None:
        pass


@dataclass
class EmbeddedReport:
    total: int
    resumed: int
    generated: int
    counts: Counts
    completion_tokens: int
    seconds: float
    mode: str
    output: Path

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "resumed": self.resumed,
            "generated": self.generated,
            "counts": self.counts.as_dict(),
            "completion_tokens": self.completion_tokens,
            "seconds": round(self.seconds, 3),
            "tokens_per_second": round(self.completion_tokens / max(self.seconds, 1e-9), 2),
            "mode": self.mode,
            "output": str(self.output),
        }


def _key(row: dict[str, Any]) -> str:
    return str(row.get("custom_id", row.get("id")))


def _row_ok(row: dict[str, Any]) -> bool:
    """Native rows carry ``status``; OpenAI batch rows carry ``error`` (null when ok)."""
    if "status" in row:
        return row["status"] == "ok"
    return row.get("error") is None


def reorder_output(path: Path, items: list[Item]) -> None:
    """Rewrite ``path`` with one row per item in input order (atomic)."""
    rows = read_done(path)
    tmp = path.with_name(path.name + ".tmp")
    from worker.core.outputs import _dumps

    with open(tmp, "w", encoding="utf-8") as fh:
        for item in items:
            row = rows.get(item.id)
            if row is not None:
                fh.write(_dumps(row))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def run_embedded(
    spec: JobSpec,
    items: list[Item],
    output: Path,
    *,
    fmt: OutputFormat = "native",
    mode: Literal["auto", "nf4", "fp32"] = "auto",
    on_progress: Callable[[Progress], None] | None = None,
    max_attempts: int = 3,
) -> EmbeddedReport:
    """Generate every item not already in ``output``, appending results as they finish."""
    from worker.core.profiles import load_profile
    from worker.engine import build_engine
    from worker.model.loading import load_model
    from worker.tasks import process_chunk

    started = time.monotonic()
    previous = read_done(output)
    trim_partial_line(output)
    ids = {it.id for it in items}
    done = {it.index for it in items if it.id in previous}
    resumed = len(done)
    profile = load_profile(spec.profile)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "a", encoding="utf-8") as out:
        store = LocalStore(spec, items, out, fmt, done)
        for row in previous.values():  # count what the earlier run finished
            if _key(row) in ids:
                if _row_ok(row):
                    store.counts.succeeded += 1
                else:
                    store.counts.errored += 1
        progress = Progress(
            len(items), resumed, store.counts.succeeded, store.counts.errored, 0, time.monotonic()
        )

        def on_record(results: list[ItemResult]) -> None:
            progress.done = store.counts.finished
            progress.succeeded, progress.errored = store.counts.succeeded, store.counts.errored
            progress.completion_tokens = store.completion_tokens
            if on_progress:
                on_progress(progress)

        store.on_record = on_record
        if on_progress:
            on_progress(progress)
        loaded_mode = "-"
        if resumed < len(items):
            loaded = load_model(profile, mode)
            loaded_mode = loaded.mode
            engine = build_engine(loaded, worker="embedded")
            queue: list[tuple[str, list[int]]] = [
                (f"c{n:06d}", list(range(s, min(s + spec.chunk_size, len(items)))))
                for n, s in enumerate(range(0, len(items), spec.chunk_size))
            ]
            while queue:
                cid, indices = queue.pop(0)
                if not store.pending_indices(spec.job_id, indices):
                    continue
                ref = ChunkRef(job_id=spec.job_id, chunk_id=cid, indices=indices)

                def publish(_spec: JobSpec, children: dict[str, list[int]]) -> None:
                    queue[:0] = list(children.items())

                process_chunk(
                    store, engine, ref, worker="embedded", max_attempts=max_attempts, publish=publish
                )
    reorder_output(output, items)
    return EmbeddedReport(
        total=len(items),
        resumed=resumed,
        generated=store.counts.finished - resumed,
        counts=store.counts,
        completion_tokens=store.completion_tokens,
        seconds=time.monotonic() - started,
        mode=loaded_mode,
        output=output,
    )
