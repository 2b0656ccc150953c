"""Running a job embedded: read the input a window at a time, keep what the output already
answers, generate the rest through the same chunk runner as a worker, and append each result in
input order as it comes.  Memory does not grow with the input: the run holds one window of items
(:data:`WINDOW`), the resume plan lives on disk (:mod:`worker.local.manifest`).

Two passes over the input, both through the producer's one reader (:class:`EmbeddedInput`):

1. every line is validated (a bad one stops the run before the model loads and before anything
   is written), each item's digest decides whether the output's row for it may be kept, and the
   output is cut down to the rows kept and the manifest rewritten (:func:`prepare_output`);
2. window by window, the items without a row are run and their rows appended in input order.

A fresh run's output is in input order all along; a resumed one holds the rows kept, then the new
ones, and is merged into input order at the end (:func:`put_in_order`).  Killed anywhere, the same
command resumes from what the output holds."""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from worker.chunks import chunk_id, chunk_range, process_chunk
from worker.core.identity import job_context
from worker.core.jobstate import JobState
from worker.core.logs import get_logger
from worker.core.outputs import OutputFormat, check_output_path
from worker.core.profiles import Profile
from worker.core.schema import ChunkRef, Counts, Item, JobSpec
from worker.core.settings import get_settings
from worker.core.states import LoadMode
from worker.core.throughput import Throughput, record_local
from worker.local.manifest import Resume, prepare_output, put_in_order
from worker.local.store import WORKER, LocalStore

WINDOW = 1024
"""Items an embedded run reads and holds at a time (rounded up to whole chunks when it runs
them): a few dozen chunks, far more than a micro-batch, so windows never starve the engine."""


class EmbeddedInput(Protocol):
    """A job to run embedded, as the producer builds it (:class:`producer.build.EmbeddedJob`):
    this package never reads an input file itself."""

    @property
    def draft(self) -> JobSpec:
        """The job's spec before its input is read (its id, options and source; total 0)."""

    def windows(self, size: int) -> Iterator[list[Item]]:
        """The whole input from its start, validated, ``size`` items at a time (each call reads
        it again; the first bad line raises, naming line and field, unless ``skip_invalid``)."""

    def spec(self) -> JobSpec:
        """The complete spec, once :meth:`windows` read the input through."""

    @property
    def output_format(self) -> OutputFormat:
        """The output's shape, once :meth:`windows` read the input through."""


@dataclass
class EmbeddedReport:
    total: int
    resumed: int
    changed: int
    generated: int
    counts: Counts
    completion_tokens: int
    seconds: float
    mode: str
    output: Path
    peak_held: int = 0
    """The most input items the run held in memory at once (one window's)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "resumed": self.resumed,
            "changed": self.changed,
            "generated": self.generated,
            "counts": self.counts.as_dict(),
            "completion_tokens": self.completion_tokens,
            "seconds": round(self.seconds, 3),
            "tokens_per_second": round(self.completion_tokens / max(self.seconds, 1e-9), 2),
            "mode": self.mode,
            "output": str(self.output),
            "peak_held": self.peak_held,
        }


def run_embedded(
    job: EmbeddedInput,
    output: Path,
    *,
    profile: Profile,
    mode: LoadMode | str = LoadMode.AUTO,
    on_progress: Callable[[JobState], None] | None = None,
    max_attempts: int = 3,
    window: int = WINDOW,
) -> EmbeddedReport:
    """Generate every item whose answer ``output`` does not already hold, appending results in
    input order as they finish; the output ends in input order, one row per item.  ``profile`` is
    the job's (``spec.profile``), as the caller loaded it: nothing here reads it again."""
    started = time.monotonic()
    draft = job.draft
    log = get_logger(job=draft.job_id, worker=WORKER)
    check_output_path(output, inputs=[draft.source] if draft.source else [])
    context = job_context(profile, draft.defaults, draft.system_prompt)
    resume = prepare_output(
        output,
        job.windows(window),
        context,
        output_format=lambda: job.output_format,
        spec=job.spec,
    )
    spec, fmt = job.spec(), job.output_format
    if resume.first_changed is not None:
        first = resume.first_changed
        log.warning(
            "regenerating_changed_items", items=resume.changed, first_line=first.line, first_id=first.id
        )
    loaded_mode = "-"
    with contextlib.ExitStack() as stack:
        stack.callback(resume.positions.close)
        out = stack.enter_context(open(output, "a", encoding="utf-8"))
        store = LocalStore(spec, out, fmt, resume.counts)
        stack.callback(store.written.close)
        if on_progress:
            store.on_record = lambda: on_progress(store.state())
            on_progress(store.state())
        if resume.kept < spec.total:
            loaded_mode = _generate(job, spec, profile, store, resume, mode, max_attempts, window)
        out.close()
        put_in_order(output, resume, store.written)  # a resumed run's new rows among the kept ones
    return EmbeddedReport(
        total=spec.total,
        resumed=resume.kept,
        changed=resume.changed,
        generated=store.counts.finished - resume.kept,
        counts=store.counts,
        completion_tokens=store.completion_tokens,
        seconds=time.monotonic() - started,
        mode=loaded_mode,
        output=output,
        peak_held=max(resume.peak_held, store.peak_held),
    )


def _generate(
    job: EmbeddedInput,
    spec: JobSpec,
    profile: Profile,
    store: LocalStore,
    resume: Resume,
    mode: LoadMode | str,
    max_attempts: int,
    window: int,
) -> str:
    """Load the model and run, window by window, every chunk with something left to do;
    returns the mode used."""
    from worker.engine import build_engine
    from worker.model.loading import load_model

    loaded = load_model(profile, mode)
    engine = build_engine(loaded, worker=WORKER)
    started, tokens_before = time.monotonic(), store.completion_tokens
    size = spec.chunk_size
    kept = iter(resume.positions)
    next_kept = next(kept, None)
    queue: deque[tuple[str, list[int]]] = deque()

    def publish(_spec: JobSpec, children: dict[str, list[int]]) -> None:
        queue.extendleft(reversed(list(children.items())))

    for items in job.windows(-(-window // size) * size):  # whole chunks: their ids are the job's
        first, end = items[0].index, items[-1].index + 1
        done: list[int] = []
        while next_kept is not None and next_kept < end:
            done.append(next_kept)
            next_kept = next(kept, None)
        if len(done) == len(items):
            continue
        store.open_window(items, done)
        queue.extend(
            (chunk_id(n), list(chunk_range(n, end, size))) for n in range(first // size, -(-end // size))
        )
        while queue:
            cid, indices = queue.popleft()
            if not store.pending_indices(spec.job_id, indices):
                continue
            ref = ChunkRef(job_id=spec.job_id, chunk_id=cid, indices=indices)
            process_chunk(store, engine, ref, worker=WORKER, max_attempts=max_attempts, publish=publish)
        store.close_window()
    _record_speed(spec.profile, loaded, store.completion_tokens - tokens_before, time.monotonic() - started)
    return str(loaded.mode)


def _record_speed(profile: str, loaded: Any, tokens: int, seconds: float) -> None:
    """Keep this machine's measured speed for `genq estimate` (runs of a few tokens say little)."""
    if tokens < 64 or seconds <= 0:
        return
    from worker.engine.cpu import cpu_name

    if loaded.device == "cuda":
        import torch

        hardware = str(torch.cuda.get_device_name(0))
    else:
        hardware = cpu_name()
    measured = Throughput(
        profile=profile,
        mode=str(loaded.mode),
        device=str(loaded.device),
        hardware=hardware,
        tokens_per_second=round(tokens / seconds, 2),
        measured_at=time.time(),
        source=WORKER,
    )
    try:
        record_local(get_settings().home, measured)
    except OSError as exc:  # a speed note must never fail a run
        get_logger().warning("throughput_not_recorded", error=str(exc))
