"""The task: fetch a chunk, skip what is done, run the engine, store results.  The one error wrapper.

:func:`process_chunk` is the whole of it and is shared by the Celery task (distributed) and the
embedded runner (``genq run`` without a broker), so both paths behave the same:

* a chunk of a finished, cancelled or expired job is closed without generating;
* items that already have a result are skipped (a redelivered chunk redoes nothing);
* every delivery is counted; past ``GENQ_MAX_ATTEMPTS`` the chunk is split in two until a bad
  item is alone, and that item is recorded as ``worker_lost``;
* results are written per micro-batch, first write wins;
* on shutdown the unfinished part is handed back (the delivery is not counted as an attempt);
* an unexpected engine error splits the chunk the same way, so one item cannot sink its neighbours.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from worker.core.errors import GenqError, ShutdownRequested, StoreUnavailable
from worker.core.logs import bind, get_logger, unbind
from worker.core.schema import ChunkRef, ErrorInfo, Item, ItemResult, JobSpec, error_result
from worker.core.states import FINAL_STATUSES

Publish = Callable[[JobSpec, dict[str, list[int]]], object]


class ChunkStore(Protocol):
    """What a chunk needs from a job store (Redis, or in memory when embedded)."""

    def spec(self, job_id: str) -> JobSpec: ...
    def status(self, job_id: str) -> str: ...
    def expire_if_due(self, job_id: str, now: float | None = None) -> bool: ...
    def pending_indices(self, job_id: str, indices: Sequence[int]) -> list[int]: ...
    def items(self, job_id: str, indices: Sequence[int]) -> list[Item]: ...
    def record(self, job_id: str, results: Sequence[ItemResult], worker: str | None = None) -> int: ...
    def close_items(self, job_id: str, indices: Sequence[int], kind: str, message: str) -> int: ...
    def start_attempt(self, job_id: str, chunk_id: str) -> int: ...
    def undo_attempt(self, job_id: str, chunk_id: str) -> None: ...
    def add_chunks(
        self, job_id: str, chunks: dict[str, list[int]], *, split_parent: str | None = None
    ) -> None: ...
    def mark_running(self, job_id: str, chunk_id: str, worker: str) -> None: ...
    def clear_running(self, job_id: str, chunk_id: str) -> None: ...


@dataclass
class Outcome:
    outcome: str
    """done | skipped | cancelled | expired | split | worker_lost | handed_back"""
    written: int = 0
    tokens: int = 0
    seconds: float = 0.0
    children: dict[str, list[int]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "written": self.written,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
        }


def split(chunk_id: str, indices: Sequence[int]) -> dict[str, list[int]]:
    half = (len(indices) + 1) // 2
    return {f"{chunk_id}.0": list(indices[:half]), f"{chunk_id}.1": list(indices[half:])}


def process_chunk(
    store: ChunkStore,
    engine: Any,
    ref: ChunkRef,
    *,
    worker: str,
    max_attempts: int,
    publish: Publish,
    should_stop: Callable[[], bool] = lambda: False,
) -> Outcome:
    """Run one chunk to the end (or hand it back).  Raises ShutdownRequested to hand back."""
    started = time.perf_counter()
    job_id, chunk_id = ref.job_id, ref.chunk_id
    log = get_logger(job=job_id, chunk=chunk_id, worker=worker)
    spec = store.spec(job_id)

    status = store.status(job_id)
    if status in FINAL_STATUSES:
        return Outcome("skipped")
    if store.expire_if_due(job_id):
        n = store.close_items(job_id, ref.indices, "expired", "the job expired before this item ran")
        return Outcome("expired", written=n)
    if status == "cancelling":
        n = store.close_items(job_id, ref.indices, "cancelled", "the job was cancelled before this item ran")
        return Outcome("cancelled", written=n)

    pending = store.pending_indices(job_id, ref.indices)
    if not pending:
        return Outcome("skipped")
    attempts = store.start_attempt(job_id, chunk_id)
    if attempts > max_attempts:
        if len(pending) == 1:
            item = store.items(job_id, pending)[0]
            lost = error_result(
                item,
                ErrorInfo(
                    type="worker_lost",
                    message=f"the worker process died {attempts - 1} times while generating this item",
                ),
                profile=spec.profile,
                worker=worker,
                attempts=attempts - 1,
            )
            log.error("item_worker_lost", item=item.id, line=item.line, attempts=attempts - 1)
            return Outcome("worker_lost", written=store.record(job_id, [lost], worker))
        children = split(chunk_id, pending)
        store.add_chunks(job_id, children, split_parent=chunk_id)
        publish(spec, children)
        log.warning("chunk_split", attempts=attempts - 1, pending=len(pending), children=list(children))
        return Outcome("split", children=children)

    items = store.items(job_id, pending)
    invalid = [
        error_result(it, it.invalid, profile=spec.profile, attempts=attempts)
        for it in items
        if it.invalid is not None
    ]
    written = store.record(job_id, invalid, worker) if invalid else 0
    runnable = [it for it in items if it.invalid is None]
    tokens = 0

    store_seconds = 0.0

    def on_results(results: list[ItemResult]) -> None:
        nonlocal written, tokens, store_seconds
        t0 = time.perf_counter()
        written += store.record(job_id, results, worker)
        store_seconds += time.perf_counter() - t0
        tokens += sum(r.usage.completion_tokens for r in results)

    cancelled = False

    def stop_now() -> bool:
        nonlocal cancelled
        if store.status(job_id) in ("cancelling", "cancelled"):
            cancelled = True
            return True
        return should_stop()

    store.mark_running(job_id, chunk_id, worker)
    bind(job=job_id, chunk=chunk_id)
    gen_started = time.perf_counter()
    try:
        engine.generate(
            runnable,
            job_params=spec.defaults,
            system_prompt=spec.system_prompt,
            on_results=on_results,
            should_stop=stop_now,
            attempts=attempts,
        )
    except ShutdownRequested:
        if cancelled:
            n = store.close_items(job_id, pending, "cancelled", "the job was cancelled before this item ran")
            return Outcome(
                "cancelled", written=written + n, tokens=tokens, seconds=time.perf_counter() - started
            )
        store.undo_attempt(job_id, chunk_id)
        log.info("chunk_handed_back", written=written)
        raise
    except (GenqError, StoreUnavailable):
        raise
    except Exception as exc:
        # An unexpected engine failure: isolate it like a poison item, never drop the chunk.
        still = store.pending_indices(job_id, pending)
        log.error("chunk_failed", error=f"{type(exc).__name__}: {exc}"[:500], pending=len(still))
        if len(still) <= 1:
            errs = [
                error_result(
                    it,
                    ErrorInfo(type="generation_error", message=f"{type(exc).__name__}: {exc}"[:1000]),
                    profile=spec.profile,
                    worker=worker,
                    attempts=attempts,
                )
                for it in store.items(job_id, still)
            ]
            return Outcome("done", written=written + store.record(job_id, errs, worker))
        children = split(chunk_id, still)
        store.add_chunks(job_id, children, split_parent=chunk_id)
        publish(spec, children)
        return Outcome("split", written=written, children=children)
    finally:
        gen_seconds = time.perf_counter() - gen_started - store_seconds
        store.clear_running(job_id, chunk_id)
        unbind("job", "chunk")
    outcome = Outcome("done", written=written, tokens=tokens, seconds=time.perf_counter() - started)
    log.info(
        "chunk_done",
        items=len(pending),
        written=written,
        tokens=tokens,
        seconds=round(outcome.seconds, 4),
        gen_seconds=round(gen_seconds, 4),
        store_seconds=round(store_seconds, 4),
    )
    return outcome


# --- the Celery task -----------------------------------------------------------------------------

from celery import signals  # noqa: E402
from celery.exceptions import Reject  # noqa: E402

from worker.app import TASK_NAME, app, publish_chunks  # noqa: E402
from worker.runtime import get_runtime  # noqa: E402


@app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_chunk(self: Any, ref: dict[str, Any]) -> dict[str, Any]:
    runtime = get_runtime()
    chunk = ChunkRef.model_validate(ref)
    runtime.load()
    spec = runtime.store.spec(chunk.job_id)
    log = get_logger(job=chunk.job_id, chunk=chunk.chunk_id, worker=runtime.name)
    if not runtime.serves(spec.profile):
        # Routing never does this; a hand-made message might.  Refuse: never download or load.
        log.error("wrong_profile", job_profile=spec.profile, worker_profile=runtime.profile.name)
        error = ErrorInfo(
            type="unknown_profile", message=f"worker {runtime.name} does not serve profile {spec.profile!r}"
        )
        items = runtime.store.items(chunk.job_id, runtime.store.pending_indices(chunk.job_id, chunk.indices))
        runtime.store.record(chunk.job_id, [error_result(it, error) for it in items], runtime.name)
        return {"outcome": "refused"}
    runtime.stats.current = f"{chunk.job_id}:{chunk.chunk_id}"
    try:
        outcome = process_chunk(
            runtime.store,
            runtime.engine,
            chunk,
            worker=runtime.name,
            max_attempts=runtime.settings.max_attempts,
            publish=publish_chunks,
            should_stop=runtime.stop_event.is_set,
        )
    except ShutdownRequested:
        raise Reject("worker shutting down: chunk handed back", requeue=True) from None
    except StoreUnavailable as exc:
        log.warning("store_unavailable", error=str(exc))
        raise Reject("job store unreachable: chunk handed back", requeue=True) from None
    finally:
        runtime.stats.current = None
    runtime.stats.chunks += 1
    runtime.stats.add(outcome.written, outcome.tokens, outcome.seconds)
    return outcome.as_dict()


@signals.worker_shutting_down.connect
def _on_shutdown(**_: Any) -> None:
    get_runtime().stop_event.set()


@signals.worker_process_init.connect
def _on_process_init(**_: Any) -> None:
    """Prefork child: load the model here (never in the parent, which must stay CUDA-free).
    The solo pool sends this signal too, in the one process that already holds the model."""
    runtime = get_runtime()
    if runtime.settings.profile:
        from celery.utils.log import current_process_index

        index = current_process_index()
        if index is not None and runtime.engine is None:
            # one name per child, "<worker>-<n>"; a child that replaces a dead one takes its name
            runtime.name = f"{runtime.name}-{index}"
            runtime.log = get_logger(worker=runtime.name)
        runtime.load()
        runtime.start_heartbeat()


@signals.worker_ready.connect
def _on_ready(sender: Any = None, **_: Any) -> None:
    """Solo/threads pool: the model lives in this process; load it before the first task.
    ``sender`` is the consumer; under prefork its pool's children load, never this parent."""
    pool = type(getattr(sender, "pool", None)).__module__ if sender is not None else ""
    runtime = get_runtime()
    if "prefork" not in pool and runtime.settings.profile:
        runtime.load()
        runtime.start_heartbeat()


@signals.worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    get_runtime().shutdown()
