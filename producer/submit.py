"""Submitting a job: one streaming pass that validates and stores the inputs, then the chunks.

The order is what makes a submit leave a job or nothing:

1. the job id is known (given, or derived from the file's bytes, the profile and the parameters,
   so the same command finds the same job) and reported before anything is written;
2. one process at a time submits a job (a lock in the store; a second submit waits, then resumes);
3. the job is created as ``submitting``: every key it writes expires after ``GENQ_SUBMIT_TTL``;
4. the input is validated and stored page by page (memory stays flat), a block of items per
   stored value (:mod:`worker.store.blocks`); an error removes what was written, unless
   ``skip_invalid`` records the line as an errored item;
5. only then are chunks published, each claimed in the store first (a bit per chunk), in
   pipelined batches, into the job's backlog, from which they are dispatched to the broker queue
   round robin with other jobs (:mod:`worker.store.dispatch`);
6. the job becomes ``queued`` and its TTL is lifted.

Interrupted anywhere, the same command resumes: the id is the same, inputs already stored are
checked, not trusted blindly (a different input under the same id is refused), and only chunks
without a live message (in the job's backlog, on its queue or unacknowledged) are published.
Redis full: what was written is removed and the error names Redis' maxmemory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from producer import interrupts
from producer.build import JobBuilder, Source
from producer.options import SubmitOptions, option_difference
from worker.chunks import chunk_count, chunk_id, chunk_range
from worker.core.errors import InputError, JobConflict, StoreFull
from worker.core.lifecycle import Event, refusal
from worker.core.schema import Item, JobSpec, error_result
from worker.core.states import JobStatus
from worker.queue.messages import job_queues
from worker.queue.routing import chunk_task_id
from worker.store import RedisStore
from worker.store.keys import PAGE
from worker.store.submit import new_incarnation

Publisher = Callable[[JobSpec, dict[str, list[int]]], int]


@dataclass
class SubmitReport:
    job_id: str
    resumed: bool
    enqueued: int
    total: int
    invalid: int
    status: JobStatus


class Submitter:
    """One submit of one job (see the module docstring for the order of things)."""

    def __init__(
        self,
        store: RedisStore,
        publish: Publisher,
        live_messages: Callable[[JobSpec], set[str]],
        options: SubmitOptions,
        build: JobBuilder | None = None,
    ) -> None:
        self.store = store
        self.publish = publish
        self.live_messages = live_messages
        self.options = options
        self._build = build  # how the job is built from its source (producer.build)

    def submit(
        self,
        source: Source,
        job_id: str,
        *,
        on_wait: Callable[[], None] | None = None,
    ) -> SubmitReport:
        with self.store.submit_lock(job_id, on_wait):
            spec = self._spec(job_id, source, total=0, digest="")
            # a new incarnation unless the job exists (begin then says which one it is)
            fresh = {"incarnation": new_incarnation(), "skip_invalid": self.options.skip_invalid}
            spec = spec.model_copy(update=fresh)
            status, inc = self.store.begin(spec, queues=job_queues(spec))
            created = inc == spec.incarnation
            if not created:
                stored = self.store.spec(job_id)
                self._check_same_options(stored, status)
                if status != JobStatus.SUBMITTING:
                    return self._resume_complete(source, stored)
                # a partial job resumes as first submitted (its deadline included)
                spec = stored.model_copy(update={"incarnation": inc})
            try:
                spec, invalid = self._store_inputs(source, spec, partial=not created)
                # a resumed submit publishes only chunks with an item still to run
                check_done = not created or bool(invalid)
                enqueued = self._publish_all(spec, resumed=not created, check_done=check_done)
            except (InputError, StoreFull):
                self.store.abort(job_id, inc=spec.incarnation)  # a submit leaves a job or nothing
                raise
            final = self.store.finish_submit(job_id, inc=spec.incarnation)
            return SubmitReport(job_id, not created, enqueued, spec.total, len(invalid), final)

    # --- inputs ----------------------------------------------------------------------------------

    def _builder(self, source: Source) -> JobBuilder:
        if self._build is None or self._build.source is not source:
            self._build = JobBuilder(source, self.options)
        return self._build

    def _spec(self, job_id: str, source: Source, *, total: int, digest: str) -> JobSpec:
        return self._builder(source).spec(job_id, total=total, input_digest=digest)

    def _fingerprint(self, source: Source) -> str:
        return self._builder(source).fingerprint

    def _check_same_options(self, stored: JobSpec, status: JobStatus) -> None:
        """A job of this id (partial or not) must be resubmitted with the options it was first
        submitted with: refused in one line naming the first option that differs."""
        differs = option_difference(stored, self.options)
        if differs is not None:
            raise refusal(Event.RESUME_OTHER, status, stored.job_id, option=differs)

    def _store_inputs(self, source: Source, spec: JobSpec, *, partial: bool) -> tuple[JobSpec, list[Item]]:
        """Validate and store every input, a page at a time; returns the final spec and the
        items recorded as invalid (``skip_invalid``)."""
        invalid: list[Item] = []
        reading = self._builder(source).read()  # validated and added to the job's digest
        for part in reading.pages(PAGE):
            interrupts.check()  # a Ctrl-C a finalizer swallowed stops the submit here
            rows = part.rows
            if partial:  # an interrupted submit of this id stored some inputs: they must be ours
                differs = self.store.differing_input(spec.job_id, rows)
                if differs is not None:
                    line = part.items[differs - part.items[0].index].line
                    raise JobConflict(
                        f"job {spec.job_id} was partly submitted from a different input (its item at "
                        f"line {line} differs): submit with another --job-id, or `genq delete {spec.job_id}`"
                    )
            self.store.write_inputs(spec.job_id, rows, inc=spec.incarnation)
            invalid += [item for item in part.items if item.invalid is not None]
        spec = spec.model_copy(update={"total": reading.count, "input_digest": reading.digest})
        self.store.complete_inputs(spec)
        for start in range(0, len(invalid), PAGE):
            page = invalid[start : start + PAGE]
            errs = [
                error_result(it, it.invalid, profile=spec.profile, attempts=0) for it in page if it.invalid
            ]
            self.store.record(spec.job_id, errs, inc=spec.incarnation)
        return spec, invalid

    def _resume_complete(self, source: Source, existing: JobSpec) -> SubmitReport:
        """The job exists and its submit finished: same input → re-publish what lost its message;
        a different input → refuse."""
        job_id = existing.job_id
        same_file = bool(existing.source_fingerprint) and existing.source_fingerprint == self._fingerprint(
            source
        )
        complete = bool(existing.input_digest)  # a job cancelled during its submit has no digest
        if complete and not same_file and not self._same_input(source, existing):
            raise JobConflict(
                f"job {job_id} exists with a different input or profile: submit with another --job-id "
                f"(or none), or `genq delete {job_id}` first"
            )
        state = self.store.state(job_id)
        live = state.status in (JobStatus.QUEUED, JobStatus.IN_PROGRESS)
        enqueued = self._publish_all(existing, resumed=True, check_done=True) if live else 0
        return SubmitReport(job_id, True, enqueued, existing.total, state.counts.errored, state.status)

    def _same_input(self, source: Source, existing: JobSpec) -> bool:
        """Read the whole input again: does it make the job ``existing`` is?"""
        reading = self._builder(source).read()
        for _page in reading.pages(PAGE):
            pass
        return reading.digest == existing.input_digest and existing.profile == self.options.profile.name

    # --- chunks ----------------------------------------------------------------------------------

    def _publish_all(self, spec: JobSpec, *, resumed: bool, check_done: bool) -> int:
        """Claim and publish every plain chunk with something to run; on a resume, also re-publish
        claimed chunks and split children whose message is gone.  Returns messages published.
        ``check_done``: some items may have results already (skip chunks that need nothing)."""
        live = self.live_messages(spec) if resumed else set()
        enqueued = 0
        count = chunk_count(spec.total, spec.chunk_size)
        for start in range(0, count, PAGE):
            interrupts.check()
            numbers = list(range(start, min(start + PAGE, count)))
            won = set(self.store.claim(spec.job_id, numbers, inc=spec.incarnation))
            todo: dict[str, list[int]] = {}
            for n in numbers:
                cid = chunk_id(n)
                indices = list(chunk_range(n, spec.total, spec.chunk_size))
                if n in won or (resumed and chunk_task_id(spec.job_id, cid, spec.incarnation) not in live):
                    todo[cid] = indices
            enqueued += self._publish_pending(spec, todo) if check_done else self.publish(spec, todo)
        if resumed:
            stored = {cid: idx for cid, idx in self.store.stored_chunks(spec.job_id) if idx}
            enqueued += self._publish_pending(
                spec,
                {
                    cid: idx
                    for cid, idx in stored.items()
                    if chunk_task_id(spec.job_id, cid, spec.incarnation) not in live
                },
            )
            self.publish(spec, {})  # a backlog an interrupted publish left outside its ring is served
        return enqueued

    def _publish_pending(self, spec: JobSpec, chunks: dict[str, list[int]]) -> int:
        """Publish the chunks of ``chunks`` that still have an item without a result."""
        if not chunks:
            return 0
        every = [i for idx in chunks.values() for i in idx]
        done = self.store.done(spec.job_id, every)
        todo = {cid: idx for cid, idx in chunks.items() if any(i not in done for i in idx)}
        return self.publish(spec, todo) if todo else 0
