"""Fair share between jobs: each job's chunk messages wait in its own backlog, and
``lua/dispatch.lua`` moves them to the broker queue one job at a time (round robin), keeping only
a few messages on the queue.  A job submitted after a million-item one therefore gets its turn
within about one chunk per worker instead of waiting behind it.

The messages are the ones kombu would find on the queue (built by :mod:`worker.queue.publish`);
the broker and the job store are one Redis (``GENQ_BROKER_URL`` names both), so a Lua script can
move a message from a backlog to the broker's list atomically: it is always in a backlog, on the
queue, or delivered and unacknowledged (kombu's ``unacked``), never lost and never twice.

Dispatch runs after each publish (submit, retry, split), in the worker after each chunk before
its acknowledgement, and on every worker heartbeat (which also makes up a dispatch lost to a
crash).  See docs/OPERATIONS.md, "Several jobs on one fleet".
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import redis

from worker.core.lifecycle import Event, allowed_arg
from worker.store.base import StoreBase, refused
from worker.store.keys import JOB_PREFIX, backlog_key, consumers_key, job_key, ring_key, turn_key


def ring_entry(raw: str) -> tuple[str, str]:
    """A ring entry ``<job>@<inc>`` as ``(job id, incarnation)`` (as ``dispatch.lua`` reads it)."""
    job, sep, inc = raw.rpartition("@")
    if not sep or not all(c in "0123456789abcdefABCDEF" for c in inc):
        return raw, ""
    return job, inc


Target = str | tuple[str, str]
"""A broker queue to top up from its own ring of jobs, or ``(queue, shared)``: from its own ring
and, taking turns job by job, from the ring of queue ``shared`` (the ``any`` queue of its priority
level, whose jobs any worker may run; :func:`worker.queue.routing.dispatch_targets`)."""


class Dispatcher(StoreBase):
    def _dispatch_keys(self, targets: Sequence[Target]) -> list[str]:
        keys: list[str] = []
        for target in targets:
            queue, shared = (target, target) if isinstance(target, str) else target
            keys += [queue, ring_key(queue), consumers_key(queue), ring_key(shared), turn_key(queue)]
        return keys

    def _dispatch_args(self) -> list[str | int | float]:
        return [self.settings.queue_depth, time.time(), JOB_PREFIX]

    def dispatch(self, targets: Sequence[Target]) -> int:
        """Top up each broker queue of ``targets`` from its jobs' backlogs, round robin; returns
        how many messages moved (one EVALSHA)."""
        if not targets:
            return 0
        return int(self._script("dispatch", self._dispatch_keys(targets), self._dispatch_args()))

    def rescue(self, pairs: Sequence[tuple[str, str]]) -> int:
        """Give back the ``any`` jobs' messages waiting on each mode queue of ``pairs`` (``(mode
        queue, the any queue of its level)``) that no live worker consumes: to the front of their
        jobs' backlogs, the jobs back in the any ring (``lua/rescue.lua``).  Returns how many
        (one EVALSHA); a dispatch then hands them to a mode with a live worker."""
        if not pairs:
            return 0
        keys: list[str] = []
        for queue, anyq in pairs:
            keys += [queue, consumers_key(queue), ring_key(anyq)]
        args = [time.time(), JOB_PREFIX, *(anyq for _, anyq in pairs)]
        return int(self._script("rescue", keys, args))

    def enqueue(
        self,
        job_id: str,
        queue: str,
        batches: Iterable[Sequence[str]],
        *,
        inc: str = "",
        targets: Sequence[Target] | None = None,
    ) -> int:
        """Append messages to the job's backlog, a pipelined batch at a time, each batch putting
        the job in ``queue``'s ring in the same step (an entry naming its incarnation, added only
        while the job is that incarnation) and followed by a dispatch to ``targets`` (default:
        ``queue`` alone); returns how many were appended.  A partial job's backlog lives as long
        as the job (like its other keys).  Refused (the state table's error) when the job may not
        publish: ending, ended, gone, another incarnation."""
        keys = [job_key(job_id), backlog_key(job_id), ring_key(queue)]
        count = 0
        for batch in batches:
            pipe = self.r.pipeline(transaction=False)
            args = [inc, allowed_arg(Event.PUBLISH), job_id, *batch]
            self.scripts["append"](keys=keys, args=args, client=pipe)
            self.scripts["dispatch"](
                keys=self._dispatch_keys(targets or [queue]), args=self._dispatch_args(), client=pipe
            )
            try:
                self._call(pipe.execute)
            except redis.ResponseError as exc:
                raise refused(exc, Event.PUBLISH, job_id) from None
            count += len(batch)
        return count

    def queued(self, queues: Sequence[str]) -> int:
        """Chunk messages waiting on the broker queues ``queues`` (their jobs' backlogs are moved
        there by every dispatch, so none waits elsewhere when these are empty after one)."""
        pipe = self.r.pipeline(transaction=False)
        for queue in queues:
            pipe.llen(queue)
        return sum(int(n) for n in self._call(pipe.execute))

    def backlog_length(self, job_id: str) -> int:
        return int(self._call(self.r.llen, backlog_key(job_id)))

    def ring(self, queue: str) -> list[str]:
        """The jobs with chunks waiting for ``queue``, the next one served last in the list (by
        id: :meth:`ring_entries` says which incarnation each entry serves)."""
        return [job for job, _ in self.ring_entries(queue)]

    def ring_entries(self, queue: str) -> list[tuple[str, str]]:
        """``(job id, incarnation)`` of each entry of ``queue``'s ring."""
        return [ring_entry(raw) for raw in self._call(self.r.lrange, ring_key(queue), 0, -1)]

    def forget_backlog(self, job_id: str, queues: Sequence[str] = (), *, inc: str = "") -> None:
        """Drop the job's unpublished messages and its place (incarnation ``inc``) in the rings
        of ``queues`` (cancel, expiry, delete); a dispatch drops a ring entry it finds ended,
        gone or of another incarnation anyway."""
        pipe = self.r.pipeline(transaction=False)
        pipe.delete(backlog_key(job_id))
        for queue in queues:
            pipe.lrem(ring_key(queue), 0, f"{job_id}@{inc}")
        self._call(pipe.execute)

    # --- who consumes a queue: the depth to keep ------------------------------------------------

    def register_consumer(self, name: str, queues: Sequence[str], ttl: float) -> None:
        """``name`` consumes ``queues`` for the next ``ttl`` seconds (sent with each heartbeat)."""
        if not queues:
            return
        now = time.time()
        pipe = self.r.pipeline(transaction=False)
        for queue in queues:
            key = consumers_key(queue)
            pipe.zadd(key, {name: now + ttl})
            pipe.zremrangebyscore(key, "-inf", now)
        self._call(pipe.execute)

    def unregister_consumer(self, name: str, queues: Sequence[str]) -> None:
        if not queues:
            return
        pipe = self.r.pipeline(transaction=False)
        for queue in queues:
            pipe.zrem(consumers_key(queue), name)
        self._call(pipe.execute)
