"""The store's side of `genq collect --follow`: results leave Redis once a collector has them on
disk.

* :meth:`DrainStore.undrained` pages out results not drained yet (an HSCAN of the results hash:
  while a collector follows the job, that hash holds only the work in flight and kept errors).
* :meth:`DrainStore.confirm_drained` (``lua/drain.lua``) is called after the collector's fsync:
  it sets each item's ``drained`` bit and deletes its result, unless the result changed since
  it was read, and a block of inputs (:mod:`worker.store.blocks`) once all of its items are
  drained.  An error moves to ``drained_errors`` and its input to ``kept_inputs``, for
  `genq retry` (out of the results hash, so that a follower's scans stay the size of the work
  in flight however many items errored).
* The ``drained`` bitmap is what keeps drained items done: the worker's pending check and
  ``record.lua`` read it, so a late second delivery never writes an item twice.
* One collector per job: :meth:`DrainStore.take_follow_lease` (``lua/follow_lease.lua``), a key
  with a short TTL that the collector renews while it lives.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from worker.core.lifecycle import Event
from worker.store import blocks
from worker.store.base import LUA
from worker.store.keys import DRAIN, FOLLOWER, PAGE, job_key
from worker.store.results import ResultStore

_SOURCES = {"follow_lease": (LUA / "follow_lease.lua").read_text(encoding="utf-8")}
"""Unguarded: the follow lease is a key of its own, not the job's state (see the state table)."""


def result_digest(raw: str) -> str:
    """What ``drain.lua`` compares a stored result with (``redis.sha1hex`` of its bytes)."""
    return hashlib.sha1(raw.encode("utf-8"), usedforsecurity=False).hexdigest()


class DrainStore(ResultStore):
    def _drain_script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        scripts = self.__dict__.setdefault("_drain_scripts", {})
        if name not in scripts:
            scripts[name] = self.r.register_script(_SOURCES[name])
        return self._call(scripts[name], keys=keys, args=args)

    def undrained(self, job_id: str, limit: int) -> list[tuple[int, str]]:
        """Up to about ``limit`` ``(index, result json)`` in Redis whose item is not drained yet,
        in no particular order."""
        key = job_key(job_id, "results")
        found: list[tuple[int, str]] = []
        cursor = 0
        while True:
            cursor, page = self._call(self.r.hscan, key, cursor, count=PAGE)
            entries = [(int(k), v) for k, v in page.items()]
            gone = self.drained(job_id, [i for i, _ in entries])
            found += [(i, v) for i, v in entries if i not in gone]
            if not cursor or len(found) >= limit:
                break
        # an HSCAN may return an entry twice: keep one
        return list(dict(found).items())

    def confirm_drained(self, job_id: str, rows: Sequence[tuple[int, str, bool]], *, inc: str = "") -> int:
        """``rows`` of ``(index, result digest, keep)`` are durably in the collector's output:
        mark them drained and delete those not kept; a block of inputs whose items are all
        drained leaves Redis, a kept error's input moves to ``kept_inputs`` first.  Returns how
        many were marked (a result replaced since it was read is not).  A guarded step of the
        state table: :class:`JobNotFound` when the job is gone or not incarnation ``inc`` ('': any)."""
        keys = [job_key(job_id, part) for part in ("", "results", "inputs", *DRAIN)]
        marked = 0
        for start in range(0, len(rows), PAGE):
            page = rows[start : start + PAGE]
            # an error's input, read before its block may go (it is only ever written at submit)
            inputs = self.stored_inputs(job_id, [index for index, _, keep in page if keep])
            argv: list[Any] = [blocks.BLOCK]
            for index, digest, keep in page:
                argv += [index, digest, 1 if keep else 0, inputs.get(index, "") if keep else ""]
            marked += int(self._step(Event.DRAIN, job_id, inc, "drain", keys, argv))
        return marked

    def stored_results(self, job_id: str, indices: Sequence[int]) -> list[str | None]:
        """The stored result json of each of ``indices`` (None: none in Redis)."""
        if not indices:
            return []
        return list(self._call(self.r.hmget, job_key(job_id, "results"), [str(i) for i in indices]))

    def drained_bitmap(self, job_id: str) -> bytes:
        """The ``drained`` bitmap (bit *n*, most significant first in each byte, is item *n*)."""
        raw = self._call(
            self.r.execute_command, "GETRANGE", job_key(job_id, "drained"), 0, -1, NEVER_DECODE=True
        )
        return bytes(raw or b"")

    def drained_total(self, job_id: str) -> int:
        return int(self._call(self.r.bitcount, job_key(job_id, "drained")))

    def follow_lease(
        self, job_id: str, op: str, holder: str, ttl_ms: int = 0, replace: str = ""
    ) -> str | None:
        """``op`` ``take``, ``renew`` or ``release`` the job's follow lease for ``holder``;
        returns None when done, else the holder that has it."""
        reply = self._drain_script("follow_lease", [job_key(job_id, FOLLOWER)], [op, holder, ttl_ms, replace])
        return None if reply == 1 else str(reply)
