"""The Redis job store (see :mod:`worker.store.keys` for every key it uses).

Results and counters move together in Lua scripts (``lua/``), so counts are exact even when a
chunk is delivered twice or Redis restarts between a write and its reply.  The script that ends
a job sets its final status and the retention TTL on all of its keys, and publishes the status
on the job's events channel, so waiting producers (:class:`JobEvents`) learn at once.

:class:`RedisStore` is the parts together: results (:mod:`.results`), chunks (:mod:`.chunks`),
the job's life (:mod:`.jobs`, :mod:`.submit`), workers (:mod:`.workers`), chunk leases and
wasted work (:mod:`.leases`), the fair-share dispatcher (:mod:`.dispatch`: per-job backlogs
moved to the broker queues round robin) and draining results to a following collector
(:mod:`.drain`).
"""

from __future__ import annotations

from worker.store.connection import check_reachable, connect
from worker.store.dispatch import Dispatcher
from worker.store.drain import DrainStore
from worker.store.events import JobEvents
from worker.store.files import OutputFiles
from worker.store.keys import events_channel
from worker.store.leases import Leases
from worker.store.submit import SubmitLock, SubmitStore
from worker.store.workers import WorkerRegistry

__all__ = ["JobEvents", "RedisStore", "SubmitLock", "check_reachable", "connect"]


class RedisStore(SubmitStore, WorkerRegistry, OutputFiles, Dispatcher, Leases, DrainStore):
    """The job store.  Every method is safe to call again after a failure (idempotent)."""

    def events(self, job_id: str) -> JobEvents:
        """Wake-ups for the end of ``job_id``: ``with store.events(job) as ev: ... ev.pause(1.0)``."""
        return JobEvents(self.r, events_channel(job_id))
