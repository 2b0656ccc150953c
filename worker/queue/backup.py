"""Backup execution at a job's tail: an idle worker takes over the unfinished items of the
chunk expected to finish last, on a slower worker, when it would finish them sooner.

On each heartbeat a worker with nothing to run and nothing queued for its profile and mode looks
at the chunks the other live workers of its profile run (their heartbeats name the chunk and its
start, and publish their measured speed in results per second).  For each, the items without a
result and the holder's speed give when it should end; the idle worker's own speed gives when it
would.  When it would finish the last-ending one :data:`MARGIN` times sooner, it records a backup
chunk (:func:`worker.chunks.backup_id`: at most one per chunk, ever) holding those items and
publishes it on the job's queue, which its own idle consumer takes at once.

Both workers then run the same items; each checks between micro-batches for items the other has
recorded and goes on with the rest only (:func:`worker.chunks.process_chunk`), so the work done
twice is about one micro-batch, and first write wins keeps every result once.  What was
generated and not kept is counted on the job (``wasted_tokens``) and in ``genq_wasted_tokens``.
A worker starts at most one backup until it has run a chunk again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from worker.chunks import backup_id, is_backup
from worker.core.errors import JobNotFound
from worker.core.lifecycle import Event
from worker.core.logs import get_logger
from worker.core.schema import JobSpec
from worker.queue.publish import publish_chunks
from worker.queue.routing import queue_name
from worker.runtime import Runtime

MARGIN = 1.5
"""How much sooner the idle worker must expect to finish the items than their holder."""

PENDING_FOR = 30.0
"""Seconds a published backup keeps its worker from starting another one before it runs it."""


@dataclass
class Candidate:
    spec: JobSpec
    chunk_id: str
    holder: str
    left: list[int]
    holder_eta: float
    own_eta: float


def holder_eta(left: int, info: dict[str, Any], now: float) -> float:
    """Seconds the holder should need for ``left`` items: at its published speed, or, before it
    has produced a result, as if its next one were due now (``left`` × the time it has run)."""
    rate = float(info.get("items_per_second") or 0)
    if rate > 0:
        return left / rate
    since = float(info.get("current_since") or now)
    return left * max(1.0, now - since)


def candidates(runtime: Runtime, own_rate: float, now: float) -> list[Candidate]:
    store = runtime.store
    found: list[Candidate] = []
    for info in store.workers():
        current = info.get("current")
        if info.get("name") == runtime.name or info.get("profile") != runtime.profile_name or not current:
            continue
        job_id, _, cid = str(current).rpartition(":")
        if not job_id or is_backup(cid) or store.backed_up(job_id, cid):
            continue
        try:
            spec = store.spec(job_id)
            indices = store.chunk_indices(job_id, cid, total=spec.total, size=spec.chunk_size)
        except JobNotFound:
            continue
        if queue_name(spec.profile, spec.mode, spec.priority) not in runtime.queues:
            continue  # a job for another mode: this worker may not run it
        left = store.pending_indices(job_id, indices)
        if not left:
            continue
        theirs = holder_eta(len(left), info, now)
        own = len(left) / own_rate
        if own * MARGIN < theirs:
            found.append(Candidate(spec, cid, str(info.get("name")), left, theirs, own))
    return found


def backup_hook(runtime: Runtime) -> None:
    """The heartbeat's backup decision (see the module's notes)."""
    settings = runtime.settings
    stats = runtime.stats
    now = time.time()
    if not settings.backup or stats.current is not None or not runtime.queues:
        return
    if runtime.backup_sent_at is not None and now - runtime.backup_sent_at < PENDING_FOR:
        return
    own_rate = stats.items_per_second()
    if own_rate <= 0 or runtime.store.queued(runtime.queues):
        return
    found = candidates(runtime, own_rate, now)
    if not found:
        return
    best = max(found, key=lambda c: c.holder_eta)
    job_id = best.spec.job_id
    created = runtime.store.add_chunks(
        job_id, {backup_id(best.chunk_id): best.left}, inc=best.spec.incarnation, event=Event.BACKUP
    )
    if not created:
        return  # another worker backed it up first
    publish_chunks(best.spec, created, store=runtime.store)
    runtime.backup_sent_at = now
    get_logger(job=job_id, chunk=best.chunk_id, worker=runtime.name).info(
        "backup_started",
        holder=best.holder,
        items=len(best.left),
        holder_eta=round(best.holder_eta, 2),
        own_eta=round(best.own_eta, 2),
    )
