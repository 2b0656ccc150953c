"""Queue names: ``genq.<profile>.<mode>`` with mode ``nf4``, ``fp32`` or ``any`` for normal
priority, and the same with ``.high`` or ``.low`` after it for the other levels.  A worker
consumes, strictly in this order (kombu's ``queue_order_strategy="priority"``): its own mode's
high queue, ``any``'s high queue, its mode's and ``any``'s normal queues, then the low ones.  A job
goes to ``any`` unless it asks for a mode.  (Names only: nothing here imports Celery.)"""

from __future__ import annotations

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


def task_id(ref: ChunkRef) -> str:
    """Deterministic Celery task id: publishing the same chunk again cannot create a second task
    identity, and a message names its job (``<job>:<chunk>``) and its incarnation (``@<inc>``): a
    message of a deleted job never passes for one of the same id submitted again."""
    return chunk_task_id(ref.job_id, ref.chunk_id, ref.inc)


def chunk_task_id(job_id: str, chunk_id: str, inc: str = "") -> str:
    """:func:`task_id` from its parts."""
    return f"{job_id}:{chunk_id}" + (f"@{inc}" if inc else "")
