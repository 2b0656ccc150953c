"""Chunk leases: a live worker keeps its chunk however long it runs, a dead worker's chunk is
back on its queue within about ``GENQ_LEASE_SECONDS`` + one heartbeat, whatever the chunk length.

The lease is kombu's own record of the delivery: its time in kombu's unacked index
(:mod:`worker.queue.messages`).  While a chunk runs, a thread of the worker process
(:class:`LeaseKeeper`) moves that time to now every third of the lease (``lua/renew.lua``, which
renews the job's ``running`` entry with it).  On each heartbeat every worker sweeps
(:func:`sweep_lapsed`): a genq message whose delivery time is older than the lease belongs to a
worker that died or lost Redis, and is put back on its queue with kombu's own restore code (the
same envelope, marked redelivered, at the head of its queue), in a transaction that watches the
index, so a renewal that lands meanwhile wins.  kombu's own sweep, after
``GENQ_VISIBILITY_TIMEOUT``, stays as the backstop.

Putting a chunk back does not stop its first worker if it lives (cut off from Redis for longer than
the lease): it finishes the chunk, and first write wins keeps every result once.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis

from worker.core.logs import get_logger
from worker.queue.messages import UNACKED, UNACKED_INDEX
from worker.queue.routing import TASK_NAME
from worker.runtime import Runtime

SWEEP_PAGE = 100
"""Lapsed messages put back per sweep (the next heartbeat takes the rest)."""


@dataclass
class _Held:
    tag: str
    job_id: str
    chunk_id: str
    lost: bool = False


class LeaseKeeper:
    """Renews the leases of the chunks this process runs, from a thread of its own."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._held: dict[str, _Held] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def interval(self) -> float:
        return self.runtime.settings.lease / 3

    @contextlib.contextmanager
    def hold(self, tag: str | None, job_id: str, chunk_id: str) -> Iterator[None]:
        """Renew delivery ``tag``'s lease while the block runs (no tag: a message kombu did not
        deliver, nothing to renew)."""
        if not tag or self.runtime.settings.fault_no_lease_renewal:
            yield
            return
        with self._lock:
            self._held[tag] = _Held(tag, job_id, chunk_id)
        self._start()
        try:
            yield
        finally:
            with self._lock:
                self._held.pop(tag, None)

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="genq-leases", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        # not the worker's stop event: a stopping worker finishes its micro-batch and hands the
        # chunk back, and its lease must hold until then
        while True:
            time.sleep(self.interval)
            self.renew()

    def renew(self) -> None:
        """Renew every held lease once; a lease found lapsed is logged once (the chunk went back
        to its queue: this worker goes on, and first write wins keeps results once)."""
        with self._lock:
            held = list(self._held.values())
        runtime = self.runtime
        for h in held:
            try:
                ok = runtime.store.renew_lease(UNACKED_INDEX, h.tag, h.job_id, h.chunk_id, runtime.name)
            except Exception as exc:  # Redis away (or full): the lease lapses unless it is back in time
                runtime.store_failed("lease_renewal_failed", exc, job=h.job_id, chunk=h.chunk_id)
                continue
            if not ok and not h.lost:
                h.lost = True
                runtime.log.warning("lease_lost", job=h.job_id, chunk=h.chunk_id)


_keeper: LeaseKeeper | None = None


def keeper(runtime: Runtime) -> LeaseKeeper:
    """The process's lease keeper."""
    global _keeper
    if _keeper is None or _keeper.runtime is not runtime:
        _keeper = LeaseKeeper(runtime)
    return _keeper


def _is_chunk(raw: str) -> bool:
    try:
        return bool(json.loads(raw)[0]["headers"]["task"] == TASK_NAME)
    except (ValueError, KeyError, IndexError, TypeError):
        return False


def sweep_lapsed(channel: Any, client: redis.Redis, lease: float, now: float | None = None) -> list[str]:
    """Put back on their queues the chunk messages whose lease lapsed more than ``lease`` seconds
    ago; returns the task ids put back.  ``channel``: a kombu Redis channel (its restore code),
    ``client``: a client of the broker's Redis."""
    ceil = (time.time() if now is None else now) - lease
    tags = client.zrangebyscore(UNACKED_INDEX, "-inf", ceil, start=0, num=SWEEP_PAGE)
    restored: list[str] = []
    for raw_tag in tags:
        tag = raw_tag.decode() if isinstance(raw_tag, bytes) else str(raw_tag)
        task_id: str | None = None

        def restore(pipe: Any, tag: str = tag) -> None:
            nonlocal task_id
            task_id = None
            score = pipe.zscore(UNACKED_INDEX, tag)
            payload = pipe.hget(UNACKED, tag)
            pipe.multi()
            if score is None or float(score) > ceil or payload is None:
                return  # renewed, acknowledged or put back meanwhile
            text = payload.decode() if isinstance(payload, bytes) else str(payload)
            if not _is_chunk(text):
                return  # not genq's: kombu's own sweep (the visibility timeout) decides
            message, exchange, routing_key = json.loads(text)
            task_id = str(message["headers"].get("id"))
            pipe.zrem(UNACKED_INDEX, tag)
            pipe.hdel(UNACKED, tag)
            channel._do_restore_message(message, exchange, routing_key, pipe, False)

        client.transaction(restore, UNACKED, UNACKED_INDEX)
        if task_id is not None:
            restored.append(task_id)
    return restored


def sweep_hook(runtime: Runtime) -> None:
    """The heartbeat's lease sweep: cheap (one ZRANGEBYSCORE) when nothing lapsed."""
    from worker.queue.app import get_app

    lease = runtime.settings.lease
    r = runtime.store.r
    if not r.zcount(UNACKED_INDEX, "-inf", time.time() - lease):
        return
    with get_app().connection_for_write() as conn:
        channel = conn.default_channel
        for task_id in sweep_lapsed(channel, channel.client, lease):
            job, _, chunk = task_id.rpartition(":")
            log = get_logger(job=job, chunk=chunk, worker=runtime.name)
            log.warning("lease_lapsed_chunk_requeued", lease=lease)
