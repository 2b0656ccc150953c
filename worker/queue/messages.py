"""The one place that reads kombu's Redis layout (a private format): which task messages of a
job wait in a queue or are delivered and not yet acknowledged, and removing a job's messages.

kombu keeps a queue as a Redis list of JSON envelopes (``{"body", "headers": {"id", ...},
"properties"}``) and delivered-but-unacknowledged messages in the hash ``unacked`` as
``[envelope, exchange, routing_key]``.  A Celery message's task id is ``headers.id``; genq's task
ids are ``<job>:<chunk>@<incarnation>`` (:func:`worker.queue.routing.task_id`).  A job's messages not yet
dispatched wait, in the same envelopes, in its backlog list (:mod:`worker.store.dispatch`).
tests/test_queue_layout.py checks this against messages kombu itself wrote, so an upgrade that
changes it fails there first.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import redis

from worker.core.schema import JobSpec
from worker.core.states import QueueMode
from worker.queue.routing import queue_name
from worker.store.keys import backlog_key

if TYPE_CHECKING:
    from worker.store.dispatch import Dispatcher

PAGE = 1000
UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"
"""kombu's sorted set of unacknowledged delivery tags, scored by delivery time (a chunk's lease:
:mod:`worker.queue.leases` renews it)."""


def _text(raw: bytes | str) -> str:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw


def _task_id(raw: str, wrapped: bool) -> str | None:
    try:
        body = json.loads(raw)
        msg = body[0] if wrapped else body
        return str(msg["headers"]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def _queue_messages(r: redis.Redis, queue: str) -> Iterator[tuple[str, str | None]]:
    """``(raw envelope, task id)`` of every message waiting in ``queue``."""
    length = int(r.llen(queue))
    for start in range(0, length, PAGE):
        for raw in r.lrange(queue, start, start + PAGE - 1):
            text = _text(raw)
            yield text, _task_id(text, wrapped=False)


def _backlog_messages(r: redis.Redis, key: str) -> Iterator[str | None]:
    """Task ids in a backlog, read in pages from its right end: the dispatcher takes from the
    left, which does not move negative indices, so no message is skipped (an append on the right
    only makes a page read again what the last one read)."""
    end = -1
    while True:
        page = r.lrange(key, end - PAGE + 1, end)
        if not page:
            return
        for raw in page:
            yield _task_id(_text(raw), wrapped=False)
        if len(page) < PAGE:
            return
        end -= PAGE


def message_ids(r: redis.Redis, queues: Sequence[str], backlogs: Sequence[str] = ()) -> set[str]:
    """Task ids of the messages waiting in ``backlogs`` (a job's undispatched messages) or
    ``queues``, or delivered but not yet acknowledged, so a resumed submit re-enqueues only chunks
    whose message is gone.  Backlogs are read first: a message the dispatcher moves meanwhile is
    then seen on the queue (it only ever moves from a backlog to a queue, then to ``unacked``)."""
    ids = {tid for key in backlogs for tid in _backlog_messages(r, key) if tid is not None}
    ids |= {tid for queue in queues for _, tid in _queue_messages(r, queue) if tid is not None}
    for _, raw in r.hscan_iter(UNACKED, count=PAGE):
        tid = _task_id(_text(raw), wrapped=True)
        if tid is not None:
            ids.add(tid)
    return ids


def remove_waiting(r: redis.Redis, queues: Sequence[str], job_id: str) -> int:
    """Remove the waiting messages of ``job_id`` from ``queues``; returns how many.  Messages a
    worker holds are left to it: it finds the job gone and drops them."""
    prefix = f"{job_id}:"
    removed = 0
    for queue in queues:
        doomed = [raw for raw, tid in _queue_messages(r, queue) if tid is not None and tid.startswith(prefix)]
        if doomed:
            pipe = r.pipeline(transaction=False)
            for raw in doomed:
                pipe.lrem(queue, 1, raw)
            removed += sum(int(n) for n in pipe.execute())
    return removed


def job_queues(spec: JobSpec) -> list[str]:
    """Every broker queue a message of the job may wait on (its priority level, any mode)."""
    return [queue_name(spec.profile, m, spec.priority) for m in QueueMode]


def job_message_ids(r: redis.Redis, spec: JobSpec) -> set[str]:
    """Task ids of the messages that may run the job's chunks: in its backlog, on the queues of its
    level (an ``any`` job's are dispatched to the modes' queues) or unacknowledged (every job's
    ids among them: callers keep their own)."""
    return message_ids(r, job_queues(spec), [backlog_key(spec.job_id)])


def withdraw(store: Dispatcher, spec: JobSpec) -> int:
    """Take a job out of the queues (cancel, expiry, delete): its backlog, its place in the rings
    and its messages waiting on the broker queues; returns how many of those were removed.
    Messages a worker holds are left to it: it finds the job ended or gone and drops them."""
    queues = job_queues(spec)
    store.forget_backlog(spec.job_id, queues, inc=spec.incarnation)
    return remove_waiting(store.r, queues, spec.job_id)
