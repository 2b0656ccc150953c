"""Redis' memory against its ``maxmemory``: what `genq status JOB` and the exporter show, and the
one warning a worker prints while Redis is full.

At ``maxmemory`` (with the ``noeviction`` policy genq needs) Redis refuses every write: a worker
can neither take a chunk (kombu writes its unacked hash), record a result nor heartbeat.  Nothing
is lost (the chunk stays queued, its results are written once memory is freed), but every one of
those refusals used to be a log line.  A worker reports the condition through :func:`full_notice`
instead: at most one line a minute, naming maxmemory, used and max memory and what to do.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import OutOfMemoryError

from worker.core.errors import StoreFull

FULL_FRACTION = 0.95
"""Used memory at or above this fraction of ``maxmemory`` counts as full (Redis refuses a write
that would cross the limit, so a full Redis sits a little under it)."""

NOTICE_INTERVAL = 60.0
"""Seconds between two ``redis_maxmemory`` warnings of one worker."""

ADVICE = (
    "raise maxmemory (redis-cli CONFIG SET maxmemory ..., and in redis.conf), or free space: "
    "`genq collect JOB` then `genq delete JOB`, `genq prune --older-than ...`; workers wait and "
    "go on by themselves once Redis has room"
)


@dataclass(frozen=True)
class RedisMemory:
    used: int
    """``used_memory``, bytes."""
    max: int
    """``maxmemory``, bytes (0: no limit)."""

    @property
    def full(self) -> bool:
        return self.max > 0 and self.used >= FULL_FRACTION * self.max

    @property
    def refusing(self) -> bool:
        """Whether Redis refuses writes now (``used_memory`` above ``maxmemory``)."""
        return self.max > 0 and self.used > self.max

    def describe(self) -> str:
        limit = f"{self.max / 2**20:.1f} MiB" if self.max else "no limit"
        return f"used {self.used / 2**20:.1f} MiB of maxmemory {limit}"


def redis_memory(r: Any) -> RedisMemory:
    """Redis' ``INFO memory`` (a read: Redis answers it when full)."""
    info = r.info("memory")
    return RedisMemory(used=int(info.get("used_memory", 0)), max=int(info.get("maxmemory", 0)))


def wait_for_room(r: Any, stop: Callable[[], bool], poll: float = 1.0) -> None:
    """Until Redis takes writes again (or ``stop()``): handing a chunk back is a write too, and
    one refused leaves the message in kombu's unacked hash until the visibility timeout."""
    while not stop():
        try:
            if not redis_memory(r).refusing:
                return
        except Exception:  # unreachable now: the hand-back fails or not, as for any outage
            return
        time.sleep(poll)


def is_full(exc: BaseException) -> bool:
    """Whether ``exc`` is Redis refusing a write at ``maxmemory`` (as genq's, redis-py's or
    kombu's error: kombu passes redis-py's message on)."""
    return isinstance(exc, StoreFull | OutOfMemoryError) or "maxmemory" in str(exc)


class FullNotice:
    """At most one ``redis_maxmemory`` warning per ``interval`` seconds.  With a prefork pool only
    the process that owns the Celery consumer (:attr:`owner`) speaks: every process of a worker
    meets the same full Redis, and one line a minute per worker is enough."""

    def __init__(self, interval: float = NOTICE_INTERVAL) -> None:
        self.interval = interval
        self.owner: int | None = None
        self._last = -float("inf")

    def report(self, r: Any, shown: str, log: Any, exc: BaseException | None = None) -> bool:
        """Log the warning unless one was logged less than ``interval`` seconds ago (or another
        process of this worker speaks for it); returns whether it was logged."""
        if self.owner is not None and self.owner != os.getpid():
            return False
        now = time.monotonic()
        if now - self._last < self.interval:
            return False
        self._last = now
        try:
            memory: RedisMemory | None = redis_memory(r)
        except Exception:  # the warning must not fail what reports it
            memory = None
        log.warning(
            "redis_maxmemory",
            message=f"Redis at {shown} is at its maxmemory"
            + (f" ({memory.describe()})" if memory else "")
            + f": writes are refused; {ADVICE}",
            used_memory=memory.used if memory else None,
            maxmemory=memory.max if memory else None,
            error=str(exc)[:200] if exc is not None else None,
        )
        return True


_notice = FullNotice()


def full_notice() -> FullNotice:
    """This process's notice (the heartbeat, the chunk task and the Celery consumer share it)."""
    return _notice
