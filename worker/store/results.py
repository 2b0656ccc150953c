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
from worker.store import blocks
from worker.store.base import StoreBase
from worker.store.connection import guarded_iter
from worker.store.keys import PAGE, job_key, job_keys


class ResultStore(StoreBase):
    def items(self, job_id: str, indices: Sequence[int]) -> list[Item]:
        """The items of ``indices``; one drained meanwhile (done by another delivery and already
        in a collector's output, its input gone) is left out: there is nothing left to do for it."""
        stored = self.stored_inputs(job_id, indices)
        missing = [i for i in indices if i not in stored]
        if missing:
            gone = self.drained(job_id, missing)
            missing = [i for i in missing if i not in gone]
        if missing:
            raise JobNotFound(f"job {job_id}: inputs {missing[:5]} are missing (expired or deleted)")
        return [Item.model_validate_json(stored[i]) for i in indices if i in stored]

    def stored_inputs(self, job_id: str, indices: Sequence[int]) -> dict[int, str]:
        """The stored Item JSON of each of ``indices`` that Redis still holds: from its block
        (:mod:`worker.store.blocks`), else, for an error drained to a collector's output whose
        block is gone, from ``kept_inputs``, else from a field of its own (a job an older genq
        stored, one field per item: new workers still serve it)."""
        wanted = set(indices)
        if not wanted:
            return {}
        numbers = blocks.blocks_of(wanted)
        values = self._call(
            self.r.execute_command,
            "HMGET",
            job_key(job_id, "inputs"),
            *[blocks.field(b) for b in numbers],
            NEVER_DECODE=True,
        )
        found: dict[int, str] = {}
        for number, value in zip(numbers, values, strict=True):
            if value is not None:
                found.update((i, raw) for i, raw in blocks.unpack(number, value) if i in wanted)
        rest = [i for i in wanted if i not in found]
        if rest:
            pipe = self.r.pipeline(transaction=False)
            for part in ("kept_inputs", "inputs"):
                pipe.hmget(job_key(job_id, part), [str(i) for i in rest])
            kept, older = self._call(pipe.execute)
            for i, raw, old in zip(rest, kept, older, strict=True):
                if raw is not None or old is not None:
                    found[i] = raw if raw is not None else old
        return found

    def all_items(self, job_id: str, total: int) -> Iterator[Item]:
        for start in range(0, total, PAGE):
            yield from self.items(job_id, range(start, min(start + PAGE, total)))

    def done(self, job_id: str, indices: Sequence[int]) -> set[int]:
        """Which of ``indices`` already have a result (in Redis, or drained to an output), in one
        round trip."""
        pipe = self.r.pipeline(transaction=False)
        for i in indices:
            pipe.hexists(job_key(job_id, "results"), str(i))
        for args in _bit_reads(indices):
            pipe.execute_command("BITFIELD_RO", job_key(job_id, "drained"), *args)
        replies = self._call(pipe.execute)
        bits = [bit for page in replies[len(indices) :] for bit in page]
        return {i for i, f, bit in zip(indices, replies, bits, strict=False) if f or bit}

    def drained(self, job_id: str, indices: Sequence[int]) -> set[int]:
        """Which of ``indices`` a `genq collect --follow` has durably written (``drained`` bits)."""
        found: set[int] = set()
        for start, args in zip(range(0, len(indices), PAGE), _bit_reads(indices), strict=True):
            bits = self._call(self.r.execute_command, "BITFIELD_RO", job_key(job_id, "drained"), *args)
            found.update(i for i, bit in zip(indices[start : start + PAGE], bits, strict=True) if bit)
        return found

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
        """``(index, stored json, result)`` of each error ``genq retry`` would run again (those
        drained to a collector's output included)."""
        for part in ("results", "drained_errors"):
            scan = self.r.hscan_iter(job_key(job_id, part), count=PAGE)
            for key, raw in guarded_iter(self.url_display, scan):
                result = ItemResult.model_validate_json(raw)
                if retryable(result, all_errors=all_errors):
                    yield int(key), raw, result

    def forget(self, job_id: str, entries: Sequence[tuple[int, str, ItemResult]], *, inc: str = "") -> int:
        """Drop the error results of ``entries`` (from :meth:`retryable`) and reopen the job;
        refused (:class:`JobRefused`) when the state table allows no retry (a cancelled or
        expired job, one still submitting).  An error already drained to a collector's output
        loses its ``drained`` bit too, so its new result is recorded and drained in its turn
        (before any chunk of it is published)."""
        removed = 0
        for start in range(0, max(len(entries), 1), PAGE):
            argv: list[Any] = []
            for index, raw, result in entries[start : start + PAGE]:
                argv += [index, raw, count_field(result)]
            # an entry is in one of the two hashes: unrecord leaves it alone in the other
            for part in ("results", "drained_errors"):
                keys = [job_key(job_id), job_key(job_id, part), *job_keys(job_id)]
                removed += int(self._step(Event.RETRY, job_id, inc, "unrecord", keys, argv))
            gone = self.drained(job_id, [index for index, _, _ in entries[start : start + PAGE]])
            if gone:
                pipe = self.r.pipeline(transaction=False)
                for index in gone:
                    pipe.setbit(job_key(job_id, "drained"), index, 0)
                self._call(pipe.execute)
        return removed


def _bit_reads(indices: Sequence[int]) -> Iterator[list[Any]]:
    """``BITFIELD_RO`` arguments reading the bit of each index, a page at a time."""
    for start in range(0, len(indices), PAGE):
        args: list[Any] = []
        for i in indices[start : start + PAGE]:
            args += ["GET", "u1", i]
        yield args
