"""The Celery task that runs one chunk, and the worker signals that load the model once.

The task is a thin shell around :func:`worker.chunks.process_chunk`: it parses the message (JSON
only), refuses chunks of a profile this worker does not serve, and turns a shutdown or a lost
store into a hand-back (the message goes back to its queue).  Once a chunk is over (its results
written) and before its message is acknowledged, the worker tops up its queues from the jobs'
backlogs (:mod:`worker.store.dispatch`), so the next chunk it takes is already waiting.
"""

from __future__ import annotations

import functools
from typing import Any

from celery import Task, shared_task, signals
from celery.exceptions import Reject

from worker.chunks import process_chunk
from worker.core.errors import JobNotFound, ShutdownRequested, TransientError
from worker.core.logs import get_logger, route_stdlib_logging
from worker.core.schema import ChunkRef, ErrorInfo, error_result
from worker.core.states import ChunkOutcome, ErrorCode
from worker.queue.backup import backup_hook
from worker.queue.leases import keeper, sweep_hook
from worker.queue.messages import withdraw
from worker.queue.publish import publish_chunks
from worker.queue.recovery import recovery_hook
from worker.queue.routing import TASK_NAME, dispatch_targets, rescue_targets, worker_queues
from worker.runtime import Runtime, get_runtime
from worker.store.memory import full_notice, is_full, wait_for_room


@shared_task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_chunk(self: Task, ref: dict[str, Any]) -> dict[str, Any]:
    runtime = get_runtime()
    chunk = ChunkRef.model_validate(ref)
    # the lease: kombu's delivery record of this message, renewed while the chunk runs
    tag = (self.request.properties or {}).get("delivery_tag")
    with keeper(runtime).hold(tag, chunk.job_id, chunk.chunk_id):
        outcome = _run_chunk(runtime, chunk)
    # before the acknowledgement: the chunk is over, top up the queues (a chunk handed back has
    # raised instead: its message returns to its queue, and the next heartbeat dispatches)
    _dispatch(runtime)
    # nothing left queued: take over the tail of a slower worker's chunk now, not a beat later
    try:
        backup_hook(runtime)
    except Exception as exc:
        runtime.log.warning("backup_failed", error=str(exc)[:200])
    return outcome


def _dispatch(runtime: Runtime) -> None:
    _serve_queues(runtime)
    try:
        runtime.store.dispatch(runtime.targets)
    except Exception as exc:  # the next chunk or heartbeat dispatches again: never fail a chunk
        runtime.store_failed("dispatch_failed", exc)


def _run_chunk(runtime: Runtime, chunk: ChunkRef) -> dict[str, Any]:
    engine = runtime.load()
    store = runtime.store
    log = get_logger(job=chunk.job_id, chunk=chunk.chunk_id, worker=runtime.name)
    try:
        spec = store.spec(chunk.job_id, chunk.inc or None)
    except JobNotFound:
        log.info("chunk_of_missing_job")  # deleted, or expired after retention: nothing to do
        return {"outcome": str(ChunkOutcome.SKIPPED)}
    if not runtime.serves(spec.profile):
        # Routing never does this; a hand-made message might.  Refuse: never download or load.
        log.error("wrong_profile", job_profile=spec.profile, worker_profile=runtime.profile_name)
        error = ErrorInfo(
            type=ErrorCode.UNKNOWN_PROFILE,
            message=f"worker {runtime.name} does not serve profile {spec.profile!r}",
        )
        items = store.items(chunk.job_id, store.pending_indices(chunk.job_id, chunk.indices))
        store.record(chunk.job_id, [error_result(it, error) for it in items], runtime.name, inc=chunk.inc)
        return {"outcome": str(ChunkOutcome.REFUSED)}
    runtime.stats.start(f"{chunk.job_id}:{chunk.chunk_id}")
    runtime.backup_sent_at = None
    try:
        outcome = process_chunk(
            store,
            engine,
            chunk,
            worker=runtime.name,
            max_attempts=runtime.settings.max_attempts,
            publish=functools.partial(publish_chunks, store=store),
            control=store,
            should_stop=runtime.stop_event.is_set,
            time_box=runtime.settings.chunk_time_box,
            progress=runtime.stats.progress,
        )
    except ShutdownRequested:
        raise Reject("worker shutting down: chunk handed back", requeue=True) from None
    except TransientError as exc:  # retrying may help (the store went away or is full): run it again
        if is_full(exc):  # say so (once a minute), and hand back only once Redis can take it
            full_notice().report(store.r, store.url_display, log, exc)
            wait_for_room(store.r, runtime.stop_event.is_set)
        else:
            log.warning(str(exc.code), error=str(exc))
        raise Reject(f"{exc.code}: chunk handed back", requeue=True) from None
    finally:
        runtime.stats.stop()
    if outcome.outcome == ChunkOutcome.EXPIRED:  # this delivery ended the job: take it out of the queues
        withdraw(store, spec)
    runtime.stats.chunks += 1
    runtime.stats.add(outcome.written, outcome.tokens, outcome.seconds)
    return outcome.as_dict()


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:
    """Celery's own lines (task received, succeeded, handed back) in genq's log format, instead
    of Celery's; connecting this signal also keeps Celery from configuring logging itself."""
    route_stdlib_logging()


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
            runtime.rename(f"{runtime.name}-{index}")
        runtime.load()
        _serve_queues(runtime)
        runtime.start_heartbeat()


def _serve_queues(runtime: Runtime) -> None:
    """The queues this process consumes: its heartbeat counts it as their consumer and tops them
    up from the jobs' backlogs (the first beat is the dispatch at the worker's start).  A worker
    started on some of its queues only (``-Q``) is the consumer of those only."""
    if not runtime.queues and runtime.profile is not None and runtime.mode is not None:
        from celery import current_app

        serve(runtime, consumed_queues(worker_queues(runtime.profile.name, runtime.mode), current_app))

    # each heartbeat also puts back chunks whose lease lapsed, may start a backup, and (one
    # worker of the fleet) publishes again what lost its message
    hooks = (sweep_hook, backup_hook, recovery_hook)
    if not any(getattr(h, "func", None) in hooks for h in runtime.beat_hooks):
        runtime.beat_hooks += [functools.partial(hook, runtime) for hook in hooks]


def consumed_queues(queues: list[str], app: Any) -> list[str]:
    """Those of ``queues`` that ``app``'s worker consumes (``-Q``), in their order (none without
    ``-Q``: Celery then consumes its default queue only)."""
    selected = app.amqp.queues.consume_from
    if selected is None:
        return list(queues)
    return [q for q in queues if q in selected]


def serve(runtime: Runtime, queues: list[str]) -> None:
    """``runtime`` consumes ``queues`` (a worker's, in order): what it registers as the consumer
    of, and what it tops up (:func:`worker.queue.routing.dispatch_targets`)."""
    runtime.queues = list(queues)
    if runtime.profile is not None and runtime.mode is not None:
        runtime.targets = dispatch_targets(runtime.profile.name, runtime.mode, runtime.queues)
        runtime.rescues = rescue_targets(runtime.profile.name, runtime.mode, runtime.queues)


@signals.worker_ready.connect
def _on_ready(sender: Any = None, **_: Any) -> None:
    """Solo/threads pool: the model lives in this process; load it before the first task.
    ``sender`` is the consumer; under prefork its pool's children load, never this parent."""
    pool = type(getattr(sender, "pool", None)).__module__ if sender is not None else ""
    runtime = get_runtime()
    if "prefork" not in pool and runtime.settings.profile:
        runtime.load()
        _serve_queues(runtime)
        runtime.start_heartbeat()


@signals.worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    get_runtime().shutdown()
