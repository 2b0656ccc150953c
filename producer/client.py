"""The Python API for submitting machines: ``Client`` and ``Job`` (never imports torch).

from producer import Client

client = Client("redis://127.0.0.1:6379/0")
job = client.submit("prompts.jsonl", profile="qwen2.5-7b-medical")
job.wait(progress=True)
for result in job.results():
    print(result.id, result.text)
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from producer.inputs import InputLimits, ReadResult, items_from_records, read_items
from worker.core.errors import ConfigError, InputError
from worker.core.profiles import Profile, load_profile
from worker.core.schema import GenParams, Item, ItemResult, JobSpec
from worker.core.settings import Settings, get_settings
from worker.core.states import QueueMode
from worker.store import JobState, RedisStore

DEFAULT_CHUNK_SIZE = 16


def new_job_id() -> str:
    return time.strftime("j%Y%m%d-%H%M%S-", time.gmtime()) + secrets.token_hex(3)


def input_digest(items: Iterable[Item], profile: str, params: GenParams, system_prompt: str | None) -> str:
    h = hashlib.sha256()
    h.update(profile.encode())
    h.update(params.model_dump_json().encode())
    h.update((system_prompt or "").encode())
    for item in items:
        h.update(item.model_dump_json().encode())
    return h.hexdigest()


def make_chunks(total: int, size: int, prefix: str = "c") -> dict[str, list[int]]:
    return {
        f"{prefix}{n:06d}": list(range(s, min(s + size, total))) for n, s in enumerate(range(0, total, size))
    }


def check_params(params: GenParams, profile: Profile) -> None:
    limit = profile.limits.max_new_tokens
    if params.max_new_tokens is not None and params.max_new_tokens > limit:
        raise InputError(
            f"max_new_tokens {params.max_new_tokens} is above the profile's limit of {limit}",
            field="max_new_tokens",
        )


def read_source(
    source: str | os.PathLike[str] | Iterable[Mapping[str, Any]], profile: Profile, *, skip_invalid: bool
) -> ReadResult:
    limits = InputLimits(max_new_tokens=profile.limits.max_new_tokens)
    if isinstance(source, str | os.PathLike):
        return read_items(source, skip_invalid=skip_invalid, limits=limits)
    return items_from_records(source, skip_invalid=skip_invalid, limits=limits)


class Job:
    """A handle on a submitted job."""

    def __init__(self, client: Client, job_id: str, *, resumed: bool = False, enqueued: int = 0) -> None:
        self.client = client
        self.id = job_id
        self.resumed = resumed
        self.enqueued = enqueued

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def status(self) -> JobState:
        self.client.store.expire_if_due(self.id)
        return self.client.store.state(self.id)

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
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.client.store.events(self.id) as events:  # the end wakes us at once
            if progress:
                from producer.progress import watch

                return watch(self.status, poll=poll, timeout=timeout, pause=events.pause)
            while True:
                state = self.status()
                if on_update:
                    on_update(state)
                if state.final:
                    return state
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {self.id} is still {state.status} after {timeout} s")
                events.pause(poll)

    def results(self) -> Iterator[ItemResult]:
        """Finished results in input order, each item once (pending items are left out)."""
        for _index, result in self.client.store.results(self.id):
            if result is not None:
                yield result

    def pairs(self) -> Iterator[tuple[int, ItemResult | None, Item]]:
        """``(index, result or None, item)`` in input order (for writers that need the input)."""
        store = self.client.store
        total = store.spec(self.id).total
        items = store.all_items(self.id, total)
        for (index, result), item in zip(store.results(self.id, total), items, strict=True):
            yield index, result, item

    def cancel(self) -> JobState:
        return self.client.store.request_cancel(self.id)

    def retry(self) -> int:
        """Run errored items again (not cancelled or expired ones).  Returns how many."""
        store = self.client.store
        spec = store.spec(self.id)
        indices = [
            i
            for i, r in store.results(self.id)
            if r is not None and not r.ok and r.error_type not in ("cancelled", "expired")
        ]
        if not indices:
            return 0
        store.forget(self.id, indices)
        round_no = int(time.time())
        chunks = make_chunks(len(indices), spec.chunk_size, prefix=f"r{round_no}-")
        chunks = {cid: [indices[i] for i in local] for cid, local in chunks.items()}
        store.add_chunks(self.id, chunks)
        self.client.publish(spec, chunks)
        return len(indices)


class Client:
    """Submit and follow jobs.  ``url`` defaults to ``GENQ_BROKER_URL``."""

    def __init__(self, url: str | None = None, *, settings: Settings | None = None) -> None:
        base = settings or get_settings()
        if url:
            base = base.model_copy(update={"broker_url": SecretStr(url)})
        self.settings = base
        if not self.settings.broker:
            raise ConfigError(
                "no broker: pass a Redis URL or set GENQ_BROKER_URL (or use `genq run`, embedded)"
            )
        self.store = RedisStore(settings=self.settings)
        self._app: Any = None

    @property
    def app(self) -> Any:
        if self._app is None:
            from worker.app import make_app

            self._app = make_app(self.settings)
        return self._app

    def publish(self, spec: JobSpec, chunks: dict[str, list[int]]) -> int:
        from worker.app import publish_chunks

        return publish_chunks(spec, chunks, self.app)

    def submit(
        self,
        source: str | os.PathLike[str] | Iterable[Mapping[str, Any]],
        *,
        profile: str,
        job_id: str | None = None,
        mode: QueueMode | str = QueueMode.ANY,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        params: GenParams | None = None,
        system_prompt: str | None = None,
        expires_in: float | None = None,
        skip_invalid: bool = False,
    ) -> Job:
        """Validate everything, store the job, enqueue its chunks.  Nothing is enqueued when the
        input has an error (unless ``skip_invalid``).  The same ``job_id`` again resumes."""
        prof = load_profile(profile, self.settings)
        if mode not in tuple(QueueMode):
            raise InputError(f"unknown mode {mode!r}: choose any, nf4 or fp32", field="mode")
        if chunk_size < 1:
            raise InputError("chunk size must be at least 1", field="chunk_size")
        if expires_in is not None and not (math.isfinite(expires_in) and expires_in > 0):
            raise InputError(
                f"--expires-in must be a positive number of seconds, got {expires_in}", field="expires_in"
            )
        params = params or GenParams()
        check_params(params, prof)
        read = read_source(source, prof, skip_invalid=skip_invalid)
        items = read.items
        spec = JobSpec(
            job_id=job_id or new_job_id(),
            profile=prof.name,
            mode=QueueMode(mode),
            chunk_size=chunk_size,
            total=len(items),
            defaults=params,
            system_prompt=system_prompt,
            expires_at=(time.time() + expires_in) if expires_in is not None else None,
            input_digest=input_digest(items, prof.name, params, system_prompt),
            source=str(source) if isinstance(source, str | os.PathLike) else None,
        )
        chunks = make_chunks(len(items), chunk_size)
        if self.store.create_job(spec, items, chunks):
            self._record_invalid(spec, items)
            todo = {cid: idx for cid, idx in chunks.items() if not all(items[i].invalid for i in idx)}
            return Job(self, spec.job_id, enqueued=self.publish(spec, todo))
        return Job(self, spec.job_id, resumed=True, enqueued=self._resume(spec.job_id))

    def _record_invalid(self, spec: JobSpec, items: list[Item]) -> None:
        from worker.core.schema import error_result

        bad = [error_result(it, it.invalid, profile=spec.profile, attempts=0) for it in items if it.invalid]
        for start in range(0, len(bad), 1000):
            self.store.record(spec.job_id, bad[start : start + 1000])

    def _resume(self, job_id: str) -> int:
        """Re-enqueue the chunks that still have pending items and whose message is gone."""
        from worker.app import queue_name
        from worker.core.schema import task_id

        state = self.store.state(job_id)
        if state.final:
            return 0
        spec = state.spec
        live = self.store.message_ids([queue_name(spec.profile, spec.mode)])
        todo: dict[str, list[int]] = {}
        for cid, chunk in self.store.chunks(job_id).items():
            if chunk.get("split") or task_id(job_id, cid) in live:
                continue
            pending = self.store.pending_indices(job_id, chunk["indices"])
            if pending:
                todo[cid] = pending
        return self.publish(spec, todo) if todo else 0

    def job(self, job_id: str) -> Job:
        self.store.spec(job_id)  # raises JobNotFound
        return Job(self, job_id)

    def jobs(self, limit: int = 20) -> list[JobState]:
        return self.store.list_jobs(limit)

    def workers(self) -> list[dict[str, Any]]:
        return self.store.workers()


def default_output(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p.with_name(p.stem + ".results.jsonl")
