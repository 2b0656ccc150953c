"""The store's side of a submit: a job exists from its first write, as ``submitting`` with a TTL
on every key, until :meth:`SubmitStore.finish_submit` lifts it; a submit that fails is undone by
:meth:`SubmitStore.abort`, and one that dies is resumed by the same command or expires.

One process at a time submits a job: :class:`SubmitLock` is a short-lived key refreshed while
the submit runs, so a second submit of the same job waits for the first, then resumes it.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType

from worker.core.schema import JobSpec
from worker.core.states import JobStatus
from worker.store.jobs import COUNT_FIELDS, JobStore
from worker.store.keys import JOBS_INDEX, SUBMITTER, job_key, job_keys

LOCK_SECONDS = 30
"""The submit lock's lifetime; the holder refreshes it every third of that."""

_REFRESH = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then "
    "return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
)
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


class SubmitLock:
    """Held while a process submits a job.  ``with store.submit_lock(job, on_wait) as lock:``"""

    def __init__(self, store: SubmitStore, job_id: str, on_wait: Callable[[], None] | None) -> None:
        self.store = store
        self.key = job_key(job_id, SUBMITTER)
        self.token = secrets.token_hex(8)
        self.on_wait = on_wait
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> SubmitLock:
        r = self.store.r
        told = False
        while not self.store._call(r.set, self.key, self.token, nx=True, px=LOCK_SECONDS * 1000):
            if not told and self.on_wait is not None:
                self.on_wait()
                told = True
            time.sleep(0.2)
        self._thread = threading.Thread(target=self._refresh, name="genq-submit-lock", daemon=True)
        self._thread.start()
        return self

    def _refresh(self) -> None:
        while not self._stop.wait(LOCK_SECONDS / 3):
            with contextlib.suppress(Exception):  # Redis away a moment: the next refresh tries again
                self.store.r.eval(_REFRESH, 1, self.key, self.token, LOCK_SECONDS * 1000)

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1)
        with contextlib.suppress(Exception):  # gone with Redis: it expires on its own
            self.store.r.eval(_RELEASE, 1, self.key, self.token)


class SubmitStore(JobStore):
    def submit_lock(self, job_id: str, on_wait: Callable[[], None] | None = None) -> SubmitLock:
        return SubmitLock(self, job_id, on_wait)

    def begin(self, spec: JobSpec) -> None:
        """Create the job as ``submitting``: it is listed at once, and every key expires after
        ``GENQ_SUBMIT_TTL`` unless the submit finishes."""
        now = time.time()
        pipe = self.r.pipeline(transaction=True)
        key = job_key(spec.job_id)
        pipe.hset(
            key,
            mapping={
                "spec": spec.model_dump_json(),
                "status": JobStatus.SUBMITTING,
                "total": spec.total,
                **dict.fromkeys(COUNT_FIELDS, 0),
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "inputs_written": 0,
                "created_at": spec.created_at,
                "updated_at": now,
            },
        )
        pipe.expire(key, self.settings.submit_ttl)
        pipe.zadd(JOBS_INDEX, {spec.job_id: spec.created_at})
        self._call(pipe.execute)

    def write_inputs(self, job_id: str, page: Sequence[tuple[int, str]]) -> None:
        """Store a page of ``(index, Item JSON)``; the inputs live as long as the partial job."""
        if not page:
            return
        key = job_key(job_id, "inputs")
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(key, mapping={str(i): raw for i, raw in page})
        pipe.expire(key, self.settings.submit_ttl)
        pipe.hset(job_key(job_id), mapping={"inputs_written": page[-1][0] + 1, "updated_at": time.time()})
        self._call(pipe.execute)

    def differing_input(self, job_id: str, page: Sequence[tuple[int, str]]) -> int | None:
        """The first index of ``page`` whose stored input differs from the given JSON (a missing
        one does not differ: it is simply not written yet)."""
        stored = self._call(self.r.hmget, job_key(job_id, "inputs"), [str(i) for i, _ in page])
        for (index, raw), old in zip(page, stored, strict=True):
            if old is not None and old != raw:
                return index
        return None

    def complete_inputs(self, spec: JobSpec) -> None:
        """Every input is stored and valid: write the final spec (total and digest)."""
        self._call(
            self.r.hset,
            job_key(spec.job_id),
            mapping={"spec": spec.model_dump_json(), "total": spec.total, "updated_at": time.time()},
        )
        self._specs.pop(spec.job_id, None)

    def finish_submit(self, job_id: str) -> JobStatus:
        """Every chunk is published: the job becomes ``queued`` (or ``in_progress``, or
        ``completed`` when nothing was left to run) and its TTL is lifted."""
        keys = job_keys(job_id)
        status = self._script("finish_submit", keys, [time.time(), self.settings.result_ttl])
        return JobStatus(status)

    def abort(self, job_id: str) -> None:
        """Undo a submit that cannot finish (bad input, Redis full): remove what it wrote."""
        self.delete(job_id)
