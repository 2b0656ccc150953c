"""Inputs and results of a job: read pages of inputs, write results (first write wins), read them
back in input order, and forget errors for a retry."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

from worker.core.counting import count_field, retryable
from worker.core.errors import JobNotFound, JobRefused
from worker.core.lifecycle import Event
from worker.core.observe import observer
from worker.core.schema import Item, ItemResult
from worker.store.base import StoreBase
from worker.store.connection import guarded_iter
from worker.store.keys import PAGE, job_key, job_keys


class ResultStore(StoreBase):
    def items(self, job_id: str, indices: Sequence[int]) -> list[Item]:
        raw = self._call(self.r.hmget, job_key(job_id, "inputs"), [str(i) for i in indices])
        missing = [i for i, r in zip(indices, raw, strict=True) if r is None]
        if missing:
            raise JobNotFound(f"job {job_id}: inputs {missing[:5]} are missing (expired or deleted)")
        return [Item.model_validate_json(r) for r in raw]

    def all_items(self, job_id: str, total: int) -> Iterator[Item]:
        for start in range(0, total, PAGE):
            yield from self.items(job_id, range(start, min(start + PAGE, total)))

    def done(self, job_id: str, indices: Sequence[int]) -> set[int]:
        """Which of ``indices`` already have a result."""
        pipe = self.r.pipeline(transaction=False)
        for i in indices:
            pipe.hexists(job_key(job_id, "results"), str(i))
        flags = self._call(pipe.execute)
        return {i for i, f in zip(indices, flags, strict=True) if f}

    def pending_indices(self, job_id: str, indices: Sequence[int]) -> list[int]:
        done = self.done(job_id, indices)
        return [i for i in indices if i not in done]

    def record(
        self, job_id: str, results: Sequence[ItemResult], worker: str | None = None, *, inc: str = ""
    ) -> int:
        """Write results, first write wins; returns how many were new (0 once the job has been
        cancelled or has expired: what was not done by then stays counted as such).  Raises
        :class:`JobNotFound` when the job is gone or is another incarnation than ``inc``."""
        return len(self.record_indices(job_id, results, worker, inc=inc))

    def record_indices(
        self, job_id: str, results: Sequence[ItemResult], worker: str | None = None, *, inc: str = ""
    ) -> list[int]:
        """:meth:`record`, returning the indices whose results were new (the rest were dropped:
        another write of the same item came first)."""
        if not results:
            return []
        argv: list[Any] = [time.time(), self.settings.result_ttl, worker or "", len(results)]
        for r in results:
            argv += [
                r.index,
                r.model_dump_json(exclude_none=True),
                count_field(r),
                r.usage.prompt_tokens,
                r.usage.completion_tokens,
            ]
        keys = [job_key(job_id), job_key(job_id, "results"), job_key(job_id, "workers"), *job_keys(job_id)]
        try:
            written = self._step(Event.RECORD, job_id, inc, "record", keys, argv)
        except JobRefused:  # cancelled or expired: its counts never move again
            written = []
        new = [int(i) for i in written]
        observer().recorded(job_id, results, new)  # metrics count first writes only
        return new

    def results(self, job_id: str, total: int) -> Iterator[tuple[int, ItemResult | None]]:
        """``(index, result or None)`` for every item, in input order, a page at a time."""
        for start in range(0, total, PAGE):
            idx = list(range(start, min(start + PAGE, total)))
            raw = self._call(self.r.hmget, job_key(job_id, "results"), [str(i) for i in idx])
            for i, r in zip(idx, raw, strict=True):
                yield i, (ItemResult.model_validate_json(r) if r is not None else None)

    def retryable(self, job_id: str, *, all_errors: bool = False) -> Iterator[tuple[int, str, ItemResult]]:
        """``(index, stored json, result)`` of each error ``genq retry`` would run again."""
        scan = self.r.hscan_iter(job_key(job_id, "results"), count=PAGE)
        for key, raw in guarded_iter(self.url_display, scan):
            result = ItemResult.model_validate_json(raw)
            if retryable(result, all_errors=all_errors):
                yield int(key), raw, result

    def forget(self, job_id: str, entries: Sequence[tuple[int, str, ItemResult]], *, inc: str = "") -> int:
        """Drop the error results of ``entries`` (from :meth:`retryable`) and reopen the job;
        refused (:class:`JobRefused`) when the state table allows no retry (a cancelled or
        expired job, one still submitting)."""
        keys = [job_key(job_id), job_key(job_id, "results"), *job_keys(job_id)]
        removed = 0
        for start in range(0, max(len(entries), 1), PAGE):
            argv: list[Any] = []
            for index, raw, result in entries[start : start + PAGE]:
                argv += [index, raw, count_field(result)]
            removed += int(self._step(Event.RETRY, job_id, inc, "unrecord", keys, argv))
        return removed
