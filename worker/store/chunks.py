"""Chunks of a job: which items a chunk holds, claims before publishing, deliveries and who runs
what.  Plain chunks are ranges of the input and have no record; split children and retry rounds
are stored in ``job:<id>:chunks``."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Sequence

from worker.chunks import chunk_number, chunk_range
from worker.core.errors import JobNotFound
from worker.core.lifecycle import Event
from worker.store.keys import job_key
from worker.store.results import ResultStore


class ChunkRecords(ResultStore):
    def chunk_indices(self, job_id: str, cid: str, *, total: int, size: int) -> list[int]:
        """The item indices of chunk ``cid`` (a range for plain chunks, else its record)."""
        n = chunk_number(cid)
        if n is not None:
            return list(chunk_range(n, total, size))
        raw = self._call(self.r.hget, job_key(job_id, "chunks"), cid)
        if raw is None:
            raise JobNotFound(f"job {job_id} has no chunk {cid!r}")
        return list(json.loads(raw))

    def stored_chunks(self, job_id: str) -> Iterator[tuple[str, list[int]]]:
        """Split children and retry rounds: ``(chunk id, indices)`` (split parents hold none)."""
        raw = self._call(self.r.hgetall, job_key(job_id, "chunks"))
        for cid, value in raw.items():
            yield cid, list(json.loads(value))

    def add_chunks(
        self,
        job_id: str,
        chunks: dict[str, list[int]],
        *,
        split_parent: str | None = None,
        inc: str = "",
        event: Event = Event.PUBLISH,
    ) -> dict[str, list[int]]:
        """Record new chunks; returns those this call created (a chunk held by two live workers
        is split by both: only the first split publishes its children).  Refused when the job
        may not publish (ending, ended, gone, or another incarnation); ``event``: the state
        table's event this is (a backup, a time box's hand-on, else publishing)."""
        keys = [job_key(job_id), job_key(job_id, "chunks")]
        args: list[str] = [split_parent or ""]
        for cid, idx in chunks.items():
            args += [cid, json.dumps(idx)]
        made = set(self._step(event, job_id, inc, "chunks", keys, args))
        return {cid: idx for cid, idx in chunks.items() if cid in made}

    def claim(self, job_id: str, numbers: Sequence[int], *, inc: str = "") -> list[int]:
        """Claim plain chunks for publishing; returns the numbers this call won (refused when
        the job may not publish)."""
        if not numbers:
            return []
        keys = [job_key(job_id), job_key(job_id, "claims")]
        won = self._step(Event.PUBLISH, job_id, inc, "claim", keys, list(numbers))
        return [int(n) for n in won]

    def claimed(self, job_id: str, numbers: Sequence[int]) -> list[bool]:
        """Whether each of the plain chunks ``numbers`` is claimed for publishing yet."""
        pipe = self.r.pipeline(transaction=False)
        for n in numbers:
            pipe.getbit(job_key(job_id, "claims"), n)
        return [bool(b) for b in self._call(pipe.execute)]

    def start_attempt(self, job_id: str, cid: str, worker: str, *, inc: str = "") -> int:
        """Count a delivery of ``cid`` and note that ``worker`` runs it; returns the attempt
        number.  Refused (JobNotFound: gone or another incarnation; JobRefused: ending or ended)
        in the same step that would count it."""
        now = time.time()
        keys = [job_key(job_id), job_key(job_id, "attempts"), job_key(job_id, "running")]
        return int(self._step(Event.DELIVER, job_id, inc, "start", keys, [cid, f"{worker}|{now}", now]))

    def undo_attempt(self, job_id: str, cid: str, *, inc: str = "") -> None:
        """A chunk handed back on shutdown did not fail: do not count that delivery (nothing when
        the job is gone or another incarnation)."""
        self._release(job_id, cid, inc, "handback")

    def _release(self, job_id: str, cid: str, inc: str, what: str) -> None:
        keys = [job_key(job_id), job_key(job_id, "attempts"), job_key(job_id, "running")]
        with contextlib.suppress(JobNotFound):
            self._step(Event.CHUNK_DONE, job_id, inc, "release", keys, [cid, what])

    def attempts(self, job_id: str) -> dict[str, int]:
        raw = self._call(self.r.hgetall, job_key(job_id, "attempts"))
        return {cid: int(n) for cid, n in raw.items()}

    def clear_running(self, job_id: str, cid: str, *, inc: str = "") -> None:
        """The delivery of ``cid`` ended (nothing when the job is gone or another incarnation)."""
        self._release(job_id, cid, inc, "running")

    def running(self, job_id: str) -> dict[str, tuple[str, float]]:
        out: dict[str, tuple[str, float]] = {}
        for cid, value in self._call(self.r.hgetall, job_key(job_id, "running")).items():
            worker, _, since = value.rpartition("|")
            out[cid] = (worker, float(since or 0))
        return out
