"""A job's record and its end: read the spec and the state, list jobs, cancel, expire, delete,
prune.  Cancelled and expired items are a number (``total`` minus what finished), never a row
each: :meth:`JobStore.settle` fixes that number once no live worker runs a chunk of the job."""

from __future__ import annotations

import time
from collections.abc import Iterator

from worker.core.errors import JobNotFound
from worker.core.jobstate import JobState
from worker.core.schema import Counts, JobSpec
from worker.core.states import CountField, JobStatus
from worker.store.chunks import ChunkRecords
from worker.store.connection import guarded_iter
from worker.store.keys import JOBS_INDEX, SUBMITTER, all_job_keys, job_key, job_keys

COUNT_FIELDS = tuple(CountField)


class JobStore(ChunkRecords):
    def job_exists(self, job_id: str) -> bool:
        return bool(self._call(self.r.exists, job_key(job_id)))

    def spec(self, job_id: str) -> JobSpec:
        cached = self._specs.get(job_id)
        if cached is not None:
            return cached
        raw = self._call(self.r.hget, job_key(job_id), "spec")
        if raw is None:
            raise JobNotFound(
                f"no job {job_id!r} in {self.url_display} "
                f"(finished jobs are kept {self.settings.result_ttl} s; `genq status` lists jobs)"
            )
        spec = JobSpec.model_validate_json(raw)
        if spec.total:  # a partial job's spec is rewritten once its inputs are complete
            self._specs[job_id] = spec
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

    def _end(self, job_id: str, ending: CountField) -> JobState:
        """Start ending the job (cancel or expiry) and settle it if nothing runs."""
        script = (
            "local s = redis.call('HGET', KEYS[1], 'status') "
            "if s == 'queued' or s == 'in_progress' or s == 'submitting' then "
            "redis.call('HSET', KEYS[1], 'status', 'cancelling', 'ending', ARGV[1], 'updated_at', ARGV[2]) "
            "end return s"
        )
        self._call(self.r.eval, script, 1, job_key(job_id), str(ending), time.time())
        # chunks never dispatched are dropped now (settle counts their items as it counts those of
        # messages still queued); the job leaves its ring at the next dispatch
        self._call(self.r.delete, job_key(job_id, "backlog"))
        self.settle(job_id)
        return self.state(job_id)

    def settle(self, job_id: str) -> bool:
        """End a cancelling job once no live worker runs its chunks; True when it ended now."""
        keys = [job_key(job_id), job_key(job_id, "running"), *job_keys(job_id)]
        horizon = time.time() - self.settings.lease
        return int(self._script("settle", keys, [time.time(), self.settings.result_ttl, horizon])) == 1

    def request_cancel(self, job_id: str) -> JobState:
        """Cancel: chunks not started are skipped, chunks in flight finish their micro-batch;
        the job ends (``cancelled``) when the last of them stops."""
        state = self.state(job_id)
        if state.final:
            return state
        return self._end(job_id, CountField.CANCELLED)

    def expire_if_due(self, job_id: str, now: float | None = None) -> bool:
        """Past ``expires_at``: end the job as ``expired`` (as a cancel would).  True when due."""
        spec = self.spec(job_id)
        if spec.expires_at is None or (now or time.time()) < spec.expires_at:
            return False
        status = self.status(job_id)
        if status is None or status.final:
            return False
        self._end(job_id, CountField.EXPIRED)
        return True

    # --- housekeeping ----------------------------------------------------------------------------

    def delete(self, job_id: str) -> int:
        """Remove every key of the job and its index entry; returns how many keys existed."""
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(*all_job_keys(job_id))
        pipe.zrem(JOBS_INDEX, job_id)
        removed, _ = self._call(pipe.execute)
        self._specs.pop(job_id, None)
        return int(removed)

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
