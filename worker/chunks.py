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
* an engine error splits the chunk the same way, so one item cannot sink its neighbours, unless
  the error classes say retrying may help (:func:`retry_may_help`: a transient error such as a
  lost store), which ends the delivery for the chunk to run again.

Chunks are numbered ranges of the input (:func:`chunk_range`); split children and retry rounds
carry explicit index lists.  Nothing here imports torch, Redis or Celery: the stores and the
engine come in through the protocols below.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from worker.core.errors import (
    GenerationError,
    GenqError,
    JobNotFound,
    JobRefused,
    ShutdownRequested,
    WorkerLost,
    retry_may_help,
)
from worker.core.lifecycle import Event
from worker.core.logs import bind, get_logger, unbind
from worker.core.observe import observer
from worker.core.schema import ChunkRef, ErrorInfo, GenParams, Item, ItemResult, JobSpec, error_result
from worker.core.states import ChunkOutcome, JobStatus

ResultCallback = Callable[[list[ItemResult]], None]

TAKEOVER_CHECK = 1.0
"""Seconds between checks, while a chunk runs, for items of it recorded by another worker."""
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
        event: Event = Event.PUBLISH,
    ) -> dict[str, list[int]]: ...


class JobControl(Protocol):
    """The life of a job shared between processes (the Redis store only): its status, its end,
    and who runs which chunk.  An embedded run has no such life: nobody else can cancel it."""

    def status(self, job_id: str) -> JobStatus | None: ...
    def expire_if_due(self, job_id: str, now: float | None = None) -> bool: ...
    def settle(self, job_id: str) -> bool: ...
    def clear_running(self, job_id: str, cid: str, *, inc: str = "") -> None: ...
    def backed_up(self, job_id: str, cid: str) -> bool: ...
    def add_waste(self, job_id: str, tokens: int, items: int, *, inc: str = "") -> int: ...


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


def backup_id(cid: str) -> str:
    """The chunk that takes over the unfinished items of ``cid`` on another worker (at most one)."""
    return f"{cid}.b"


def is_backup(cid: str) -> bool:
    return cid.endswith(".b")


def rest_id(cid: str) -> str:
    """The chunk holding what was left of ``cid`` when its time box ran out."""
    return f"{cid}.r"


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
    wasted_tokens: int = 0
    results: int = 0
    """Results this delivery produced (kept or not)."""
    todo: list[int] = field(default_factory=list)
    """Items this delivery has not yet written or seen dropped."""
    shared: bool = False
    """Another worker works on these items too (this is a backup, or the chunk has one)."""
    taken: bool = False
    """Items of ``todo`` were recorded by another worker: run the engine again on the rest."""
    boxed: bool = False
    """The time box ran out: what is left is handed on as a new chunk."""
    time_box: float = 0.0
    outer_stop: Callable[[], bool] = lambda: False
    progress: Callable[[int], None] = lambda n: None
    started: float = field(default_factory=time.monotonic)
    next_check: float = 0.0

    def on_results(self, results: list[ItemResult]) -> None:
        self.write(results)

    def should_stop(self) -> bool:
        """Asked by the engine between micro-batches: a cancel, a shutdown, the time box, or (at
        most every :data:`TAKEOVER_CHECK` seconds) items of this chunk recorded by another worker."""
        if self.cancelled_now() or self.outer_stop():
            return True
        now = time.monotonic()
        # the time box hands on what is left once this delivery has made some progress (a box
        # shorter than one micro-batch must not hand the whole chunk on again and again)
        if self.time_box and now - self.started >= self.time_box and self.results:
            self.boxed = True
            return True
        if self.control is None or now < self.next_check:
            return False
        self.next_check = now + TAKEOVER_CHECK
        job_id, cid = self.ref.job_id, self.ref.chunk_id
        self.shared = self.shared or self.control.backed_up(job_id, cid)
        if self.shared and len(self.store.pending_indices(job_id, self.todo)) < len(self.todo):
            self.taken = True
        return self.taken

    def write(self, results: Sequence[ItemResult]) -> int:
        """Record ``results`` (first write wins) and log what was written and what dropped."""
        t0 = time.perf_counter()
        new = self.store.record_indices(self.ref.job_id, results, self.worker, inc=self.ref.inc)
        self.store_seconds += time.perf_counter() - t0
        generated = sum(r.usage.completion_tokens for r in results)
        self.written += len(new)
        self.tokens += generated
        kept = set(new)
        self.progress(len(results))
        self.results += len(results)
        seen = {r.index for r in results}
        self.todo = [i for i in self.todo if i not in seen]
        lost = [r for r in results if r.index not in kept]
        # generated and not kept: another write of these items came first (work done twice)
        wasted = sum(r.usage.completion_tokens for r in lost)
        if lost and self.control is not None:
            self.wasted_tokens += wasted
            self.control.add_waste(self.ref.job_id, wasted, len(lost), inc=self.ref.inc)
            observer().wasted(wasted)
        self.log.info(
            "results_written",
            generated=len(results),
            written=len(new),
            dropped=len(results) - len(new),
            generated_tokens=generated,
            dropped_tokens=wasted,
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
    time_box: float = 0.0,
    progress: Callable[[int], None] = lambda n: None,
) -> Outcome:
    """Run one chunk to the end (or hand it back).  Raises ShutdownRequested to hand back.

    A chunk of a job that is gone, or of another incarnation of its id (deleted and submitted
    again), is dropped, also when that happens while it runs: its results are never counted for
    the job stored now (the store refuses them in the same step that would write them).

    ``time_box``: seconds after which what is left is published as a new chunk (0: none);
    ``progress`` is told how many results each write carried (the worker's measured speed)."""
    started = time.perf_counter()
    job_id, cid = ref.job_id, ref.chunk_id
    log = get_logger(job=job_id, chunk=cid, worker=worker)
    try:
        return _process(
            store,
            engine,
            ref,
            worker,
            max_attempts,
            publish,
            control,
            should_stop,
            started,
            log,
            time_box=time_box,
            progress=progress,
        )
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
    *,
    time_box: float,
    progress: Callable[[int], None],
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
    run = _Run(
        store,
        control,
        ref,
        spec,
        worker,
        log,
        attempt=attempts,
        shared=is_backup(cid),
        time_box=time_box,
        outer_stop=should_stop,
        progress=progress,
    )
    try:
        if attempts > max_attempts:
            return _past_cap(run, pending, attempts, publish)
        return _generate(run, engine, pending, attempts, publish, started)
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
        died = WorkerLost(f"the worker process died {attempts - 1} times while generating this item")
        lost = error_result(
            item,
            ErrorInfo(**died.to_dict()),
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
    todo = [it for it in items if it.invalid is None]
    run.todo = [it.index for it in todo]
    try:
        while todo:
            try:
                engine.generate(
                    todo,
                    job_params=run.spec.defaults,
                    system_prompt=run.spec.system_prompt,
                    on_results=run.on_results,
                    should_stop=run.should_stop,
                    attempts=attempts,
                )
                break
            except ShutdownRequested:
                if run.cancelled:
                    return Outcome(
                        ChunkOutcome.CANCELLED,
                        written=run.written,
                        tokens=run.tokens,
                        seconds=time.perf_counter() - started,
                    )
                if run.taken:  # another worker recorded some of these items: run the rest
                    run.taken = False
                    run.todo = run.store.pending_indices(job_id, run.todo)
                    run.log.info("chunk_shared", left=len(run.todo), written=run.written)
                    todo = run.store.items(job_id, run.todo) if run.todo else []
                    continue
                if run.boxed:
                    return _hand_on(run, publish, started)
                run.store.undo_attempt(job_id, cid, inc=run.ref.inc)
                run.log.info("chunk_handed_back", written=run.written)
                raise
    except (JobNotFound, JobRefused):
        raise  # the job went away or ended under us: process_chunk drops the chunk
    except Exception as exc:
        if isinstance(exc, GenqError) and retry_may_help(exc):
            raise  # transient (the store went away): the task hands the chunk back
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
        wasted_tokens=run.wasted_tokens,
        seconds=round(outcome.seconds, 4),
        gen_seconds=round(gen_seconds, 4),
        store_seconds=round(run.store_seconds, 4),
    )
    return outcome


def _hand_on(run: _Run, publish: Publish, started: float) -> Outcome:
    """The time box ran out: publish what is left as a new chunk any worker may take (this
    delivery then ends and is acknowledged; the items it wrote stay written)."""
    job_id, cid = run.ref.job_id, run.ref.chunk_id
    left = run.store.pending_indices(job_id, run.todo)
    hand_on = {rest_id(cid): left}
    children = run.store.add_chunks(job_id, hand_on, inc=run.ref.inc, event=Event.TIME_BOX) if left else {}
    if children:
        publish(run.spec, children)
    seconds = time.perf_counter() - started
    run.log.info("chunk_time_boxed", written=run.written, left=len(left), children=list(children))
    observer().chunk_done(ChunkOutcome.SPLIT, seconds)
    return Outcome(
        ChunkOutcome.SPLIT, written=run.written, tokens=run.tokens, seconds=seconds, children=children
    )


def _engine_failed(run: _Run, pending: list[int], exc: Exception, attempts: int, publish: Publish) -> Outcome:
    """An engine failure retrying will not cure: isolate it like a poison item, never drop the
    chunk.  An item alone records the error (a genq error's own code, else ``generation_error``)."""
    job_id, cid = run.ref.job_id, run.ref.chunk_id
    still = run.store.pending_indices(job_id, pending)
    run.log.error("chunk_failed", error=f"{type(exc).__name__}: {exc}"[:500], pending=len(still))
    if len(still) <= 1:
        err = exc if isinstance(exc, GenqError) else GenerationError(f"{type(exc).__name__}: {exc}"[:1000])
        errs = [
            error_result(
                it,
                ErrorInfo(**err.to_dict()),
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
