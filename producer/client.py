"""The Python API for submitting machines: ``Client`` and ``Job`` (never imports torch).

from producer import Client

client = Client("redis://127.0.0.1:6379/0")
job = client.submit("prompts.jsonl", profile="qwen2.5-7b-medical")
job.wait(progress=True)
for result in job.results():
    print(result.id, result.text)
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from producer.build import JobBuilder, Source, job_options
from producer.submit import SubmitReport, Submitter
from worker.chunks import make_chunks
from worker.core.errors import ConfigError, FollowConflict, JobNotFound
from worker.core.jobstate import JobState
from worker.core.outputs import OutputFormat
from worker.core.schema import ErrorInfo, GenParams, Item, ItemResult, JobSpec, error_result
from worker.core.settings import Settings, get_settings
from worker.core.states import ErrorCode, JobStatus, Priority, QueueMode
from worker.store import RedisStore

if TYPE_CHECKING:
    from celery import Celery

DEFAULT_CHUNK_SIZE = 16

ENDED_MESSAGES = {
    ErrorCode.CANCELLED: "the job was cancelled before this item ran",
    ErrorCode.EXPIRED: "the job expired before this item ran",
}


def ended_result(item: Item, status: JobStatus) -> ItemResult:
    """The result of an item the job's end left without one (cancelled and expired items are
    stored as a count, not a row each)."""
    code = ErrorCode.EXPIRED if status == JobStatus.EXPIRED else ErrorCode.CANCELLED
    return error_result(item, ErrorInfo(type=code, message=ENDED_MESSAGES[code]), attempts=0)


class Job:
    """A handle on a submitted job."""

    def __init__(self, client: Client, job_id: str, report: SubmitReport | None = None) -> None:
        self.client = client
        self.id = job_id
        self.report = report

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    @property
    def resumed(self) -> bool:
        return bool(self.report and self.report.resumed)

    @property
    def enqueued(self) -> int:
        return self.report.enqueued if self.report else 0

    def status(self) -> JobState:
        store = self.client.store
        if store.expire_if_due(self.id):
            self.client.withdraw(self.id)
        state = store.state(self.id)
        if state.status == JobStatus.CANCELLING and state.live_chunks == 0:
            store.settle(self.id)  # the workers that held its chunks died: end it now
            state = store.state(self.id)
        return state

    def wait(
        self,
        *,
        progress: bool = False,
        poll: float = 1.0,
        timeout: float | None = None,
        on_update: Callable[[JobState], None] | None = None,
    ) -> JobState:
        """Block until the job is completed, cancelled or expired (or ``timeout`` passes).  The
        status is read every ``poll`` seconds (for ``on_update`` and the progress display); the
        job's end is seen at once, whatever ``poll`` is."""
        from producer.progress import follow

        with self.client.store.events(self.id) as events:  # the end wakes us at once
            return follow(
                self.status, poll=poll, timeout=timeout, pause=events.pause, bar=progress, on_update=on_update
            )

    def pairs(self) -> Iterator[tuple[int, ItemResult | None, Item]]:
        """``(index, result or None, item)`` in input order, a page at a time.  Items the job's
        cancel or expiry left without a result come with a ``cancelled``/``expired`` result."""
        store = self.client.store
        state = store.state(self.id)  # a job cancelled during its submit: the items it stored
        total, status = state.counts.total, state.status
        drained = store.drained_total(self.id)
        if drained:
            where = store.output_files(self.id).get("output_file") or "its output"
            raise FollowConflict(
                f"job {self.id}: {drained} results were drained to {where} by `genq collect --follow` "
                f"and are no longer in Redis; run `genq collect {self.id} -o {where} --follow` to "
                "finish that file"
            )
        ended = status in (JobStatus.CANCELLED, JobStatus.EXPIRED)
        items = store.all_items(self.id, total)
        for (index, result), item in zip(store.results(self.id, total), items, strict=True):
            if result is None and ended and status is not None:
                result = ended_result(item, status)
            yield index, result, item

    def results(self, *, follow: bool = False, poll: float = 0.5) -> Iterator[ItemResult]:
        """Finished results in input order, each item once (pending items are left out).

        ``follow``: results as they land, until the job ends, and out of Redis: a page (a few
        thousand, sorted by index; pages are not in input order) is drained when the next one is
        asked for, so keep each result somewhere durable before iterating further.  A consumer
        that dies mid-page gets that page again from the next follow.  One follower per job
        (:class:`~worker.core.errors.FollowConflict` otherwise)."""
        if follow:
            from producer.follow import Follower

            with Follower(self, poll=poll) as follower:
                for page in follower.pages():
                    for entry in sorted(page, key=lambda entry: entry[0]):
                        yield entry[2]
            return
        for _index, found, _item in self.pairs():
            if found is not None:
                yield found

    def batch_object(self) -> dict[str, Any]:
        """This job as OpenAI's Batch object (:mod:`producer.batch`)."""
        from producer.batch import batch_endpoint, batch_object

        store = self.client.store
        first = store.items(self.id, [0]) if store.spec(self.id).total else []
        endpoint = batch_endpoint(first[0] if first else None)
        return batch_object(self.status(), store.output_files(self.id), endpoint=endpoint)

    def cancel(self) -> JobState:
        """Cancel: its backlog is dropped in the same step, and the few messages already on its
        queue are removed (a worker holding one drops it: the job is cancelling)."""
        state = self.client.store.request_cancel(self.id)
        self.client.withdraw(self.id)
        return state

    def retry(self, *, all_errors: bool = False) -> int:
        """Run errored items again: those whose error may pass next time (``worker_lost``,
        ``out_of_memory``, ``generation_error``), or every error with ``all_errors``.  Cancelled
        and expired items are not errors.  Returns how many items were re-enqueued."""
        store = self.client.store
        spec = store.spec(self.id)
        entries = sorted(store.retryable(self.id, all_errors=all_errors))
        # refused in one line when the job's state allows no retry (cancelled, expired, submitting)
        store.forget(self.id, entries, inc=spec.incarnation)
        if not entries:
            return 0
        indices = [index for index, _, _ in entries]
        prefix = f"r{int(time.time())}{secrets.token_hex(3)}-"  # two rounds never share a chunk id
        chunks = store.add_chunks(
            self.id, make_chunks(indices, spec.chunk_size, prefix=prefix), inc=spec.incarnation
        )
        self.client.publish(spec, chunks)
        return len(indices)


@dataclass
class Collected:
    """What :meth:`Client.collect` wrote."""

    written: int
    pending: int
    ended: int
    """Cancelled or expired items (left out unless ``include_unfinished``)."""
    errored: int
    """Rows written to the errors file."""
    status: JobStatus
    spool_kept: Path | None = None
    """A follow of a job with errors keeps its spool, so that a retry's results merge in."""


@dataclass
class Deleted:
    job_id: str
    keys: int
    messages: int


class Client:
    """Submit and follow jobs.  ``url`` defaults to ``GENQ_BROKER_URL``.  Fails within seconds,
    naming the URL (password hidden) and what to check, when Redis cannot be reached; once
    connected, a lost connection is retried for ``retry_seconds`` (a Redis restart)."""

    def __init__(
        self, url: str | None = None, *, settings: Settings | None = None, retry_seconds: float = 60.0
    ) -> None:
        base = settings or get_settings()
        if url:
            base = base.model_copy(update={"broker_url": SecretStr(url)})
        self.settings = base
        if not self.settings.broker:
            raise ConfigError(
                "no broker: pass a Redis URL or set GENQ_BROKER_URL (or use `genq run`, embedded)"
            )
        self.store = RedisStore(settings=self.settings, retry_seconds=retry_seconds)
        self.store.check()
        self._app: Celery | None = None

    @property
    def app(self) -> Celery:
        if self._app is None:
            from worker.queue.app import make_app

            self._app = make_app(self.settings)
        return self._app

    def publish(self, spec: JobSpec, chunks: dict[str, list[int]]) -> int:
        """Into the job's backlog, then dispatched to its queue round robin with other jobs."""
        from worker.queue.publish import publish_chunks

        return publish_chunks(spec, chunks, self.app, store=self.store)

    def live_messages(self, spec: JobSpec) -> set[str]:
        """The job's messages in its backlog, on the queues of its level (an ``any`` job's are
        dispatched to the modes' queues) or unacknowledged."""
        from worker.queue.messages import job_message_ids

        return job_message_ids(self.store.r, spec)

    def submit(
        self,
        source: Source,
        *,
        profile: str,
        job_id: str | None = None,
        mode: QueueMode | str = QueueMode.ANY,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        params: GenParams | None = None,
        system_prompt: str | None = None,
        expires_in: float | None = None,
        skip_invalid: bool = False,
        adapter: str | None = None,
        new: bool = False,
        priority: Priority | str = Priority.NORMAL,
        on_job_id: Callable[[str], None] | None = None,
        on_wait: Callable[[], None] | None = None,
    ) -> Job:
        """Validate and store the input, then enqueue its chunks (see :mod:`producer.submit`).
        Nothing is enqueued when the input has an error (unless ``skip_invalid``).  Without
        ``job_id`` a file gets an id derived from its content, profile and parameters (the same
        command resumes the same job; ``new`` makes a fresh one); records get a fresh id.
        ``priority`` (high, normal, low): which queue level its chunks wait on; between jobs of
        one level, chunks are served round robin.  ``adapter``: one of the profile's adapters, by
        name, for items that name none.  ``on_job_id`` hears the id before anything is written."""
        options = job_options(
            profile,
            settings=self.settings,
            mode=mode,
            chunk_size=chunk_size,
            params=params,
            system_prompt=system_prompt,
            expires_in=expires_in,
            skip_invalid=skip_invalid,
            adapter=adapter,
            priority=priority,
        )
        build = JobBuilder(source, options)  # the one way a job is built (producer.build)
        job_id = build.job_id(job_id, new=new)
        if on_job_id is not None:
            on_job_id(job_id)
        report = Submitter(self.store, self.publish, self.live_messages, options, build).submit(
            source, job_id, on_wait=on_wait
        )
        return Job(self, job_id, report)

    def collect(
        self,
        job_id: str,
        output: str | os.PathLike[str],
        *,
        fmt: OutputFormat = "native",
        follow: bool = False,
        include_unfinished: bool = False,
        errors_file: str | os.PathLike[str] | None = None,
        on_state: Callable[[JobState], None] | None = None,
    ) -> Collected:
        """`genq collect`: write the job's results to ``output`` in input order, each item once
        (errored items to ``errors_file`` when given).  ``follow``: while the job runs, until it
        ends, taking each result out of Redis once it is durably spooled next to ``output``
        (:mod:`producer.follow`); run it again after a kill and it resumes."""
        from producer.collect import write_collected
        from producer.follow import follow_collect

        job = self.job(job_id)
        out = Path(output)
        errors = Path(errors_file) if errors_file is not None else None
        if follow:
            report = follow_collect(
                job, out, fmt, include_unfinished=include_unfinished, errors=errors, on_state=on_state
            )
            return Collected(
                report.written, 0, report.ended, report.errored, report.status, report.spool_kept
            )
        written, pending, ended, errored = write_collected(job, out, fmt, include_unfinished, errors)
        return Collected(written, pending, ended, errored, job.status().status, None)

    def job(self, job_id: str) -> Job:
        self.store.spec(job_id)  # raises JobNotFound
        return Job(self, job_id)

    def jobs(self, limit: int = 20, *, sizes: bool = False) -> list[JobState]:
        return self.store.list_jobs(limit, sizes=sizes)

    def workers(self) -> list[dict[str, object]]:
        return self.store.workers()

    def delete(self, job_id: str) -> Deleted:
        """Remove every key of the job and its waiting messages (a worker holding one of its
        chunks finds the job gone and drops it)."""
        gone = self._delete(job_id, older_than=None)
        return gone or Deleted(job_id, 0, 0)

    def _delete(self, job_id: str, *, older_than: float | None) -> Deleted | None:
        """:meth:`delete`; with ``older_than`` (prune) only when the job is still prunable in the
        step that deletes it (None when it no longer is)."""
        keys, messages = self.store.delete(job_id, older_than=older_than)  # one step (delete.lua)
        if keys < 0:
            return None
        return Deleted(job_id, keys, messages)

    def withdraw(self, job_id: str) -> int:
        """Withdraw the job from the queues: its place in the rings and its messages waiting on
        the broker queues (cancel, expiry); returns how many messages were removed.  (Not to be
        confused with draining *results* out of Redis, which `genq collect --follow` does.)"""
        from worker.queue.messages import withdraw

        try:
            return withdraw(self.store, self.store.spec(job_id))
        except JobNotFound:
            return 0

    def prune(self, older_than: float, *, dry_run: bool = False) -> list[JobState]:
        """Delete jobs that finished (or partial jobs last touched) more than ``older_than``
        seconds ago; returns them (a job that changed since it was listed is left alone)."""
        found = self.store.prunable(older_than)
        if dry_run:
            return found
        return [s for s in found if self._delete(s.spec.job_id, older_than=older_than) is not None]
