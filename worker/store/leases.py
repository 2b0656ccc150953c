"""Chunk leases and work done twice: a worker renews its hold on the chunk it runs, and counts
the tokens it generated that the store did not keep.

A chunk's lease is kombu's own record of its delivery (the message's time in kombu's unacked
index, whose key the queue layer passes in): renewing moves it to now, so neither kombu's
visibility-timeout sweep nor genq's lease sweep (:mod:`worker.queue.leases`) ever puts back the
chunk of a live worker.  The job's ``running`` entry of the chunk is renewed with it, so the
chunk counts as running (cancel waits for it, ``genq status`` lists it) exactly while its lease
holds.  A backup of a chunk (another worker taking over its unfinished items at the job's tail)
is a stored chunk record named :func:`worker.chunks.backup_id`.
"""

from __future__ import annotations

import time

from worker.chunks import backup_id
from worker.core.lifecycle import Event, allowed_arg
from worker.store.base import StoreBase
from worker.store.keys import job_key


class Leases(StoreBase):
    def renew_lease(self, index_key: str, tag: str, job_id: str, cid: str, worker: str) -> bool:
        """Renew the lease of delivery ``tag`` of ``cid``, run by ``worker``; False when the
        message is no longer unacknowledged (the lease lapsed and it went back to its queue)."""
        keys = [index_key, job_key(job_id, "running")]
        return bool(self._script("renew", keys, [tag, cid, f"{worker}|", time.time()]))

    def lease_horizon(self) -> float:
        """A running entry older than this belongs to a worker whose lease lapsed."""
        return time.time() - self.settings.lease

    def backed_up(self, job_id: str, cid: str) -> bool:
        """Whether another worker has taken over the unfinished items of ``cid``."""
        return bool(self._call(self.r.hexists, job_key(job_id, "chunks"), backup_id(cid)))

    def add_waste(self, job_id: str, tokens: int, items: int, *, inc: str = "") -> int:
        """Count ``tokens`` of ``items`` results generated and not kept; returns the job's total
        (a job gone or not incarnation ``inc`` counts nothing: 0)."""
        args = [inc, allowed_arg(Event.WASTE), tokens, items]
        return int(self._script("waste", [job_key(job_id)], args))

    def waste(self, job_id: str) -> tuple[int, int]:
        """``(wasted tokens, wasted items)`` of the job so far."""
        raw = self._call(self.r.hmget, job_key(job_id), ["wasted_tokens", "wasted_items"])
        return int(raw[0] or 0), int(raw[1] or 0)
