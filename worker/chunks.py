"""The chunk runner: fetch a chunk's items, skip what is done, run the engine, store results.

:func:`process_chunk` is shared by the Celery task (distributed) and the embedded runner
(``genq run`` without a broker), so both paths behave the same:

* a chunk of a finished, cancelled or expired job is dropped without generating (and a cancelled
  job is settled once nothing runs);
* items that already have a result are skipped (a redelivered chunk redoes nothing);
* every delivery is counted; past ``GENQ_MAX_ATTEMPTS`` the chunk is split in two until a bad
  item is alone, and that item is recorded as ``worker_lost``;
* results are written per micro-batch, first write wins; each write is logged
  (``results_written``: generated, written, dropped, the indices written and dropped, the
  delivery's attempt number), so work done twice can be counted from the workers' own events;
* on shutdown the unfinished part is handed back (the delivery is not counted as an attempt);
* an unexpected engine error splits the chunk the same way, so one item cannot sink its neighbours.

Chunks are numbered ranges of the input (:func:`chunk_range`); split children and retry rounds
carry explicit index lists.  Nothing here imports torch, Redis or Celery: the stores and the
engine come in through the protocols below.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from worker.core.errors import GenqError, JobNotFound, JobRefused, ShutdownRequested, StoreUnavailable
from worker.core.logs import bind, get_logger, unbind
from worker.core.observe import observer
from worker.core.schema import ChunkRef, ErrorInfo, GenParams, Item, ItemResult, JobSpec, error_result
from worker.core.states import ChunkOutcome, ErrorCode, JobStatus

ResultCallback = Callable[[list[ItemResult]], None]
Publish = Callable[[JobSpec, dict[str, list[int]]], object]


class Engine(Protocol):
    """What runs items: :class:`worker.engine.Engine`."""

    def generate(
        self,
        items: Sequence[Item],
        *,
        job_params: GenParams | None = None,
        system_prompt: str | None = None,
        on_results: ResultCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
        attempts: int = 1,
    ) -> list[ItemResult]: ...


class ChunkStore(Protocol):
    """What running a chunk needs from a job store: the Redis store, and the in-memory one of
    embedded runs, implement all of it."""

    def spec(self, job_id: str, inc: str | None = None) -> JobSpec: ...
    def pending_indices(self, job_id: str, indices: Sequence[int]) -> list[int]: ...
    def items(self, job_id: str, indices: Sequence[int]) -> list[Item]: ...
    def record(
        self, job_id: str, results: Sequence[ItemResult], worker: str | None = None, *, inc: str = ""
    ) -> int: ...
    def record_indices(
        self, job_id: str, results: Sequence[ItemResult], worker: str | None = None, *, inc: str = ""
    ) -> list[int]: ...
    def start_attempt(self, job_id: str, cid: str, worker: str, *, inc: str = "") -> int: ...
    def undo_attempt(self, job_id: str, cid: str, *, inc: str = "") -> None: ...
    def add_chunks(
        self,
        job_id: str,
        chunks: dict[str, list[int]],
        *,
        split_parent: str | None = None,
        inc: str = "",
    ) -> dict[str, list[int]]: ...


class JobControl(Protocol):
    """The life of a job shared between processes (the Redis store only): its status, its end,
    and who runs which chunk.  An embedded run has no such life: nobody else can cancel it."""

    def status(self, job_id: str) -> JobStatus | None: ...
    def expire_if_due(self, job_id: str, now: float | None = None) -> bool: ...
    def settle(self, job_id: str) -> bool: ...
    def clear_running(self, job_id: str, cid: str, *, inc: str = "") -> None: ...


@dataclass
class Outcome:
    outcome: ChunkOutcome
    written: int = 0
    tokens: int = 0
    seconds: float = 0.0
    children: dict[str, list[int]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "outcome": str(self.outcome),
            "written": self.written,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
        }


# --- chunking: the one rule ------------------------------------------------------------------


def chunk_id(n: int) -> str:
    """The id of plain chunk number ``n``."""
    return f"c{n:06d}"


def chunk_number(cid: str) -> int | None:
    """``n`` for a plain chunk id; None for split children (``c000001.0``) and retry rounds."""
    if cid.startswith("c") and cid[1:].isdigit():
        return int(cid[1:])
    return None


def chunk_count(total: int, size: int) -> int:
    return (total + size - 1) // size


def chunk_range(n: int, total: int, size: int) -> range:
    """The item indices of plain chunk ``n`` of a job of ``total`` items."""
    return range(n * size, min((n + 1) * size, total))


def make_chunks(indices: Sequence[int], size: int, prefix: str) -> dict[str, list[int]]:
    """``indices`` cut into chunks of ``size``, named ``<prefix><n>`` (retry rounds)."""
    return {
        f"{prefix}{n:06d}": list(indices[s : s + size]) for n, s in enumerate(range(0, len(indices), size))
    }


def split(cid: str, indices: Sequence[int]) -> dict[str, list[int]]:
    half = (len(indices) + 1) // 2
    return {f"{cid}.0": list(indices[:half]), f"{cid}.1": list(indices[half:])}


# --- running one chunk -----------------------------------------------------------------------


@dataclass
class _Run:
    """One delivery of a chunk: what it needs and what it has done so far."""

    store: ChunkStore
    control: JobControl | None
    ref: ChunkRef
    spec: JobSpec
    worker: str
    log: Any
    attempt: int = 0
    written: int = 0
    tokens: int = 0
    store_seconds: float = 0.0
    cancelled: bool = False

    def on_results(self, results: list[ItemResult]) -> None:
        self.write(results)

    def write(self, results: Sequence[ItemResult]) -> int:
        """Record ``results`` (first write wins) and log what was written and what dropped."""
        t0 = time.perf_counter()
        new = self.store.record_indices(self.ref.job_id, results, self.worker, inc=self.ref.inc)
        self.store_seconds += time.perf_counter() - t0
        generated = sum(r.usage.completion_tokens for r in results)
        self.written += len(new)
        self.tokens += generated
        kept = set(new)
        self.log.info(
            "results_written",
            generated=len(results),
            written=len(new),
            dropped=len(results) - len(new),
            generated_tokens=generated,
            attempt=self.attempt,
            written_indices=sorted(kept),
            dropped_indices=sorted(r.index for r in results if r.index not in kept),
        )
        return len(new)

    def cancelled_now(self) -> bool:
        if self.control is None:
            return False
        if self.control.status(self.ref.job_id) in (
            JobStatus.CANCELLING,
            JobStatus.CANCELLED,
            JobStatus.EXPIRED,
        ):
            self.cancelled = True
        return self.cancelled


def process_chunk(
    store: ChunkStore,
    engine: Engine,
    ref: ChunkRef,
    *,
    worker: str,
    max_attempts: int,
    publish: Publish,
    control: JobControl | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> Outcome:
    """Run one chunk to the end (or hand it back).  Raises ShutdownRequested to hand back.

    A chunk of a job that is gone, or of another incarnation of its id (deleted and submitted
    again), is dropped, also when that happens while it runs: its results are never counted for
    the job stored now (the store refuses them in the same step that would write them)."""
    started = time.perf_counter()
    job_id, cid = ref.job_id, ref.chunk_id
    log = get_logger(job=job_id, chunk=cid, worker=worker)
    try:
        return _process(store, engine, ref, worker, max_attempts, publish, control, should_stop, started, log)
    except JobNotFound as exc:  # deleted (or expired, or submitted again) under us: nothing to do
        log.info("chunk_of_missing_job", reason=exc.message)
        return Outcome(ChunkOutcome.SKIPPED, seconds=time.perf_counter() - started)
    except JobRefused as exc:  # ending or ended under us (a split it may no longer publish)
        log.info("chunk_refused", state=exc.state, reason=exc.message)
        return Outcome(ChunkOutcome.CANCELLED, seconds=time.perf_counter() - started)


def _process(
    store: ChunkStore,
    engine: Engine,
    ref: ChunkRef,
    worker: str,
    max_attempts: int,
    publish: Publish,
    control: JobControl | None,
    should_stop: Callable[[], bool],
    started: float,
    log: Any,
) -> Outcome:
    job_id, cid = ref.job_id, ref.chunk_id
    closed = _closed(control, job_id)
    if closed is not None:
        return Outcome(closed)
    spec = store.spec(job_id, ref.inc or None)
    pending = store.pending_indices(job_id, ref.indices)
    if not pending:
        return Outcome(ChunkOutcome.SKIPPED)
    try:
        attempts = store.start_attempt(job_id, cid, worker, inc=ref.inc)
    except JobRefused as exc:  # ending or ended since _closed read it: the same step said no
        if control is not None and exc.state == JobStatus.CANCELLING:
            control.settle(job_id)
        return Outcome(ChunkOutcome.CANCELLED if exc.state != JobStatus.COMPLETED else ChunkOutcome.SKIPPED)
    observer().delivery(job_id, attempts)
    run = _Run(store, control, ref, spec, worker, log, attempt=attempts)
    try:
        if attempts > max_attempts:
            return _past_cap(run, pending, attempts, publish)
        return _generate(run, engine, pending, attempts, publish, should_stop, started)
    finally:
        if control is not None:
            control.clear_running(job_id, cid, inc=ref.inc)
            # the last chunk of a cancelled job to stop ends it, even one that finished without
            # noticing the cancel (its other chunks wait in no queue: cancel dropped its backlog)
            if run.cancelled or control.status(job_id) == JobStatus.CANCELLING:
                control.settle(job_id)


def _closed(control: JobControl | None, job_id: str) -> ChunkOutcome | None:
    """Why a chunk of this job must not run at all (None: it may run)."""
    if control is None:
        return None
    status = control.status(job_id)
    if status is None or status.final:
        return ChunkOutcome.SKIPPED
    if control.expire_if_due(job_id):
        return ChunkOutcome.EXPIRED
    if status == JobStatus.CANCELLING:
        control.settle(job_id)
        return ChunkOutcome.CANCELLED
    return None


def _past_cap(run: _Run, pending: list[int], attempts: int, publish: Publish) -> Outcome:
    """A chunk delivered more than the cap: split it, or record its lone item as worker_lost."""
    job_id, cid = run.ref.job_id, run.ref.chunk_id
    if len(pending) == 1:
        item = run.store.items(job_id, pending)[0]
        lost = error_result(
            item,
            ErrorInfo(
                type=ErrorCode.WORKER_LOST,
                message=f"the worker process died {attempts - 1} times while generating this item",
            ),
            profile=run.spec.profile,
            worker=run.worker,
            attempts=attempts - 1,
        )
        run.log.error("item_worker_lost", item=item.id, line=item.line, attempts=attempts - 1)
        return Outcome(ChunkOutcome.WORKER_LOST, written=run.write([lost]))
    children = run.store.add_chunks(job_id, split(cid, pending), split_parent=cid, inc=run.ref.inc)
    if children:
        publish(run.spec, children)
    run.log.warning("chunk_split", attempts=attempts - 1, pending=len(pending), children=list(children))
    return Outcome(ChunkOutcome.SPLIT, children=children)


def _generate(
    run: _Run,
    engine: Engine,
    pending: list[int],
    attempts: int,
    publish: Publish,
    should_stop: Callable[[], bool],
    started: float,
) -> Outcome:
    job_id, cid = run.ref.job_id, run.ref.chunk_id
    items = run.store.items(job_id, pending)
    invalid = [
        error_result(it, it.invalid, profile=run.spec.profile, attempts=attempts)
        for it in items
        if it.invalid is not None
    ]
    if invalid:
        run.write(invalid)
    bind(job=job_id, chunk=cid)
    gen_started = time.perf_counter()
    try:
        engine.generate(
            [it for it in items if it.invalid is None],
            job_params=run.spec.defaults,
            system_prompt=run.spec.system_prompt,
            on_results=run.on_results,
            should_stop=lambda: run.cancelled_now() or should_stop(),
            attempts=attempts,
        )
    except ShutdownRequested:
        if run.cancelled:
            return Outcome(
                ChunkOutcome.CANCELLED,
                written=run.written,
                tokens=run.tokens,
                seconds=time.perf_counter() - started,
            )
        run.store.undo_attempt(job_id, cid, inc=run.ref.inc)
        run.log.info("chunk_handed_back", written=run.written)
        raise
    except (GenqError, StoreUnavailable):
        raise
    except Exception as exc:
        return _engine_failed(run, pending, exc, attempts, publish)
    finally:
        gen_seconds = time.perf_counter() - gen_started - run.store_seconds
        unbind("job", "chunk")
    outcome = Outcome(
        ChunkOutcome.DONE, written=run.written, tokens=run.tokens, seconds=time.perf_counter() - started
    )
    observer().chunk_done(outcome.outcome, outcome.seconds)
    run.log.info(
        "chunk_done",
        items=len(pending),
        written=run.written,
        tokens=run.tokens,
        seconds=round(outcome.seconds, 4),
        gen_seconds=round(gen_seconds, 4),
        store_seconds=round(run.store_seconds, 4),
    )
    return outcome


def _engine_failed(run: _Run, pending: list[int], exc: Exception, attempts: int, publish: Publish) -> Outcome:
    """An unexpected engine failure: isolate it like a poison item, never drop the chunk."""
    job_id, cid = run.ref.job_id, run.ref.chunk_id
    still = run.store.pending_indices(job_id, pending)
    run.log.error("chunk_failed", error=f"{type(exc).__name__}: {exc}"[:500], pending=len(still))
    if len(still) <= 1:
        errs = [
            error_result(
                it,
                ErrorInfo(type=ErrorCode.GENERATION_ERROR, message=f"{type(exc).__name__}: {exc}"[:1000]),
                profile=run.spec.profile,
                worker=run.worker,
                attempts=attempts,
            )
            for it in run.store.items(job_id, still)
        ]
        run.write(errs)
        return Outcome(ChunkOutcome.DONE, written=run.written)
    children = run.store.add_chunks(job_id, split(cid, still), split_parent=cid, inc=run.ref.inc)
    if children:
        publish(run.spec, children)
    return Outcome(ChunkOutcome.SPLIT, written=run.written, children=children)
