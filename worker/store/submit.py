"""The store's side of a submit: a job exists from its first write, as ``submitting`` with a TTL
on every key, until :meth:`SubmitStore.finish_submit` lifts it; a submit that fails is undone by
:meth:`SubmitStore.abort`, and one that dies is resumed by the same command or expires.

One process at a time submits a job: :class:`SubmitLock` is a short-lived key refreshed while
the submit runs, so a second submit of the same job waits for the first, then resumes it.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType

from worker.core.lifecycle import Event
from worker.core.schema import JobSpec
from worker.core.states import JobStatus
from worker.store import blocks
from worker.store.jobs import COUNT_FIELDS, JobStore
from worker.store.keys import JOBS_INDEX, SUBMITTER, job_key, job_keys, ring_key


def new_incarnation() -> str:
    """A fresh incarnation token (a job id submitted again after a delete is another one)."""
    return secrets.token_hex(8)


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

    def begin(self, spec: JobSpec, *, queues: Sequence[str] = ()) -> tuple[JobStatus, str]:
        """Create the job as ``submitting``, a new incarnation (``spec.incarnation``, or a fresh
        one): it is listed at once, and every key expires after ``GENQ_SUBMIT_TTL`` unless the
        submit finishes.  When the job exists nothing changes.  Returns ``(status, incarnation)``
        of the job now stored: ``spec``'s own when this call created it.  ``queues``: every broker
        queue a message of the job may wait on, kept as the job's ``route``: the step that ends
        or completes the job takes its messages off them and its entries out of their rings."""
        inc = spec.incarnation or new_incarnation()
        spec = spec.model_copy(update={"incarnation": inc})
        fields: dict[str, str | int | float] = {
            "spec": spec.model_dump_json(),
            "total": spec.total,
            **dict.fromkeys(COUNT_FIELDS, 0),
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "inputs_written": 0,
            "created_at": spec.created_at,
            "updated_at": time.time(),
        }
        if spec.expires_at is not None:
            fields["expires_at"] = spec.expires_at
        if queues:
            route = {"id": spec.job_id, "queues": list(queues), "rings": [ring_key(q) for q in queues]}
            fields["route"] = json.dumps(route)
        keys = [job_key(spec.job_id), JOBS_INDEX, *job_keys(spec.job_id)[1:]]
        args: list[str | int | float] = [inc, spec.job_id, spec.created_at, self.settings.submit_ttl]
        for name, value in fields.items():
            args += [name, value]
        status, found = self._script("begin", keys, args)
        return JobStatus(status), str(found)

    def write_inputs(self, job_id: str, page: Sequence[tuple[int, str]], *, inc: str = "") -> None:
        """Store a page of ``(index, Item JSON)`` while the job is still ``submitting`` (this
        incarnation), as whole blocks (:mod:`worker.store.blocks`: the page starts at a block's
        first item; only the input's last block may be short); every key of the partial job gets
        ``GENQ_SUBMIT_TTL`` again.  Refused (:class:`~worker.core.errors.JobRefused`,
        :class:`~worker.core.errors.JobNotFound`) once the job was cancelled, deleted or expired
        during the submit."""
        if not page:
            return
        keys = [job_key(job_id), job_key(job_id, "inputs"), *job_keys(job_id)[1:]]
        args: list[str | int | float | bytes] = [self.settings.submit_ttl, time.time(), page[-1][0] + 1]
        for block, value in blocks.pack(page):
            args += [blocks.field(block), value]
        self._step(Event.WRITE_PAGE, job_id, inc, "write", keys, args)

    def differing_input(self, job_id: str, page: Sequence[tuple[int, str]]) -> int | None:
        """The first index of ``page`` whose stored input differs from the given JSON (a missing
        one does not differ: it is simply not written yet)."""
        stored = self.stored_inputs(job_id, [i for i, _ in page])
        for index, raw in page:
            old = stored.get(index)
            if old is not None and old != raw:
                return index
        return None

    def complete_inputs(self, spec: JobSpec) -> None:
        """Every input is stored and valid: write the final spec (total and digest), while the
        job is still ``submitting`` (refused like :meth:`write_inputs`)."""
        if not spec.incarnation:  # a caller that did not keep begin's incarnation: the stored one
            found = self._call(self.r.hget, job_key(spec.job_id), "inc") or ""
            spec = spec.model_copy(update={"incarnation": found})
        args = [spec.model_dump_json(), spec.total, time.time()]
        self._step(Event.WRITE_PAGE, spec.job_id, spec.incarnation, "complete", [job_key(spec.job_id)], args)

    def finish_submit(self, job_id: str, *, inc: str = "") -> JobStatus:
        """Every chunk is published: the job becomes ``queued`` (or ``in_progress``, or
        ``completed`` when nothing was left to run) and its TTL is lifted.  Refused when the job
        was cancelled, deleted or expired during the submit."""
        keys = job_keys(job_id)
        args = [time.time(), self.settings.result_ttl]
        return JobStatus(self._step(Event.SUBMIT_FINISH, job_id, inc, "finish_submit", keys, args))

    def abort(self, job_id: str, *, inc: str = "") -> None:
        """Undo a submit that cannot finish (bad input, Redis full): remove what it wrote (only
        this incarnation: a newer job of the same id is never touched)."""
        self.delete(job_id, inc=inc)
