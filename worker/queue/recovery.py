"""Lost messages: a chunk whose message is gone is found and published again by the fleet itself,
within seconds of its job going quiet.

A chunk's message can vanish without a worker dying with it.  kombu's Redis transport takes a
message off its queue (``BRPOP``) and only then, in a second command, writes it to its
``unacked`` hash: a Redis stopped, or a worker killed, between the two loses the message (seen
here with a Redis restarted mid-job: the job stopped at 196 of 200 items, forever).  A queue
emptied by hand, or a Redis that lost its last writes, does the same.  Leases cannot see it: the
message is nowhere.

On each heartbeat one worker of the fleet (a lock with the heartbeat's period) looks at the next
:data:`PAGE` jobs of the job index (one small read each; the live ones, ``queued`` and
``in_progress``, are looked at further).  A job is *quiet* when it has pending items, an empty
backlog, no chunk running on a live worker, and its counts have not moved for
``GENQ_RECOVERY_SECONDS``.  Only then are its messages read (its queues, and kombu's unacked
hash): pending items that no message of this incarnation covers are recorded as new chunks
(``l<time><random>-<n>``: fresh ids, fresh attempt counts) and published, through the same
guarded steps as any publish (the state table's *lost message recovered*).  A quiet job whose
items all have a message (its chunks wait on a queue no worker consumes) costs one read of its
queues per period and nothing else.

Publishing a chunk whose message was in fact somewhere (a delivery between its two commands at
the very moment of the check) costs a chunk run twice; first write wins keeps each result once.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from worker.chunks import make_chunks
from worker.core.errors import GenqError, JobNotFound
from worker.core.lifecycle import Event
from worker.core.logs import get_logger
from worker.core.observe import observer
from worker.core.schema import JobSpec
from worker.core.states import JobStatus
from worker.queue.messages import job_message_ids
from worker.queue.publish import publish_chunks
from worker.runtime import Runtime
from worker.store import RedisStore
from worker.store.keys import JOBS_INDEX, PREFIX, job_key

QUIET = f"{PREFIX}recovery"
"""Hash: job id → ``<signature>|<since>``: what the job's counts were when it was first seen quiet."""

LOCK = f"{PREFIX}recovery:lock"
"""Held for one heartbeat period by the worker that looks this period."""

CURSOR = f"{PREFIX}recovery:cursor"
"""Where in the job index the next look begins."""

PAGE = 2_000
"""Jobs one look reads (one small read each, pipelined): a Redis holding many finished jobs is
read a page per heartbeat period, not whole each time."""

SCAN = 10_000
"""Items whose result is looked up per round trip when a job has lost something."""


@dataclass(frozen=True)
class Recovered:
    job_id: str
    chunks: dict[str, list[int]]

    @property
    def items(self) -> int:
        return sum(len(idx) for idx in self.chunks.values())


def _covered(store: RedisStore, spec: JobSpec, task_ids: Iterable[str]) -> set[int]:
    """Items of the chunks of this job and incarnation that ``task_ids`` name."""
    covered: set[int] = set()
    for tid in task_ids:
        head, at, inc = tid.rpartition("@")
        if not at:
            head, inc = tid, ""
        job, _, cid = head.rpartition(":")
        if job != spec.job_id or inc != spec.incarnation:
            continue
        try:
            covered.update(store.chunk_indices(spec.job_id, cid, total=spec.total, size=spec.chunk_size))
        except JobNotFound:  # a chunk record gone with its job: nothing of it to cover
            continue
    return covered


def lost_items(store: RedisStore, spec: JobSpec, pending: int) -> list[int]:
    """The job's pending items that no waiting or unacknowledged message of this incarnation
    covers.  ``pending``: the job's count; when the covered items without a result account for
    it, nothing was lost and no result is read beyond theirs."""
    ids = job_message_ids(store.r, spec)
    covered = _covered(store, spec, ids)
    waiting = sorted(covered)
    if len(waiting) - len(store.done(spec.job_id, waiting)) >= pending:
        return []
    lost: list[int] = []
    for start in range(0, spec.total, SCAN):
        page = [i for i in range(start, min(start + SCAN, spec.total)) if i not in covered]
        done = store.done(spec.job_id, page)
        lost += [i for i in page if i not in done]
    return lost


def recover_job(store: RedisStore, spec: JobSpec, pending: int) -> Recovered | None:
    """Publish the job's lost items as new chunks (refused, as any publish, unless the job is
    this incarnation and ``queued`` or ``in_progress``)."""
    lost = lost_items(store, spec, pending)
    if not lost:
        return None
    prefix = f"l{int(time.time())}{secrets.token_hex(3)}-"  # two recoveries never share a chunk id
    chunks = make_chunks(lost, spec.chunk_size, prefix=prefix)
    made = store.add_chunks(spec.job_id, chunks, inc=spec.incarnation, event=Event.RECOVER)
    if made:
        publish_chunks(spec, made, store=store)
    return Recovered(spec.job_id, made)


def _signature(status: str, inc: str, counts: Iterable[object]) -> str:
    return ":".join([status, inc, *(str(c) for c in counts)])


def _forget_gone(r: Any) -> None:
    """Drop what was seen of jobs no longer in the index (deleted, pruned or lapsed while quiet)."""
    noted = [str(j) for j in r.hkeys(QUIET)]
    if not noted:
        return
    pipe = r.pipeline(transaction=False)
    for job in noted:
        pipe.zscore(JOBS_INDEX, job)
    gone = [job for job, score in zip(noted, pipe.execute(), strict=True) if score is None]
    if gone:
        r.hdel(QUIET, *gone)


def _page(r: Any, page: int) -> list[str]:
    """The next ``page`` job ids of the index, oldest first, from where the last look ended
    (:data:`CURSOR`); back to the start after the last."""
    at = int(r.get(CURSOR) or 0)
    ids = [str(j) for j in r.zrange(JOBS_INDEX, at, at + page - 1)]
    if len(ids) < page:  # the end of the index: the next look starts again
        r.set(CURSOR, 0)
        _forget_gone(r)
        if at:
            ids += [str(j) for j in r.zrange(JOBS_INDEX, 0, page - len(ids) - 1) if str(j) not in ids]
    else:
        r.set(CURSOR, at + page)
    return ids


def recover_lost(
    store: RedisStore, quiet_for: float, now: float | None = None, *, page: int = PAGE
) -> list[Recovered]:
    """One look at up to ``page`` jobs of the index (see the module's text); returns what was
    published again."""
    now = time.time() if now is None else now
    r = store.r
    ids = _page(r, page)
    pipe = r.pipeline(transaction=False)
    for job in ids:
        pipe.hmget(job_key(job), "status", "inc", "total", "succeeded", "errored", "cancelled", "expired")
    rows = pipe.execute()
    seen = dict(zip(ids, r.hmget(QUIET, ids), strict=True)) if ids else {}
    keep: dict[str, str] = {}
    found: list[Recovered] = []
    for job, (status, inc, total, *counts) in zip(ids, rows, strict=True):
        if status not in (JobStatus.QUEUED, JobStatus.IN_PROGRESS):
            continue
        pending = int(total or 0) - sum(int(c or 0) for c in counts)
        if pending <= 0:
            continue
        try:
            state = store.state(job)
        except JobNotFound:
            continue
        if state.live_chunks or state.submitting or store.backlog_length(job):
            continue
        sig = _signature(str(status), str(inc or ""), [total, *counts])
        first_sig, _, since = str(seen.get(job) or "").rpartition("|")
        if first_sig != sig:
            keep[job] = f"{sig}|{now}"
            continue
        if now - float(since or now) < quiet_for:
            keep[job] = str(seen[job])
            continue
        keep[job] = f"{sig}|{now}"  # looked: the next look after another quiet period
        try:
            done = recover_job(store, state.spec, pending)
        except GenqError:  # ended, deleted or resubmitted meanwhile: its own steps took over
            continue
        if done is not None and done.chunks:
            found.append(done)
    # what this look saw replaces what the last one saw of these jobs (a job no longer quiet,
    # ended or gone loses its entry); the other jobs' entries wait for their page
    pipe = r.pipeline(transaction=True)
    gone = [job for job in ids if job not in keep]
    if gone:
        pipe.hdel(QUIET, *gone)
    if keep:
        mapping: Any = keep  # redis-py's Mapping type is invariant in its key
        pipe.hset(QUIET, mapping=mapping)
    pipe.execute()
    return found


def recovery_hook(runtime: Runtime) -> None:
    """The heartbeat's look for lost messages: by one worker of the fleet per heartbeat period."""
    quiet_for = runtime.settings.recovery_seconds
    if quiet_for <= 0:
        return
    store = runtime.store
    period_ms = max(1, int(runtime.settings.heartbeat_interval * 1000))
    if not store.r.set(LOCK, runtime.name, nx=True, px=period_ms):
        return
    for done in recover_lost(store, quiet_for):
        observer().lost_published(done.items)
        get_logger(job=done.job_id, worker=runtime.name).warning(
            "lost_chunks_published",
            message=f"{done.items} pending items had no message anywhere (lost between kombu's "
            "delivery and its unacked record, or removed by hand): published again",
            items=done.items,
            chunks=sorted(done.chunks),
        )
