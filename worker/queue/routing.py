"""Queue names: ``genq.<profile>.<mode>`` with mode ``nf4``, ``fp32`` or ``any`` for normal
priority, and the same with ``.high`` or ``.low`` after it for the other levels.  A worker
consumes, strictly in this order (kombu's ``queue_order_strategy="priority"``): its own mode's
high queue, ``any``'s high queue, its mode's and ``any``'s normal queues, then the low ones.  A job
goes to ``any`` unless it asks for a mode.  (Names only: nothing here imports Celery.)

Within a level a worker would always take its own mode's queue first, so the dispatcher never
fills ``any`` queues: a mode's queue is topped up from its own jobs and, taking turns job by job,
from the ``any`` jobs of its level (:func:`dispatch_targets`), and a job pinned to a mode and an
``any`` job share a worker round robin.  An ``any`` queue only receives messages kombu restores
there (a dead worker's, addressed to it), or from the dispatch of a worker that consumes it
without its mode's queue (``-Q``).  What an ``any`` job already has on the queue of a mode whose
last worker is gone, a worker of another mode gives back at its heartbeat (:func:`rescue_targets`)."""

from __future__ import annotations

from collections.abc import Sequence

from worker.core.schema import ChunkRef
from worker.core.states import Mode, Priority, QueueMode

TASK_NAME = "genq.run_chunk"


def queue_name(profile: str, mode: QueueMode | Mode, priority: Priority | str = Priority.NORMAL) -> str:
    """The broker queue of a job of ``profile``, ``mode`` and ``priority`` (normal keeps the name
    queues had before priorities existed)."""
    level = Priority(priority)
    suffix = "" if level == Priority.NORMAL else f".{level}"
    return f"genq.{profile}.{QueueMode(mode)}{suffix}"


def worker_queues(profile: str, mode: Mode) -> list[str]:
    """What a worker of ``mode`` consumes, first to last: each priority level, high first, and
    within a level its own mode's queue, then ``any``."""
    return [
        queue_name(profile, m, level)
        for level in (Priority.HIGH, Priority.NORMAL, Priority.LOW)
        for m in (QueueMode(mode), QueueMode.ANY)
    ]


LEVELS = (Priority.HIGH, Priority.NORMAL, Priority.LOW)


def dispatch_targets(profile: str, mode: Mode, consumed: Sequence[str]) -> list[str | tuple[str, str]]:
    """What a worker of ``mode`` consuming ``consumed`` tops up (see :mod:`worker.store.dispatch`):
    at each level, its mode's queue, also from the ``any`` queue's jobs when it consumes that too;
    the ``any`` queue itself only when it consumes that without its mode's queue."""
    targets: list[str | tuple[str, str]] = []
    for level in LEVELS:
        own, anyq = queue_name(profile, mode, level), queue_name(profile, QueueMode.ANY, level)
        if own in consumed:
            targets.append((own, anyq) if anyq in consumed else own)
        elif anyq in consumed:
            targets.append(anyq)
    return targets


def rescue_targets(profile: str, mode: Mode, consumed: Sequence[str]) -> list[tuple[str, str]]:
    """The other modes' queues whose ``any`` messages a worker of ``mode`` consuming ``consumed``
    gives back when no live worker consumes them (:meth:`worker.store.dispatch.Dispatcher.rescue`),
    each with the ``any`` queue of its level: at the levels whose ``any`` queue it consumes."""
    pairs: list[tuple[str, str]] = []
    for level in LEVELS:
        anyq = queue_name(profile, QueueMode.ANY, level)
        if anyq in consumed:
            pairs += [(queue_name(profile, m, level), anyq) for m in Mode if m != mode]
    return pairs


def publish_targets(profile: str, mode: QueueMode, priority: Priority) -> list[str | tuple[str, str]]:
    """Where a publish of a job of ``mode`` and ``priority`` dispatches at once: its own queue, or
    for an ``any`` job the queues of both modes (each takes from the ``any`` jobs only while a
    live worker consumes it)."""
    anyq = queue_name(profile, QueueMode.ANY, priority)
    if mode != QueueMode.ANY:
        return [(queue_name(profile, mode, priority), anyq)]
    return [(queue_name(profile, m, priority), anyq) for m in Mode]


def task_id(ref: ChunkRef) -> str:
    """Deterministic Celery task id: publishing the same chunk again cannot create a second task
    identity, and a message names its job (``<job>:<chunk>``) and its incarnation (``@<inc>``): a
    message of a deleted job never passes for one of the same id submitted again."""
    return chunk_task_id(ref.job_id, ref.chunk_id, ref.inc)


def chunk_task_id(job_id: str, chunk_id: str, inc: str = "") -> str:
    """:func:`task_id` from its parts."""
    return f"{job_id}:{chunk_id}" + (f"@{inc}" if inc else "")
