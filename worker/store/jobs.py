"""A job's record and its end: read the spec and the state, list jobs, cancel, expire, delete,
prune.  Cancelled and expired items are a number (``total`` minus what finished), never a row
each: :meth:`JobStore.settle` fixes that number once no live worker runs a chunk of the job."""

from __future__ import annotations

import time
from collections.abc import Iterator

from worker.core.errors import JobNotFound
from worker.core.jobstate import JobState
from worker.core.lifecycle import Event, allowed_arg, refusal
from worker.core.schema import Counts, JobSpec
from worker.core.states import CountField, JobStatus
from worker.store.chunks import ChunkRecords
from worker.store.connection import guarded_iter
from worker.store.keys import JOBS_INDEX, SUBMITTER, all_job_keys, job_key, job_keys

COUNT_FIELDS = tuple(CountField)


class JobStore(ChunkRecords):
    def spec(self, job_id: str, inc: str | None = None) -> JobSpec:
        """The job's spec.  With ``inc`` (a chunk message's incarnation): that incarnation's,
        cached for the life of the process (a spec never changes within an incarnation), and
        :class:`JobNotFound` when the job stored now is another one; without, always read."""
        if inc:
            cached = self._specs.get((job_id, inc))
            if cached is not None:
                return cached
        raw = self._call(self.r.hget, job_key(job_id), "spec")
        if raw is None:
            raise JobNotFound(
                f"no job {job_id!r} in {self.url_display} "
                f"(finished jobs are kept {self.settings.result_ttl} s; `genq status` lists jobs)"
            )
        spec = JobSpec.model_validate_json(raw)
        if inc and spec.incarnation and spec.incarnation != inc:
            raise refusal(Event.DELIVER, None, job_id)
        if inc and spec.total:  # a partial job's spec is rewritten once its inputs are complete
            self._specs[(job_id, inc)] = spec
        return spec

    def status(self, job_id: str) -> JobStatus | None:
        raw = self._call(self.r.hget, job_key(job_id), "status")
        return JobStatus(raw) if raw else None

    def state(self, job_id: str) -> JobState:
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(job_key(job_id))
        pipe.hgetall(job_key(job_id, "workers"))
        pipe.hvals(job_key(job_id, "running"))
        pipe.exists(job_key(job_id, SUBMITTER))
        raw, per_worker_raw, running, submitting = self._call(pipe.execute)
        if not raw or "spec" not in raw:
            raise JobNotFound(f"no job {job_id!r} in {self.url_display}")
        spec = JobSpec.model_validate_json(raw["spec"])
        counts = Counts(
            total=int(raw.get("total", spec.total)), **{k: int(raw.get(k, 0)) for k in COUNT_FIELDS}
        )
        per_worker: dict[str, dict[str, int]] = {}
        for name, value in per_worker_raw.items():
            worker, _, what = name.rpartition(":")
            per_worker.setdefault(worker, {})[what] = int(value)
        horizon = time.time() - self.settings.lease
        live = sum(1 for v in running if float(v.rpartition("|")[2] or 0) >= horizon)

        def opt(name: str) -> float | None:
            return float(raw[name]) if raw.get(name) else None

        return JobState(
            spec=spec,
            status=JobStatus(raw.get("status", JobStatus.QUEUED)),
            counts=counts,
            prompt_tokens=int(raw.get("prompt_tokens", 0)),
            completion_tokens=int(raw.get("completion_tokens", 0)),
            started_at=opt("started_at"),
            finished_at=opt("finished_at"),
            first_finished_at=opt("first_finished_at"),
            updated_at=opt("updated_at"),
            workers=per_worker,
            inputs_written=int(raw.get("inputs_written", 0)),
            submitting=bool(submitting),
            ending=raw.get("ending"),
            live_chunks=live,
        )

    def job_ids(self) -> Iterator[str]:
        """Every job in the index, newest first."""
        yield from guarded_iter(self.url_display, iter(self._call(self.r.zrevrange, JOBS_INDEX, 0, -1)))

    def list_jobs(self, limit: int = 20, *, sizes: bool = False) -> list[JobState]:
        states: list[JobState] = []
        for job_id in self.job_ids():
            try:
                state = self.state(job_id)
            except JobNotFound:  # expired after retention (or a partial job's TTL): unindex it
                self._call(self.r.zrem, JOBS_INDEX, job_id)
                continue
            if sizes:
                state.redis_bytes = self.redis_bytes(job_id)
            states.append(state)
            if len(states) >= limit:
                break
        return states

    def redis_bytes(self, job_id: str) -> int:
        """What the job's keys take in Redis (``MEMORY USAGE``, sampled for big hashes)."""
        pipe = self.r.pipeline(transaction=False)
        for key in job_keys(job_id):
            pipe.memory_usage(key, samples=64)
        return sum(int(n or 0) for n in self._call(pipe.execute))

    # --- the end of a job ------------------------------------------------------------------------

    def _end(self, job_id: str, ending: CountField, *, due: bool = False, now: float | None = None) -> bool:
        """Start ending the job (cancel, or expiry when ``due`` and its deadline has passed) and
        settle it if nothing runs; True when it started ending now.  The status check, the change
        and dropping the backlog are one step (``lua/end.lua``): chunks never dispatched are
        counted by settle as it counts those of messages still queued."""
        event = Event.EXPIRE if ending == CountField.EXPIRED else Event.CANCEL
        keys = [job_key(job_id), job_key(job_id, "backlog")]
        args = [str(ending), now or time.time(), "1" if due else ""]
        ended = int(self._step(event, job_id, "", "end", keys, args)) == 1
        self.settle(job_id)
        return ended

    def settle(self, job_id: str) -> bool:
        """End a cancelling job once no live worker runs its chunks; True when it ended now."""
        keys = [job_key(job_id), job_key(job_id, "running"), *job_keys(job_id)]
        horizon = time.time() - self.settings.lease
        return int(self._script("settle", keys, [time.time(), self.settings.result_ttl, horizon])) == 1

    def request_cancel(self, job_id: str) -> JobState:
        """Cancel: chunks not started are skipped, chunks in flight finish their micro-batch;
        the job ends (``cancelled``) when the last of them stops."""
        self._end(job_id, CountField.CANCELLED)
        return self.state(job_id)

    def expire_if_due(self, job_id: str, now: float | None = None) -> bool:
        """Past its deadline (``expires_at``, stored in the job's hash): end the job as
        ``expired`` (as a cancel would); decided in the same step as the change.  True when it
        started ending now."""
        try:
            return self._end(job_id, CountField.EXPIRED, due=True, now=now)
        except JobNotFound:
            return False

    # --- housekeeping ----------------------------------------------------------------------------

    def delete(self, job_id: str, *, inc: str = "", older_than: float | None = None) -> tuple[int, int]:
        """Remove every key of the job and its index entry, and take it out of the queues in the
        same step; returns how many keys existed (-1: refused, nothing changed) and how many of
        its messages were waiting (its backlog and the broker queues).  ``inc``: only that
        incarnation.  ``older_than`` (prune): only a job that is still prunable, checked in the
        same step (``lua/delete.lua``)."""
        event = Event.DELETE if older_than is None else Event.PRUNE
        cutoff = "" if older_than is None else time.time() - older_than
        keys = [*all_job_keys(job_id), JOBS_INDEX]
        reply = self._script("delete", keys, [inc, allowed_arg(event), job_id, cutoff])
        if not isinstance(reply, list):
            return int(reply), 0
        return int(reply[0]), int(reply[1])

    def prunable(self, older_than: float, *, now: float | None = None) -> list[JobState]:
        """Finished jobs that ended, and partial jobs last touched, more than ``older_than``
        seconds ago."""
        cutoff = (now or time.time()) - older_than
        found: list[JobState] = []
        for state in self.list_jobs(limit=1 << 30):
            if (state.final and (state.finished_at or 0) < cutoff) or (
                state.partial and (state.updated_at or state.spec.created_at) < cutoff
            ):
                found.append(state)
        return found
